"""SimMIM: the mask generator's counts, alignment and seeding; the masked L1 loss against the paper's
formula; the mask token hides the masked pixels from the encoder; shapes and parameter counts of
the official Swin-B / ViT-B models; weight-decay groups with the official quirks; the schedules
against timm's scheduler; a tiny run end to end with its one-line errors."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from shared.config import BackboneConfig, build_config
from shared.data.loader import GlobalBatchSampler, SeededDataset, make_loader
from shared.engine import global_batch
from shared.errors import ConfigError
from shared.models import count_parameters
from shared.optim import lr_factor, param_groups
from simmim.loss import masked_l1_loss
from simmim.model import MaskGenerator, SimMIM, SimMIMModelConfig, make_transform
from simmim.train import Config

from conftest import ROOT, run_cli

CONFIGS = ROOT / "simmim/configs"
VIT_KWARGS = dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1,
                  global_pool="avg", use_fc_norm=False)


def recipe(name: str, *overrides: str) -> Config:
    return build_config(Config, [CONFIGS / f"{name}.yaml"], ["data.root=/imagenet", *overrides])


def tiny_vit(**kw) -> SimMIM:
    return SimMIM(SimMIMModelConfig(backbone=BackboneConfig(
        name="beit_base_patch16_224", img_size=32, kwargs={**VIT_KWARGS, "patch_size": 4, "embed_dim": 24,
                                                          "depth": 2, "num_heads": 2, **kw})))


def tiny_swin() -> SimMIM:
    return SimMIM(SimMIMModelConfig(backbone=BackboneConfig(
        name="swin_tiny_patch4_window7_224", img_size=32,
        kwargs={"patch_size": 2, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "window_size": 4})))


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("size,model_patch,units,count,grid", [(192, 4, 36, 22, 48), (224, 16, 49, 30, 14)])
def test_mask_counts_and_32px_alignment(size, model_patch, units, count, grid):
    gen = MaskGenerator(size, 32, model_patch, 0.6)
    assert gen.count == count == math.ceil(units * 0.6) and gen.grid == grid
    torch.manual_seed(0)
    masks = torch.stack([gen() for _ in range(16)])
    assert masks.shape == (16, grid, grid) and masks.dtype == torch.bool
    per_unit = 32 // model_patch
    assert (masks.sum((1, 2)) == count * per_unit ** 2).all()           # exactly `count` units each
    cells = masks.view(16, grid // per_unit, per_unit, grid // per_unit, per_unit)
    assert (cells.all(2).all(3) == cells.any(2).any(3)).all()           # constant over each 32-px unit
    assert len({m.flatten().tolist().__str__() for m in masks}) == 16    # differ across samples


class Blank(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return Image.new("RGB", (32, 32), (i * 20, 0, 0)), 0


def test_masks_are_seeded_per_image_and_differ_across_workers():
    cfg = recipe("demo")
    tf = make_transform(cfg, tiny_vit())
    sampler = GlobalBatchSampler(8, 8, seed=3)
    ds = SeededDataset(Blank(), tf)

    def masks(workers):
        (_, m), _ = next(iter(make_loader(ds, sampler, workers, False)))
        return m

    a, b = masks(0), masks(2)
    assert torch.equal(a, b)                          # the same masks whatever the number of workers
    assert len({str(x.flatten().tolist()) for x in a}) == 8
    sampler.set_epoch(1)
    assert not torch.equal(masks(2), a)               # and new ones every epoch


# ------------------------------------------------------------------------------------------- loss
def reference_loss(x, x_rec, mask_cells):
    """The paper's loss written out: mean over masked pixels and channels of |x - x_rec|."""
    total, n = 0.0, 0
    ph, pw = x.shape[2] // mask_cells.shape[1], x.shape[3] // mask_cells.shape[2]
    for b in range(x.shape[0]):
        for i in range(mask_cells.shape[1]):
            for j in range(mask_cells.shape[2]):
                if mask_cells[b, i, j]:
                    d = (x[b, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                         - x_rec[b, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]).abs()
                    total, n = total + d.sum(), n + d.numel()
    return total / n


def test_loss_and_gradients_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    rec = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, 4, generator=g) < 0.6
    ours = masked_l1_loss(x, rec, mask)
    (ga,) = torch.autograd.grad(ours, rec)
    rec2 = rec.detach().clone().requires_grad_()
    ref = reference_loss(x, rec2, mask)
    (gb,) = torch.autograd.grad(ref, rec2)
    assert torch.allclose(ours.double(), ref, rtol=1e-5)    # ours accumulates in fp32, and adds 1e-5 to the count
    assert torch.allclose(ga.double(), gb, rtol=1e-4, atol=1e-9)
    pix = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(x)
    assert (ga[~pix] == 0).all() and (ga[pix] != 0).all()   # unmasked pixels get no gradient


