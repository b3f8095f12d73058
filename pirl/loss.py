"""PIRL's losses against a memory bank (Misra & van der Maaten, CVPR 2020), as the authors' VISSL
implementation computes them (`vissl/losses/nce_loss.py`: NCEAverage scores, NCECriterion, and the
`cross_entropy` loss type).

Every row of `sim` holds the cosine similarities of one embedding to 1 + K memory rows: column 0 is
the sample's own row (the positive), columns 1..K rows drawn uniformly from the whole bank (the
positive itself may be among them; VISSL does not exclude it). The memory rows are constants.

NCE (the headline recipe): the model's probability of a row is P = exp(s / T) / Z with a partition
constant Z estimated once; the noise distribution is uniform over the N rows (1/N each) and K noise
samples are drawn per data sample, so the noise term is K/N:
  h(pos) = P_0 / (P_0 + K/N + eps),   h(neg_j) = (K/N) / (P_j + K/N + eps),
  L = -(sum_b log h(pos_b) + sum_b sum_j log h(neg_bj)) / B.
InfoNCE (the MLP-head recipe): cross-entropy over the 1 + K logits s / T with the positive at 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = float(torch.finfo(torch.float32).eps)    # VISSL's NCECriterion adds float32 eps to each denominator


def nce_loss(sim: torch.Tensor, *, temperature: float, Z: float, num_data: int) -> torch.Tensor:
    """VISSL's NCE criterion on `sim` (B, 1+K), positive in column 0: a scalar, summed over the
    positive and the K negatives of a row and averaged over the B rows."""
    if sim.dim() != 2 or sim.shape[1] < 2:
        raise ValueError(f"sim must be (B, 1+K) with K >= 1, got {tuple(sim.shape)}")
    k = sim.shape[1] - 1
    noise = k / float(num_data)                  # K x the uniform noise probability 1/N
    p = torch.exp(sim / temperature) / Z
    log_pos = torch.log(p[:, 0] / (p[:, 0] + (noise + EPS)))
    log_neg = torch.log(noise / (p[:, 1:] + (noise + EPS)))
    return -(log_pos.sum() + log_neg.sum()) / sim.shape[0]


@torch.no_grad()
def partition_constant(sim: torch.Tensor, *, temperature: float, num_data: int) -> torch.Tensor:
    """Z = mean(exp(sim / T)) x N over every entry of `sim` (positives included), VISSL's estimate
    from the first batch. The model averages it over ranks and then freezes it."""
    return torch.exp(sim.float() / temperature).mean() * num_data


def info_nce_memory_loss(sim: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Cross-entropy of the logits sim / T (B, 1+K) with the positive in column 0, mean over B."""
    return F.cross_entropy(sim / temperature, torch.zeros(sim.shape[0], dtype=torch.long, device=sim.device))


def memory_scores(z: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, 1+K) inner products of the embeddings z (B, D) with the memory rows idx (B, 1+K); the
    rows are read as constants (no gradient reaches the bank)."""
    rows = memory.detach()[idx.reshape(-1)].view(*idx.shape, memory.shape[1]).to(z.dtype)
    return torch.bmm(rows, z.unsqueeze(2)).squeeze(2)


def sample_rows(target: torch.Tensor, num_negatives: int, num_data: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1+K) memory rows: column 0 the targets, columns 1..K uniform over all N rows (with
    replacement, the positive not excluded: VISSL's AliasMethod over uniform probabilities)."""
    idx = torch.randint(num_data, (target.shape[0], num_negatives + 1), device=target.device, generator=generator)
    idx[:, 0] = target
    return idx
