"""ConvMAE: parameter counts, stage shapes, masking, the no-leakage property of the masked convolution,
layer-decay ids, the loss against an independent reference, the recipes and the fine-tuning hand-over."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from convmae.loss import mae_loss, patchify, unpatchify
from convmae.model import ConvMAE, ConvMAEModelConfig, random_masking, upsample_mask
from convmae.train import Config
from shared.config import BackboneConfig, build_config
from shared.models import build_backbone, count_parameters
from shared.models.convvit import ConvViT, sincos_pos_embed_2d

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "convmae" / "configs").glob("*.yaml"))


def tiny_cfg(img: int = 64, **kw) -> ConvMAEModelConfig:
    """The ConvViT-B geometry (patches 4-2-2, one token = a 16-px block) at small widths."""
    kwargs = dict(patch_size=[4, 2, 2], embed_dim=[16, 24, 32], depth=[1, 1, 2], num_heads=2)
    kwargs.update(kw)
    return ConvMAEModelConfig(backbone=BackboneConfig(name="convvit_base_patch16", img_size=img, kwargs=kwargs),
                              decoder_dim=32, decoder_depth=1, decoder_heads=2)


# ------------------------------------------------------------------------------ sizes and shapes
def test_parameter_counts_of_the_official_models():
    with torch.device("meta"):
        finetune = ConvViT(num_classes=1000, fc_norm=True)       # models_convvit.convvit_base_patch16(global_pool=True)
        pretrain = ConvMAE(ConvMAEModelConfig())                  # convmae_convvit_base_patch16_dec512d8b
    assert count_parameters(finetune) == 85_374_824
    assert count_parameters(finetune.blocks3[0]) == 7_087_872
    assert count_parameters(finetune.blocks1[0]) == 664_832
    assert count_parameters(pretrain) == 115_041_408
    assert count_parameters(pretrain.backbone) == 84_605_824
    # frozen: the two sin-cos position embeddings (150,528 + 100,352)
    assert count_parameters(pretrain, trainable_only=True) == 115_041_408 - 250_880
    assert count_parameters(pretrain.decoder_blocks[0]) == 3_152_384


def test_stage_shapes_at_224():
    with torch.device("meta"):
        m = ConvMAE(ConvMAEModelConfig())
        x = torch.empty(2, 3, 224, 224)
        ids_keep, mask, ids_restore = random_masking(2, m.backbone.num_patches, 0.75)
        v1, v2 = m.visible_maps(mask)
        s1, s2, t = m.backbone.stage_maps(x, (v1, v2))
        latent = m.encode(x, mask, ids_keep)
        pred = m.decode(latent, ids_restore)
    assert tuple(s1.shape) == (2, 256, 56, 56) and tuple(s2.shape) == (2, 384, 28, 28)
    assert tuple(t.shape) == (2, 196, 768) and tuple(ids_keep.shape) == (2, 49)
    assert tuple(v1.shape) == (2, 1, 56, 56) and tuple(v2.shape) == (2, 1, 28, 28)
    assert tuple(latent.shape) == (2, 49, 768) and tuple(pred.shape) == (2, 196, 768)


def test_layer_norm_eps_per_place():
    bb = ConvViT(img_size=32, patch_size=(2, 2, 2), embed_dim=(8, 8, 8), depth=(1, 1, 1), num_heads=2)
    assert bb.patch_embed1.norm.eps == 1e-5 and bb.blocks1[0].norm1.eps == 1e-5 and bb.blocks2[0].norm2.eps == 1e-5
    assert bb.blocks3[0].norm1.eps == 1e-6 and bb.norm.eps == 1e-6
    m = ConvMAE(tiny_cfg())
    assert m.decoder_blocks[0].norm2.eps == 1e-6 and m.decoder_norm.eps == 1e-6


def test_sincos_table_matches_its_formula():
    dim, grid = 8, 3
    table = sincos_pos_embed_2d(dim, grid)
    omega = [1.0 / 10000 ** (k / 2.0) for k in range(2)]        # dim/4 = 2 frequencies per axis
    for i in range(grid):
        for j in range(grid):
            row = table[i * grid + j]
            want = ([math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
                    + [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega])
            assert row.tolist() == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------------- masking
def test_mask_rows_and_upsample_equivalence():
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(5, 196, 0.75)
    assert mask.sum(1).tolist() == [147.0] * 5
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros(5, 49))
    # the official expression of models_convmae.forward_encoder, written out
    official1 = mask.reshape(-1, 14, 14).unsqueeze(-1).repeat(1, 1, 1, 16).reshape(-1, 14, 14, 4, 4) \
        .permute(0, 1, 3, 2, 4).reshape(5, 56, 56).unsqueeze(1)
    official2 = mask.reshape(-1, 14, 14).unsqueeze(-1).repeat(1, 1, 1, 4).reshape(-1, 14, 14, 2, 2) \
        .permute(0, 1, 3, 2, 4).reshape(5, 28, 28).unsqueeze(1)
    assert torch.equal(upsample_mask(mask, 14, 4), official1)
    assert torch.equal(upsample_mask(mask, 14, 2), official2)
    assert official1.mean().item() == 0.75
    # the visible maps are their complement
    m = ConvMAE(tiny_cfg(img=224, embed_dim=[8, 8, 8], depth=[1, 1, 1]))
    v1, v2 = m.visible_maps(mask)
    assert torch.equal(v1, 1 - official1) and torch.equal(v2, 1 - official2)


def _blocks(mask_row: torch.Tensor, grid: int):
    return [(i // grid, i % grid) for i in range(grid * grid) if mask_row[i] > 0]


def test_no_leakage_from_masked_blocks():
    """With a fixed mask, the pixels of masked 16x16 blocks do not reach the visible stage-3 tokens:
    neither before the transformer (nor the fused stage-1/2 features) nor the encoder's output."""
    torch.manual_seed(0)
    m = ConvMAE(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64)
    ids_keep, mask, _ = random_masking(2, 16, 0.75)
    grid = 4

    def visible_stage3(img):
        s1, s2, t = m.backbone.stage_maps(img, m.visible_maps(mask))
        e1 = m.stage1_output_decode(s1).flatten(2).transpose(1, 2)
        e2 = m.stage2_output_decode(s2).flatten(2).transpose(1, 2)
        keep = ids_keep.unsqueeze(-1)
        return [torch.gather(v, 1, keep.expand(-1, -1, v.shape[-1])) for v in (t, e1, e2)]

    with torch.no_grad():
        ref_tokens, ref_latent = visible_stage3(x), m.encode(x, mask, ids_keep)
        y = x.clone()
        for b in range(2):
            for i, j in _blocks(mask[b], grid):
                y[b, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16] = torch.randn(3, 16, 16) * 5
        assert not torch.equal(x, y)
        for a, r in zip(visible_stage3(y), ref_tokens):
            assert torch.equal(a, r)
        assert torch.equal(m.encode(y, mask, ids_keep), ref_latent)
        # a visible block does change them
        z = x.clone()
        i, j = divmod(int(ids_keep[0, 0]), grid)
        z[0, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16] += 1.0
        assert not torch.equal(m.encode(z, mask, ids_keep)[0], ref_latent[0])
        assert torch.equal(m.encode(z, mask, ids_keep)[1], ref_latent[1])
        # and without the masked convolution the masked pixels would leak
        s1, s2, t = m.backbone.stage_maps(y)
        t0 = m.backbone.stage_maps(x)[2]
        keep = ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        assert not torch.equal(torch.gather(t, 1, keep), torch.gather(t0, 1, keep))


