"""ConvViT, the hybrid convolution-transformer encoder of ConvMAE (Gao et al., NeurIPS 2022; ground
truth: Alpha-VL/ConvMAE `vision_transformer.py`, `models_convvit.py`, `models_convmae.py`).

No library provides it, and the evaluations and transfers rebuild a backbone from its name, so it is
registered with timm here (`convvit_small_patch16`, `convvit_base_patch16`, `convvit_large_patch16`)
and `shared.models.build_backbone` makes it like any timm model. The method (masking, multi-scale
fusion, decoder, loss) lives in `convmae/`.

  stage 1  PatchEmbed: conv p1 x p1 / s p1 (3 -> C1) -> LayerNorm (eps 1e-5) -> GELU; depth[0] ConvBlocks
  stage 2  PatchEmbed: conv p2 x p2 / s p2 (C1 -> C2) -> LN -> GELU;                 depth[1] ConvBlocks
  stage 3  PatchEmbed: conv p3 x p3 / s p3 (C2 -> C3) -> LN -> GELU, flatten, Linear C3 -> C3
           (`patch_embed4`), + position embedding, depth[2] transformer blocks (timm's Block:
           pre-norm, LayerNorm eps 1e-6, qkv bias, mlp ratio 4); no class token.
  ConvBlock  x + conv1x1(dwconv5x5(visible * conv1x1(LN(x)))), then x + CMlp(LN(x)), CMlp = 1x1
           conv -> GELU -> 1x1 conv; its LayerNorms have PyTorch's eps 1e-5 (the official CBlock does
           not take the norm layer it is given). `visible` (B, 1, h, w), 1 = visible, is the masked
           convolution of ConvMAE; None in fine-tuning and evaluation.
  output   `norm` (LayerNorm eps 1e-6, ConvMAE's encoder norm, applied by the pretraining model after
           the multi-scale fusion), or, with `fc_norm=True` (the official fine-tuning model,
           global_pool=True), `norm` = Identity and the mean of the stage-3 tokens goes through a new
           LayerNorm `fc_norm`. Without `fc_norm`, `forward` returns the mean token through an
           affine-free LayerNorm (eps 1e-6): what the official linear probe computes with
           `--global_pool` (its fc_norm is freshly initialised to weight 1, bias 0, and not trained).

Key names are the official ones (patch_embed1..4, blocks1..3, pos_embed, norm, fc_norm, head), so the
authors' checkpoints load without renaming. Stochastic depth runs linearly over all the blocks
(2 + 2 + 11 for ConvViT-B), as the official ConvViT. Init (`init_convvit`): the official pretraining
init (xavier-uniform Linears, patch_embed3's projection xavier-uniform as a Linear, LayerNorm 1 / 0,
the other convolutions PyTorch's default), the position embedding the fixed 2-D sin-cos table of
`models_convmae.py` (the fine-tuning ConvViT draws it trunc-normal, then loads the checkpoint over it).
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import register_model
from timm.models.vision_transformer import Block


def sincos_pos_embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(len(pos), dim): sin of pos * omega_k in the first half, cos in the second, omega_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """(grid², dim) as MAE's get_2d_sincos_pos_embed (no class token): the first half of the width
    encodes the column index (x), the second half the row index (y); tokens in row-major order."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([sincos_pos_embed_1d(dim // 2, xs), sincos_pos_embed_1d(dim // 2, ys)], axis=1)


class PatchEmbed(nn.Module):
    """Strided conv -> LayerNorm over channels (eps 1e-5) -> GELU, channel-first in and out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.act(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class ConvBlock(nn.Module):
    """The official CBlock: a 5x5 depthwise convolution between two 1x1 convolutions (its input
    multiplied by the visible map when one is given), then a convolutional MLP; both residual, pre-norm."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop, use_conv=True)

    @staticmethod
    def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(self._ln(self.norm1, x))
        if visible is not None:
            h = h * visible
        x = x + self.drop_path(self.conv2(self.attn(h)))
        return x + self.drop_path(self.mlp(self._ln(self.norm2, x)))


class ConvViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: Sequence[int] = (4, 2, 2), in_chans: int = 3,
                 num_classes: int = 0, embed_dim: Sequence[int] = (256, 384, 768), depth: Sequence[int] = (2, 2, 11),
                 num_heads: int = 12, mlp_ratio: Sequence[float] = (4.0, 4.0, 4.0), qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 fc_norm: bool = False, global_pool: str = "avg", **_ignored):
        super().__init__()
        if len(patch_size) != 3 or len(embed_dim) != 3 or len(depth) != 3 or len(mlp_ratio) != 3:
            raise ValueError("ConvViT: patch_size, embed_dim, depth and mlp_ratio take one value per stage (3)")
        stride = int(np.prod(patch_size))
        if img_size % stride:
            raise ValueError(f"ConvViT: image size {img_size} is not a multiple of the total stride {stride}")
        if global_pool != "avg":
            raise ValueError(f"ConvViT: global_pool={global_pool!r}; only 'avg' (no class token)")
        self.patch_sizes = tuple(int(p) for p in patch_size)
        self.img_size, self.stride = img_size, stride
        self.grid = img_size // stride
        self.num_patches = self.grid ** 2
        self.embed_dims = tuple(int(d) for d in embed_dim)
        self.num_features = self.out_dim = self.embed_dim = self.embed_dims[-1]
        self.num_classes = num_classes
        self.patch_embed1 = PatchEmbed(self.patch_sizes[0], in_chans, self.embed_dims[0])
        self.patch_embed2 = PatchEmbed(self.patch_sizes[1], self.embed_dims[0], self.embed_dims[1])
        self.patch_embed3 = PatchEmbed(self.patch_sizes[2], self.embed_dims[1], self.embed_dims[2])
        self.patch_embed4 = nn.Linear(self.embed_dims[2], self.embed_dims[2])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, self.embed_dims[2]))
        self.pos_drop = nn.Dropout(p=drop_rate)
        n = sum(depth)
        dpr = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]   # torch.linspace(0, rate, n)
        d0, d1 = depth[0], depth[0] + depth[1]
        self.blocks1 = nn.ModuleList([ConvBlock(self.embed_dims[0], mlp_ratio[0], drop_rate, dpr[i])
                                      for i in range(depth[0])])
        self.blocks2 = nn.ModuleList([ConvBlock(self.embed_dims[1], mlp_ratio[1], drop_rate, dpr[d0 + i])
                                      for i in range(depth[1])])
        self.blocks3 = nn.ModuleList([
            Block(self.embed_dims[2], num_heads, mlp_ratio[2], qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[d1 + i], norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(depth[2])])
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(self.embed_dims[2], eps=1e-6)
        self.fc_norm = nn.LayerNorm(self.embed_dims[2], eps=1e-6) if fc_norm else None
        self.head = nn.Linear(self.embed_dims[2], num_classes) if num_classes > 0 else nn.Identity()
        init_convvit(self)

    # the fine-tuning tools (shared.eval.finetune) read `blocks` for the depth of the layer decay
    @property
    def blocks(self) -> nn.ModuleList:
        return self.blocks3

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    def lr_decay_layer_id(self, name: str) -> int:
        """The official util/lr_decay.py get_layer_id_for_vit: pos_embed, every patch_embed (patch_embed4
        included) and the blocks of stages 1 and 2 are layer 0, blocks3.i is i + 1, anything else
        (norm, fc_norm, head) len(blocks3) + 1."""
        if name in ("pos_embed", "cls_token") or name.startswith(("patch_embed", "blocks1.", "blocks2.")):
            return 0
        if name.startswith("blocks3."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks3) + 1

    def stage_maps(self, x: torch.Tensor, visible: Optional[Sequence[torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(stage-1 map (B, C1, H/p1, W/p1), stage-2 map, stage-3 tokens (B, L, C3) with the position
        embedding, before the transformer). `visible`: the (B, 1, h, w) visible maps of stages 1 and 2."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ConvViT: input {tuple(x.shape[-2:])}, expected {self.img_size}x{self.img_size}")
        v1, v2 = visible if visible is not None else (None, None)
        x = self.pos_drop(self.patch_embed1(x))
        for blk in self.blocks1:
            x = blk(x, v1)
        s1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, v2)
        s2 = x
        t = self.patch_embed4(self.patch_embed3(x).flatten(2).transpose(1, 2))
        return s1, s2, t + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-3 tokens after the transformer blocks, before any norm: (B, L, C3)."""
        t = self.stage_maps(x)[2]
        for blk in self.blocks3:
            t = blk(t)
        return t

    def forward_head(self, t: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = t.mean(dim=1)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        else:
            pooled = F.layer_norm(pooled, (pooled.shape[-1],), eps=1e-6)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, intermediates_only: bool = True) -> List[torch.Tensor]:
        """The token maps (B, C3, grid, grid) after the transformer blocks `indices` (0-based, of blocks3;
        default all); `norm` applies the encoder norm to each."""
        if not intermediates_only:
            raise NotImplementedError("ConvViT.forward_intermediates returns the maps only")
        n = len(self.blocks3)
        wanted = list(range(n)) if indices is None else (
            list(range(n - indices, n)) if isinstance(indices, int) else list(indices))
        t = self.stage_maps(x)[2]
        out = []
        for i, blk in enumerate(self.blocks3):
            t = blk(t)
            if i in wanted:
                m = self.norm(t) if norm else t
                out.append(m.transpose(1, 2).reshape(t.shape[0], -1, self.grid, self.grid))
            if i >= max(wanted):
                break
        return out


@torch.no_grad()
def xavier_linears(module: nn.Module) -> None:
    """models_convmae.py `_init_weights`: Linear weights xavier-uniform, biases 0; LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def init_convvit(model: ConvViT) -> None:
    model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(model.embed_dims[2], model.grid)).float()[None])
    w = model.patch_embed3.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    xavier_linears(model)


