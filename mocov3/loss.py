"""MoCo v3 loss (Chen, Xie, He, ICCV 2021), as facebookresearch/moco-v3 `moco/builder.py` computes it.

Queries q (online encoder + predictor) and keys k (momentum encoder) of the two views are
l2-normalised; each query is scored against the keys of the *global* batch (gathered from every
rank, without gradient), the positive being the key of the same image, and the cross-entropy is
scaled by 2T. The loss is symmetrised over the two views: ctr(q1, k2) + ctr(q2, k1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared import dist


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """q, k: (N_local, C). Keys are gathered across ranks; the positive of query i on rank r is
    global key `i + N_local * r`. Returns 2T * cross-entropy(q k_allᵀ / T)."""
    q = F.normalize(q, dim=1)
    k = dist.all_gather_nograd(F.normalize(k.detach(), dim=1))
    logits = q @ k.t() / temperature
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + n * dist.rank()
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Symmetrised loss: each view's queries against the other view's keys (summed, not averaged)."""
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)
