"""Optimisers (SGD, LARS, AdamW), parameter groups and the per-step schedule application."""
from __future__ import annotations

import fnmatch
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from shared.config import OptimConfig, ScheduleConfig
from shared.errors import ConfigError
from shared.optim.lars import LARS
from shared.optim.schedules import ema_momentum, lr_factor, scaled_lr, weight_decay

__all__ = ["LARS", "param_groups", "build_optimizer", "apply_schedule", "scaled_lr", "lr_factor",
           "ema_momentum", "weight_decay"]


def _no_decay(name: str, p: torch.Tensor, rules: List[str]) -> bool:
    for rule in rules:
        if rule == "ndim<=1" and p.ndim <= 1:
            return True
        if rule == "bias" and name.endswith(".bias"):
            return True
        if rule not in ("ndim<=1", "bias") and fnmatch.fnmatchcase(name, rule):
            return True
    return False


def param_groups(model: nn.Module, cfg: OptimConfig, global_batch: int) -> List[Dict]:
    """Two groups at most: `decay` and `no_decay` (parameters matching `cfg.no_decay`).

    Each group carries `peak_lr` (its base lr scaled by the batch rule), `base_wd`, and `lars`
    (LARS adapts only the decay group, as in the official Barlow Twins / MoCo v3 code). The
    schedule sets `lr` and `weight_decay` from these every step. Frozen parameters are left out.
    A model that defines `lr_scale(name) -> float` (layer-wise lr decay) gets each of the two
    groups split by scale, largest first, each with its `lr_scale` multiplying `peak_lr`."""
    scale_of = getattr(model, "lr_scale", None)
    buckets: Dict[Tuple[str, float], List[Tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tag = "no_decay" if _no_decay(name, p, cfg.no_decay) else "decay"
        scale = float(scale_of(name)) if callable(scale_of) else 1.0
        buckets.setdefault((tag, scale), []).append((name, p))
    groups = []
    for tag, wd, base_lr in (("decay", cfg.weight_decay, cfg.lr),
                             ("no_decay", 0.0, cfg.lr if cfg.lr_no_decay is None else cfg.lr_no_decay)):
        for scale in sorted((s for t, s in buckets if t == tag), reverse=True):
            items = buckets[(tag, scale)]
            groups.append({"params": [p for _, p in items], "param_names": [n for n, _ in items], "group": tag,
                           "peak_lr": scaled_lr(base_lr, global_batch, cfg.lr_ref_batch) * scale, "lr_scale": scale,
                           "base_wd": wd, "lr": 0.0, "weight_decay": wd, "lars": tag == "decay"})
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return groups


def _all_on_cuda(groups: List[Dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def build_optimizer(groups: List[Dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.name == "adamw":
        # On GPU the fused kernel (one launch for the whole update); on CPU torch's default, unchanged.
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps,
                                 **({"fused": True} if _all_on_cuda(groups) else {}))
    raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}")


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int, epochs: int,
                   sched: ScheduleConfig) -> float:
    """Set every group's lr and weight decay for `step`; returns the factor applied to peak lr."""
    f = lr_factor(step, steps_per_epoch, epochs, sched)
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * f
        if g["base_wd"]:
            g["weight_decay"] = weight_decay(step, steps_per_epoch, epochs, g["base_wd"], sched)
    return f
