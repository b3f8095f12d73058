"""kNN against a brute-force reference, the linear probe's frozen-backbone guarantees, and the eval command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from shared.config import RunConfig, build_config
from shared.errors import TrainingError
from shared.eval.knn import knn_scores, topk_accuracy
from shared.eval.linear import LinearProbe, linear_probe
from shared.data.synthetic import SyntheticShapes

from conftest import TINY, run_cli


def reference_knn(train_f, train_y, test_f, num_classes, k, t):
    """Loop form of the InstDisc/DINO rule: the k most cosine-similar training samples vote exp(s / T)."""
    out = torch.zeros(len(test_f), num_classes, dtype=torch.float64)
    for i, q in enumerate(test_f):
        sims = [(torch.dot(q, x) / (q.norm() * x.norm())).item() for x in train_f]
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            out[i, int(train_y[j])] += torch.exp(torch.tensor(sims[j] / t, dtype=torch.float64))
    return out


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_f = torch.randn(60, 5, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, 4, (60,), generator=g)
    test_f = torch.randn(13, 5, generator=g, dtype=torch.float64)
    ours = knn_scores(train_f, train_y, test_f, 4, k=7, temperature=0.07, chunk=5)
    assert torch.allclose(ours, reference_knn(train_f, train_y, test_f, 4, 7, 0.07), rtol=1e-9)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 1, 0]), (1, 2)) == pytest.approx([100 / 3, 200 / 3])


def test_probe_keeps_backbone_frozen_in_eval_mode():
    backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    probe = LinearProbe(backbone, 4, 3)
    probe.train()
    assert not backbone.training and probe.fc.training
    assert all(not p.requires_grad for p in backbone.parameters())
    assert probe.fc.bias.abs().sum() == 0 and 0.005 < probe.fc.weight.std() < 0.02
    before = backbone[1].running_mean.clone()
    out = probe((torch.randn(8, 4) * 5 + 3, torch.randint(0, 3, (8,))))
    out["loss"].backward()
    assert torch.equal(backbone[1].running_mean, before) and backbone[0].weight.grad is None


def _cfg(tmp_path, *extra):
    return build_config(RunConfig, [], [*[o for o in TINY if not o.startswith("model.")],
                                        "model.backbone.name=resnet18", f"train.out_dir={tmp_path}",
                                        "eval.linear.epochs=2", "eval.linear.batch_size=32", "eval.knn.batch_size=32",
                                        *extra])


@pytest.mark.parametrize("cached", [True, False])
def test_linear_probe_runs_and_detects_a_changed_backbone(tmp_path, cached):
    cfg = _cfg(tmp_path, f"eval.linear.cache_features={str(cached).lower()}")
    train, val = SyntheticShapes(64, 32, 4), SyntheticShapes(32, 32, 4, split="val")
    train.classes = val.classes = train.classes[:4]
    torch.manual_seed(0)
    from shared.models import build_backbone
    backbone = build_backbone(cfg.model.backbone)
    res = linear_probe(cfg, backbone, train, val, 4, tmp_path / "probe")
    assert set(res) == {"top1", "top5", "best_top1"} and 0 <= res["top1"] <= 100
    assert (tmp_path / "probe" / "last.pt").is_file()

    class Drift(nn.Module):  # a "backbone" whose forward secretly changes its own weights
        def __init__(self):
            super().__init__()
            self.inner, self.out_dim = backbone, backbone.out_dim

        def forward(self, x):
            with torch.no_grad():
                self.inner.conv1.weight.add_(1e-3)
            return self.inner(x)

    with pytest.raises(TrainingError, match="backbone tensor '.*' changed"):
        linear_probe(cfg, Drift(), train, val, 4, tmp_path / "probe2")


@pytest.mark.slow
def test_eval_command_on_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    r = run_cli(["barlow/train.py", "--config", "barlow/configs/demo.yaml", *TINY, f"train.out_dir={run}"])
    assert r.returncode == 0, r.stderr
    r = run_cli(["-m", "shared.eval", str(run / "last.pt"), "--what", "knn,linear", "--compare-random-init",
                 "eval.linear.epochs=1", "eval.linear.cache_features=true"])
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert set(res) == {"pretrained", "random_init"} and set(res["pretrained"]) == {"knn", "linear"}
    assert "backbone" in r.stdout and "knn top-1" in r.stdout
    r = run_cli(["-m", "shared.eval", str(run / "backbone.pt"), "--what", "knn", "--config",
                 "barlow/configs/demo.yaml", *[o for o in TINY if o.startswith(("data.", "eval."))]])
    assert r.returncode == 0, r.stderr
    r = run_cli(["-m", "shared.eval", str(run / "nothing.pt")])
    assert r.returncode == 2 and r.stderr.strip() == f"error: checkpoint not found: {run / 'nothing.pt'}"
    from shared.eval.nuisance import main as nuisance
    capsys.readouterr()
    nuisance([str(run / "last.pt"), "--directions", "2", "data.workers=0"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["backbone"] == "pretrained" and {"x_centre", "y_centre", "size", "class"} <= set(line)
    with pytest.raises(SystemExit):
        nuisance([str(run / "backbone.pt")])
    assert "not a training checkpoint of ours" in capsys.readouterr().err


def test_nuisance_fit_finds_what_the_features_encode():
    from shared.eval.nuisance import r2_from_directions
    g = np.random.default_rng(0)
    pos, cls = g.uniform(0, 1, 500), g.integers(0, 4, 500)
    noise = 0.01 * g.normal(size=(500, 16))
    feats = noise + 5.0                              # a common offset: normalised away, then centred
    feats[:, 0] += 2 * pos                           # the strongest direction encodes the position
    res = r2_from_directions(feats, {"pos": pos, "class": np.eye(4)[cls]}, directions=1)
    assert res["pos"] > 0.99 and res["class"] < 0.05 and res["variance_share"] > 0.9


def test_probe_runs_in_fp32_by_default():
    from shared.eval.linear import probe_config
    cfg = _cfg(Path("/tmp/unused"), "train.amp=bf16")
    assert cfg.eval.linear.amp == "fp32"
    assert probe_config(cfg, Path("/tmp/unused"), True, 1).train.amp == "fp32"


def test_probe_resumes_its_best_and_restarts_for_another_backbone(tmp_path, capsys):
    """Resuming a finished probe keeps the best top-1 of its earlier evaluations; a probe folder left
    by another backbone is not resumed (its classifier would be evaluated on foreign features)."""
    from shared.models import build_backbone
    cfg = _cfg(tmp_path, "eval.linear.cache_features=true", "eval.linear.epochs=3")
    train, val = SyntheticShapes(64, 32, 4), SyntheticShapes(32, 32, 4, split="val")
    train.classes = val.classes = train.classes[:4]
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    first = linear_probe(cfg, backbone, train, val, 4, tmp_path / "probe")
    again = linear_probe(cfg, backbone, train, val, 4, tmp_path / "probe")
    assert again == first
    logged = [json.loads(l) for l in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["top1"] for r in logged if "top1" in r) == first["best_top1"]

    torch.manual_seed(1)
    other = build_backbone(cfg.model.backbone)
    capsys.readouterr()
    linear_probe(cfg, other, train, val, 4, tmp_path / "probe")
    assert "linear probe: " + str(tmp_path / "probe") + " holds a run of another backbone; starting afresh" in capsys.readouterr().out
    records = [json.loads(l) for l in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 3, 5]   # one fresh run, no leftovers
