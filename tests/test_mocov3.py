"""MoCo v3: loss parity with the paper's formula, the collapse value, architecture and init facts
of the official ResNet/ViT encoders and heads, recipe schedules, the frozen patch projection, and
2-process runs against the single-process full batch (loss, gradients, gathered-key labels)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mocov3.loss import contrastive_loss, mocov3_loss
from mocov3.model import MoCoV3, MoCoV3ModelConfig, sincos_position_embedding
from mocov3.train import Config
from shared.config import BackboneConfig, build_config
from shared.engine import StepContext
from shared.models import count_parameters
from shared.optim import apply_schedule, build_optimizer, ema_momentum, param_groups

from conftest import ROOT, run_distributed

CONFIGS = ROOT / "mocov3/configs"


def recipe(name: str) -> Config:
    return build_config(Config, [CONFIGS / f"{name}.yaml"], ["data.root=/imagenet"])


def reference_ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """InfoNCE of the paper, written out: for query i, -log( exp(q_i·k_i / t) / Σ_j exp(q_i·k_j / t) )
    with unit vectors, averaged over queries, times 2t (the official scaling)."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(q.shape[0]):
        sims = torch.stack([qn[i].dot(kn[j]) for j in range(k.shape[0])]) / t
        total = total - (sims[i] - torch.log(torch.exp(sims).sum()))
    return total / q.shape[0] * 2 * t


@pytest.mark.parametrize("n,c,t", [(8, 16, 1.0), (12, 8, 0.2)])
def test_loss_and_gradients_match_paper_formula(n, c, t):
    g = torch.Generator().manual_seed(n * c)
    q1, q2, k1, k2 = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    q1.requires_grad_(), q2.requires_grad_()
    ours = mocov3_loss(q1, q2, k1, k2, t)
    ga = torch.autograd.grad(ours, (q1, q2))
    r1, r2 = q1.detach().clone().requires_grad_(), q2.detach().clone().requires_grad_()
    ref = reference_ctr(r1, k2, t) + reference_ctr(r2, k1, t)
    gb = torch.autograd.grad(ref, (r1, r2))
    assert torch.allclose(ours, ref, rtol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(ga, gb))


def test_keys_get_no_gradient():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    contrastive_loss(q, k, 1.0).backward()
    assert q.grad is not None and k.grad is None


@pytest.mark.parametrize("t,n", [(1.0, 64), (0.2, 64), (1.0, 4096)])
def test_full_collapse_costs_4t_ln_n(t, n):
    z = F.normalize(torch.randn(1, 32, dtype=torch.float64), dim=1).expand(n, 32)
    assert mocov3_loss(z, z, z, z, t).item() == pytest.approx(4 * t * math.log(n), rel=1e-9)
    if t == 1.0 and n == 4096:
        assert 4 * t * math.log(n) == pytest.approx(33.27, abs=5e-3)   # the first logged loss of an R50 run


def test_parameter_counts_of_encoders_and_heads():
    expect = {  # backbone, trainable backbone, projector, predictor
        "r50_100ep": (23_508_032, 23_508_032, 9_445_376, 2_105_344),
        "vit_small_300ep": (21_665_664, 21_665_664 - 295_296 - 75_648, 19_415_040, 2_105_344),
        "vit_base_300ep": (85_798_656, 85_056_768, 20_987_904, 2_105_344),
    }
    for name, (bb, trainable, proj, pred) in expect.items():
        cfg = recipe(name)
        with torch.device("meta"):
            m = MoCoV3(cfg.model)
        got = (count_parameters(m.backbone), count_parameters(m.backbone, trainable_only=True),
               count_parameters(m.projector), count_parameters(m.predictor))
        assert got == (bb, trainable, proj, pred), name
        assert count_parameters(m.momentum_backbone) == bb and count_parameters(m.momentum_projector, True) == 0


def test_head_shapes_and_batchnorm_placement():
    r50, vit = recipe("r50_100ep").model, recipe("vit_small_300ep").model
    with torch.device("meta"):
        a, b = MoCoV3(r50), MoCoV3(vit)
    kinds = lambda s: [type(x).__name__ + (f"({x.in_features}->{x.out_features})" if isinstance(x, nn.Linear) else "")
                       for x in s]
    assert kinds(a.projector) == ["Linear(2048->4096)", "BatchNorm1d", "ReLU", "Linear(4096->256)", "BatchNorm1d"]
    assert kinds(a.predictor) == ["Linear(256->4096)", "BatchNorm1d", "ReLU", "Linear(4096->256)"]   # no last BN
    assert kinds(b.projector) == ["Linear(384->4096)", "BatchNorm1d", "ReLU", "Linear(4096->4096)", "BatchNorm1d",
                                  "ReLU", "Linear(4096->256)", "BatchNorm1d"]
    assert kinds(b.predictor)[-1] == "BatchNorm1d"
    for head in (a.projector, a.predictor, b.projector, b.predictor):
        assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    assert not a.projector[-1].affine and not b.projector[-1].affine and not b.predictor[-1].affine
    assert b.backbone.blocks[0].attn.num_heads == 12 and len(b.backbone.blocks) == 12


