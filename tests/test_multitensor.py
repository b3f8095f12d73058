"""The multi-tensor (`torch._foreach_*`) training-step code equals the per-parameter formulas.

LARS and the momentum-encoder update run on whole lists of tensors; the references here are the
formulas written out parameter by parameter, as the code was before it was vectorised."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn

import shared.optim.lars as lars_module

from conftest import ROOT
from shared.config import OptimConfig, RunConfig
from shared.models import momentum_copy, momentum_update
from shared.optim import LARS, build_optimizer


class PerParameterLARS(torch.optim.Optimizer):
    """Reference: the LARS step parameter by parameter (the formula of shared/optim/lars.py)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001, lars=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=lars))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d + group["weight_decay"] * p
                if group["lars"]:
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    if p_norm > 0 and d_norm > 0:
                        d = d * (group["eta"] * p_norm / d_norm)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"] = group["momentum"] * state["mu"] + d
                p -= group["lr"] * state["mu"]


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 3, 3), (16, 5), (7,), (3, 3), (6,), (4, 4)]
    ps = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ps.append(nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)))   # a list of its own
    with torch.no_grad():
        ps[3].zero_()              # |p| = 0 at the first step: trust ratio 1
    return ps


def _groups(ps):
    return [{"params": ps[0:2] + ps[6:7], "weight_decay": 1e-2, "lars": True, "lr": 0.5},     # decay + trust ratio
            {"params": ps[2:3], "weight_decay": 0.0, "lars": False, "lr": 0.1},     # plain momentum SGD
            {"params": ps[3:5], "weight_decay": 0.0, "lars": True, "lr": 0.3},      # ratio, no decay; ps[3] = 0
            {"params": ps[5:6], "weight_decay": 5e-2, "lars": False, "lr": 0.2}]    # decay, no ratio


@pytest.mark.parametrize("list_bytes", [2 ** 22, 200])   # one list per group; lists of a few tensors
def test_lars_equals_the_per_parameter_formula(list_bytes, monkeypatch):
    monkeypatch.setattr(lars_module, "CPU_LIST_BYTES", list_bytes)
    assert len(lars_module._tensor_lists(_params(0))) == (2 if list_bytes > 2 ** 20 else 4)
    ps, ref_ps = _params(0), _params(0)
    opt = LARS(_groups(ps), momentum=0.9, eta=0.02)
    ref = PerParameterLARS(_groups(ref_ps), momentum=0.9, eta=0.02)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]
        grads[4] = None if step < 3 else grads[4]                   # no gradient for three steps: skipped
        for p, r, gr in zip(ps, ref_ps, grads):
            p.grad = None if gr is None else gr.clone()
            r.grad = None if gr is None else gr.clone()
        grads_before = [None if p.grad is None else p.grad.clone() for p in ps]
        opt.step()
        ref.step()
        for i, (p, r) in enumerate(zip(ps, ref_ps)):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7, msg=f"param {i} after step {step}")
            if grads_before[i] is not None:
                assert torch.equal(p.grad, grads_before[i])          # the gradients are not modified
        assert (ps[4] in opt.state) == (step >= 3)
    for p, r in zip(ps, ref_ps):
        torch.testing.assert_close(opt.state[p]["mu"], ref.state[r]["mu"], rtol=1e-6, atol=1e-7)
    assert float(ps[3].detach().abs().sum()) > 0                              # the zero parameter did move


def test_lars_state_dict_round_trips():
    ps = _params(2)
    opt = LARS(_groups(ps), momentum=0.9, eta=0.02)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(set(s) == {"mu"} for s in saved["state"].values())    # the key older checkpoints hold

    ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = LARS(_groups(ps2), momentum=0.9, eta=0.02)
    opt2.load_state_dict(saved)
    for a, b in ((ps, opt), (ps2, opt2)):
        for p in a:
            p.grad = torch.full_like(p, 0.5)
        b.step()
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["mu"], opt2.state[q]["mu"])


def test_momentum_update_equals_the_per_parameter_formula():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    target = momentum_copy(online)
    ref = copy.deepcopy(target)
    for m in (0.99, 0.9, 0.5):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
            for t, o in zip(ref.parameters(), online.parameters()):
                t.copy_(m * t + (1 - m) * o)
        momentum_update(online, target, m)
        for t, r in zip(target.parameters(), ref.parameters()):
            torch.testing.assert_close(t, r, rtol=1e-6, atol=1e-7)


def test_adamw_is_fused_only_on_cuda():
    cfg = OptimConfig(name="adamw")
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(3))]}], cfg)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")   # CPU: unchanged


def test_optim_step_benchmark_times_the_recipe_optimizer():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = RunConfig()
    cfg.optim.name, cfg.train.batch_size, cfg.train.epochs = "lars", 16, 2
    result = bench.optim_step_ms(cfg, nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), torch.device("cpu"), 2, 1)
    assert result["optimizer"] == "LARS" and result["param_tensors"] == 4 and result["steps_measured"] == 2
    assert result["step_ms_median"] > 0