# ---------------------------------------------------------------------------------------- loss
def reference_loss(imgs, pred, mask, p, norm_pix):
    """Written from the paper's formulas, patch by patch."""
    b, c, h, w = imgs.shape
    g = h // p
    total, count = 0.0, 0.0
    for n in range(b):
        for t in range(g * g):
            i, j = divmod(t, g)
            patch = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                mu = patch.sum() / patch.numel()
                var = ((patch - mu) ** 2).sum() / (patch.numel() - 1)
                patch = (patch - mu) / torch.sqrt(var + 1e-6)
            err = ((pred[n, t] - patch) ** 2).sum() / patch.numel()
            total = total + err * mask[n, t]
            count = count + mask[n, t]
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_reference_values_and_gradients(norm_pix):
    torch.manual_seed(1)
    p = 4
    imgs = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    pred = torch.randn(2, 9, p * p * 3, dtype=torch.float64, requires_grad=True)
    _, mask, _ = random_masking(2, 9, 0.6)
    loss = mae_loss(imgs, pred, mask, patch_size=p, norm_pix=norm_pix)
    (g,) = torch.autograd.grad(loss, pred)
    pred2 = pred.detach().clone().requires_grad_(True)
    ref = reference_loss(imgs, pred2, mask.double(), p, norm_pix)
    (g_ref,) = torch.autograd.grad(ref, pred2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(g.double(), g_ref, atol=1e-9)
    # analytic: d/dpred = 2 (pred - target) mask / (p² C · number masked)
    target = patchify(imgs, p)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    analytic = 2 * (pred.detach() - target) * mask[..., None] / (p * p * 3 * mask.sum())
    assert torch.allclose(g.double(), analytic, atol=1e-9)


def test_patchify_order_and_inverse():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(x, 4)
    assert patches.shape == (2, 4, 48)
    # token 1 = row 0, column 1; its entry (row 0, col 0, channel 1) is x[:, 1, 0, 4]
    assert patches[0, 1, 1].item() == x[0, 1, 0, 4].item()
    assert torch.equal(unpatchify(patches, 4), x)


# ------------------------------------------------------------------------------- optimisation
def test_layer_decay_ids_and_scales():
    from shared.eval.finetune import Finetuner
    bb = ConvViT(img_size=32, patch_size=(2, 2, 2), embed_dim=(8, 8, 8), depth=(2, 2, 11), num_heads=2, fc_norm=True)
    ids = {n: bb.lr_decay_layer_id(n) for n, _ in bb.named_parameters()}
    assert ids["pos_embed"] == 0 and ids["patch_embed4.weight"] == 0 and ids["patch_embed1.proj.weight"] == 0
    assert ids["blocks1.1.attn.weight"] == 0 and ids["blocks2.0.mlp.fc1.weight"] == 0
    assert ids["blocks3.0.attn.qkv.weight"] == 1 and ids["blocks3.10.mlp.fc2.bias"] == 11
    assert ids["fc_norm.weight"] == 12
    ft = Finetuner(bb, 10, mix=None, layer_decay=0.65)
    assert ft.lr_scale("backbone.blocks1.0.conv1.weight") == pytest.approx(0.65 ** 12)
    assert ft.lr_scale("backbone.blocks3.4.norm1.weight") == pytest.approx(0.65 ** 7)
    assert ft.lr_scale("head.weight") == 1.0 and ft.lr_scale("backbone.fc_norm.bias") == 1.0


def test_drop_path_over_all_fifteen_blocks():
    bb = build_backbone(BackboneConfig(name="convvit_base_patch16", img_size=32, drop_path=0.1,
                                       kwargs=dict(embed_dim=[8, 8, 8], num_heads=2, patch_size=[2, 2, 2])))
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0
             for blk in [*bb.blocks1, *bb.blocks2]] + \
            [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in bb.blocks3]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 15).tolist())


