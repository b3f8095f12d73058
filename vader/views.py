"""VADeR's pair of views with their geometry, and the matched cells drawn per image.

`PairedViews(views, stride, matches)` turns one PIL image into a dict of tensors:
    view1, view2   (3, S, S) the two augmented views (each `ViewConfig`'s ops, in its order)
    box            (2, 4) float64: each view's crop box (x0, y0, w, h) in original pixels
    flip           (2,) bool: whether each view was flipped
    cells1, cells2 (n,) long: n distinct cells of view 1 whose centre lies inside view 2, and the
                   cell of view 2 each one lands in (row-major on the (S/stride)^2 grid)
    rcells2, rcells1  the same from view 2 into view 1 (used by the symmetric loss)

The crop boxes of the two views are drawn first (torchvision's RandomResizedCrop parameters) and
re-drawn until each view has at least n cells whose centre lies in the other view's box, at most
`max_tries` times; after that the second view takes the first view's box (ours: a pair that always
matches; at MoCo v2's crop scales it is very rare, see `tests/test_vader.py`). Then each view runs
its ops in its order with its box; the flip is drawn where the flip op stands. Photometric ops do
not move pixels, so the geometry is exact. All draws come from torch's global generator, which the
loader seeds per sample, so the views and the sampled cells are a function of (seed, epoch, index):
a resumed or 2-process run sees exactly the pairs of a 1-process run.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from shared.config import ViewConfig
from shared.data.augment import build_view
from shared.errors import ConfigError
from vader.correspondence import correspondence, sample_matches


def check_views(views: Sequence[ViewConfig], stride: int) -> None:
    if len(views) != 2 or any(v.n != 1 for v in views):
        raise ConfigError(f"aug.views: VADeR takes exactly two views with n=1, got {len(views)} "
                          f"(n={[v.n for v in views]})")
    if views[0].size != views[1].size:
        raise ConfigError(f"aug.views.N.size: both views must have the same size (their cells are matched one "
                          f"to one), got {views[0].size} and {views[1].size}")
    if views[0].size % 32:
        raise ConfigError(f"aug.views.N.size={views[0].size}: the FPN decoder needs a multiple of 32")
    for i, v in enumerate(views):
        if "flip" in v.order and v.order.index("flip") < v.order.index("crop"):
            raise ConfigError(f"aug.views.{i}.order={v.order}: VADeR's geometry needs the crop before the flip")


class PairedViews:
    def __init__(self, views: Sequence[ViewConfig], stride: int, matches: int, max_tries: int = 100):
        check_views(views, stride)
        self.pipelines = [build_view(v) for v in views]
        self.grid = views[0].size // stride
        self.matches, self.max_tries = matches, max_tries
        if matches > self.grid ** 2:
            raise ConfigError(f"model.matches={matches}: more than the {self.grid ** 2} cells of a "
                              f"{views[0].size} px view at stride {stride}")

    def crop_op(self, k: int) -> T.RandomResizedCrop:
        return next(op for op in self.pipelines[k].transforms if isinstance(op, T.RandomResizedCrop))

    def draw_boxes(self, width: int, height: int) -> torch.Tensor:
        """(2, 4) float64 boxes (x0, y0, w, h) such that each view has >= matches cells in the other."""
        probe = torch.empty(()).expand(1, height, width)
        no = torch.zeros(1, dtype=torch.bool)
        boxes = None
        for _ in range(self.max_tries):
            drawn = [self.crop_op(k).get_params(probe, self.crop_op(k).scale, self.crop_op(k).ratio) for k in (0, 1)]
            boxes = torch.tensor([[j, i, w, h] for i, j, h, w in drawn], dtype=torch.float64)
            a, b = boxes[:1], boxes[1:]
            if (int(correspondence(a, no, b, no, self.grid)[1].sum()) >= self.matches
                    and int(correspondence(b, no, a, no, self.grid)[1].sum()) >= self.matches):
                return boxes
        boxes[1] = boxes[0]
        return boxes

    def run(self, k: int, img: Image.Image, box: torch.Tensor):
        """View k of `img` cropped to `box`: (tensor, flipped)."""
        flipped = False
        x0, y0, w, h = (int(v) for v in box.tolist())
        for op in self.pipelines[k].transforms:
            if isinstance(op, T.RandomResizedCrop):
                img = TF.resized_crop(img, y0, x0, h, w, list(op.size), op.interpolation, antialias=True)
            elif isinstance(op, T.RandomHorizontalFlip):
                if torch.rand(1) < op.p:
                    img, flipped = TF.hflip(img), True
            else:
                img = op(img)
        return img, flipped

    def __call__(self, img: Image.Image) -> Dict[str, torch.Tensor]:
        boxes = self.draw_boxes(*img.size)
        (v1, f1), (v2, f2) = self.run(0, img, boxes[0]), self.run(1, img, boxes[1])
        flips = torch.tensor([f1, f2])
        a, fa, b, fb = boxes[:1], flips[:1], boxes[1:], flips[1:]
        idx12, ok12 = correspondence(a, fa, b, fb, self.grid)
        idx21, ok21 = correspondence(b, fb, a, fa, self.grid)
        cells1 = sample_matches(ok12, self.matches)
        rcells2 = sample_matches(ok21, self.matches)
        return {"view1": v1, "view2": v2, "box": boxes, "flip": flips,
                "cells1": cells1[0], "cells2": idx12.gather(1, cells1)[0],
                "rcells2": rcells2[0], "rcells1": idx21.gather(1, rcells2)[0]}
