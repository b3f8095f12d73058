"""VADeR (Pinheiro et al., "Unsupervised Learning of Dense Visual Representations", NeurIPS 2020) as
an nn.Module for the shared engine. The authors' code is not public; every setting below that the
paper's accessible text does not fix is ours (vader/README.md, "Choices").

online f:    view 1 -> ResNet (C2..C5) -> FPN -> semantic-FPN head -> 1x1 conv -> (B, 128, S/4, S/4),
             L2-normalised per pixel
momentum g:  a copy of the ResNet *and* the decoder, updated as m·g + (1 - m)·f before the keys
             (m = 0.999), run without gradient on view 2 with shuffle-BN across ranks
loss:        for 32 cells per image sampled among those of view 1 whose centre lies inside view 2
             (the pairs come with the batch, from the view geometry: `vader.transform`), InfoNCE of
             q (view 1, online) against its matched key (view 2, momentum) and a queue of earlier
             pixel keys; the keys of the matched cells are enqueued FIFO from every rank.
symmetric:   optional (off: view 1 is the query, view 2 the key, as MoCo v2 and DenseCL).

Decoder (ours, from detectron2's Panoptic-FPN defaults): FPN over C2..C5 (1x1 lateral convs to 256,
nearest 2x top-down, sum, 3x3 output convs, no norm, no P6), then the semantic-FPN head (per level
max(1, log2(stride/4)) x [3x3 conv 128, GroupNorm(32), ReLU, 2x bilinear upsample where stride > 4],
summed at stride 4) and a 1x1 conv 128 -> `dim` (detectron2's predictor, here the embedding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import dist
from shared.config import BackboneConfig, ModelConfig, num
from shared.errors import ConfigError
from shared.models import build_backbone, momentum_copy, momentum_update
from shared.models.backbones import ResNet
from shared.numerics import at_least_fp32
from vader.loss import gather_pixels, pixel_info_nce

STRIDE = 4          # the decoder's output stride: 56 x 56 cells for a 224 input


@dataclass
class VADeRModelConfig(ModelConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="resnet50"))
    fpn_dim: int = num(256, ">=1")          # FPN width (detectron2 FPN.OUT_CHANNELS)
    head_dim: int = num(128, ">=1")         # semantic head width (SEM_SEG_HEAD.CONVS_DIM); a multiple of gn_groups
    gn_groups: int = num(32, ">=1")         # GroupNorm groups in the head (detectron2: 32)
    dim: int = num(128, ">=1")              # embedding width: 128 x 56 x 56 at 224 (the paper)
    queue_len: int = num(65536, ">=1")      # pixel keys; a multiple of matches x global batch
    temperature: float = num(0.2, ">0")
    matches: int = num(32, ">=1")           # matched pairs sampled per image per step (the paper)
    symmetric: bool = False                 # also view 2 as query against view 1's keys
    init_backbone: str = ""                 # a checkpoint to start the ResNet from (ours or the authors' MoCo v2)
    require_init: bool = False              # the recipe starts from a checkpoint: refuse an empty init_backbone


def c2_xavier_fill(m: nn.Conv2d) -> None:
    """detectron2's init of the FPN convolutions: kaiming-uniform with a = 1, bias 0."""
    nn.init.kaiming_uniform_(m.weight, a=1)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def c2_msra_fill(m: nn.Conv2d) -> None:
    """detectron2's init of the semantic head: kaiming-normal, fan_out, relu; bias 0."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class FPNDecoder(nn.Module):
    """C2..C5 (strides 4..32) -> one (B, dim, H/4, W/4) map (not normalised)."""

    def __init__(self, in_channels: Sequence[int], fpn_dim: int = 256, head_dim: int = 128, dim: int = 128,
                 gn_groups: int = 32):
        super().__init__()
        if head_dim % gn_groups:
            raise ConfigError(f"model.head_dim={head_dim}: GroupNorm({gn_groups}) needs a multiple of model.gn_groups")
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_dim, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1) for _ in in_channels)
        for m in [*self.lateral, *self.output]:
            c2_xavier_fill(m)
        self.heads = nn.ModuleList()
        for level in range(len(in_channels)):               # stride 4 * 2**level
            ops: List[nn.Module] = []
            for k in range(max(1, level)):
                conv = nn.Conv2d(fpn_dim if k == 0 else head_dim, head_dim, 3, padding=1, bias=False)
                c2_msra_fill(conv)
                ops += [conv, nn.GroupNorm(gn_groups, head_dim), nn.ReLU(inplace=True)]
                if level > 0:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.heads.append(nn.Sequential(*ops))
        self.predictor = nn.Conv2d(head_dim, dim, 1)
        c2_msra_fill(self.predictor)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        p = [None] * len(lat)
        top = lat[-1]
        p[-1] = self.output[-1](top)
        for i in range(len(lat) - 2, -1, -1):
            top = lat[i] + F.interpolate(top, scale_factor=2.0, mode="nearest")
            p[i] = self.output[i](top)
        x = self.heads[0](p[0])
        for head, f in zip(self.heads[1:], p[1:]):
            x = x + head(f)
        return self.predictor(x)


class DenseEncoder(nn.Module):
    """ResNet + decoder as one frozen feature extractor for the dense probe: `forward_intermediates`
    returns [the L2-normalised embedding map] whatever index is asked (the probe's `stage`)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.decoder(self.backbone.forward_intermediates(x, [0, 1, 2, 3])), dim=1)

    def forward_intermediates(self, x, indices=None, intermediates_only: bool = True) -> List[torch.Tensor]:
        return [self(x)]


class VADeR(nn.Module):
    BATCH_COUPLING = "BatchNorm and shuffle-BN see the batch, and the queue takes the whole batch once per step"

    def __init__(self, cfg: VADeRModelConfig, global_batch: int):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        if not isinstance(self.backbone, ResNet):
            raise ConfigError(f"model.backbone.name: VADeR takes a torchvision ResNet, got {cfg.backbone.name}")
        if cfg.require_init and not cfg.init_backbone:
            raise ConfigError("model.init_backbone: this recipe starts from a MoCo v2 checkpoint; give its path "
                              "(our last.pt or the authors' moco_v2_*.pth.tar)")
        if cfg.init_backbone:
            load_backbone(self.backbone, cfg.init_backbone)
        self.decoder = FPNDecoder(self.backbone.stage_channels, cfg.fpn_dim, cfg.head_dim, cfg.dim, cfg.gn_groups)
        per_step = cfg.matches * global_batch
        if cfg.queue_len % per_step:
            raise ConfigError(f"model.queue_len={cfg.queue_len} must be a multiple of model.matches x train.batch_size "
                              f"= {cfg.matches} x {global_batch} = {per_step} (the pixel keys one step enqueues)")
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_decoder = momentum_copy(self.decoder)
        self.temperature, self.matches, self.symmetric = cfg.temperature, cfg.matches, cfg.symmetric
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_len, cfg.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def embed(self, backbone: nn.Module, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, dim, S/4, S/4), unit vectors per pixel (in fp32)."""
        out = decoder(backbone.forward_intermediates(x, [0, 1, 2, 3]))
        return F.normalize(at_least_fp32(out), dim=1)

    def dense_encoder(self) -> DenseEncoder:
        return DenseEncoder(self.backbone, self.decoder)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum network's embedding of `x`, on a batch shuffled across ranks, back in order."""
        x, inverse = dist.shuffle_batch(x)
        return dist.unshuffle_batch(self.embed(self.momentum_backbone, self.momentum_decoder, x), inverse)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the pixel keys of the global batch (gathered from every rank, rank order) at the pointer."""
        keys = dist.all_gather_nograd(keys.contiguous())
        n, start = keys.shape[0], int(self.queue_ptr)
        if self.queue.shape[0] % n:
            raise ConfigError(f"model.queue_len={self.queue.shape[0]} is not a multiple of the {n} keys of a step")
        self.queue[start:start + n] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((start + n) % self.queue.shape[0])

    def forward(self, batch, ctx) -> Dict[str, torch.Tensor]:
        views, _ = batch
        x1, x2 = views["view1"], views["view2"]
        if ctx.ema_momentum is None:
            raise ConfigError("VADeR needs a momentum coefficient: set sched.ema_start (0.999, ema_kind constant)")
        q1 = self.embed(self.backbone, self.decoder, x1)
        q2 = self.embed(self.backbone, self.decoder, x2) if self.symmetric else None
        momentum_update(self.backbone, self.momentum_backbone, ctx.ema_momentum)       # before the keys
        momentum_update(self.decoder, self.momentum_decoder, ctx.ema_momentum)
        k2 = self.keys(x2)
        k1 = self.keys(x1) if self.symmetric else None
        queue = self.queue.clone()       # overwritten below, after autograd saved it
        with torch.autocast(x1.device.type, enabled=False):
            q, k = gather_pixels(q1, views["cells1"]), gather_pixels(k2, views["cells2"])
            loss = pixel_info_nce(q, k, queue, self.temperature)
            if self.symmetric:
                q_b, k_b = gather_pixels(q2, views["rcells2"]), gather_pixels(k1, views["rcells1"])
                loss = 0.5 * (loss + pixel_info_nce(q_b, k_b, queue, self.temperature))
        self.enqueue(k)          # view 2's matched keys (also with symmetric: one step, matches x batch keys)
        return {"loss": loss, "pos_sim": (q * k).sum(1).mean().detach()}


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Start the ResNet from a checkpoint (ours, or an author release the converter reads): every
    ResNet tensor must be there; a classifier is ignored."""
    from shared.transfer.convert import read_backbone
    sd, what = read_backbone(path)
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(f"model.init_backbone={path} ({what}): not this ResNet: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
