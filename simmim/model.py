"""SimMIM as an nn.Module for the shared engine (ground truth: microsoft/SimMIM, `models/simmim.py`,
`data/data_simmim.py`).

data:     one view (random resized crop 0.67-1, flip, normalise) and a mask drawn per image:
          32-px mask units, ceil(0.6 x units) of them masked, repeated onto the model's token grid.
encoder:  after patch embedding (after the patch norm for Swin), the tokens of masked cells are
          replaced by a learned mask token, before any position information; the encoder sees
          every token. Output: the last feature map (B, C, H/stride, W/stride).
head:     a 1x1 convolution to stride² x 3 channels, then PixelShuffle(stride): each output token
          predicts the pixels it covers (stride 16 for ViT-B/16, 32 for Swin).
loss:     L1 on the masked pixels of the normalised input (simmim/loss.py).

Encoders are timm's: `SwinTransformer` (the official Swin, with its patch-merging layers at the
start of the next stage instead of the end of the previous one: the same computation) and `Beit`
configured as SimMIM's BEiT-style ViT (q/v biases, layer scale 0.1, no absolute position
embedding, one relative position bias shared by all blocks, final LayerNorm). `model.backbone`
is that timm model, exported as is; the mask token lives here, beside it.
init:     Swin keeps timm's (trunc-normal std 0.02, untruncated, as the official Swin); the ViT is
          re-drawn as the official one, every trunc-normal draw cut at ±1 std (`init_vit_as_simmim`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
import torch.nn as nn
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer

from shared.config import BackboneConfig, ModelConfig, ViewConfig, choice, num
from shared.data.augment import build_view
from shared.errors import ConfigError
from shared.models import build_backbone
from simmim.loss import masked_l1_loss


@dataclass
class SimMIMModelConfig(ModelConfig):
    # the recipes set the backbone (Swin-B: img_size 192, kwargs {window_size: 6}); kwargs given in
    # a recipe are merged into these defaults, so the default has none
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="swin_base_patch4_window7_224"))
    mask_patch_size: int = num(32, ">=1")       # DATA.MASK_PATCH_SIZE: side of a mask unit, in pixels
    mask_ratio: float = num(0.6, "(0,1)")         # DATA.MASK_RATIO: ceil(units x ratio) units masked per image
    # ViT only. official: VisionTransformerForSimMIM's init (every trunc-normal draw cut at ±1 std).
    # timm: timm's BEiT init (std 0.02, untruncated), the patch projection drawn like the Linears,
    # the mask token cut at ±1 std; what this project used before, kept for the CPU demo (README)
    vit_init: str = choice("official", "official", "timm")


# ---------------------------------------------------------------------------------------- data
class MaskGenerator:
    """One random mask per call: (input/unit)² units of `unit` px, exactly ceil(units x ratio) of
    them masked (a random permutation), each unit repeated (unit / model patch)² times so that the
    mask lies on the model's token grid. Bool (grid, grid), True = masked. It draws from torch's
    default generator, which the data loader seeds per (seed, epoch, image)."""

    def __init__(self, input_size: int, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if mask_patch_size <= 0 or model_patch_size <= 0 or input_size % mask_patch_size \
                or mask_patch_size % model_patch_size:
            raise ConfigError(f"model.mask_patch_size={mask_patch_size} must divide the image size {input_size} "
                              f"and be a multiple of the model's patch size {model_patch_size}")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio={mask_ratio}: expected a value in (0, 1)")
        self.units = input_size // mask_patch_size          # mask units per side
        self.scale = mask_patch_size // model_patch_size    # tokens per unit side
        self.count = int(math.ceil(self.units ** 2 * mask_ratio))

    @property
    def grid(self) -> int:
        return self.units * self.scale

    def __call__(self) -> torch.Tensor:
        cells = torch.zeros(self.units ** 2, dtype=torch.bool)
        cells[torch.randperm(self.units ** 2)[:self.count]] = True
        cells = cells.view(self.units, self.units)
        return cells.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)


class SimMIMTransform:
    """PIL image -> (augmented view, mask)."""

    def __init__(self, view: ViewConfig, masks: MaskGenerator):
        self.view, self.masks = build_view(view), masks

    def __call__(self, img) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.view(img), self.masks()

    def __repr__(self) -> str:
        return f"SimMIMTransform({self.view}, units {self.masks.units}, {self.masks.count} masked)"


# --------------------------------------------------------------------------------------- model
def patch_size(backbone: nn.Module) -> int:
    p = backbone.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def encoder_stride(backbone: nn.Module) -> int:
    """Pixels per output token: the patch size, x 2 per patch merging for Swin."""
    if isinstance(backbone, SwinTransformer):
        return patch_size(backbone) * 2 ** (len(backbone.layers) - 1)
    return patch_size(backbone)


VIT_INIT_STD = 0.02


def truncated_normal(n: int, std: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """n draws of N(0, std²) conditioned on |x| <= std, by rejection: redraw those outside until
    none is (about a third of what is left, each round). The same law as `nn.init.trunc_normal_(a=-std, b=std)`, several
    times faster on CPU than its inverse-CDF (erfinv) for the 86M weights of ViT-B."""
    x = torch.empty(n, dtype=dtype, device=device).normal_(0.0, std)
    out = (x.abs() > std).nonzero().squeeze(1)
    while out.numel():
        redraw = torch.empty(out.numel(), dtype=dtype, device=device).normal_(0.0, std)
        x[out] = redraw
        out = out[redraw.abs() > std]
    return x


@torch.no_grad()
def init_vit_as_simmim(bb: Beit, mask_token: nn.Parameter, std: float = VIT_INIT_STD) -> None:
    """Re-draw a timm `Beit` as SimMIM's pretraining ViT starts. Its `VisionTransformerForSimMIM`
    makes every trunc-normal draw of the BEiT init truncate at one standard deviation: the class
    token (and an absolute position embedding, if any), the weight of every Linear and of the patch
    projection, and the mask token all come from N(0, std²) cut to [-std, std], whose standard
    deviation is about 0.54 std. Biases are zero, LayerNorms 1 and 0; the relative position tables,
    q/v biases and layer scales keep timm's values (zeros, zeros, init_values), as the official ones.
    Then, as in BEiT, the output projections of block i (attn.proj, mlp.fc2) are divided by
    sqrt(2 i), i counted from 1. timm's own init draws the same std with bounds ±2 (absolute), that
    is without truncation, and leaves the patch projection at PyTorch's Conv2d default."""
    def draw(t: torch.Tensor) -> None:
        t.copy_(truncated_normal(t.numel(), std, t.dtype, t.device).view_as(t))

    for m in bb.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            draw(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if bb.pos_embed is not None:
        draw(bb.pos_embed)
    draw(bb.cls_token)
    for i, blk in enumerate(bb.blocks, start=1):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
    draw(mask_token)


class SimMIM(nn.Module):
    # the loss is sum |x - x̂|·m / (sum m + 1e-5) / 3: every image has the same number of masked pixels,
    # so it is the mean of per-image losses (up to the 1e-5); no BatchNorm: accumulation is exact
    BATCH_COUPLING = None

    def __init__(self, cfg: SimMIMModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        bb = self.backbone
        if not isinstance(bb, (Beit, SwinTransformer)):
            raise ConfigError(f"model.backbone.name={cfg.backbone.name}: SimMIM takes a timm Swin "
                              "(swin_*) or BEiT-style ViT (beit_*) backbone")
        self.is_vit = isinstance(bb, Beit)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, int(bb.embed_dim)))
        if self.is_vit and cfg.vit_init == "official":
            init_vit_as_simmim(bb, self.mask_token)
        elif self.is_vit:
            nn.init.trunc_normal_(bb.patch_embed.proj.weight, std=VIT_INIT_STD)   # bounds ±2: untruncated
            nn.init.zeros_(bb.patch_embed.proj.bias)
            nn.init.trunc_normal_(self.mask_token, std=VIT_INIT_STD, a=-VIT_INIT_STD, b=VIT_INIT_STD)
        else:
            nn.init.trunc_normal_(self.mask_token, std=0.02)      # bounds ±2 (absolute): no truncation
        self.stride = encoder_stride(bb)
        self.decoder = nn.Sequential(nn.Conv2d(bb.num_features, self.stride ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(self.stride))

    def _masked(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.reshape(*tokens.shape[:-1], 1).to(tokens.dtype)
        return tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), mask (B, H/p, W/p) -> the encoder's last map (B, C, H/stride, W/stride)."""
        bb = self.backbone
        grid = (x.shape[-2] // patch_size(bb), x.shape[-1] // patch_size(bb))
        if tuple(mask.shape[1:]) != grid:
            raise ValueError(f"mask grid {tuple(mask.shape[1:])} is not the token grid {grid}")
        if self.is_vit:
            t = self._masked(bb.patch_embed(x), mask)                           # (B, L, C)
            t = torch.cat([bb.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
            if bb.pos_embed is not None:
                t = t + bb.pos_embed
            t = bb.pos_drop(t)
            rpb = bb.rel_pos_bias() if bb.rel_pos_bias is not None else None
            for blk in bb.blocks:
                t = blk(t, shared_rel_pos_bias=rpb)
            t = bb.norm(t)[:, 1:]
            return t.transpose(1, 2).reshape(t.shape[0], -1, *grid)
        t = self._masked(bb.patch_embed(x), mask)                               # (B, h, w, C)
        if getattr(bb, "absolute_pos_embed", None) is not None:
            t = t + bb.absolute_pos_embed
        t = bb.norm(bb.layers(t))
        return t.permute(0, 3, 1, 2)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x, mask))

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        (x, mask), _ = batch
        return {"loss": masked_l1_loss(x, self.reconstruct(x, mask), mask)}


def make_transform(cfg, model: SimMIM) -> SimMIMTransform:
    """The pretraining transform of a run: `cfg.aug.views` must hold exactly one view."""
    views = cfg.aug.views
    if len(views) != 1 or views[0].n != 1:
        raise ConfigError(f"aug.views: SimMIM takes exactly one view, got {sum(v.n for v in views)}")
    size = views[0].size
    if size != cfg.model.backbone.img_size:
        raise ConfigError(f"aug.views.0.size={size} must equal model.backbone.img_size="
                          f"{cfg.model.backbone.img_size}")
    masks = MaskGenerator(size, cfg.model.mask_patch_size, patch_size(model.backbone), cfg.model.mask_ratio)
    return SimMIMTransform(views[0], masks)
