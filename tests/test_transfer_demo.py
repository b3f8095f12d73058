"""The end-to-end transfer demo (`make transfer-demo`), shrunk to a few images and iterations: every
step runs and results.json holds both backbones. Needs mmseg (the transfer environment); the
detection half runs where detectron2 is installed too."""
from __future__ import annotations

import importlib.util
import json

import torch
import torchvision

from conftest import import_or_skip, run_cli


def test_demo_runs_end_to_end_and_reports_both_inits(tmp_path):
    import_or_skip("mmseg", reason="mmsegmentation is not installed (make transfer-env builds it)")
    torch.manual_seed(0)
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "backbone.pt")
    skip = [] if importlib.util.find_spec("detectron2") else ["--skip", "detection"]
    out = tmp_path / "demo"
    argv = ["-m", "shared.transfer.demo", "--out", str(out), "--checkpoint", str(tmp_path / "backbone.pt"),
            "--length", "16", "--val-length", "8", "--iters", "2", *skip]
    r = run_cli(argv)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"pretrained", "random_init"}
    for init in res:
        assert res[init]["mIoU"] is not None
        if not skip:
            assert "AP50" in res[init]
    assert "mIoU" in r.stdout and "random_init" in r.stdout
    r = run_cli(argv)                                     # a rerun finds every step done
    assert r.returncode == 0 and r.stdout.count("already done") >= 4, r.stdout
