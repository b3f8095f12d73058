"""Jigsaw Clustering as an nn.Module for the shared engine (ground truth: dvlab-research/
JigsawClustering `JigClu/jigclu.py`, `JigClu/resnet_jigclu.py`, `main.py`).

crops:    each image of the global batch gives 4 crops (TL, BL, TR, BR; `jigclu.data`), gathered
          from every rank into one list of 4n, position-major: crop c = position * n + image.
montages: one random permutation of the 4n (drawn from the run's seed and the step, broadcast from
          rank 0); quarter q of the permuted list fills cell q of the n montages (TL, TR, BL, BR:
          two crops side by side, two below); each rank keeps its own n / world montages.
network:  ResNet -> layer4 map -> bilinear resize to 8x8 -> average pool to 2x2 -> one vector per
          montage cell; gathered from every rank with gradient, cell-major in TL, TR, BL, BR order,
          so that row k is the cell that holds crop perm[k].
heads:    clustering MLP (Linear d-d, ReLU, Linear d-128, no BN) -> l2-normalised; location Linear d-4.
loss:     w_clu * SupClu(z, perm % n) + w_loc * CE(location, perm // n), computed by every rank on
          the whole gathered batch (DDP's gradient average then gives the single-process gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from jigclu.loss import jigclu_loss
from shared import dist
from shared.config import BackboneConfig, ModelConfig, num
from shared.data.loader import sample_seed
from shared.errors import ConfigError
from shared.models import build_backbone
from shared.models.backbones import ResNet
from shared.numerics import at_least_fp32

PERM_STREAM = (1 << 62) + 18      # the `index` of the montage permutation's seed stream (not a sample index)


@dataclass
class JigCluModelConfig(ModelConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="resnet50"))
    dim: int = num(128, ">=1")                  # --proj-dim
    temperature: float = num(0.3, ">0")         # --loss-t (official default 0.07; the README command: 0.3)
    base_temperature: float = num(0.07, ">0")   # SupCluLoss's fixed base_temperature (not an official option)
    cross_ratio: float = num(0.3, "[0,0.5]")    # --cross-ratio: each crop spans 0.5 + cross of each axis
    loss_clu: float = num(1.0, ">=0")           # --loss_clu
    loss_loc: float = num(1.0, ">=0")           # --loss_loc
    resize: int = num(8, ">=2")                 # the layer4 map is resized to resize x resize before the 2x2 pool (official 8)
    min_lr: float = num(0.0, "[0,1)")           # --min-lr: lr(e) = lr * ((0.5 - m)(1 + cos(pi e / E)) + m); train.py
                                                # maps it onto optim.lr and sched.final (jigclu/README.md)


def build_montages(crops: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(4n, C, s, s) crops, position-major, and a permutation of 4n -> (n, C, 2s, 2s) montages:
    quarter q of `crops[perm]` fills cell q, in the order TL, TR, BL, BR."""
    if crops.shape[0] % 4:
        raise ValueError(f"build_montages: expected 4n crops, got {crops.shape[0]}")
    q0, q1, q2, q3 = crops[perm].chunk(4)
    return torch.cat([torch.cat([q0, q1], dim=3), torch.cat([q2, q3], dim=3)], dim=2)


def cell_rows(cells: torch.Tensor) -> torch.Tensor:
    """(n, C, 2, 2) cell vectors -> (4n, C), cell-major in TL, TR, BL, BR order: row q * n + j is
    cell q of montage j, i.e. the cell that holds crop perm[q * n + j]."""
    n, c = cells.shape[:2]
    return cells.flatten(2).permute(2, 0, 1).reshape(4 * n, c)


def permutation(seed: int, step: int, size: int, device: torch.device) -> torch.Tensor:
    """The montage permutation of `step`: a function of (seed, step) only, so that a resumed run
    builds the montages of the uninterrupted one; drawn on rank 0 and broadcast (every rank already
    draws the same, the broadcast keeps it so whatever the ranks' generators)."""
    g = torch.Generator().manual_seed(sample_seed(seed, step, PERM_STREAM))
    perm = torch.randperm(size, generator=g).to(device)
    return dist.broadcast(perm, 0)


class JigClu(nn.Module):
    BATCH_COUPLING = "the montages mix crops of the whole global batch and BatchNorm sees the montages"

    def __init__(self, cfg: JigCluModelConfig, seed: int = 0):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        if not isinstance(self.backbone, ResNet):
            raise ConfigError(f"model.backbone.name: JigClu takes a torchvision ResNet, got {cfg.backbone.name}")
        d = self.backbone.out_dim
        # torchvision's init (conv kaiming fan_out, BN 1/0, Linear default) is the official one
        self.fc_clu = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, cfg.dim))
        self.fc_loc = nn.Linear(d, 4)
        self.cfg, self.seed = cfg, seed

    def cells(self, montages: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) montages -> (b, d, 2, 2) cell vectors (layer4, bilinear resize, 2x2 average pool)."""
        fmap = self.backbone.forward_intermediates(montages, [3])[0]
        r = self.cfg.resize
        fmap = F.interpolate(fmap, size=(r, r), mode="bilinear", align_corners=False)
        return F.adaptive_avg_pool2d(fmap, 2)

    @torch.no_grad()
    def montages(self, crops: Sequence[torch.Tensor], step: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's montages, the permutation of the global 4n crops and the global n."""
        if len(crops) != 4:
            raise ConfigError(f"JigClu takes 4 crops per image (jigclu.data.make_transform), got {len(crops)}")
        b = crops[0].shape[0]
        gathered = torch.cat([dist.all_gather_nograd(c) for c in crops], dim=0)   # position-major, (4n, ...)
        n = gathered.shape[0] // 4
        perm = permutation(self.seed, step, 4 * n, gathered.device)
        r = dist.rank()
        return build_montages(gathered, perm)[r * b:(r + 1) * b], perm, n

    def forward(self, batch, ctx) -> Dict[str, torch.Tensor]:
        crops, _ = batch
        mont, perm, n = self.montages(crops, ctx.step)
        rows = cell_rows(dist.all_gather(self.cells(mont)))          # (4n, d), with gradient from every rank
        z = F.normalize(self.fc_clu(rows), dim=1)
        loc = self.fc_loc(rows)
        with torch.autocast(rows.device.type, enabled=False):
            loss, clu, loc_loss = jigclu_loss(at_least_fp32(z), at_least_fp32(loc), perm, n, self.cfg.temperature,
                                              self.cfg.base_temperature, self.cfg.loss_clu, self.cfg.loss_loc)
        acc = (loc.detach().argmax(1) == perm // n).float().mean() * 100
        return {"loss": loss, "loss_clu": clu.detach(), "loss_loc": loc_loss.detach(), "loc_acc": acc}
