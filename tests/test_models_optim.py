"""Backbones, heads, momentum encoders, LARS, parameter groups and schedules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torchvision

from shared.config import BackboneConfig, OptimConfig, ScheduleConfig
from shared.errors import ConfigError
from shared.models import build_backbone, count_parameters, mlp, momentum_copy, momentum_update
from shared.optim import LARS, apply_schedule, build_optimizer, ema_momentum, lr_factor, param_groups, scaled_lr


# ------------------------------------------------------------------------------------ backbones
def test_resnet_keys_are_torchvision_keys():
    with torch.device("meta"):
        ours = build_backbone(BackboneConfig("resnet50"))
        ref = torchvision.models.resnet50()
    assert set(ref.state_dict()) - set(ours.state_dict()) == {"fc.weight", "fc.bias"}
    assert set(ours.state_dict()) <= set(ref.state_dict())
    assert ours.out_dim == 2048 and count_parameters(ours) == 23_508_032


def test_resnet_pooled_and_multiscale_features():
    b = build_backbone(BackboneConfig("resnet18")).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = b.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert torch.allclose(b(x), maps[-1].mean((2, 3)), atol=1e-6)
    assert [m.shape[1] for m in b.forward_intermediates(x, indices=[1, 2])] == [128, 256]


@pytest.mark.parametrize("name,dim,chans", [("vit_tiny_patch16_224", 192, [192] * 4),
                                            ("swin_tiny_patch4_window7_224", 768, [96, 192, 384, 768])])
def test_timm_backbones(name, dim, chans):
    kwargs = {"window_size": 2} if "swin" in name else {}
    b = build_backbone(BackboneConfig(name, img_size=64, kwargs=kwargs)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert b(x).shape == (2, dim) and b.out_dim == dim
    maps = b.forward_intermediates(x, indices=4, intermediates_only=True)
    assert [m.shape[1] for m in maps] == chans


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backbone 'resnt50'"):
        build_backbone(BackboneConfig("resnt50"))


# ---------------------------------------------------------------------------------------- heads
def test_mlp_builder_options():
    proj = mlp([8, 16, 16, 4], bias=False, last_bn=True, last_bn_affine=False)
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                                                "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert not proj[-1].affine and proj[1].affine
    plain = mlp([8, 16, 4], hidden_bn=False, bias=True)
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"] and plain[2].bias is not None
    assert count_parameters(mlp([256, 4096, 256], bias=False)) == 2_105_344   # MoCo v3's ResNet predictor


def test_momentum_update_is_ema_of_parameters_only():
    online = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(5.0)
    before = [p.clone() for p in target.parameters()]
    momentum_update(online, target, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
    assert torch.equal(target[1].running_mean, torch.zeros(3))   # buffers untouched


# ----------------------------------------------------------------------------------------- LARS
def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))       # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True, "lr": 1.0},
                {"params": [b], "weight_decay": 0.0, "lars": False, "lr": 0.1}], momentum=0.9, eta=0.001)
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5])
    opt.step()
    # d = g + 0.1 w = (0.9, 1.2), |d| = 1.5; trust ratio 0.001 * 5 / 1.5; w -= 1.0 * d * ratio
    assert torch.allclose(w, torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]), atol=1e-7)
    assert torch.allclose(b, torch.tensor([1.0 - 0.05]))   # 1-D: plain momentum SGD, no wd, no ratio
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5])
    w_before = w.detach().clone()
    opt.step()
    d = torch.tensor([[0.6, 0.8]]) + 0.1 * w_before
    ratio = 0.001 * w_before.norm() / d.norm()
    mu = 0.9 * torch.tensor([[0.003, 0.004]]) + ratio * d
    assert torch.allclose(w, w_before - mu, atol=1e-7)
    assert torch.allclose(b, torch.tensor([0.95 - 0.1 * (0.9 * 0.5 + 0.5)]))


def test_lars_zero_norms_use_ratio_one():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars": True, "lr": 1.0}], momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(w, -torch.ones(2, 2))


# --------------------------------------------------------------------------------- param groups
def test_param_group_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 3, 4)))
    cfg = OptimConfig(name="adamw", lr=1e-3, lr_ref_batch=512, weight_decay=0.05, no_decay=["ndim<=1", "pos_*"])
    groups = param_groups(model, cfg, global_batch=1024)
    decay, no_decay = groups
    assert decay["param_names"] == ["0.weight", "3.weight"]
    assert set(no_decay["param_names"]) == {"0.bias", "1.weight", "1.bias", "3.bias", "pos_embed"}
    assert decay["peak_lr"] == no_decay["peak_lr"] == 2e-3 and no_decay["base_wd"] == 0.0
    model[0].weight.requires_grad_(False)
    assert param_groups(model, cfg, 512)[0]["param_names"] == ["3.weight"]
    bias_rule = param_groups(model, OptimConfig(no_decay=["bias"]), 256)
    assert "1.weight" in bias_rule[0]["param_names"] and "1.bias" in bias_rule[1]["param_names"]
    opt = build_optimizer(groups, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)


# ------------------------------------------------------------------------------------ schedules
def test_scaling_rule():
    assert scaled_lr(0.3, 4096, 256) == 4.8 and scaled_lr(1e-4, 2048, 512) == 4e-4 and scaled_lr(0.03, 999, 0) == 0.03


def test_cosine_with_warmup_and_floor():
    s = ScheduleConfig(kind="cosine", warmup_epochs=2, final=0.0)
    assert lr_factor(0, 10, 10, s) == 0.0
    assert lr_factor(10, 10, 10, s) == 0.5
    assert lr_factor(20, 10, 10, s) == 1.0
    assert math.isclose(lr_factor(60, 10, 10, s), 0.5)
    assert lr_factor(99, 10, 10, s) < 1e-3
    s.warmup_start, s.final = 0.1, 0.2
    assert math.isclose(lr_factor(0, 10, 10, s), 0.1) and math.isclose(lr_factor(10, 10, 10, s), 0.55)
    assert math.isclose(lr_factor(60, 10, 10, s), 0.6)


def test_step_decay_and_per_epoch():
    s = ScheduleConfig(kind="step", warmup_epochs=1, milestones=[7], gamma=0.1)
    assert lr_factor(5, 10, 10, s) == 0.5 and lr_factor(69, 10, 10, s) == 1.0 and math.isclose(lr_factor(70, 10, 10, s), 0.1)
    e = ScheduleConfig(kind="cosine", per_epoch=True)
    # torch's CosineAnnealingLR(T_max=epochs) stepped once per epoch
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for epoch in range(5):
        for it in range(3):
            assert math.isclose(lr_factor(epoch * 3 + it, 3, 5, e), opt.param_groups[0]["lr"], abs_tol=1e-12)
        ref.step()


def test_ema_momentum_schedule_as_moco_v3():
    s = ScheduleConfig(ema_start=0.99)
    assert ema_momentum(0, 100, 10, s) == 0.99
    assert math.isclose(ema_momentum(500, 100, 10, s), 0.995)
    assert ema_momentum(1000, 100, 10, s) == 1.0
    assert ema_momentum(3, 100, 10, ScheduleConfig(ema_start=0.999, ema_kind="constant")) == 0.999
    assert ema_momentum(3, 100, 10, ScheduleConfig()) is None


def test_apply_schedule_sets_group_lr_and_cosine_weight_decay():
    p1, p2 = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    groups = [{"params": [p1], "peak_lr": 2.0, "base_wd": 0.04, "weight_decay": 0.04, "lars": True},
              {"params": [p2], "peak_lr": 0.5, "base_wd": 0.0, "weight_decay": 0.0, "lars": False}]
    opt = torch.optim.SGD(groups, lr=0.0)
    s = ScheduleConfig(kind="cosine", wd_final=0.4)
    apply_schedule(opt, 50, 10, 10, s)
    assert math.isclose(opt.param_groups[0]["lr"], 1.0) and math.isclose(opt.param_groups[1]["lr"], 0.25)
    assert math.isclose(opt.param_groups[0]["weight_decay"], 0.22) and opt.param_groups[1]["weight_decay"] == 0.0
