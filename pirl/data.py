"""PIRL's input: per image, one view of the whole image and nine jigsaw patches, as VISSL builds
them (`ImgPilToPatchesAndImage`, `ImgPatchesFromTensor`, `ImgPilRandomPhotometric`, the transform
list of `pirl_jigsaw_4node_resnet50.yaml` and `patch_and_image_collator`).

1. image view: RandomResizedCrop(224, scale 0.08-1) of the image;
2. jigsaw view: an independent RandomResizedCrop(255, scale 0.6-1), cut into a 3 x 3 grid of
   85-px cells; from each cell a 64 x 64 patch at a random offset in [0, 21) along x and y;
   the 9 patches in a random order (no un-shuffling anywhere later);
3. then each later transform, in turn, on each of the 10 elements with its own random draws:
   ColorJitter(0.4, 0.4, 0.4, 0.2) (always applied), the random photometric op (with p 0.66:
   posterize 4-8 bits, sharpness 0.1-1.9, solarize at 0-256, autocontrast, in that order),
   RandomGrayscale(0.2), RandomHorizontalFlip(0.5), ToTensor, Normalize.
The sample is a dict {"image": (3, S, S), "patches": (9, 3, P, P), "index": dataset index}; the
default collate stacks it to (B, ...) and (B, 9, ...), image-major as VISSL's collator. All draws
come from torch's generator, which `SeededDataset` seeds per sample (VISSL draws the patch offsets,
the permutation and the photometric values from numpy): the distributions are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T

from shared.config import IMAGENET_MEAN, IMAGENET_STD, num
from shared.data.augment import INTERPOLATION
from shared.errors import ConfigError


@dataclass
class PIRLAugConfig:
    """`aug:` of a PIRL recipe (VISSL's TRANSFORMS list of the PIRL config)."""
    image_size: int = num(224, ">=1")                                   # crop_size_image
    image_scale: Tuple[float, float] = num((0.08, 1.0), "(0,1] ordered")  # crop_scale_image
    jigsaw_size: int = num(255, ">=3")                                  # crop_size_patches
    jigsaw_scale: Tuple[float, float] = num((0.6, 1.0), "(0,1] ordered")  # crop_scale_patches
    num_patches: int = num(9, ">=1")                                    # a square: 3 x 3 cells
    patch_jitter: int = num(21, ">=1")                                  # patch = cell - jitter (85 - 21 = 64)
    interpolation: str = "bilinear"                                     # torchvision's RandomResizedCrop default
    jitter: Tuple[float, float, float, float] = num((0.4, 0.4, 0.4, 0.2), ">=0")   # ColorJitter, always applied
    photometric_p: float = num(0.66, "[0,1]")                           # ImgPilRandomPhotometric's default p
    gray_p: float = num(0.2, "[0,1]")
    flip_p: float = num(0.5, "[0,1]")
    mean: Tuple[float, float, float] = num(IMAGENET_MEAN, "[0,1]")
    std: Tuple[float, float, float] = num(IMAGENET_STD, ">0")


def grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConfigError(f"aug.num_patches={num_patches}: expected a square number (9: a 3 x 3 grid)")
    return side


def patch_geometry(jigsaw_size: int, num_patches: int, patch_jitter: int) -> Tuple[int, int, int]:
    """(grid side, cell size, patch size) as ImgPatchesFromTensor: cell = size // side, patch = cell - jitter."""
    side = grid_side(num_patches)
    cell = jigsaw_size // side
    patch = cell - patch_jitter
    if patch < 1:
        raise ConfigError(f"aug.patch_jitter={patch_jitter} leaves no patch in a {cell}-px cell "
                          f"(aug.jigsaw_size={jigsaw_size} over {side} cells); expected patch_jitter < {cell}")
    return side, cell, patch


def patch_boxes(jigsaw_size: int, num_patches: int, patch_jitter: int) -> List[Tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes of the patches, before shuffling: cells taken column by
    column (x outer, y inner, as ImgPatchesFromTensor), each patch at an offset U{0..jitter-1} in x and y."""
    side, cell, patch = patch_geometry(jigsaw_size, num_patches, patch_jitter)
    offsets = torch.randint(0, patch_jitter, (2, side, side))
    boxes = []
    for i in range(side):            # x
        for j in range(side):        # y
            left, top = i * cell + int(offsets[0, i, j]), j * cell + int(offsets[1, i, j])
            boxes.append((left, top, left + patch, top + patch))
    return boxes


def _randint(lo: int, hi: int) -> int:
    """U{lo..hi}, both ends included."""
    return int(torch.randint(lo, hi + 1, ()).item())


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


class RandomPhotometric:
    """VISSL's ImgPilRandomPhotometric: with probability p, all four in turn: posterize to
    U{4..8} bits, sharpness U(0.1, 1.9), solarize at U{0..256}, autocontrast."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p < torch.rand(()).item():      # torchvision's RandomApply: skip when p < u
            return img
        img = ImageOps.posterize(img, _randint(4, 8))
        img = ImageEnhance.Sharpness(img).enhance(_uniform(0.1, 1.9))
        img = ImageOps.solarize(img, _randint(0, 256))
        return ImageOps.autocontrast(img)

    def __repr__(self) -> str:
        return f"RandomPhotometric(p={self.p})"


class PatchesAndImage:
    """PIL image -> {"image", "patches", "index"} (see the module docstring)."""

    takes_index = True      # `SeededDataset` passes the dataset index: it selects the memory row

    def __init__(self, cfg: PIRLAugConfig):
        if cfg.interpolation not in INTERPOLATION:
            raise ConfigError(f"aug.interpolation={cfg.interpolation!r}: expected one of {', '.join(INTERPOLATION)}")
        self.cfg = cfg
        self.side, self.cell, self.patch = patch_geometry(cfg.jigsaw_size, cfg.num_patches, cfg.patch_jitter)
        interp = INTERPOLATION[cfg.interpolation]
        self.image_crop = T.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.image_scale), interpolation=interp)
        self.jigsaw_crop = T.RandomResizedCrop(cfg.jigsaw_size, scale=tuple(cfg.jigsaw_scale), interpolation=interp)
        b, c, s, h = cfg.jitter
        # applied one after the other, each to every element (VISSL's wrapper over the list)
        self.per_element: Sequence = [T.ColorJitter(b, c, s, h), RandomPhotometric(cfg.photometric_p),
                                      T.RandomGrayscale(cfg.gray_p), T.RandomHorizontalFlip(cfg.flip_p),
                                      T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]

    def elements(self, img: Image.Image) -> List[Image.Image]:
        """[image view, 9 shuffled patches] before the per-element transforms."""
        img = img.convert("RGB")
        image = self.image_crop(img)
        jigsaw = self.jigsaw_crop(img)
        patches = [jigsaw.crop(box) for box in patch_boxes(self.cfg.jigsaw_size, self.cfg.num_patches,
                                                          self.cfg.patch_jitter)]
        order = torch.randperm(len(patches)).tolist()
        return [image] + [patches[k] for k in order]

    def __call__(self, img: Image.Image, index: int) -> Dict[str, torch.Tensor]:
        items = self.elements(img)
        for t in self.per_element:
            items = [t(x) for x in items]
        return {"image": items[0], "patches": torch.stack(items[1:]), "index": torch.tensor(index, dtype=torch.long)}
