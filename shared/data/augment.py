"""Augmentation recipes as data: a `ViewConfig` becomes a PIL -> tensor pipeline, in the order it lists.

All randomness comes from torch's global generator, which the loader seeds per sample, so a
sample's views depend only on (seed, epoch, index): not on workers, world size or resumption.
`MultiView` also takes an undecoded image file (`EncodedImage`, from `ImageFolder` with
`data.fast_path`): the same parameters, drawn before decoding, then a faster decode and resize
(see "the fast path" below).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps, ImageStat
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from shared.config import ViewConfig
from shared.data.folder import EncodedImage
from shared.errors import ConfigError

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
OPS = ("crop", "flip", "jitter", "gray", "blur", "solarize")


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma ~ U(lo, hi), applied with probability p (the BYOL/MoCo v3/Barlow op)."""

    def __init__(self, p: float, sigma: Sequence[float]):
        self.p, self.sigma = p, tuple(sigma)

    def draw(self) -> Optional[float]:
        """The radius, or None when the blur is not applied."""
        if torch.rand(()).item() >= self.p:
            return None
        lo, hi = self.sigma
        return lo + (hi - lo) * torch.rand(()).item()

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = self.draw()
        return img if sigma is None else img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, sigma={self.sigma})"


class RandomSolarize:
    """PIL `ImageOps.solarize` (invert values >= threshold) with probability p."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def draw(self) -> bool:
        return torch.rand(()).item() < self.p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if self.draw() else img

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
    """PIL image -> list of augmented views (each recipe repeated `n` times, in config order).
    An `EncodedImage` takes the fast path: the same parameters (the same draws, in the same
    order), one decode at a reduced JPEG scale where every crop allows it, and a faster resize."""

    takes_encoded = True      # `SeededDataset` hands it `EncodedImage`s where the dataset offers them

    def __init__(self, views: Sequence[ViewConfig]):
        self.pipelines: List[T.Compose] = []
        for v in views:
            self.pipelines += [build_view(v)] * v.n

    def __call__(self, img) -> List[torch.Tensor]:
        if isinstance(img, EncodedImage):
            return self.fast(img)
        return [p(img) for p in self.pipelines]

    def fast(self, enc: EncodedImage, max_reduction: int = 8) -> List[torch.Tensor]:
        width, height = enc.size
        plans = [_draw(p, width, height) for p in self.pipelines]
        img, k = enc.decode(jpeg_reduction(plans, max_reduction))
        return [_run(steps, img, 1.0 / k, 1.0 / k) for steps in plans]


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


RECONSTRUCTION_TITLES = ("input", "masked", "reconstruction", "visible + reconstructed")


def reconstruction_sheet(x: torch.Tensor, pix: torch.Tensor, rec: torch.Tensor, mean, std) -> Image.Image:
    """The picture of a masked-image-modelling run (SimMIM, ConvMAE): one row per image of `x` (B, 3, H, W,
    normalised), with its masked pixels `pix` (B, 1, H, W; 1 = masked) greyed out, the reconstruction `rec`,
    and the reconstruction pasted into the visible pixels; enlarged to at least 128 px."""
    grey = torch.tensor([(0.5 - mu) / sd for mu, sd in zip(mean, std)]).view(1, 3, 1, 1)
    panels = [x, x * (1 - pix) + grey * pix, rec, x * (1 - pix) + rec * pix]
    scale = max(1, 128 // x.shape[-1])
    size, gap, head = x.shape[-1] * scale, 8, 18
    sheet = Image.new("RGB", (4 * size + 3 * gap, head + len(x) * (size + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(RECONSTRUCTION_TITLES):
        draw.text((c * (size + gap) + 2, 2), title, fill=(0, 0, 0))
    for r in range(len(x)):
        for c, panel in enumerate(panels):
            sheet.paste(to_pil(panel[r], mean, std, scale), (c * (size + gap), head + r * (size + gap)))
    return sheet


# ------------------------------------------------------------------------------- the fast path
# `MultiView` given an `EncodedImage` (an image file read but not decoded; `ImageFolder` yields
# one when the config's `data.fast_path` is on) draws every view's parameters first, with exactly
# the torch calls, in exactly the order, of the PIL pipeline above (the crop needs only the size,
# known from the file header); then decodes the file once for all views, at the largest JPEG
# scale (1/2, 1/4, 1/8) that keeps every view's crop at least its output size; then runs each
# view's ops, in its order, with the drawn parameters:
#   decode          a JPEG at 1/k (PIL `draft`: libjpeg's DCT scaling) where k > 1, else an RGB JPEG
#                   with torchvision's libjpeg-turbo decoder (the same pixels as PIL, faster)
#   crop + resize   torch's antialiased uint8 resize (PIL's filters and support; within 1 level of PIL)
#   brightness, contrast   the 256-entry table that PIL's own blend gives: bit-identical, one pass
#   saturation, hue, grayscale, blur, solarize, flip   the PIL ops themselves: bit-identical
# so the views differ from the PIL path only by the reduced decoding and the resize (see
# tests/test_input_pipeline.py for the measured difference and its bound).



def _ramp() -> Image.Image:
    return Image.frombytes("L", (256, 1), bytes(range(256)))


def _blend_lut(degenerate: int, factor: float) -> List[int]:
    """`Image.blend(constant degenerate, img, factor)` as a per-value table, computed by PIL itself."""
    out = Image.blend(Image.new("L", (256, 1), degenerate), _ramp(), factor)
    return list(out.tobytes()) * 3


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    return img.point(_blend_lut(0, factor))


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return img.point(_blend_lut(mean, factor))


def _draw(pipeline: T.Compose, width: int, height: int) -> List[tuple]:
    """A view's parameters, drawn with the same torch calls in the same order as `pipeline(img)`."""
    steps: List[tuple] = []
    for op in pipeline.transforms:
        if isinstance(op, T.RandomResizedCrop):
            box = T.RandomResizedCrop.get_params(torch.empty(()).expand(1, height, width), op.scale, op.ratio)
            steps.append(("crop", box, tuple(op.size), op.interpolation))
        elif isinstance(op, T.RandomHorizontalFlip):
            if torch.rand(1) < op.p:
                steps.append(("flip",))
        elif isinstance(op, T.RandomApply):                        # [ColorJitter]
            if not op.p < torch.rand(1):
                cj = op.transforms[0]
                order, *factors = T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
                steps += [(("brightness", "contrast", "saturation", "hue")[k], factors[k])
                          for k in order.tolist() if factors[k] is not None]
        elif isinstance(op, T.RandomGrayscale):
            if torch.rand(1) < op.p:
                steps.append(("gray",))
        elif isinstance(op, RandomGaussianBlur):
            sigma = op.draw()
            if sigma is not None:
                steps.append(("blur", sigma))
        elif isinstance(op, RandomSolarize):
            if op.draw():
                steps.append(("solarize", op.threshold))
        elif isinstance(op, T.Normalize):
            steps.append(("normalize", op.mean, op.std))
        elif not isinstance(op, T.ToTensor):
            raise TypeError(f"no fast path for {op!r}")
    return steps


