"""Momentum (EMA) encoders: a frozen copy updated from the online network's *parameters* only.

BatchNorm buffers are not averaged: the copy's running statistics evolve from its own forward
passes, as in MoCo v2/v3, BYOL and DenseCL. The coefficient `m` comes from the engine's schedule
(`sched.ema_*`) through `StepContext.ema_momentum`, once per step."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def momentum_copy(online: nn.Module) -> nn.Module:
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target = m * target + (1 - m) * online, parameter by parameter."""
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("online and momentum networks have different parameter lists")
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - m)
