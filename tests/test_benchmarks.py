"""The benchmark scripts run (their figures are recorded in benchmarks/README.md, never asserted)."""
from __future__ import annotations

import json

from conftest import TINY, run_cli


def test_train_throughput_prints_one_json_line():
    tiny = [o for o in TINY if not o.startswith("train.log_every")]
    r = run_cli(["benchmarks/train_throughput.py", "barlow", "--config", "barlow/configs/demo.yaml",
                 "--steps", "3", "--warmup", "1", "--data", "synthetic", *tiny])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps_measured"] == 3 and result["global_batch"] == 16 and result["img_per_s_median"] > 0


def test_train_throughput_feeds_simmim_its_image_and_mask():
    # SimMIM brings its own transform (image + mask): both data modes must go through it
    tiny = ["data.synthetic.length=32", "data.workers=0", "model.backbone.kwargs.depth=1",
            "model.backbone.kwargs.embed_dim=24", "train.batch_size=8"]
    for data in ("tensors", "synthetic"):
        r = run_cli(["benchmarks/train_throughput.py", "simmim", "--config", "simmim/configs/demo.yaml",
                     "--steps", "2", "--warmup", "1", "--data", data, *tiny])
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["steps_measured"] == 2 and result["global_batch"] == 8, result
