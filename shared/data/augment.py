"""Augmentation recipes as data: a `ViewConfig` becomes a PIL -> tensor pipeline, in the order it lists.

All randomness comes from torch's global generator, which the loader seeds per sample, so a
sample's views depend only on (seed, epoch, index): not on workers, world size or resumption.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from shared.config import ViewConfig
from shared.errors import ConfigError

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
OPS = ("crop", "flip", "jitter", "gray", "blur", "solarize")


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma ~ U(lo, hi), applied with probability p (the BYOL/MoCo v3/Barlow op)."""

    def __init__(self, p: float, sigma: Sequence[float]):
        self.p, self.sigma = p, tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        lo, hi = self.sigma
        return img.filter(ImageFilter.GaussianBlur(radius=lo + (hi - lo) * torch.rand(()).item()))

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, sigma={self.sigma})"


class RandomSolarize:
    """PIL `ImageOps.solarize` (invert values >= threshold) with probability p."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if torch.rand(()).item() < self.p else img

    def __repr__(self) -> str:
        return f"RandomSolarize(p={self.p}, threshold={self.threshold})"


def build_view(v: ViewConfig) -> T.Compose:
    unknown = [op for op in v.order if op not in OPS]
    if unknown or len(set(v.order)) != len(v.order) or "crop" not in v.order:
        raise ConfigError(f"aug.views.N.order={v.order}: expected each of {', '.join(OPS)} at most once, with crop")
    ops = []
    for op in v.order:
        if op == "crop":
            ops.append(T.RandomResizedCrop(v.size, scale=tuple(v.crop_scale), ratio=tuple(v.crop_ratio),
                                           interpolation=INTERPOLATION[v.interpolation]))
        elif op == "flip" and v.flip_p > 0:
            ops.append(T.RandomHorizontalFlip(v.flip_p))
        elif op == "jitter" and v.jitter_p > 0:
            b, c, s, h = v.jitter
            ops.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=v.jitter_p))
        elif op == "gray" and v.gray_p > 0:
            ops.append(T.RandomGrayscale(v.gray_p))
        elif op == "blur" and v.blur_p > 0:
            ops.append(RandomGaussianBlur(v.blur_p, v.blur_sigma))
        elif op == "solarize" and v.solarize_p > 0:
            ops.append(RandomSolarize(v.solarize_p, v.solarize_threshold))
    ops += [T.ToTensor(), T.Normalize(v.mean, v.std)]
    return T.Compose(ops)


class MultiView:
    """PIL image -> list of augmented views (each recipe repeated `n` times, in config order)."""

    def __init__(self, views: Sequence[ViewConfig]):
        self.pipelines: List[T.Compose] = []
        for v in views:
            self.pipelines += [build_view(v)] * v.n

    def __call__(self, img: Image.Image) -> List[torch.Tensor]:
        return [p(img) for p in self.pipelines]


def eval_transform(image_size: int, resize: int, interpolation: str, mean, std) -> T.Compose:
    """Resize(resize) -> CenterCrop(image_size): the standard kNN / linear-probe validation transform."""
    return T.Compose([T.Resize(resize, interpolation=INTERPOLATION[interpolation]), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def linear_train_transform(image_size: int, crop_scale, interpolation: str, mean, std) -> T.Compose:
    """RandomResizedCrop + flip: the linear-probe training transform of MoCo / Barlow Twins."""
    return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=INTERPOLATION[interpolation]),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def to_pil(x: torch.Tensor, mean, std, scale: int = 1) -> Image.Image:
    """A normalised (3, H, W) tensor back to a PIL image, enlarged `scale` times (nearest), for pictures."""
    rgb = (x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    img = Image.fromarray((rgb.permute(1, 2, 0) * 255).round().byte().numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img