def test_vit_init_and_fixed_position_embedding():
    torch.manual_seed(0)
    m = MoCoV3(MoCoV3ModelConfig(backbone=BackboneConfig("vit_small_patch16_224", kwargs={"num_heads": 12}),
                                 projector_layers=3, predictor_last_bn=True, mlp_dim=64, dim=32, stop_grad_conv1=True))
    vit, d = m.backbone, 384
    pe = vit.pos_embed
    assert pe.shape == (1, 197, d) and not pe.requires_grad and torch.equal(pe[0, 0], torch.zeros(d))
    omega = 1.0 / 10000 ** (torch.arange(d // 4) / (d // 4))
    for p in (0, 13, 14, 100, 195):      # token p sits at row p // 14, column p % 14
        y, x = p // 14, p % 14
        want = torch.cat([torch.sin(y * omega), torch.cos(y * omega), torch.sin(x * omega), torch.cos(x * omega)])
        assert torch.allclose(pe[0, 1 + p], want, atol=1e-5), p
    qkv = vit.blocks[3].attn.qkv.weight                           # (3D, D): bound of one D x D matrix
    assert qkv.abs().max() <= math.sqrt(6 / (d + d)) and qkv.abs().max() > 0.95 * math.sqrt(6 / (d + d))
    fc1 = vit.blocks[3].mlp.fc1.weight                            # xavier on (4D, D)
    assert fc1.abs().max() <= math.sqrt(6 / (5 * d)) and fc1.abs().max() > 0.95 * math.sqrt(6 / (5 * d))
    assert vit.blocks[3].mlp.fc1.bias.abs().sum() == 0
    assert vit.cls_token.std() < 1e-5
    proj = vit.patch_embed.proj.weight
    assert proj.abs().max() <= math.sqrt(6 / (768 + d)) and not proj.requires_grad
    assert torch.equal(sincos_position_embedding(14, d), pe.detach())
    # the momentum encoder starts as an exact copy
    for a, b in zip(m.backbone.parameters(), m.momentum_backbone.parameters()):
        assert torch.equal(a, b) and not b.requires_grad


def test_conv_stem_variant():
    cfg = MoCoV3ModelConfig(backbone=BackboneConfig("vit_small_patch16_224", conv_stem=True,
                                                    kwargs={"num_heads": 12, "depth": 11}),
                            projector_layers=3, predictor_last_bn=True, mlp_dim=64, dim=32)
    with torch.device("meta"):
        m = MoCoV3(cfg)
    assert len(m.backbone.blocks) == 11
    convs = [x for x in m.backbone.patch_embed.proj if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 96, 192, 384, 384] and convs[-1].kernel_size == (1, 1)


def test_momentum_schedule_and_update_before_the_keys():
    for name, m0 in (("r50_100ep", 0.99), ("r50_1000ep", 0.996)):
        cfg = recipe(name)
        spe, epochs = 312, cfg.train.epochs                 # 1,281,167 // 4096 with drop_last
        assert ema_momentum(0, spe, epochs, cfg.sched) == pytest.approx(m0, abs=1e-15)
        assert ema_momentum(spe * epochs // 2, spe, epochs, cfg.sched) == pytest.approx((1 + m0) / 2, abs=1e-12)
        assert ema_momentum(spe * epochs, spe, epochs, cfg.sched) == pytest.approx(1.0, abs=1e-15)
    torch.manual_seed(0)
    model = MoCoV3(MoCoV3ModelConfig(backbone=BackboneConfig("resnet18"), mlp_dim=32, dim=16)).double()
    with torch.no_grad():                                 # make the two encoders differ
        for p in model.momentum_backbone.parameters():
            p.add_(0.1)
    online = [p.detach().clone() for p in model.backbone.parameters()]
    target = [p.detach().clone() for p in model.momentum_backbone.parameters()]
    x1, x2 = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ctx = StepContext(0, 0, 1, 1, 1.0, 0.75, 4, 1)
    out = model(([x1, x2], None), ctx)
    for o, t, now in zip(online, target, model.momentum_backbone.parameters()):
        assert torch.allclose(now, 0.75 * t + 0.25 * o)
    # the keys of this step come from the updated momentum encoder
    k1, k2 = model.key(x1), model.key(x2)
    q1, q2 = model.query(x1), model.query(x2)
    assert torch.allclose(out["loss"], mocov3_loss(q1, q2, k1, k2, 1.0), rtol=1e-10)


def test_lr_at_step_0_end_of_warmup_and_last_step():
    for name, peak, warm in (("r50_100ep", 9.6, 10), ("r50_300ep", 4.8, 10), ("vit_small_300ep", 2.4e-3, 40),
                             ("vit_small_300ep_b1024", 6e-4, 40)):
        cfg = recipe(name)
        spe = 1_281_167 // cfg.train.batch_size
        with torch.device("meta"):
            model = MoCoV3(cfg.model)
        opt = build_optimizer(param_groups(model, cfg.optim, cfg.train.batch_size), cfg.optim)

        def lr(step):
            apply_schedule(opt, step, spe, cfg.train.epochs, cfg.sched)
            values = {g["lr"] for g in opt.param_groups}
            assert len(values) == 1, values              # one lr for every parameter
            return values.pop()

        total = spe * cfg.train.epochs
        assert lr(0) == 0.0
        assert lr(spe * warm // 2) == pytest.approx(peak / 2, rel=1e-12)
        assert lr(spe * warm) == pytest.approx(peak, rel=1e-12)
        mid = spe * warm + (total - spe * warm) // 2
        assert lr(mid) == pytest.approx(peak / 2, rel=1e-6)
        assert lr(total - 1) < peak * 1e-6
        if cfg.optim.name == "adamw":     # one group: decay on every trained parameter, frozen ones absent
            assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
            ids = {id(p) for p in opt.param_groups[0]["params"]}
            assert id(model.backbone.patch_embed.proj.weight) not in ids and id(model.backbone.pos_embed) not in ids
        else:                             # LARS: 1-D params excluded from decay and adaptation, same lr
            decay, no_decay = opt.param_groups
            assert decay["lars"] and not no_decay["lars"] and no_decay["weight_decay"] == 0


def test_frozen_patch_projection_gets_no_update_and_no_weight_decay():
    torch.manual_seed(0)
    cfg = build_config(Config, [CONFIGS / "vit_small_300ep.yaml"],
                       ["data.root=/x", "model.mlp_dim=32", "model.dim=16", "model.backbone.img_size=32",
                        "model.backbone.kwargs={num_heads: 2, depth: 1, embed_dim: 32, patch_size: 8}"])
    model = MoCoV3(cfg.model)
    opt = build_optimizer(param_groups(model, cfg.optim, 4096), cfg.optim)
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    other = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    for step in range(3):
        apply_schedule(opt, 4000 * 40, 4000, 300, cfg.sched)      # full lr, weight decay 0.1
        x = torch.randn(4, 3, 32, 32)
        out = model(([x, x.flip(3)], None), StepContext(step, 0, 1, 3, 1.0, 0.99, 4, 1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, other)


# ----------------------------------------------------------------------------------- 2 processes
def _tiny_model() -> MoCoV3:
    torch.manual_seed(0)
    cfg = MoCoV3ModelConfig(backbone=BackboneConfig("resnet18", zero_init_residual=True), mlp_dim=32, dim=16,
                            temperature=0.5)
    return MoCoV3(cfg).double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _two_process_step(rank, world):
    from shared import dist
    model = dist.convert_sync_batchnorm(_tiny_model(), torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    x1, x2 = _inputs()
    n = 8 // world
    sl = slice(rank * n, (rank + 1) * n)
    out = ddp(([x1[sl], x2[sl]], None), StepContext(0, 0, 1, 1, 1.0, 0.9, 8, world))
    out["loss"].backward()
    # the pure loss on this rank's queries: labels point at this rank's slice of the gathered keys
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    q_local = q[sl].clone().requires_grad_()
    part = contrastive_loss(q_local, k[sl], 0.5)
    part.backward()
    return out["loss"].detach(), _grads(model), part.detach(), q_local.grad


@pytest.mark.dist
def test_two_process_loss_and_gradients_match_full_batch(tmp_path):
    model = _tiny_model()
    x1, x2 = _inputs()
    loss = model(([x1, x2], None), StepContext(0, 0, 1, 1, 1.0, 0.9, 8, 1))["loss"]
    loss.backward()
    full = _grads(model)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    q = q.requires_grad_()
    whole = contrastive_loss(q, k, 0.5)
    whole.backward()
    results = run_distributed(_two_process_step, 2, tmp_path)
    # DDP averages the ranks' gradients; the ranks' losses average to the full-batch loss
    assert torch.allclose((results[0][0] + results[1][0]) / 2, loss.detach(), rtol=1e-10)
    for k_ in full:
        assert torch.allclose(results[0][1][k_], full[k_], rtol=1e-7, atol=1e-12), k_
        assert torch.equal(results[0][1][k_], results[1][1][k_])
    assert torch.allclose((results[0][2] + results[1][2]) / 2, whole.detach(), rtol=1e-12)
    got = torch.cat([results[0][3], results[1][3]]) / 2       # each rank's mean is over 4 queries, not 8
    assert torch.allclose(got, q.grad, rtol=1e-10)


@pytest.mark.parametrize("recipe_name", ["demo", "demo_vit"])
def test_tiny_recipes_run_end_to_end(tmp_path, recipe_name):
    from conftest import TINY, run_cli
    tiny = [o for o in TINY if not o.startswith(("model.projector", "aug.views", "eval.image_size", "eval.resize"))]
    r = run_cli(["mocov3/train.py", "--config", str(CONFIGS / f"{recipe_name}.yaml"), *tiny, "model.mlp_dim=32",
                 "model.dim=16", "eval.after_train=[knn]", f"train.out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 8
    assert (tmp_path / "backbone.pt").is_file() and (tmp_path / "eval.json").is_file()
