"""ConvMAE's reconstruction loss (ground truth: Alpha-VL/ConvMAE `models_convmae.py`, `patchify` and
`forward_loss`, MAE's)."""
from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p²·C): patches in row-major order, each flattened as (row, column,
    channel), the official `einsum('nchpwq->nhwpqc')` order."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible into {p}x{p} patches")
    x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int = 16, channels: int = 3) -> torch.Tensor:
    """The inverse of `patchify` for a square grid: (B, L, p²·C) -> (B, C, H, W)."""
    b, n, _ = x.shape
    g, p = int(round(n ** 0.5)), patch_size
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = x.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *, patch_size: int = 16,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error between `pred` (B, L, p²·3) and the patches of `imgs` (B, 3, H, W), averaged
    over each patch's pixels and then over the masked patches (`mask` (B, L), 1 = masked) only. With
    `norm_pix` the target patches are normalised each by its own mean and (unbiased) variance + 1e-6,
    as the official `norm_pix_loss`. Computed in fp32."""
    target = patchify(imgs.float(), patch_size)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} does not match the {tuple(target.shape)} patches of the images")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum()