def test_pretraining_weight_decay_groups():
    from shared.optim import param_groups
    cfg = build_config(Config, [ROOT / "convmae/configs/pretrain_1600ep.yaml"])
    m = ConvMAE(tiny_cfg())
    groups = param_groups(m, cfg.optim, 2048)
    names = {g["group"]: set(g["param_names"]) for g in groups}
    assert "mask_token" in names["decay"]                         # 3-D: decayed, as timm 0.3.2's add_weight_decay
    assert "backbone.blocks3.0.attn.qkv.bias" in names["no_decay"]
    assert "backbone.patch_embed1.norm.weight" in names["no_decay"]
    everything = names["decay"] | names["no_decay"]
    assert "backbone.pos_embed" not in everything and "decoder_pos_embed" not in everything   # frozen
    assert groups[0]["peak_lr"] == pytest.approx(1.2e-3)           # 1.5e-4 x 2048 / 256


def test_pretraining_schedule_values():
    from shared.optim import lr_factor
    cfg = build_config(Config, [ROOT / "convmae/configs/pretrain_1600ep.yaml"])
    spe, ep = 625, 1600
    assert lr_factor(0, spe, ep, cfg.sched) == 0.0
    assert lr_factor(20 * spe, spe, ep, cfg.sched) == pytest.approx(0.5)
    assert lr_factor(40 * spe, spe, ep, cfg.sched) == pytest.approx(1.0)
    assert lr_factor(820 * spe, spe, ep, cfg.sched) == pytest.approx(0.5)   # half-way through the cosine
    assert lr_factor(ep * spe - 1, spe, ep, cfg.sched) == pytest.approx(0.0, abs=1e-8)


