"""VADeR's loss: InfoNCE over matched pixel embeddings (Pinheiro et al., NeurIPS 2020).

For each sampled cell u of view 1 and its matching cell u' of view 2 (same scene location, from
`vader.correspondence`), the online network's embedding q_u is the query, the momentum network's
k_u' the positive, and a queue of earlier pixel keys (other images) the negatives:

    l_u = -log  exp(q_u·k_u'/T) / ( exp(q_u·k_u'/T) + sum_n exp(q_u·n/T) ),   averaged over all u.

Embeddings are unit vectors (cosine similarity calibrated by the temperature T). This is MoCo's
InfoNCE applied row by row to pixels; the queue holds no keys of the current batch, so no pixel of
the same image is a negative (the paper reports that same-image negatives did not work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_info_nce(q: torch.Tensor, k_pos: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """q, k_pos: (M, D) unit rows, matched row by row; queue: (K, D) unit rows of other images'
    pixel keys (no gradient). Mean over the M rows of the cross-entropy of
    [q·k_pos, q·queueᵀ] / T with the positive at index 0."""
    if q.shape != k_pos.shape or q.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"pixel_info_nce: q {tuple(q.shape)} and k_pos {tuple(k_pos.shape)} must be the same (M, D), "
                         f"queue {tuple(queue.shape)} (K, D)")
    pos = (q * k_pos.detach()).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def gather_pixels(fmap: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """fmap (B, D, H, W), index (B, n) row-major cells -> (B·n, D): the embeddings at those cells,
    image by image."""
    b, d = fmap.shape[:2]
    flat = fmap.flatten(2)                                           # (B, D, H·W)
    picked = flat.gather(2, index.unsqueeze(1).expand(-1, d, -1))    # (B, D, n)
    return picked.transpose(1, 2).reshape(b * index.shape[1], d)
