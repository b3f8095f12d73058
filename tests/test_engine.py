"""The engine end to end: resume after a kill, bad inputs, the NaN guard, atomic checkpoints,
exports, and a 2-process run that reproduces the 1-process run."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from barlow.train import Config, build
from shared import checkpoint as ckpt
from shared.config import build_config
from shared.data.augment import MultiView
from shared.data.loader import build_image_dataset
from shared.data.synthetic import export
from shared.engine import fit
from shared.errors import TrainingError

from conftest import PY, ROOT, TINY, run_cli, run_distributed

DEMO = str(ROOT / "barlow/configs/demo.yaml")


def losses(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_cfg(tmp_path: Path, *extra: str) -> Config:
    return build_config(Config, [DEMO], TINY + [f"train.out_dir={tmp_path}", *extra])


def test_run_writes_config_checkpoint_and_torchvision_backbone(tmp_path):
    r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, f"train.out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    saved = build_config(Config, [tmp_path / "config.yaml"])
    assert saved == build_config(Config, [DEMO], TINY + [f"train.out_dir={tmp_path}"])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 8 and state["config"]["model"]["projector"] == "64-64-64"
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert torch.equal(sd["layer4.1.bn2.weight"], state["model"]["backbone.layer4.1.bn2.weight"])
    assert sorted(losses(tmp_path)) == list(range(8))
    rates = sorted(json.loads(line)["img_per_s"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert len(rates) == 8 and rates[-1] < 20 * rates[4]   # the last step's rate is timed like the others


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path):
    extra = ["train.epochs=4", "train.ckpt_every_steps=1", "train.batch_size=32", "aug.views.0.size=32",
             "aug.views.1.size=32", "data.synthetic.length=128"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, *extra, f"train.out_dir={full}"])
    assert r.returncode == 0, r.stderr
    total = torch.load(full / "last.pt", weights_only=True)["step"]
    assert total == 16

    proc = subprocess.Popen([PY, "barlow/train.py", "--config", DEMO, *TINY, *extra, f"train.out_dir={killed}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        last = killed / "last.pt"
        if last.is_file() and torch.load(last, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(killed / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < total, "the run must be killed mid-way for this test to mean anything"

    r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, *extra, f"train.out_dir={killed}"])
    assert r.returncode == 0, r.stderr
    assert f"resumed from {killed / 'last.pt'} at step {stopped_at}" in r.stdout
    ref, got = losses(full), losses(killed)
    assert sorted(got) == list(range(total))
    for step, values in got.items():          # records the killed attempt wrote past its checkpoint are purged
        assert len(values) == 1 and values[0] == pytest.approx(ref[step][0], rel=1e-6, abs=1e-6), step
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_missing_data_path_is_one_line(tmp_path):
    r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, f"train.out_dir={tmp_path}", "data.source=folder",
                 f"data.root={tmp_path / 'nowhere'}"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: dataset folder not found: '{tmp_path / 'nowhere' / 'train'}' " \
                                           "(set data.root + data.train_dir to a folder in ImageNet layout)"


def test_corrupt_image_stops_with_its_path_and_keeps_checkpoint(tmp_path):
    data = export(tmp_path / "data", "imagefolder", length=64, val_length=16, image_size=32)
    run = tmp_path / "run"
    args = ["barlow/train.py", "--config", DEMO, *TINY, f"train.out_dir={run}", "data.source=folder",
            f"data.root={data}", "data.workers=1", "train.epochs=1"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    before = sha(run / "last.pt")
    bad = sorted((data / "train").rglob("*.png"))[5]
    bad.write_bytes(b"garbage")
    r = run_cli(args[:-1] + ["train.epochs=2", "train.allow_config_change=true"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read image '{bad}'"), r.stderr
    assert sha(run / "last.pt") == before
    r = run_cli(args[:-1] + ["train.epochs=2", "train.allow_config_change=true", "data.skip_bad_files=true"])
    assert r.returncode == 0, r.stderr
    assert "skipped an unreadable image" in r.stderr


class NaNAt(nn.Module):
    """Wraps a method and makes its loss NaN from step `k` on."""

    def __init__(self, inner: nn.Module, k: int):
        super().__init__()
        self.inner, self.k = inner, k
        self.backbone = inner.backbone

    def forward(self, batch, ctx):
        out = self.inner(batch, ctx)
        if ctx.step >= self.k:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.ckpt_every_steps=2", "train.epochs=3")
    ds = build_image_dataset(cfg.data, "train")
    torch.manual_seed(0)
    model = NaNAt(build(cfg), k=5)
    with pytest.raises(TrainingError) as e:
        fit(cfg, model, ds, MultiView(cfg.aug.views), method="barlow")
    assert str(e.value).startswith(f"loss is nan at step 5 (epoch 1); training stopped. "
                                   f"Last good checkpoint: {tmp_path / 'last.pt'} (intact)")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_atomic_save_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    before = sha(path)

    def crash(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_resume_into_a_different_model_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.epochs=1")
    ds = build_image_dataset(cfg.data, "train")
    fit(cfg, build(cfg), ds, MultiView(cfg.aug.views), method="barlow")
    other = tiny_cfg(tmp_path, "train.epochs=2", "model.projector=32-32", "train.allow_config_change=true")
    from shared.errors import UserError
    with pytest.raises(UserError, match="does not match this model"):
        fit(other, build(other), ds, MultiView(other.aug.views), method="barlow")


def _distributed_fit(rank, world, out_dir):
    cfg = build_config(Config, [DEMO], TINY + [f"train.out_dir={out_dir}", "model.gradient=exact", "optim.name=sgd",
                                               "optim.lr=0.01", "train.epochs=1"])
    ds = build_image_dataset(cfg.data, "train")
    torch.manual_seed(0)
    model = build(cfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = fit(cfg, model, ds, MultiView(cfg.aug.views), method="barlow")
    return init, {k: v.detach().clone() for k, v in res.model.state_dict().items()}


@pytest.mark.dist
def test_two_process_training_reproduces_one_process(tmp_path):
    """Same global batches, same views, synchronised BN, exact gradients: 4 SGD steps on 2 processes
    follow the 1-process run up to float32 rounding (checked relative to the size of each update)."""
    init, one = _distributed_fit(0, 1, tmp_path / "one")
    (init2, two), (_, two_b) = run_distributed(_distributed_fit, 2, tmp_path, str(tmp_path / "two"))
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == sorted(ref) == [0, 1, 2, 3]
    for s in ref:
        assert got[s][0] == pytest.approx(ref[s][0], rel=1e-5)
    for k, v in one.items():
        if not v.is_floating_point() or "running" in k:
            continue
        assert torch.equal(init[k], init2[k]) and torch.equal(two[k], two_b[k]), k
        update = (v - init[k]).abs().max()
        assert (two[k] - v).abs().max() <= 1e-2 * update + 1e-7, k


@pytest.mark.slow
def test_channels_last_and_compile_follow_the_eager_run(tmp_path):
    """train.channels_last and train.compile change kernels, not the computation: on the CPU the
    losses follow the plain run, and the compiled run's checkpoint and backbone keep plain key names."""
    runs = {}
    for name, extra in [("eager", []), ("channels_last", ["train.channels_last=true"]),
                        ("compiled", ["train.compile=true"])]:
        out = tmp_path / name
        r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, *extra, "train.epochs=1", f"train.out_dir={out}"])
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = losses(out)
    for name in ("channels_last", "compiled"):
        assert sorted(runs[name]) == sorted(runs["eager"]) == [0, 1, 2, 3]
        for s, v in runs["eager"].items():
            assert runs[name][s][0] == pytest.approx(v[0], rel=1e-3), (name, s)
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert all(not k.startswith("_orig_mod") for k in state["model"])
    sd = torch.load(tmp_path / "compiled" / "backbone.pt", weights_only=True)
    assert torchvision.models.resnet18().load_state_dict(sd, strict=False).unexpected_keys == []
