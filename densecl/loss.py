"""DenseCL losses (Wang et al., CVPR 2021), as WXinlong/DenseCL `openselfsup/models/densecl.py`
and `heads/contrastive_head.py` compute them.

Global branch (MoCo v2): the query q of view 1 against its key k (view 2, momentum encoder) and a
queue of earlier keys, InfoNCE at temperature T.
Dense branch: every cell i of the query's projected grid is matched to the key cell whose
*backbone* feature is most similar to the query's backbone feature at i (cosine, argmax, no
gradient); that projected key cell is the positive, the dense queue (one pooled vector per earlier
image) the negatives.
total = (1 - λ) · CE_global + λ · CE_dense.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


@torch.no_grad()
def dense_correspondence(q_feat: torch.Tensor, k_feat: torch.Tensor) -> torch.Tensor:
    """Backbone maps (N, C, H, W) or (N, C, L) of query and key -> (N, L_q) LongTensor: for each
    query cell (row-major), the index of the key cell with the highest cosine similarity."""
    q = F.normalize(q_feat.flatten(2).float(), dim=1)
    k = F.normalize(k_feat.flatten(2).float(), dim=1)
    return torch.bmm(q.transpose(1, 2), k).argmax(dim=2)


def info_nce(q: torch.Tensor, k_pos: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of `cat([q·k_pos, q·negativesᵀ]) / T` with the positive at index 0.
    q, k_pos: (M, C) unit rows; negatives: (K, C) unit rows (the queue; no gradient)."""
    pos = (q * k_pos).sum(dim=1, keepdim=True)
    neg = q @ negatives.detach().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def gather_cells(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grid (N, C, L), index (N, L_q) -> (N, C, L_q): column index[n, i] of grid[n] at i."""
    return grid.gather(2, index.unsqueeze(1).expand(-1, grid.shape[1], -1))


def dense_loss(q_grid: torch.Tensor, k_grid: torch.Tensor, match: torch.Tensor, negatives: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """q_grid, k_grid: (N, C, L) unit columns; match: (N, L) from `dense_correspondence`. Every
    query cell is one InfoNCE row (N·L rows): positive k_grid[n, :, match[n, i]]."""
    pos = gather_cells(k_grid, match)
    rows = lambda g: g.transpose(1, 2).reshape(-1, g.shape[1])  # noqa: E731  (N, C, L) -> (N·L, C)
    return info_nce(rows(q_grid), rows(pos), negatives, temperature)


def densecl_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, q_grid: torch.Tensor, k_grid: torch.Tensor,
                 match: torch.Tensor, queue_dense: torch.Tensor, temperature: float,
                 lam: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, (1-λ)·CE_global, λ·CE_dense): the two terms as the official code logs them."""
    single = (1.0 - lam) * info_nce(q, k, queue, temperature)
    dense = lam * dense_loss(q_grid, k_grid, match, queue_dense, temperature)
    return single + dense, single, dense
