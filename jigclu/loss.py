"""JigClu's two losses as pure functions (ground truth: `JigClu/losses.py` `SupCluLoss` and the
location branch of `JigClu/jigclu.py`, dvlab-research/JigsawClustering)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float,
                base_temperature: float = 0.07) -> torch.Tensor:
    """The official SupClu loss over `z` (N, D), rows l2-normalised, `labels` (N,) the source image.

    For anchor i, with s_ij = z_i . z_j / temperature and P(i) the other rows of i's image:
        l_i = - (temperature / base_temperature) * mean_{p in P(i)} [ s_ip - log sum_{k != i} exp(s_ik) ]
    and the loss is the mean of l_i over every anchor. The anchor itself is left out of both the
    positives and the denominator. The factor temperature / base_temperature is the official one:
    with the README's temperature 0.3 and the fixed base 0.07 it multiplies the loss (and its
    gradient) by 4.2857. An anchor without a positive gives NaN, as in the official code (JigClu
    always has three)."""
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"supcon_loss: expected z (N, D) and labels (N,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    n = z.shape[0]
    logits = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    log_den = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_den
    pos = positives.to(log_prob.dtype)
    mean_log_prob_pos = (log_prob * pos).sum(1) / pos.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def location_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way location head against each crop's position in its source image
    (0 TL, 1 BL, 2 TR, 3 BR: `perm // n`), the mean over the 4n crops."""
    return F.cross_entropy(logits, positions)


def jigclu_loss(z: torch.Tensor, loc_logits: torch.Tensor, perm: torch.Tensor, n: int, temperature: float,
                base_temperature: float = 0.07, w_clu: float = 1.0, w_loc: float = 1.0):
    """(total, clustering, location) for the 4n cells whose k-th row holds crop `perm[k]` of the
    gathered crop list (crop c = position * n + image): source image `perm % n`, position `perm // n`."""
    clu = supcon_loss(z, perm % n, temperature, base_temperature)
    loc = location_loss(loc_logits, perm // n)
    return w_clu * clu + w_loc * loc, clu, loc