def _create(name: str, defaults: dict, pretrained: bool = False, **kwargs) -> ConvViT:
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights here; load a checkpoint (shared/transfer/convert.py)")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return ConvViT(**{**defaults, **kwargs})


@register_model
def convvit_base_patch16(pretrained: bool = False, **kwargs) -> ConvViT:
    """ConvViT-B (models_convvit.py convvit_base_patch16): [256, 384, 768], depth [2, 2, 11], 12 heads."""
    return _create("convvit_base_patch16", dict(patch_size=(4, 2, 2), embed_dim=(256, 384, 768), depth=(2, 2, 11),
                                                num_heads=12, mlp_ratio=(4, 4, 4)), pretrained, **kwargs)


@register_model
def convvit_small_patch16(pretrained: bool = False, **kwargs) -> ConvViT:
    """ConvViT-S: not in the official code; the dimensions of the FastConvMAE community fork
    (moreh-dev/FastConvMAE fastconvmae_convvit_small_patch16): [128, 256, 384], depth [2, 2, 11], 6 heads."""
    return _create("convvit_small_patch16", dict(patch_size=(4, 2, 2), embed_dim=(128, 256, 384), depth=(2, 2, 11),
                                                 num_heads=6, mlp_ratio=(4, 4, 4)), pretrained, **kwargs)


@register_model
def convvit_large_patch16(pretrained: bool = False, **kwargs) -> ConvViT:
    """ConvViT-L: not in the official code; the dimensions of the (unmerged) mmpretrain port
    (open-mmlab/mmpretrain PR #1195): [384, 768, 1024], depth [2, 2, 23], 16 heads."""
    return _create("convvit_large_patch16", dict(patch_size=(4, 2, 2), embed_dim=(384, 768, 1024), depth=(2, 2, 23),
                                                 num_heads=16, mlp_ratio=(4, 4, 4)), pretrained, **kwargs)
