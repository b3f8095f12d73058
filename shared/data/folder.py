"""ImageFolder (ImageNet layout: root/<class>/<image>) with one-line errors naming the path."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from shared.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe", ".jfif")


def _images(folder: Path) -> List[str]:
    """Every image file under `folder`, recursively, in sorted order."""
    out = []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return out


class ImageFolder(Dataset):
    """`ds[i] -> (PIL RGB image, class index)`. Classes are the sorted sub-folder names.
    `labelled=False`: every image under the folder, label -1 and no classes (e.g. COCO train2017
    for pretraining).

    An unreadable image raises `DataError` naming the file, unless `skip_bad_files`: then the next
    readable image is returned instead and each skip is logged to stderr with a running count."""

    def __init__(self, root: str | Path, skip_bad_files: bool = False, key: str = "data.root",
                 labelled: bool = True):
        root = Path(root)
        layout = "a folder in ImageNet layout" if labelled else "a folder of images (any sub-folders)"
        if not str(root) or not root.exists():
            raise DataError(f"dataset folder not found: '{root}' (set {key} to {layout})")
        if not root.is_dir():
            raise DataError(f"dataset path is not a folder: '{root}' (from {key})")
        self.root = root
        if labelled:
            self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
            if not self.classes:
                raise DataError(f"no class folders in '{root}': expected {root}/<class>/<image> (from {key})")
            self.samples = [(path, label) for label, cls in enumerate(self.classes) for path in _images(root / cls)]
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

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            reason = str(exc).split("\n")[0] or type(exc).__name__
            raise DataError(f"cannot read image '{path}': {reason}") from None

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return self.load(i), self.samples[i][1]
            except DataError as exc:
                if not self.skip_bad_files:
                    raise
                self.skipped += 1
                print(f"warning: skipped an unreadable image ({self.skipped} so far in this process): {exc}",
                      file=sys.stderr, flush=True)
        raise DataError(f"no readable image under '{self.root}'")