def jpeg_reduction(plans: Sequence[List[tuple]], max_reduction: int = 8) -> int:
    """The largest k in (1, 2, 4, 8) such that every view's crop, decoded at 1/k of the image, is
    still at least its output size (so that every resize stays a downscale or the same size).
    Only where nothing before a view's crop depends on the resolution (a flip may come first)."""
    k = max_reduction
    for steps in plans:
        for step in steps:
            if step[0] == "crop":
                (_, _, h, w), (oh, ow) = step[1], step[2]
                while k > 1 and (h < oh * k or w < ow * k):
                    k //= 2
                break
            if step[0] != "flip":
                return 1
    return k


def _resized_crop(img: torch.Tensor, box, size, interpolation, scale_y: float, scale_x: float) -> Image.Image:
    """Crop `box` (i, j, h, w in full-resolution pixels) of a decoded (H', W', 3) uint8 image
    (the full image scaled by scale_y, scale_x) and resize it to `size` with torch's antialiased
    uint8 resize."""
    i, j, h, w = box
    if scale_y != 1.0 or scale_x != 1.0:
        top, left = round(i * scale_y), round(j * scale_x)
        bottom = min(max(round((i + h) * scale_y), top + 1), img.shape[0])
        right = min(max(round((j + w) * scale_x), left + 1), img.shape[1])
        i, j, h, w = top, left, bottom - top, right - left
    x = img[i:i + h, j:j + w].permute(2, 0, 1).unsqueeze(0)        # (1, 3, h, w), channels_last
    mode = "bicubic" if interpolation == T.InterpolationMode.BICUBIC else "bilinear"
    y = torch.nn.functional.interpolate(x.contiguous(memory_format=torch.channels_last), size=list(size),
                                        mode=mode, antialias=True, align_corners=False)
    return Image.fromarray(y[0].permute(1, 2, 0).contiguous().numpy(), "RGB")


def _run(steps: List[tuple], img: torch.Tensor, scale_y: float, scale_x: float) -> torch.Tensor:
    pil: Optional[Image.Image] = None
    for step in steps:
        kind = step[0]
        if kind == "crop":
            pil = _resized_crop(img if pil is None else torch.from_numpy(np.asarray(pil).copy()),
                                step[1], step[2], step[3], scale_y if pil is None else 1.0,
                                scale_x if pil is None else 1.0)
            continue
        if pil is None:                                            # an op before the crop
            pil = Image.fromarray(img.numpy(), "RGB")
            scale_y = scale_x = 1.0
        if kind == "flip":
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        elif kind == "brightness":
            pil = _brightness(pil, step[1])
        elif kind == "contrast":
            pil = _contrast(pil, step[1])
        elif kind == "saturation":
            pil = ImageEnhance.Color(pil).enhance(step[1])
        elif kind == "hue":
            pil = TF.adjust_hue(pil, step[1])
        elif kind == "gray":
            pil = pil.convert("L").convert("RGB")
        elif kind == "blur":
            pil = pil.filter(ImageFilter.GaussianBlur(radius=step[1]))
        elif kind == "solarize":
            pil = ImageOps.solarize(pil, step[1])
        elif kind == "normalize":
            x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
            mean = torch.as_tensor(step[1], dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(step[2], dtype=torch.float32).view(-1, 1, 1)
            return x.sub_(mean).div_(std)
    raise AssertionError("a view pipeline ends with Normalize")
