"""LARS as in the official Barlow Twins and MoCo v3 code.

Per parameter, with g its gradient:
    d = g + wd * p                                  (only where the group's weight_decay is non-zero)
    d = d * eta * |p| / |d|   if |p| > 0 and |d| > 0 (only in groups with lars=True)
    mu = momentum * mu + d ;  p = p - lr * mu
Both official codes exclude 1-D parameters (biases, BatchNorm weights) from weight decay *and*
from the trust-ratio adaptation; here that is a property of the param group (see
`shared.optim.param_groups`), so each group also carries its own lr.

The step runs on whole lists of tensors with torch's multi-tensor `torch._foreach_*` ops (on GPU
one call per operation for all of a group's parameters of one device and dtype, as torch's own
SGD and AdamW do; on CPU one per list of about 4 MB, see `CPU_LIST_BYTES`), never parameter by
parameter in Python: the norms come from `_foreach_norm`, the
trust ratios are computed for all parameters at once on a stacked vector of norms. Parameters
without a gradient are skipped. The momentum buffer is `state[p]["mu"]`, as before, so older
checkpoints load unchanged. `tests/test_multitensor.py` checks the step against the per-parameter
formula above.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch.optim import Optimizer


# On CPU the step's temporaries (g + wd * p, its scaled copy) are made list by list of at most this many
# bytes, so that their memory is reused from one list to the next while it is in cache; in one list of
# all parameters they cost fresh pages every step and the step ran slower than parameter by parameter.
# On GPU (caching allocator) a group is one list per device and dtype.
CPU_LIST_BYTES = 2 ** 22


def _tensor_lists(params: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    """`params` as lists of one device and dtype each, on CPU cut after `CPU_LIST_BYTES`."""
    lists: Dict[Tuple[torch.device, torch.dtype], List[List[torch.Tensor]]] = {}
    nbytes: Dict[Tuple[torch.device, torch.dtype], int] = {}
    for p in params:
        key, size = (p.device, p.dtype), p.numel() * p.element_size()
        chunks = lists.setdefault(key, [[]])
        if p.device.type == "cpu" and chunks[-1] and nbytes[key] + size > CPU_LIST_BYTES:
            chunks.append([])
            nbytes[key] = 0
        chunks[-1].append(p)
        nbytes[key] = nbytes.get(key, 0) + size
    return [chunk for chunks in lists.values() for chunk in chunks]


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
            with_grad = [p for p in group["params"] if p.grad is not None]
            for params in _tensor_lists(with_grad):
                self._update(group, params)
        return loss

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        return state["mu"]

    def _update(self, group: dict, params: List[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        mus = [self._momentum_buffer(p) for p in params]
        decay = group["weight_decay"] != 0
        d = torch._foreach_add(grads, params, alpha=group["weight_decay"]) if decay else grads
        if group["lars"]:
            p_norm = torch.stack(torch._foreach_norm(params))
            d_norm = torch.stack(torch._foreach_norm(d))
            q = list(torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm,
                                 torch.ones_like(p_norm)).unbind(0))
            if decay:
                torch._foreach_mul_(d, q)              # d is already a new list
            else:
                d = torch._foreach_mul(grads, q)       # the gradients stay as they are
        torch._foreach_mul_(mus, group["momentum"])
        torch._foreach_add_(mus, d)
        del d
        torch._foreach_add_(params, mus, alpha=-group["lr"])
