"""ImageFolder (ImageNet layout: root/<class>/<image>) with one-line errors naming the path."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from shared.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe", ".jfif")


def class_folders(root: Path) -> List[str]:
    """The class names of a split in ImageNet layout: its sub-folders, sorted."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return f"class{'es' if len(names) > 1 else ''} {shown}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"


def _images(folder: Path) -> List[str]:
    """Every image file under `folder`, recursively, in sorted order."""
    out = []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return out


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """`img` as 8-bit RGB. High-bit-depth images (16-bit PNG/TIFF greyscale: modes I;16*, or I holding
    16-bit values) are scaled to 8 bits (x >> 8) rather than clipped at 255, which turns them white;
    floating-point images are refused with one line, since their range is unknown."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        peak = int(a.max()) if a.size else 0
        if a.size and (int(a.min()) < 0 or peak > 65535):
            raise DataError(f"cannot read image '{path}': {mode} pixels outside 0..65535 (min {int(a.min())}, "
                            f"max {peak}); convert it to an 8- or 16-bit image")
        if mode.startswith("I;16") or peak > 255:
            a = a >> 8
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise DataError(f"cannot read image '{path}': floating-point pixels (mode F) have no fixed range; "
                        f"convert it to an 8- or 16-bit image")
    return img.convert("RGB")


class ImageFolder(Dataset):
    """`ds[i] -> (PIL RGB image, class index)`. Classes are the sorted sub-folder names.
    `labelled=False`: every image under the folder, label -1 and no classes (e.g. COCO train2017
    for pretraining).

    An unreadable image raises `DataError` naming the file, unless `skip_bad_files`: then the next
    readable image is returned instead and each skip is logged to stderr with a running count."""

    def __init__(self, root: str | Path, skip_bad_files: bool = False, key: str = "data.root",
                 labelled: bool = True, classes: Optional[Sequence[str]] = None, classes_from: str = ""):
        root = Path(root)
        layout = "a folder in ImageNet layout" if labelled else "a folder of images (any sub-folders)"
        if not str(root) or not root.exists():
            raise DataError(f"dataset folder not found: '{root}' (set {key} to {layout})")
        if not root.is_dir():
            raise DataError(f"dataset path is not a folder: '{root}' (from {key})")
        self.root = root
        if labelled:
            found = class_folders(root)
            if not found:
                raise DataError(f"no class folders in '{root}': expected {root}/<class>/<image> (from {key})")
            if classes is not None:     # another split's classes: the same names, so that labels agree
                missing = sorted(set(classes) - set(found))
                extra = sorted(set(found) - set(classes))
                if missing or extra:
                    what = "; ".join(x for x in (f"lacks {_some(missing)}" if missing else "",
                                                 f"has {_some(extra)} that {classes_from} lacks" if extra else "") if x)
                    raise DataError(f"class folders of '{root}' do not match those of '{classes_from}': it {what} "
                                    f"(labels follow the class names of the training split)")
                found = list(classes)
            self.classes = found
            self.samples = []
            for label, cls in enumerate(self.classes):
                files = _images(root / cls)
                if not files:
                    raise DataError(f"class folder '{root / cls}' holds no images ({', '.join(IMG_EXTENSIONS[:3])}, "
                                    f"...): remove it or fill it (from {key})")
                self.samples += [(path, label) for path in files]
        else:
            self.classes = []
            self.samples = [(path, -1) for path in _images(root)]
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS[:3])}, ...) under '{root}' (from {key})")
        self.targets = [s[1] for s in self.samples]
        self.skip_bad_files = skip_bad_files
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, encoded: bool = False) -> "Image.Image | EncodedImage":
        """The image as PIL RGB, or (`encoded`) read and its header parsed but not decoded."""
        path = self.samples[index][0]
        try:
            if encoded:
                return EncodedImage(path)
            with open(path, "rb") as f:
                return to_rgb(Image.open(f), path)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            reason = str(exc).split("\n")[0] or type(exc).__name__
            raise DataError(f"cannot read image '{path}': {reason}") from None

    def __getitem__(self, index: int, encoded: bool = False):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return self.load(i, encoded), self.samples[i][1]
            except DataError as exc:
                self.skip(exc)
        raise DataError(f"no readable image under '{self.root}'")

    def skip(self, exc: DataError) -> None:
        """Count and log an unreadable image, or raise `exc` without `skip_bad_files`."""
        if not self.skip_bad_files:
            raise exc
        self.skipped += 1
        print(f"warning: skipped an unreadable image ({self.skipped} so far in this process): {exc}",
              file=sys.stderr, flush=True)


class EncodedImage:
    """An image file read into memory with its header parsed (size, format, mode), not decoded.
    `decode(k)` decodes it once, for all views: a JPEG at 1/k of its size (libjpeg's DCT scaling,
    PIL `draft`; k in 1, 2, 4, 8), an RGB JPEG at full size with torchvision's libjpeg-turbo
    decoder (the same pixels as PIL, faster), anything else with PIL."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        with Image.open(io.BytesIO(self.data)) as img:
            self.size, self.format, self.mode = img.size, img.format, img.mode

    def decode(self, reduction: int = 1) -> Tuple[torch.Tensor, int]:
        """(H', W', 3) uint8 RGB pixels and the reduction k actually used (H' = ceil(H / k))."""
        try:
            if self.format == "JPEG" and self.mode == "RGB" and reduction == 1:
                from torchvision.io import ImageReadMode, decode_jpeg
                chw = decode_jpeg(torch.frombuffer(bytearray(self.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                return chw.permute(1, 2, 0), 1
            img = Image.open(io.BytesIO(self.data))
            if self.format == "JPEG" and reduction > 1:
                img.draft("RGB", (self.size[0] // reduction, self.size[1] // reduction))
            k = round(self.size[0] / img.size[0])
            img.load()
            return torch.from_numpy(np.array(img if img.mode == "RGB" else to_rgb(img, self.path))), k
        except (OSError, ValueError, RuntimeError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            reason = str(exc).split("\n")[0] or type(exc).__name__
            raise DataError(f"cannot read image '{self.path}': {reason}") from None
