"""Barlow Twins as an nn.Module for the shared engine.

ResNet (torchvision, zero-init residual) -> projector of bias-free Linears (BN + ReLU after all but
the last) -> affine-free BatchNorm per branch -> cross-correlation / global batch, summed over
ranks -> loss. Under DDP every BatchNorm (the affine-free one included) is synchronised by the
engine, so C is exactly the global-batch cross-correlation on every rank.

Gradient modes (`model.gradient`):
  official: C is summed with a plain all-reduce, which autograd does not see. Each rank back-
            propagates dL/dC through its own term only, then DDP averages the ranks' gradients,
            so the applied gradient is grad(L) / world_size: what facebookresearch/barlowtwins does.
  exact:    an autograd-aware all-reduce; the applied gradient is grad(L) for any world size.
The two agree on one process. Recipes keep `official`, whose lr values were tuned with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
import torch.nn as nn

from barlow.loss import cross_correlation, loss_from_cross_correlation, off_diagonal
from shared import dist
from shared.config import BackboneConfig, ModelConfig, choice, num
from shared.models import build_backbone, mlp, parse_dims
from shared.numerics import at_least_fp32


@dataclass
class BarlowModelConfig(ModelConfig):
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="resnet50", zero_init_residual=True))
    projector: str = "8192-8192-8192"   # hidden and output sizes, as the official --projector
    lambd: float = num(0.0051, ">=0")               # weight of the off-diagonal terms
    gradient: str = choice("official", "official", "exact")


class BarlowTwins(nn.Module):
    BATCH_COUPLING = "its cross-correlation matrix (and BatchNorm) is computed over the whole batch"

    def __init__(self, cfg: BarlowModelConfig, global_batch: int):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        dims = [self.backbone.out_dim] + parse_dims(cfg.projector)
        self.projector = mlp(dims, bias=False, hidden_bn=True, last_bn=False)
        self.bn = nn.BatchNorm1d(dims[-1], affine=False)
        self.lambd = cfg.lambd
        self.global_batch = global_batch   # C is divided by the nominal global batch, as the official code
        self.exact = cfg.gradient == "exact"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        views, _ = batch
        y1, y2 = views
        z1, z2 = self.embed(y1), self.embed(y2)   # two passes: BatchNorm statistics per view
        with torch.autocast(z1.device.type, enabled=False):
            c = cross_correlation(self.bn(at_least_fp32(z1)), self.bn(at_least_fp32(z2)), self.global_batch)
            c = dist.all_reduce_sum(c, differentiable=self.exact)
            loss = loss_from_cross_correlation(c, self.lambd)
        with torch.no_grad():
            on = (torch.diagonal(c) - 1).pow(2).sum()
        return {"loss": loss, "on_diag": on, "off_diag": off_diagonal(c.detach()).pow(2).sum()}
