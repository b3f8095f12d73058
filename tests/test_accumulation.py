"""Gradient accumulation (train.accum_steps): k micro-batches give the update of one batch where the
loss is a mean of per-sample terms (SimMIM), and are refused, with the reason, where the batch is coupled."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, TINY
from shared.config import build_config
from shared.data.loader import build_image_dataset
from shared.engine import fit, split_batch
from shared.errors import ConfigError

SIMMIM = ["data.synthetic.length=32", "data.synthetic.val_length=8", "data.workers=0",
          "model.backbone.kwargs.depth=1", "model.backbone.kwargs.embed_dim=24", "train.batch_size=32",
          "train.epochs=1", "train.tensorboard=false", "eval.after_train=[]", "optim.name=sgd", "optim.momentum=0",
          "optim.lr=0.5", "optim.clip_grad=0", "sched.warmup_epochs=0", "sched.kind=constant"]


def _simmim_step(out, k):
    from simmim.train import Config, build
    from simmim.model import make_transform
    cfg = build_config(Config, [ROOT / "simmim/configs/demo.yaml"], SIMMIM + [f"train.out_dir={out}",
                                                                              f"train.accum_steps={k}"])
    torch.manual_seed(0)
    model = build(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = fit(cfg, model, build_image_dataset(cfg.data, "train"), make_transform(cfg, model), method="simmim")
    assert res.steps == 1
    return before, {n: p.detach().clone() for n, p in res.model.named_parameters()}


def test_four_micro_batches_of_8_make_the_update_of_one_batch_of_32(tmp_path):
    init, one = _simmim_step(tmp_path / "k1", 1)
    init4, four = _simmim_step(tmp_path / "k4", 4)
    assert all(torch.equal(init[n], init4[n]) for n in init)
    moved = 0
    for n in one:
        d1, d4 = one[n] - init[n], four[n] - init[n]
        assert torch.allclose(d4, d1, rtol=1e-4, atol=1e-7 + 1e-4 * d1.abs().max().item()), n
        moved += int(d1.abs().max() > 0)
    assert moved > 10          # the step changed the weights (a test of equal no-ops would pass anyway)


def test_accumulation_is_refused_where_the_batch_is_coupled(tmp_path):
    from barlow.train import Config, build
    from shared.data.augment import MultiView
    cfg = build_config(Config, [ROOT / "barlow/configs/demo.yaml"], TINY + [f"train.out_dir={tmp_path}",
                                                                            "train.accum_steps=2"])
    with pytest.raises(ConfigError, match="accum_steps=2 is not exact for barlow: its cross-correlation"):
        fit(cfg, build(cfg), build_image_dataset(cfg.data, "train"), MultiView(cfg.aug.views), method="barlow")
    assert not (tmp_path / "last.pt").exists()


def test_split_batch_keeps_the_structure():
    batch = ((torch.arange(8), {"m": torch.arange(16).view(8, 2)}), torch.arange(8) * 10)
    parts = split_batch(batch, 4)
    assert len(parts) == 4 and parts[1][0][0].tolist() == [2, 3] and parts[3][0][1]["m"].tolist() == [[12, 13], [14, 15]]
    assert parts[2][1].tolist() == [40, 50]