def test_loss_is_zero_for_a_perfect_reconstruction_and_ignores_unmasked_pixels():
    x = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = mask[1, 1, 0] = True
    assert masked_l1_loss(x, x, mask) == 0
    other = x.clone()
    other[:, :, :, :] += 5.0
    pix = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(x)
    other[pix] = x[pix]
    assert masked_l1_loss(x, other, mask) == 0                 # only masked pixels count
    mean_abs = x[pix].abs().mean()
    assert torch.allclose(masked_l1_loss(x, torch.zeros_like(x), mask), mean_abs, rtol=1e-5)


# -------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_masked_pixels_do_not_reach_the_encoder(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 32, 32)
    grid = 32 // model.backbone.patch_embed.patch_size[0]
    mask = torch.zeros(2, grid, grid, dtype=torch.bool)
    mask[:, : grid // 2] = True                                   # the top half of each image
    y = x.clone()
    y[:, :, :16] = torch.randn(2, 3, 16, 32)
    z = model.encode(x, mask)
    assert torch.allclose(z, model.encode(y, mask), atol=1e-6)    # masked pixels are replaced by the token
    assert not torch.allclose(z, model.encode(y, mask.logical_not()), atol=1e-3)
    rec = model.reconstruct(x, mask)
    assert rec.shape == x.shape


def test_swin_base_shapes_and_parameter_counts():
    cfg = recipe("swin_base_800ep")
    model = SimMIM(cfg.model)
    assert model.stride == 32
    assert count_parameters(model.backbone) + model.mask_token.numel() == 86_725_304
    assert count_parameters(model.decoder) == 3_148_800
    x = torch.randn(1, 3, 192, 192)
    mask = make_transform(cfg, model).masks()[None]
    assert mask.shape == (1, 48, 48)
    with torch.no_grad():
        z = model.encode(x, mask)
        assert z.shape == (1, 1024, 6, 6)
        assert model.decoder(z).shape == (1, 3, 192, 192)


# ------------------------------------------------------------------------------------------- init
def one_sigma_truncated_std(std: float) -> float:
    """Standard deviation of N(0, std²) conditioned on |x| <= std: for a standard normal cut to
    [-1, 1], Var = 1 - 2 phi(1) / (Phi(1) - Phi(-1)), phi the density, Phi(1) - Phi(-1) = erf(1/sqrt 2)."""
    phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    return std * math.sqrt(1 - 2 * phi1 / math.erf(1 / math.sqrt(2)))


def check_draw(w: torch.Tensor, std: float, bound: float, what: str) -> None:
    """w looks like n draws of N(0, std'²) cut at ±bound: its root mean square within 5/sqrt(n)
    (relative; the estimator's relative error is below 0.71/sqrt(n) for any law cut at ±1 sd), every
    |w| <= bound (up to float rounding), and the largest close to the bound (a tighter cut would fail)."""
    w = w.detach().double().flatten()
    rms, top = w.pow(2).mean().sqrt().item(), w.abs().max().item()
    assert math.isclose(rms, std, rel_tol=5 / math.sqrt(w.numel())), (what, rms, std)
    assert top <= bound * (1 + 1e-6), (what, top, bound)
    if w.numel() >= 768:
        assert top >= 0.98 * bound, (what, top, bound)


def check_official_vit_init(model: SimMIM) -> None:
    """VisionTransformerForSimMIM (models/simmim.py) truncates every `_trunc_normal_` of its BEiT base
    at ±1 std: class token, mask token, every Linear and the patch Conv2d are N(0, 0.02²) cut to
    [-0.02, 0.02]; biases 0, LayerNorms 1 / 0, position-bias table, q/v biases 0, layer scale 0.1;
    then attn.proj and mlp.fc2 of block i (from 1) are divided by sqrt(2 i)."""
    bb, sd = model.backbone, one_sigma_truncated_std(0.02)
    assert 0.01078 < sd < 0.01080                                   # not 0.02: 0.54 of it
    check_draw(bb.cls_token, sd, 0.02, "cls_token")
    check_draw(model.mask_token, sd, 0.02, "mask_token")
    check_draw(bb.patch_embed.proj.weight, sd, 0.02, "patch_embed")
    assert (bb.patch_embed.proj.bias == 0).all()
    assert (bb.rel_pos_bias.relative_position_bias_table == 0).all()
    for i, blk in enumerate(bb.blocks, start=1):
        for name in ("attn.qkv", "mlp.fc1"):
            check_draw(blk.get_submodule(name).weight, sd, 0.02, f"{i}.{name}")
        r = math.sqrt(2 * i)
        for name in ("attn.proj", "mlp.fc2"):
            check_draw(blk.get_submodule(name).weight, sd / r, 0.02 / r, f"{i}.{name}")
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            assert (blk.get_submodule(name).bias == 0).all()
        assert (blk.attn.q_bias == 0).all() and (blk.attn.v_bias == 0).all() and blk.attn.qkv.bias is None
        assert (blk.gamma_1 == 0.1).all() and (blk.gamma_2 == 0.1).all()
    norms = [m for m in bb.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * len(bb.blocks) + 1
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    assert model.decoder[0].weight.abs().max() > 0.02              # the head keeps PyTorch's default


def test_tiny_vit_init_is_the_official_one_sigma_truncation():
    torch.manual_seed(0)
    check_official_vit_init(tiny_vit(embed_dim=48, depth=3, num_heads=2))


def test_the_demo_s_timm_vit_init_is_untruncated():
    """`model.vit_init: timm` (the CPU demo only): timm's BEiT draws, std 0.02 with no truncation, the
    patch projection drawn like them, the mask token still cut at ±1 std."""
    torch.manual_seed(0)
    model = SimMIM(SimMIMModelConfig(vit_init="timm", backbone=BackboneConfig(
        name="beit_base_patch16_224", img_size=32, kwargs={**VIT_KWARGS, "patch_size": 4, "embed_dim": 48,
                                                          "depth": 3, "num_heads": 2})))
    qkv = model.backbone.blocks[0].attn.qkv.weight
    assert math.isclose(qkv.std().item(), 0.02, rel_tol=5 / math.sqrt(qkv.numel())) and qkv.abs().max() > 0.05
    pe = model.backbone.patch_embed.proj.weight
    assert math.isclose(pe.std().item(), 0.02, rel_tol=5 / math.sqrt(pe.numel())) and pe.abs().max() > 0.05
    assert model.mask_token.abs().max() <= 0.02


def test_swin_init_is_not_truncated():
    """The official Swin keeps timm's trunc_normal_ (bounds ±2, absolute): plain N(0, 0.02²)."""
    torch.manual_seed(0)
    model = tiny_swin()
    w = torch.cat([m.weight.flatten() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)])
    assert math.isclose(w.std().item(), 0.02, rel_tol=5 / math.sqrt(w.numel()))
    assert w.abs().max() > 0.05                                     # 2.5 std: untruncated
    assert math.isclose(model.mask_token.std().item(), 0.02, rel_tol=0.5)


def test_vit_base_shapes_parameter_counts_and_init():
    cfg = recipe("vit_base_800ep")
    torch.manual_seed(0)
    model = SimMIM(cfg.model)
    bb = model.backbone
    assert model.stride == 16
    assert count_parameters(bb) + model.mask_token.numel() == 85_666_128
    assert count_parameters(model.decoder) == 590_592
    assert bb.pos_embed is None and bb.rel_pos_bias.relative_position_bias_table.shape == (732, 12)
    assert all(blk.attn.relative_position_bias_table is None for blk in bb.blocks)
    assert (bb.blocks[0].gamma_1 == 0.1).all() and (bb.blocks[11].gamma_2 == 0.1).all()
    assert bb.blocks[0].attn.q_bias is not None and bb.blocks[0].attn.v_bias is not None
    check_official_vit_init(model)
    x = torch.randn(1, 3, 224, 224)
    mask = make_transform(cfg, model).masks()[None]
    assert mask.shape == (1, 14, 14) and mask.sum() == 30 * 4
    with torch.no_grad():
        z = model.encode(x, mask)
        assert z.shape == (1, 768, 14, 14)
        assert model.decoder(z).shape == (1, 3, 224, 224)
        assert bb(x).shape == (1, 768)                              # pooled features for kNN / probes


# ---------------------------------------------------------------------------- optimisation recipes
def groups_of(model, cfg):
    out = {}
    for g in param_groups(model, cfg.optim, 2048):
        for n in g["param_names"]:
            out[n] = g["group"]
    return out


def test_weight_decay_groups_reproduce_the_official_quirks():
    cfg = recipe("swin_base_800ep", "model.backbone.kwargs.depths=[2,2,2,2]")
    swin = groups_of(SimMIM(cfg.model), cfg)
    assert swin["mask_token"] == "no_decay"
    assert swin["backbone.layers.0.blocks.0.attn.relative_position_bias_table"] == "decay"   # quirk 1
    assert swin["backbone.layers.0.blocks.0.attn.qkv.weight"] == "decay"
    assert swin["backbone.layers.0.blocks.0.norm1.weight"] == "no_decay"
    assert swin["backbone.patch_embed.proj.bias"] == "no_decay"
    cfg = recipe("vit_base_800ep", "model.backbone.kwargs.depth=2")
    vit = groups_of(SimMIM(cfg.model), cfg)
    assert vit["mask_token"] == "decay" and vit["backbone.rel_pos_bias.relative_position_bias_table"] == "decay"  # quirk 2
    assert vit["backbone.cls_token"] == "no_decay"
    assert vit["backbone.blocks.0.gamma_1"] == "no_decay" and vit["backbone.blocks.0.attn.q_bias"] == "no_decay"
    assert vit["decoder.0.weight"] == "decay" and vit["decoder.0.bias"] == "no_decay"


def timm_lr(kind: str, t: int, base: float, warmup_lr: float, min_lr: float, warmup: int, total: int,
            milestones=()):
    """The official schedulers' value at update t: timm's CosineLRScheduler (t_in_epochs=False,
    cycle_limit 1), or SimMIM's MultiStepLRScheduler (linear warm-up, then x 0.1 per milestone passed)."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if kind == "step":
        return base * 0.1 ** sum(t >= m for m in milestones)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("name,peak,warmup_lr,min_lr", [("swin_base_800ep", 4e-4, 2e-6, 0.0),
                                                        ("swin_base_100ep", 8e-4, 4e-6, 4e-5),
                                                        ("vit_base_800ep", 4e-4, 2e-6, 0.0)])
def test_schedules_match_the_official_schedulers(name, peak, warmup_lr, min_lr):
    cfg = recipe(name)
    assert global_batch(cfg.train, 16) == 2048 and cfg.optim.clip_grad == 5.0
    spe = 625                                              # ImageNet-1k at batch 2048
    g = param_groups(torch.nn.Linear(2, 2), cfg.optim, 2048)[0]
    assert math.isclose(g["peak_lr"], peak, rel_tol=1e-12)
    total = spe * cfg.train.epochs
    kind = cfg.sched.kind
    for t in (0, 1, 3000, 6249, 6250, 6251, 100_000, 437_499, 437_500, total - 1):
        if t >= total:
            continue
        ours = peak * lr_factor(t, spe, cfg.train.epochs, cfg.sched)
        ref = timm_lr(kind, t, peak, warmup_lr, min_lr, 10 * spe, total, [700 * spe])
        assert math.isclose(ours, ref, rel_tol=1e-9, abs_tol=1e-15), (t, ours, ref)


# ------------------------------------------------------------------------------------ end to end
def test_tiny_run_and_one_line_errors(tmp_path):
    common = ["simmim/train.py", "--config", str(CONFIGS / "demo.yaml"), "data.synthetic.length=64",
              "data.synthetic.val_length=32", "data.workers=0", "model.backbone.kwargs.depth=1",
              "model.backbone.kwargs.embed_dim=24", "train.batch_size=16", "train.epochs=1",
              "train.tensorboard=false", "eval.after_train=[knn]", "eval.compare_random_init=false",
              "eval.knn.block=1"]
    r = run_cli([*common, f"train.out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert "mask_token" not in sd and "rel_pos_bias.relative_position_bias_table" in sd
    r = run_cli(["simmim/show_reconstruction.py", str(tmp_path / "last.pt"), "--images", "2"])
    assert r.returncode == 0 and "masked-pixel L1" in r.stdout, r.stderr[-2000:]
    with Image.open(tmp_path / "reconstruction.png") as img:        # 4 panels of 128 px, 2 rows
        assert img.size == (4 * 128 + 3 * 8, 18 + 2 * 128 + 8)
    r = run_cli([*common, f"train.out_dir={tmp_path / 'b'}", "model.mask_patch_size=12"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: model.mask_patch_size=12")
    r = run_cli([*common, f"train.out_dir={tmp_path / 'd'}", "eval.knn.block=2"])
    assert r.returncode == 2 and "error: eval.knn.block=2: expected a block of the ViT, 1..1" in r.stderr
    assert not (tmp_path / "d" / "last.pt").exists()                         # refused before training
    two = ["aug.views=[{size: 32}, {size: 32}]"]
    r = run_cli([*common, f"train.out_dir={tmp_path / 'c'}", *two])
    assert r.returncode == 2 and "aug.views: SimMIM takes exactly one view" in r.stderr


def test_recipes_load_and_name_a_supported_backbone():
    for name in ("swin_base_100ep", "swin_base_800ep", "swin_large_800ep", "vit_base_800ep", "demo", "demo_swin"):
        cfg = recipe(name)
        assert cfg.model.mask_patch_size in (32, 8) and cfg.model.mask_ratio == 0.6
        assert list(cfg.aug.views[0].crop_scale) == [0.67, 1.0] and list(cfg.aug.views[0].order) == ["crop", "flip"]
    with pytest.raises(ConfigError, match="SimMIM takes a timm Swin"):
        SimMIM(SimMIMModelConfig(backbone=BackboneConfig(name="resnet18")))


# ------------------------------------------------------------------------------------ fine-tuning
def test_layer_decay_scales_of_vit_base_at_0_65():
    from shared.eval.finetune import Finetuner, MixupCutmix, finetune_backbone
    cfg = recipe("vit_base_800ep")
    pre = SimMIM(cfg.model).backbone
    ft = Finetuner(finetune_backbone(cfg, pre), 10, MixupCutmix(10, 0, 0), 2e-5, 0.65)
    assert ft.lr_scale("head.weight") == 1.0 and ft.lr_scale("backbone.fc_norm.weight") == 1.0
    assert math.isclose(ft.lr_scale("backbone.blocks.11.mlp.fc1.weight"), 0.65)
    assert math.isclose(ft.lr_scale("backbone.blocks.11.attn.relative_position_bias_table"), 0.65)
    assert math.isclose(ft.lr_scale("backbone.blocks.0.attn.qkv.weight"), 0.65 ** 12)
    assert math.isclose(ft.lr_scale("backbone.patch_embed.proj.weight"), 0.65 ** 13)
    assert math.isclose(ft.lr_scale("backbone.cls_token"), 0.65 ** 13)


def test_swin_layer_ids_follow_the_official_stage_depths():
    from shared.eval.finetune import layer_id
    d = [2, 2, 18, 2]
    ids = {n: layer_id(n, 24, d) for n in (
        "patch_embed.proj.weight", "layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.1.norm1.weight",
        "layers.1.downsample.reduction.weight",   # the official layers.0.downsample: sum(depths[:1]) = 2
        "layers.1.blocks.0.mlp.fc1.weight", "layers.2.blocks.17.mlp.fc2.bias", "layers.3.downsample.norm.weight",
        "layers.3.blocks.1.attn.proj.weight", "norm.weight", "head.fc.weight")}
    assert list(ids.values()) == [0, 1, 2, 2, 3, 22, 22, 24, 25, 25]


def test_relative_position_bias_resampling():
    from shared.eval.remap import geometric_offsets, resize_rpb_table
    t = torch.randn(11 * 11 + 3, 4)
    assert torch.equal(resize_rpb_table(t, 11 * 11 + 3, 3), t)        # same size: exact copy
    # a bicubic polynomial of the offsets is reproduced exactly (the spline is cubic, not-a-knot)
    xs, xq = geometric_offsets(11, 13)
    assert math.isclose(xs[-1].item(), 6.0, abs_tol=1e-4) and xq.tolist() == list(range(-6, 7))
    poly = lambda y, x: 0.01 * x ** 3 - 0.2 * x * y ** 2 + 0.5 * y - 1.0          # noqa: E731
    src = torch.stack([poly(xs[:, None], xs[None, :]).reshape(-1)] * 2, 1).float()
    out = resize_rpb_table(torch.cat([src, torch.ones(3, 2)]), 13 * 13 + 3, 3)
    xq = xq.clamp(xs[0], xs[-1])
    assert torch.allclose(out[:169, 0].double(), poly(xq[:, None], xq[None, :]).reshape(-1), atol=1e-4)
    assert torch.equal(out[169:], torch.ones(3, 2))                     # class-token entries kept


def test_resampling_matches_scipys_bicubic_spline():
    scipy = pytest.importorskip("scipy.interpolate", reason="SciPy is not a dependency; compared where present")
    from shared.eval.remap import geometric_offsets, resize_rpb_table
    t = torch.randn(23 * 23, 3, dtype=torch.float64)
    xs, xq = geometric_offsets(23, 27)
    xq = xq.clamp(xs[0], xs[-1]).numpy()
    ref = [scipy.RectBivariateSpline(xs.numpy(), xs.numpy(), t[:, h].view(23, 23).numpy(), kx=3, ky=3, s=0)(xq, xq)
           for h in range(3)]
    ref = torch.stack([torch.as_tensor(r).reshape(-1) for r in ref], 1)
    assert torch.allclose(resize_rpb_table(t, 27 * 27, 0), ref, atol=1e-9)


def test_vit_pretraining_weights_become_the_fine_tuning_model():
    from shared.eval.finetune import finetune_backbone
    cfg = recipe("vit_base_800ep", "model.backbone.kwargs.depth=2")
    pre = SimMIM(cfg.model).backbone
    with torch.no_grad():
        pre.rel_pos_bias.relative_position_bias_table.normal_()
        pre.norm.weight.fill_(3.0)
    ft = finetune_backbone(cfg, pre)
    shared = pre.rel_pos_bias.relative_position_bias_table
    assert ft.rel_pos_bias is None
    assert all(torch.equal(b.attn.relative_position_bias_table, shared) for b in ft.blocks)
    assert isinstance(ft.norm, torch.nn.Identity) and (ft.fc_norm.weight == 1).all()
    assert torch.equal(ft.blocks[1].mlp.fc2.weight, pre.blocks[1].mlp.fc2.weight)
    assert abs(ft.blocks[-1].drop_path1.drop_prob - 0.1) < 1e-6              # fine-tuning drop path
    x = torch.randn(2, 3, 224, 224)
    assert ft.eval()(x).shape == (2, 768)


def test_swin_192_window_6_loads_into_224_window_7():
    from shared.eval.finetune import finetune_backbone
    cfg = recipe("swin_base_800ep", "model.backbone.kwargs.depths=[2,2,2,2]")
    pre = SimMIM(cfg.model).backbone
    ft = finetune_backbone(cfg, pre)
    key = "layers.2.blocks.1.attn.relative_position_bias_table"
    assert pre.state_dict()[key].shape == (11 * 11, 16) and ft.state_dict()[key].shape == (13 * 13, 16)
    assert torch.equal(ft.state_dict()["layers.3.downsample.reduction.weight"],
                       pre.state_dict()["layers.3.downsample.reduction.weight"])
    assert ft.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1024)


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_official_checkpoint_names_round_trip(make, tmp_path):
    from simmim.convert import from_official, main, to_official
    model = make()
    ours = model.state_dict()
    official = to_official(ours)
    assert "encoder.mask_token" in official and "decoder.0.weight" in official
    assert not any(k.startswith("backbone.") for k in official)
    if model.is_vit:
        assert "encoder.rel_pos_bias.relative_position_bias_table" in official
    else:   # the official Swin closes stage 0 with its patch merging; timm opens stage 1 with it
        assert "encoder.layers.0.downsample.reduction.weight" in official
        assert not any(k.startswith("encoder.layers.1.downsample") for k in official)
    official["encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(3)   # buffers are dropped
    back = from_official(official)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    torch.save({"model": official, "epoch": 3}, tmp_path / "official.pth")
    main([str(tmp_path / "official.pth"), str(tmp_path / "bb.pt")])
    bb = torch.load(tmp_path / "bb.pt", weights_only=True)
    model.backbone.load_state_dict(bb)                                        # strict


def test_linear_probe_features_of_block_8():
    from shared.eval.linear import BlockFeatures
    cfg = recipe("vit_base_800ep", "model.backbone.kwargs.depth=9")
    assert cfg.eval.linear.block == 8
    bb = SimMIM(cfg.model).backbone.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        f = BlockFeatures(bb, 8)(x)
        t = bb.patch_embed(x)
        t = torch.cat([bb.cls_token.expand(2, -1, -1), t], 1)
        rpb = bb.rel_pos_bias()
        for blk in bb.blocks[:8]:
            t = blk(t, shared_rel_pos_bias=rpb)
    assert f.shape == (2, 768) and torch.allclose(f, t[:, 1:].mean(1), atol=1e-5)
    with pytest.raises(ConfigError, match="eval.linear.block=10"):
        BlockFeatures(bb, 10)


@pytest.mark.parametrize("name,params", [
    ("vit_base_800ep", 86_530_984),      # per-block position biases, fc_norm, 1000-way head
    ("swin_base_800ep", 87_768_224),     # 224 px, window 7
    # 224 px, window 14: the official Swin shrinks a window to a smaller feature map, so stage 4 (7x7)
    # keeps 13x13 tables; counted with 27x27 ones there it would be 196,848,316
    ("swin_large_800ep", 196_794_556)])
def test_fine_tuning_model_parameter_counts(name, params):
    from shared.eval.finetune import finetune_backbone
    cfg = recipe(name)
    ft = finetune_backbone(cfg, SimMIM(cfg.model).backbone)
    assert count_parameters(ft) + ft.num_features * 1000 + 1000 == params
