"""Barlow Twins loss: push the cross-correlation of the two views' normalised embeddings to identity.

    C = bn(z1)^T bn(z2) / N          bn: affine-free BatchNorm over the batch (biased variance, eps 1e-5)
    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

`barlow_twins_loss` is the single-process loss on a full batch. Under DDP the model computes the
same C from per-rank terms summed over ranks (see `barlow.model`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.numerics import at_least_fp32


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The n*n - n off-diagonal entries of a square matrix, row by row, as a flat view."""
    n, m = c.shape
    if n != m:
        raise ValueError(f"expected a square matrix, got {tuple(c.shape)}")
    # drop c[0, 0]; rows of n + 1 then end on the next diagonal entry, which the last column drops
    return c.flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()


def cross_correlation(z1n: torch.Tensor, z2n: torch.Tensor, batch_size: int) -> torch.Tensor:
    """C = z1n^T z2n / batch_size for already-normalised embeddings (N, D) -> (D, D)."""
    return z1n.T @ z2n / batch_size


def loss_from_cross_correlation(c: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def batch_standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Affine-free BatchNorm1d in training mode: (z - mean) / sqrt(biased var + eps) per dimension."""
    return F.batch_norm(z, None, None, training=True, eps=eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """Loss for projector outputs `z1`, `z2` of shape (N, D), before the affine-free BatchNorm."""
    z1, z2 = at_least_fp32(z1), at_least_fp32(z2)
    c = cross_correlation(batch_standardise(z1), batch_standardise(z2), z1.shape[0])
    return loss_from_cross_correlation(c, lambd)
