"""LARS as in the official Barlow Twins and MoCo v3 code.

Per parameter, with g its gradient:
    d = g + wd * p                                  (only where the group's weight_decay is non-zero)
    d = d * eta * |p| / |d|   if |p| > 0 and |d| > 0 (only in groups with lars=True)
    mu = momentum * mu + d ;  p = p - lr * mu
Both official codes exclude 1-D parameters (biases, BatchNorm weights) from weight decay *and*
from the trust-ratio adaptation; here that is a property of the param group (see
`shared.optim.param_groups`), so each group also carries its own lr.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, lars: bool = True):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=lars)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    q = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm,
                                    torch.ones_like(p_norm))
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
