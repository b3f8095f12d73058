"""Which output cells of two views show the same scene location: pure geometry from the crop boxes.

A view is a crop box (x0, y0, w, h) of the original image, in original pixels (continuous
coordinates: pixel p covers [p, p + 1)), resized to the output size, then possibly flipped
horizontally. Its G x G output grid (G = size / stride) divides the resized crop into equal cells,
so cell (i, j) (row i, column j) covers [x0 + j·w/G, x0 + (j+1)·w/G) x [y0 + i·h/G, ...) of the
original image before the flip; a flip reverses the columns (cell j shows what cell G-1-j would).
The centre of a cell of view a is mapped into view b's grid; its match is the cell of b that
contains it (the cell whose centre is nearest), and only cells whose centre lands inside b's box
are candidates. This is the centre-of-bin geometry PixPro uses to relate its two crops (ours for
VADeR, whose code is not public).

Everything here works on tensors with a leading batch dimension and has no randomness except
`sample_matches`, which takes a generator.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def cell_centres(boxes: torch.Tensor, flips: torch.Tensor, grid: int) -> torch.Tensor:
    """boxes (B, 4) as (x0, y0, w, h), flips (B,) bool -> (B, G·G, 2) original-image (x, y) of the
    centre of every output cell, row-major (index i·G + j)."""
    boxes = boxes.to(torch.float64)
    t = (torch.arange(grid, dtype=torch.float64, device=boxes.device) + 0.5) / grid      # (G,) in (0, 1)
    x0, y0, w, h = boxes.unbind(1)
    tx = torch.where(flips.bool().view(-1, 1), 1.0 - t.view(1, -1), t.view(1, -1))        # (B, G) columns
    xs = x0.view(-1, 1) + tx * w.view(-1, 1)                                              # (B, G)
    ys = y0.view(-1, 1) + t.view(1, -1) * h.view(-1, 1)                                   # (B, G)
    return torch.stack([xs.unsqueeze(1).expand(-1, grid, -1), ys.unsqueeze(2).expand(-1, -1, grid)],
                       dim=3).reshape(boxes.shape[0], grid * grid, 2)


def locate(points: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, grid: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Original-image points (B, P, 2) -> (index (B, P) long, inside (B, P) bool): the cell of each
    view's G x G grid that contains the point (row-major; 0 where the point is outside the box)."""
    boxes = boxes.to(torch.float64)
    x0, y0, w, h = (c.view(-1, 1) for c in boxes.unbind(1))
    u = (points[..., 0] - x0) / w * grid                  # continuous column, before the flip
    v = (points[..., 1] - y0) / h * grid
    inside = (u >= 0) & (u < grid) & (v >= 0) & (v < grid)
    col = u.floor().clamp(0, grid - 1).long()
    col = torch.where(flips.bool().view(-1, 1), grid - 1 - col, col)
    row = v.floor().clamp(0, grid - 1).long()
    index = torch.where(inside, row * grid + col, torch.zeros_like(col))
    return index, inside


def correspondence(boxes_a: torch.Tensor, flips_a: torch.Tensor, boxes_b: torch.Tensor, flips_b: torch.Tensor,
                   grid: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every cell of view a's grid (row-major), the cell of view b that shows the same scene
    location: (index (B, G·G) long, valid (B, G·G) bool). `valid` is False where a's cell centre
    falls outside b's crop; there `index` is 0 and must not be used."""
    return locate(cell_centres(boxes_a, flips_a, grid), boxes_b, flips_b, grid)


def overlap_cells(box_a, box_b, grid: int) -> int:
    """How many cells of view a's grid have their centre inside view b's box (flips do not change it)."""
    a = torch.as_tensor(box_a, dtype=torch.float64).view(1, 4)
    b = torch.as_tensor(box_b, dtype=torch.float64).view(1, 4)
    no = torch.zeros(1, dtype=torch.bool)
    return int(correspondence(a, no, b, no, grid)[1].sum())


def sample_matches(valid: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """valid (B, L) bool -> (B, n) long: n distinct valid cells per image, drawn uniformly at random.
    Every image must have at least n valid cells (the view sampler re-draws crops until it does)."""
    counts = valid.sum(1)
    if bool((counts < n).any()):
        short = int(counts.min())
        raise ValueError(f"a pair of views has only {short} matching cells; {n} are sampled per image")
    keys = torch.rand(valid.shape, generator=generator, dtype=torch.float64)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))    # invalid cells sort last
    return keys.argsort(dim=1)[:, :n]