def test_finetune_schedule_starts_cosine_after_warmup():
    from shared.eval.finetune import finetune_config
    from shared.optim import lr_factor
    cfg = build_config(Config, [ROOT / "convmae/configs/pretrain_1600ep.yaml"])
    fcfg = finetune_config(cfg, Path("/tmp/unused"), no_decay=cfg.eval.finetune.no_decay)
    spe, ep = 1251, 100
    assert lr_factor(0, spe, ep, fcfg.sched) == 0.0
    assert lr_factor(5 * spe, spe, ep, fcfg.sched) == pytest.approx(1.0)
    peak, floor = 2e-3, 1e-6
    want = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 45 / 95))   # util/lr_sched.py at epoch 50
    assert lr_factor(50 * spe, spe, ep, fcfg.sched) * peak == pytest.approx(want)


# ---------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_load(recipe):
    cfg = build_config(Config, [recipe])
    assert cfg.model.backbone.name == "convvit_base_patch16"
    assert cfg.optim.betas == (0.9, 0.95) and cfg.model.mask_ratio == 0.75
    assert cfg.aug.views[0].crop_scale == (0.2, 1.0) and cfg.aug.views[0].interpolation == "bicubic"
    if recipe.stem != "demo":
        assert cfg.train.epochs == int(recipe.stem.split("_")[1][:-2]) and cfg.train.batch_size == 2048


def test_bad_backbone_is_one_clear_error():
    from shared.errors import ConfigError
    with pytest.raises(ConfigError, match="ConvViT"):
        ConvMAE(ConvMAEModelConfig(backbone=BackboneConfig(name="resnet18")))


def test_finetune_backbone_loads_the_pretrained_encoder():
    from shared.eval.finetune import finetune_backbone
    cfg = build_config(Config, [ROOT / "convmae/configs/demo.yaml"])
    torch.manual_seed(0)
    m = ConvMAE(cfg.model)
    ft = finetune_backbone(cfg, m.backbone)
    assert ft.fc_norm is not None and isinstance(ft.norm, torch.nn.Identity)
    assert torch.equal(ft.pos_embed, m.backbone.pos_embed) and ft.pos_embed.requires_grad
    assert torch.equal(ft.blocks3[0].attn.qkv.weight, m.backbone.blocks3[0].attn.qkv.weight)
    x = torch.randn(2, 3, 32, 32)
    assert ft.eval()(x).shape == (2, 96)


def test_training_step_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = ConvMAE(tiny_cfg(img=32, patch_size=[2, 2, 2]))
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        torch.manual_seed(1)                 # the same mask every step
        loss = m(([x], None))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
