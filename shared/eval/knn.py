"""Weighted k-nearest-neighbour classification (InstDisc / DINO): cosine similarity on
l2-normalised features, the k most similar training samples vote for their class with weight
exp(similarity / T). Defaults k = 20, T = 0.07."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from shared.numerics import at_least_fp32


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """(M, num_classes) vote totals for each test sample."""
    train = F.normalize(at_least_fp32(train_feats), dim=1)
    test = F.normalize(at_least_fp32(test_feats), dim=1)
    k = min(k, train.shape[0])
    out = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of samples whose target is among the k highest scores (ties broken by index)."""
    maxk = min(max(ks), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices
    hit = pred == targets.view(-1, 1)
    return [100.0 * hit[:, :min(k, maxk)].any(1).float().mean().item() for k in ks]
