"""JigClu's input: every image cut into four overlapping crops, each augmented on its own.

Ground truth: dvlab-research/JigsawClustering `JigClu/loader.py` (`JigCluTransform`) and the
augmentation list of `main.py`. Crop k of an image is the k-th of `crop_boxes` (TL, BL, TR, BR);
the montages are built later, on the device, by the model (`jigclu.model.build_montages`).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from PIL import Image

from shared.config import ViewConfig
from shared.data.augment import build_view
from shared.errors import ConfigError

Box = Tuple[int, int, int, int]
POSITIONS = ("TL", "BL", "TR", "BR")   # the order of the crops (and of the location labels 0..3)


def crop_boxes(width: int, height: int, cross: float) -> List[Box]:
    """The four PIL boxes (left, upper, right, lower) of an image of `width` x `height`, in the
    official order TL, BL, TR, BR. Each spans half of each axis plus `cross` of the whole axis
    (cross 0.3: 80 %), so that neighbouring crops overlap by 2 x cross.

    The official transform reads `h, w = img.size`, i.e. h is PIL's width and w its height, and
    computes `h // 2 + cross * h` etc. in floats; PIL's `crop` then rounds each coordinate with
    Python's `round` (half to even). Both are reproduced here, so the boxes are the pixels that the
    official code crops."""
    if not 0.0 <= cross <= 0.5:
        raise ConfigError(f"model.cross_ratio={cross}: expected a value in [0, 0.5] (each crop spans 0.5 + cross of "
                          "each axis)")
    dx, dy = cross * width, cross * height
    mid_x, mid_y = width // 2, height // 2
    raw = [(0, 0, mid_x + dx, mid_y + dy),                  # top-left
           (0, mid_y - dy, mid_x + dx, height),             # bottom-left
           (mid_x - dx, 0, width, mid_y + dy),              # top-right
           (mid_x - dx, mid_y - dy, width, height)]         # bottom-right
    return [tuple(int(round(v)) for v in box) for box in raw]


class JigCluTransform:
    """PIL image -> [TL, BL, TR, BR] crops, each through the view pipeline (RandomResizedCrop to
    the crop size, jitter, grayscale, blur, flip, normalise), drawn independently."""

    def __init__(self, view: ViewConfig, cross: float):
        crop_boxes(2, 2, cross)              # validates cross
        self.pipeline = build_view(view)
        self.cross = cross
        self.size = view.size

    def __call__(self, img: Image.Image) -> List[torch.Tensor]:
        if not isinstance(img, Image.Image):
            raise TypeError(f"JigCluTransform takes a PIL image, got {type(img).__name__}")
        return [self.pipeline(img.crop(box)) for box in crop_boxes(img.width, img.height, self.cross)]

    def __repr__(self) -> str:
        return f"JigCluTransform(cross={self.cross}, {self.pipeline!r})"


def make_transform(cfg, model=None) -> JigCluTransform:
    """`shared.pretrain`'s hook: the one view of `cfg.aug.views` is the per-crop augmentation."""
    views = cfg.aug.views
    if len(views) != 1 or views[0].n != 1:
        raise ConfigError(f"aug.views: JigClu takes exactly one view recipe with n=1 (applied to each of the four "
                          f"crops), got {len(views)} recipe(s) with n={[v.n for v in views]}")
    return JigCluTransform(views[0], cfg.model.cross_ratio)
