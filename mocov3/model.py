"""MoCo v3 as an nn.Module for the shared engine (ground truth: facebookresearch/moco-v3,
`moco/builder.py` and `vits.py`).

online:   backbone -> projector -> predictor            (queries q1, q2)
momentum: backbone -> projector, an EMA of the online    (keys k1, k2; no gradient)
          parameters (not the BatchNorm buffers), updated inside the step before the keys are
          computed, with the coefficient the engine's `sched.ema_*` schedule gives for this step.
loss:     ctr(q1, k2) + ctr(q2, k1), keys gathered over the global batch (mocov3/loss.py).

Heads are bias-free Linears; hidden layers Linear -> BN -> ReLU; the projector ends in an
affine-free BN; the predictor does too for ViTs but not for ResNets (`predictor_last_bn`).
ResNet: 2-layer projector. ViT: 3-layer projector, and the ViT is initialised as the official
`VisionTransformerMoCo` (see `moco_vit_init`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from mocov3.loss import mocov3_loss
from shared.config import BackboneConfig, ModelConfig, num
from shared.errors import ConfigError
from shared.models import build_backbone, mlp, momentum_copy, momentum_update
from shared.numerics import at_least_fp32


@dataclass
class MoCoV3ModelConfig(ModelConfig):
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="resnet50", zero_init_residual=True))
    dim: int = num(256, ">=1")                  # output of projector and predictor (--moco-dim)
    mlp_dim: int = num(4096, ">=1")             # hidden width of both MLPs (--moco-mlp-dim)
    projector_layers: int = num(2, ">=1")       # 2 for ResNets, 3 for ViTs
    predictor_last_bn: bool = False  # affine-free BN at the end of the predictor: ViTs only
    temperature: float = num(1.0, ">0")        # --moco-t: 1.0 ResNet, 0.2 ViT
    stop_grad_conv1: bool = False   # ViT: "random patch projection", the patch embedding stays at its init


# ----------------------------------------------------------------------------------------- ViT
def sincos_position_embedding(grid: int, dim: int, temperature: float = 1e4) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a square `grid` x `grid` of patch tokens, with a zero row in
    front for the class token: (1, 1 + grid², dim). Token p (row-major, as a ViT flattens its patch
    grid) at row y = p // grid, column x = p % grid gets [sin(yω), cos(yω), sin(xω), cos(xω)],
    ω_d = temperature^(-d / (dim/4)), d = 0 .. dim/4 - 1 (the official layout)."""
    if dim % 4:
        raise ConfigError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    p = torch.arange(grid * grid, dtype=torch.float32)
    y, x = torch.div(p, grid, rounding_mode="floor"), p % grid
    ay, ax = y[:, None] * omega[None], x[:, None] * omega[None]
    table = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None]


def moco_vit_init(vit: VisionTransformer, stop_grad_conv1: bool) -> None:
    """The initialisation of the official `VisionTransformerMoCo`, on a timm VisionTransformer:
    - position embedding: fixed 2-D sin-cos (class slot zero), not trained;
    - every Linear: xavier-uniform, with the qkv projection treated as three (D x D) matrices;
      biases zero;
    - class token ~ N(0, 1e-6);
    - patch projection (when it is a plain PatchEmbed): xavier-uniform with fan-in 3·p·p, bias
      zero, and frozen if `stop_grad_conv1` (it then gets neither updates nor weight decay).
    A convolutional stem keeps PyTorch's default initialisation, as in the official code."""
    grid = vit.patch_embed.grid_size
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or getattr(vit, "no_embed_class", False) or grid[0] != grid[1]:
        raise ConfigError("MoCo v3's ViT needs one class token, a position embedding that covers it, and a square grid")
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_position_embedding(grid[0], vit.embed_dim))
    vit.pos_embed.requires_grad_(False)
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    if isinstance(vit.patch_embed, PatchEmbed):
        proj = vit.patch_embed.proj
        bound = math.sqrt(6.0 / (proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] + vit.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        if stop_grad_conv1:
            proj.weight.requires_grad_(False)
            proj.bias.requires_grad_(False)
    elif stop_grad_conv1:
        raise ConfigError("model.stop_grad_conv1 freezes a patch projection; a convolutional stem has none "
                          "(the official code ignores it there; set it to false)")


# -------------------------------------------------------------------------------------- MoCo v3
class MoCoV3(nn.Module):
    BATCH_COUPLING = "each query's negatives are the other keys of the batch (and BatchNorm sees the batch)"

    def __init__(self, cfg: MoCoV3ModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        if isinstance(self.backbone, VisionTransformer):
            moco_vit_init(self.backbone, cfg.stop_grad_conv1)
        elif cfg.stop_grad_conv1:
            raise ConfigError("model.stop_grad_conv1 applies to ViT backbones only")
        if cfg.projector_layers < 2:
            raise ConfigError(f"model.projector_layers must be at least 2, got {cfg.projector_layers}")
        width = self.backbone.out_dim
        self.projector = mlp([width] + [cfg.mlp_dim] * (cfg.projector_layers - 1) + [cfg.dim], bias=False,
                             last_bn=True, last_bn_affine=False)
        self.predictor = mlp([cfg.dim, cfg.mlp_dim, cfg.dim], bias=False, last_bn=cfg.predictor_last_bn,
                             last_bn_affine=False)
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.temperature = cfg.temperature

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self.momentum_projector(self.momentum_backbone(x))

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        momentum_update(self.backbone, self.momentum_backbone, m)
        momentum_update(self.projector, self.momentum_projector, m)

    def forward(self, batch, ctx) -> Dict[str, torch.Tensor]:
        (x1, x2), _ = batch
        if ctx.ema_momentum is None:
            raise ConfigError("MoCo v3 needs a momentum schedule: set sched.ema_start (0.99 in the recipes)")
        q1, q2 = self.query(x1), self.query(x2)
        self.update_momentum_encoder(ctx.ema_momentum)   # before the keys, as the official code
        k1, k2 = self.key(x1), self.key(x2)
        with torch.autocast(q1.device.type, enabled=False):
            loss = mocov3_loss(at_least_fp32(q1), at_least_fp32(q2), at_least_fp32(k1), at_least_fp32(k2),
                               self.temperature)
        return {"loss": loss}
