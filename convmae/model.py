"""ConvMAE pretraining as an nn.Module for the shared engine (ground truth: Alpha-VL/ConvMAE
`models_convmae.py` MaskedAutoencoderConvViT, `main_pretrain.py`).

encoder:  the ConvViT of `shared.models.convvit` (`model.backbone`, exported as is). A random mask
          is drawn per image at stage-3 resolution (MAE's argsort of uniform noise: exactly
          int(L (1 - ratio)) tokens kept, 49 of 196 at 224 px), nearest-upsampled to the stage-1 and
          stage-2 maps (one stage-3 token = one p1·p2·p3 = 16-pixel block); every ConvBlock of
          stages 1-2 multiplies the input of its depthwise convolution by that visible map (masked
          convolution). The image itself is not masked; stage 3 computes all tokens, then keeps the
          visible ones for the transformer blocks.
fusion:   stride-(p2·p3) / stride-p3 convolutions take the stage-1 / stage-2 maps to the stage-3 grid
          and width; their visible tokens are added to the transformer's output, then the encoder
          norm (`backbone.norm`). Pretraining only (`stage1_output_decode`, `stage2_output_decode`).
decoder:  MAE's: Linear to 512, mask tokens appended and un-shuffled, fixed 2-D sin-cos position
          embedding, 8 transformer blocks (16 heads, mlp 4, LayerNorm eps 1e-6), norm, Linear to
          16·16·3 pixels per token.
loss:     `convmae.loss.mae_loss` (normalised-pixel MSE on the masked tokens).
init:     xavier-uniform Linears, LayerNorms 1 / 0, mask token N(0, 0.02), fixed sin-cos position
          embeddings (frozen: requires_grad False, as the official), the convolutions PyTorch's default.
Names inside the module follow the official keys (`backbone.` in front of the encoder's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from convmae.loss import mae_loss
from shared.config import BackboneConfig, ModelConfig, num
from shared.data.augment import MultiView
from shared.errors import ConfigError
from shared.models import build_backbone
from shared.models.convvit import ConvViT, sincos_pos_embed_2d, xavier_linears


@dataclass
class ConvMAEModelConfig(ModelConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="convvit_base_patch16"))
    mask_ratio: float = num(0.75, "(0,1)")      # --mask_ratio
    norm_pix_loss: bool = True                  # --norm_pix_loss (PRETRAIN.md passes it)
    decoder_dim: int = num(512, ">=1")          # decoder_embed_dim
    decoder_depth: int = num(8, ">=1")
    decoder_heads: int = num(16, ">=1")
    decoder_mlp_ratio: float = num(4.0, ">0")   # the official passes mlp_ratio[0] (4)


def keep_count(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens per image: int(L (1 - ratio)), as `random_masking` (49 of 196 at 0.75)."""
    return int(num_tokens * (1 - mask_ratio))


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device=None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep (B, K), mask (B, L) float with 1 = masked, ids_restore (B, L)) from MAE's argsort of
    uniform noise, drawn from torch's generator (the engine seeds it per step and rank)."""
    keep = keep_count(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_tokens, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def upsample_mask(mask: torch.Tensor, grid: int, scale: int) -> torch.Tensor:
    """(B, grid²) token mask -> (B, 1, grid·scale, grid·scale), each token repeated over a scale x scale
    block (nearest upsampling, the official reshape/permute)."""
    m = mask.reshape(mask.shape[0], 1, grid, grid)
    return m.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ConvMAE(nn.Module):
    # the loss averages over masked tokens and every image has the same number of them: a mean of
    # per-image losses; no BatchNorm; the masks are drawn per image: accumulation is exact
    BATCH_COUPLING = None

    def __init__(self, cfg: ConvMAEModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        bb = self.backbone
        if not isinstance(bb, ConvViT):
            raise ConfigError(f"model.backbone.name={cfg.backbone.name}: ConvMAE takes a ConvViT backbone "
                              "(convvit_base_patch16, convvit_small_patch16, convvit_large_patch16)")
        if bb.fc_norm is not None:
            raise ConfigError("model.backbone.kwargs.fc_norm: the pretraining encoder keeps its norm; "
                              "fc_norm is for fine-tuning (eval.finetune.backbone_kwargs)")
        self.mask_ratio, self.norm_pix = cfg.mask_ratio, cfg.norm_pix_loss
        if keep_count(bb.num_patches, cfg.mask_ratio) < 1:
            raise ConfigError(f"model.mask_ratio={cfg.mask_ratio} keeps no token of {bb.num_patches}")
        bb.pos_embed.requires_grad_(False)                       # fixed sin-cos in pretraining
        p1, p2, p3 = bb.patch_sizes
        c1, c2, c3 = bb.embed_dims
        self.scales = (p2 * p3, p3)                              # stage-3 token -> stage-1 / stage-2 cells
        self.stage1_output_decode = nn.Conv2d(c1, c3, p2 * p3, stride=p2 * p3)
        self.stage2_output_decode = nn.Conv2d(c2, c3, p3, stride=p3)
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(c3, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, bb.num_patches, d), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(d, cfg.decoder_heads, cfg.decoder_mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, bb.stride ** 2 * 3)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(d, bb.grid)).float()[None])
            nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            xavier_linears(part)

    # ------------------------------------------------------------------------------------ encoder
    def visible_maps(self, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (B, 1, h, w) visible maps (1 = visible) of stages 1 and 2 for a (B, L) token mask."""
        vis = 1.0 - mask.float()
        g = self.backbone.grid
        return upsample_mask(vis, g, self.scales[0]), upsample_mask(vis, g, self.scales[1])

    def encode(self, x: torch.Tensor, mask: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), mask (B, L) with 1 = masked, ids_keep (B, K) -> the latent (B, K, C3):
        the visible tokens after the transformer, plus the fused stage-1/2 features, normalised."""
        bb = self.backbone
        s1, s2, t = bb.stage_maps(x, self.visible_maps(mask))
        e1 = self.stage1_output_decode(s1).flatten(2).transpose(1, 2)
        e2 = self.stage2_output_decode(s2).flatten(2).transpose(1, 2)
        t = gather_tokens(t, ids_keep)
        for blk in bb.blocks3:
            t = blk(t)
        return bb.norm(t + gather_tokens(e1, ids_keep) + gather_tokens(e2, ids_keep))

    # ------------------------------------------------------------------------------------ decoder
    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, d)], dim=1)
        x = gather_tokens(x, ids_restore) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def reconstruct(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, L, p²·3), mask (B, L)) with a fresh random mask."""
        ids_keep, mask, ids_restore = random_masking(x.shape[0], self.backbone.num_patches, self.mask_ratio, x.device)
        pred = self.decode(self.encode(x, mask, ids_keep), ids_restore)
        loss = mae_loss(x, pred, mask, patch_size=self.backbone.stride, norm_pix=self.norm_pix)
        return loss, pred, mask

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        views, _ = batch
        x = views[0] if isinstance(views, (list, tuple)) else views
        return {"loss": self.reconstruct(x)[0]}


def make_transform(cfg, model: ConvMAE) -> MultiView:
    """One view (RandomResizedCrop + flip in the recipes) at the encoder's input size."""
    views = cfg.aug.views
    if len(views) != 1 or views[0].n != 1:
        raise ConfigError(f"aug.views: ConvMAE takes exactly one view, got {sum(v.n for v in views)}")
    if views[0].size != model.backbone.img_size:
        raise ConfigError(f"aug.views.0.size={views[0].size} must equal model.backbone.img_size="
                          f"{model.backbone.img_size}")
    return MultiView(views)
