"""Loading a pretrained backbone into a fine-tuning backbone of another shape, as SimMIM's
`load_pretrained` does (microsoft/SimMIM utils.py, `remap_pretrained_keys_swin/_vit`):

  - a relative position bias shared by all blocks (BEiT-style ViT pretraining) is copied into
    every block when the fine-tuning model has one table per block;
  - a relative position bias table whose window (Swin 6 -> 7, 12 -> 14) or token grid (ViT)
    changed is resampled: the source offsets are spread along a geometric progression whose
    outermost offset reaches the target's, and each head's table is interpolated with a bicubic
    spline (the official code calls SciPy's `interp2d(kind='cubic')`, removed from SciPy 1.14;
    here the same interpolating not-a-knot spline is solved in torch, one axis after the other);
    BEiT's three class-token entries at the end of the table are kept as they are;
  - the pretrained final norm is dropped when the fine-tuning model pools into a new `fc_norm`
    instead (its `norm` is an Identity); `fc_norm` and the head start from their init.

Anything else that does not fit is an error naming the keys.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from shared.errors import UserError

RPB = "relative_position_bias_table"


def spline_matrix(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """(len(xq), len(x)) weights W such that W @ y is the not-a-knot cubic spline through (x, y)
    evaluated at xq (clamped to [x0, x_last], as FITPACK evaluates). x increasing, len(x) >= 4."""
    n = x.numel()
    if n < 4:
        raise ValueError(f"a cubic spline needs at least 4 points, got {n}")
    h = x[1:] - x[:-1]
    # second derivatives M = A^-1 B y
    a = torch.zeros(n, n, dtype=x.dtype)
    b = torch.zeros(n, n, dtype=x.dtype)
    for i in range(1, n - 1):
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        b[i, i - 1], b[i, i], b[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    # not-a-knot: the third derivative is continuous at x1 and at x[n-2]
    a[0, 0], a[0, 1], a[0, 2] = h[1], -(h[0] + h[1]), h[0]
    a[-1, -3], a[-1, -2], a[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    m = torch.linalg.solve(a, b)                                  # (n, n): M = m @ y
    xq = xq.clamp(x[0], x[-1])
    i = (torch.searchsorted(x, xq, right=True) - 1).clamp(0, n - 2)
    hi = h[i]
    left, right = x[i + 1] - xq, xq - x[i]
    w = torch.zeros(xq.numel(), n, dtype=x.dtype)
    rows = torch.arange(xq.numel())
    w += (left ** 3 / (6 * hi) - hi * left / 6)[:, None] * m[i]
    w += (right ** 3 / (6 * hi) - hi * right / 6)[:, None] * m[i + 1]
    w[rows, i] += left / hi
    w[rows, i + 1] += right / hi
    return w


def geometric_offsets(src: int, dst: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source and target offset positions of a (src x src) -> (dst x dst) relative-position table:
    target offsets -dst//2 .. dst//2; source offsets 0, ±1, ±(1 + q), ±(1 + q + q²), ... with the
    ratio q in (1.01, 1.5) found by bisection so that the outermost source offset reaches dst//2."""
    half = src // 2

    def reach(q: float) -> float:
        return (1.0 - q ** half) / (1.0 - q)

    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        lo, hi = (lo, q) if reach(q) > dst // 2 else (q, hi)
    pos, cur = [], 1.0
    for k in range(half):
        pos.append(cur)
        cur += q ** (k + 1)
    src_pos = torch.tensor([-p for p in reversed(pos)] + [0.0] + pos, dtype=torch.float64)
    t = dst // 2
    return src_pos, torch.arange(-t, t + 0.1, 1.0, dtype=torch.float64)


def resize_rpb_table(table: torch.Tensor, dst_len: int, extra: int) -> torch.Tensor:
    """(src_len, heads) -> (dst_len, heads): the first src_len - extra rows are a square grid of
    relative offsets, resampled; the last `extra` rows (BEiT's class-token entries) are kept."""
    src = math.isqrt(table.shape[0] - extra)
    dst = math.isqrt(dst_len - extra)
    if src * src != table.shape[0] - extra or dst * dst != dst_len - extra:
        raise UserError(f"relative position bias table of {table.shape[0]} rows does not resize to {dst_len} "
                        f"rows ({extra} extra)")
    if src == dst:
        return table.clone()
    xs, xq = geometric_offsets(src, dst)
    w = spline_matrix(xs, xq)                                     # (dst, src)
    grid = table[:table.shape[0] - extra].double().T.reshape(-1, src, src)   # (heads, rows=y, cols=x)
    out = w @ grid @ w.T                                          # interpolate along y, then along x
    out = out.reshape(table.shape[1], -1).T.to(table.dtype)
    return torch.cat([out, table[table.shape[0] - extra:]], dim=0)


def _extra_rows(length: int) -> int:
    """Rows of a table that are not relative offsets: BEiT's 3 class-token entries (Swin: none)."""
    side = math.isqrt(length)
    return 0 if side * side == length else 3


def adapt_state_dict(sd: Dict[str, torch.Tensor], target: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """`sd` (a pretrained backbone's state dict) made loadable into `target`; returns it and notes."""
    sd, notes = dict(sd), []
    want = target.state_dict()
    shared = f"rel_pos_bias.{RPB}"
    per_block = [k for k in want if k.startswith("blocks.") and k.endswith(f"attn.{RPB}")]
    if shared in sd and per_block and not any(k in sd for k in per_block):
        for k in per_block:
            sd[k] = sd[shared].clone()
        notes.append(f"shared relative position bias copied into {len(per_block)} blocks")
        if shared not in want:
            sd.pop(shared)
    resized = 0
    for k, v in list(sd.items()):
        if k.endswith(RPB) and k in want and want[k].shape != v.shape:
            if want[k].shape[1] != v.shape[1]:
                raise UserError(f"{k}: {v.shape[1]} heads pretrained, {want[k].shape[1]} in the fine-tuning model")
            sd[k] = resize_rpb_table(v, want[k].shape[0], _extra_rows(want[k].shape[0]))
            resized += 1
    if resized:
        notes.append(f"{resized} relative position bias tables resampled (geometric offsets, bicubic spline)")
    if isinstance(getattr(target, "norm", None), nn.Identity):
        dropped = [k for k in sd if k.startswith("norm.")]
        for k in dropped:
            sd.pop(k)
        if dropped:
            notes.append("pretrained final norm dropped (the fine-tuning model pools into fc_norm)")
    unexpected = sorted(k for k in sd if k not in want)
    missing = sorted(k for k in want if k not in sd and not k.startswith(("fc_norm.", "head.")))
    if unexpected or missing:
        raise UserError(f"the pretrained backbone does not fit the fine-tuning backbone: missing {missing[:4]}"
                        f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                        f"{'...' if len(unexpected) > 4 else ''}")
    mismatched = [k for k in sd if sd[k].shape != want[k].shape]
    if mismatched:
        raise UserError(f"the pretrained backbone does not fit the fine-tuning backbone: shapes differ for "
                        f"{mismatched[:4]} (e.g. {tuple(sd[mismatched[0]].shape)} vs {tuple(want[mismatched[0]].shape)})")
    return sd, notes
