"""SimMIM's reconstruction loss (ground truth: microsoft/SimMIM `models/simmim.py`, `SimMIM.forward`)."""
from __future__ import annotations

import torch


def pixel_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (B, h, w) mask on a grid that divides the image, as (B, 1, height, width): each cell
    repeated over the pixels it covers."""
    if mask.dim() != 3 or height % mask.shape[1] or width % mask.shape[2]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not a (B, h, w) grid dividing a "
                         f"{height}x{width} image")
    sh, sw = height // mask.shape[1], width // mask.shape[2]
    return mask.repeat_interleave(sh, 1).repeat_interleave(sw, 2).unsqueeze(1)


def masked_l1_loss(x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between the (normalised) input `x` and its reconstruction `x_rec`, both (B, C, H, W),
    over the masked pixels only: sum |x - x_rec| over masked pixels and channels, divided by
    (number of masked pixels + 1e-5) and by C. `mask` (B, h, w), 1 = masked, on any grid dividing
    the image (SimMIM passes the model's token grid). Computed in fp32."""
    m = pixel_mask(mask, x.shape[-2], x.shape[-1]).float()
    err = (x.float() - x_rec.float()).abs()
    return (err * m).sum() / (m.sum() + 1e-5) / x.shape[1]
