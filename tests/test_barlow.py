"""Barlow Twins: loss parity with the paper's formula, architecture facts, recipe schedule values,
and the 2-process cross-correlation (official grad(L)/W and exact modes)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from barlow.loss import barlow_twins_loss, off_diagonal
from barlow.model import BarlowModelConfig, BarlowTwins
from barlow.train import Config
from shared.config import BackboneConfig, build_config
from shared.models import count_parameters
from shared.optim import apply_schedule, build_optimizer, param_groups

from conftest import ROOT, run_distributed

HEADLINE = ROOT / "barlow/configs/in1k_1000ep.yaml"


def reference_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> torch.Tensor:
    """Eq. (1)-(2) of the paper, written out: standardise each dimension over the batch, C_ij is the
    batch mean of z1n_bi * z2n_bj, then the invariance term plus lambda times the redundancy term."""
    n, d = z1.shape
    def standardise(z):
        mu = z.sum(0) / n
        var = ((z - mu) ** 2).sum(0) / n
        return (z - mu) / torch.sqrt(var + eps)
    a, b = standardise(z1), standardise(z2)
    c = torch.einsum("bi,bj->ij", a, b) / n
    eye = torch.eye(d, dtype=z1.dtype)
    invariance = ((1 - c) ** 2 * eye).sum()
    redundancy = (c ** 2 * (1 - eye)).sum()
    return invariance + lambd * redundancy


@pytest.mark.parametrize("n,d", [(16, 8), (64, 32), (5, 40)])
def test_loss_and_gradients_match_paper_formula(n, d):
    g = torch.Generator().manual_seed(n * d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    z2 = (z1 + torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
    z1 = z1.requires_grad_()
    ours = barlow_twins_loss(z1, z2, lambd=0.0051)
    ga = torch.autograd.grad(ours, (z1, z2))
    z1r, z2r = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    ref = reference_loss(z1r, z2r, 0.0051)
    gb = torch.autograd.grad(ref, (z1r, z2r))
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(ga[0], gb[0], rtol=1e-8, atol=1e-12)
    assert torch.allclose(ga[1], gb[1], rtol=1e-8, atol=1e-12)


def test_loss_is_d_for_constant_features():
    for d in (8, 8192):
        z = torch.full((32, d), 3.5)
        assert barlow_twins_loss(z, z).item() == float(d)


def test_rank_one_collapse_costs_lambda_d_d_minus_1():
    d, lambd = 64, 0.0051
    base = torch.randn(256, 1, dtype=torch.float64)
    z = base.expand(256, d)
    expected = lambd * d * (d - 1)
    assert math.isclose(barlow_twins_loss(z, z, lambd).item(), expected, rel_tol=1e-4)


def test_off_diagonal():
    assert off_diagonal(torch.arange(9).view(3, 3)).tolist() == [1, 2, 3, 5, 6, 7]
    x = torch.randn(7, 7)
    assert torch.equal(off_diagonal(x), x[~torch.eye(7, dtype=torch.bool)])


def test_architecture_and_parameter_counts():
    with torch.device("meta"):
        model = BarlowTwins(BarlowModelConfig(), global_batch=2048)
    assert count_parameters(model.projector) == 151_027_712
    assert count_parameters(model.backbone) == 23_508_032
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))
    assert [m.out_features for m in model.projector if isinstance(m, nn.Linear)] == [8192] * 3
    assert not model.bn.affine and model.bn.num_features == 8192 and model.bn.eps == 1e-5
    assert isinstance(model.backbone.fc, nn.Identity)


def test_zero_init_residual():
    model = BarlowTwins(BarlowModelConfig(backbone=BackboneConfig("resnet50", zero_init_residual=True),
                                          projector="32-32"), global_batch=8)
    for block in (model.backbone.layer1[0], model.backbone.layer4[2]):
        assert torch.count_nonzero(block.bn3.weight) == 0
    assert torch.count_nonzero(model.backbone.bn1.weight) > 0


def test_model_loss_equals_pure_loss_on_one_process():
    torch.manual_seed(0)
    model = BarlowTwins(BarlowModelConfig(backbone=BackboneConfig("resnet18"), projector="64-64-32"), global_batch=8)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    out = model(([x1, x2], torch.zeros(8)))
    z1, z2 = model.embed(x1), model.embed(x2)
    assert torch.allclose(out["loss"], barlow_twins_loss(z1, z2, 0.0051), rtol=1e-5)


def test_loss_block_stays_fp32_under_bf16_autocast():
    """Backbone and projector run in bf16 under autocast; standardisation, C and the loss do not
    (a deviation from the official fp16 block, see barlow/README.md)."""
    torch.manual_seed(0)
    model = BarlowTwins(BarlowModelConfig(backbone=BackboneConfig("resnet18"), projector="64-64-32"), global_batch=8)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(([x1, x2], torch.zeros(8)))
        z1, z2 = model.embed(x1), model.embed(x2)
    assert z1.dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    assert torch.allclose(out["loss"], barlow_twins_loss(z1.float(), z2.float(), 0.0051), rtol=1e-5)


def _headline():
    return build_config(Config, [HEADLINE], ["data.root=/imagenet"])


def test_headline_recipe_values():
    cfg = _headline()
    v1, v2 = cfg.aug.views
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    for v in (v1, v2):
        assert v.order == ["crop", "flip", "jitter", "gray", "blur", "solarize"]
        assert v.interpolation == "bicubic" and tuple(v.jitter) == (0.4, 0.4, 0.2, 0.1)
        assert (v.jitter_p, v.gray_p, tuple(v.crop_scale)) == (0.8, 0.2, (0.08, 1.0))
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.drop_last) == (2048, 1000, False)
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.model.lambd) == ("lars", 1e-6, 0.0051)
    lin = cfg.eval.linear
    assert (lin.lr, lin.weight_decay, lin.batch_size, lin.epochs, lin.schedule) == (0.3, 1e-6, 256, 100, "cosine_epoch")


def test_headline_lr_at_step_0_end_of_warmup_and_last_step():
    cfg = _headline()
    steps_per_epoch = math.ceil(1_281_167 / 2048)           # no drop_last: 626
    assert steps_per_epoch == 626
    with torch.device("meta"):
        model = BarlowTwins(cfg.model, 2048)
    opt = build_optimizer(param_groups(model, cfg.optim, 2048), cfg.optim)
    weights, biases = opt.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert weights["lars"] and not biases["lars"]
    assert (weights["weight_decay"], biases["weight_decay"]) == (1e-6, 0.0)

    def lrs(step):
        apply_schedule(opt, step, steps_per_epoch, cfg.train.epochs, cfg.sched)
        return weights["lr"], biases["lr"]

    assert lrs(0) == (0.0, 0.0)
    w, b = lrs(6260 // 2)                               # half-way through the 10 warm-up epochs
    assert math.isclose(w, 0.8, rel_tol=1e-12) and math.isclose(b, 0.0192, rel_tol=1e-12)
    w, b = lrs(6260)                                    # end of warm-up: peak
    assert math.isclose(w, 1.6, rel_tol=1e-12) and math.isclose(b, 0.0384, rel_tol=1e-12)
    total = 626 * 1000
    w, b = lrs(6260 + (total - 6260) // 2)              # mid-cosine: (peak + floor) / 2
    assert math.isclose(w, 1.6 * (0.5 + 0.5 * 0.001), rel_tol=1e-9)
    w, b = lrs(total - 1)                               # last step: the 0.001 x peak floor
    assert math.isclose(w, 0.0016, rel_tol=1e-6) and math.isclose(b, 0.0000384, rel_tol=1e-6)


# ----------------------------------------------------------------------------------- 2 processes
def _tiny_model(gradient: str) -> BarlowTwins:
    torch.manual_seed(0)
    cfg = BarlowModelConfig(backbone=BackboneConfig("resnet18", zero_init_residual=True), projector="32-32-16",
                            gradient=gradient)
    return BarlowTwins(cfg, global_batch=8).double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randn(8, 3, 16, 16, generator=g,
                                                                                     dtype=torch.float64)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _two_process_step(rank, world, gradient):
    from shared import dist
    model = dist.convert_sync_batchnorm(_tiny_model(gradient), torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    x1, x2 = _inputs()
    n = 8 // world
    sl = slice(rank * n, (rank + 1) * n)
    out = ddp(([x1[sl], x2[sl]], None))
    out["loss"].backward()
    return out["loss"].detach(), _grads(model)


@pytest.mark.dist
@pytest.mark.parametrize("gradient,factor", [("official", 0.5), ("exact", 1.0)])
def test_two_process_loss_and_gradients_match_full_batch(tmp_path, gradient, factor):
    model = _tiny_model(gradient)
    x1, x2 = _inputs()
    loss = model(([x1, x2], None))["loss"]
    loss.backward()
    full = _grads(model)
    results = run_distributed(_two_process_step, 2, tmp_path, gradient)
    for rank_loss, rank_grads in results:
        assert torch.allclose(rank_loss, loss.detach(), rtol=1e-10)
        assert rank_grads.keys() == full.keys()
        for k in full:
            assert torch.allclose(rank_grads[k], factor * full[k], rtol=1e-7, atol=1e-12), k
    # the two ranks apply the same (DDP-averaged) gradient
    for k in full:
        assert torch.equal(results[0][1][k], results[1][1][k])
