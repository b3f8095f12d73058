"""The built-in procedural dataset: shapes on textured backgrounds, no download, any size and length.

Image `i` of split `s` is a pure function of `(seed, s, i)`: the same on every machine, process and
worker. Each image has one labelled shape (the largest; its class is the image label) and up to
`max_objects - 1` smaller distractor shapes of any class, with random colour, scale, rotation and
position, never overlapping. Annotations: a per-pixel semantic mask (0 = background, class + 1),
instance boxes (x0, y0, x1, y1, pixel edges) and polygons.

Export to ImageFolder, COCO-json and VOC layouts:
    python -m shared.data.synthetic --format coco --out /tmp/shapes-coco --length 2000 --image-size 128
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ("circle", "triangle", "square", "star", "cross", "crescent", "arrow", "heart")
SPLITS = {"train": 0, "val": 1}
SUPERSAMPLE = 4


def _unit_polygon(kind: str) -> np.ndarray:
    """Outline of a shape centred at 0 with maximum radius 1, as (K, 2) x/y points."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    if kind == "circle":
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind in ("triangle", "square"):
        k = 3 if kind == "triangle" else 4
        a = np.arange(k) * 2 * math.pi / k - math.pi / 2
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif kind == "star":
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif kind == "cross":
        w = 0.34
        pts = np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                        (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)
    elif kind == "crescent":
        # a unit disc minus a disc of radius 0.8 centred at (0.45, 0): the outer arc, then the inner one back
        outer = np.linspace(0.8957, 2 * math.pi - 0.8957, 36)
        inner = np.linspace(2 * math.pi - 1.3504, 1.3504, 30)
        pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                              np.stack([0.45 + 0.8 * np.cos(inner), 0.8 * np.sin(inner)], 1)])
    elif kind == "arrow":
        pts = np.array([(-1, -0.24), (0.15, -0.24), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.24),
                        (-1, 0.24)], dtype=float)
    elif kind == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    pts = pts - (pts.max(0) + pts.min(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


_POLYGONS = {k: _unit_polygon(k) for k in SHAPES}


@dataclass
class Sample:
    image: np.ndarray             # (H, W, 3) uint8
    label: int                    # class of the labelled (largest) shape
    mask: np.ndarray              # (H, W) uint8: 0 background, class + 1
    boxes: np.ndarray             # (K, 4) float32 x0 y0 x1 y1; row 0 is the labelled shape
    areas: np.ndarray             # (K,) pixels of each shape in `mask`
    classes: np.ndarray           # (K,) int64
    polygons: List[np.ndarray]    # K arrays of (P, 2) x/y points in pixels


def _colour(rng: np.random.Generator, palette: int, role: str) -> np.ndarray:
    """A random RGB colour (palette 0), one of `palette` fixed hues, or (palette 1) one fixed colour
    for backgrounds and another for shapes."""
    if palette == 0:
        return rng.uniform(0, 255, 3)
    if palette == 1:
        return np.array([70.0, 80.0, 100.0]) if role == "background" else np.array([225.0, 205.0, 120.0])
    k = int(rng.integers(palette))
    hue = 2 * math.pi * k / palette
    return 127.5 + 110 * np.array([math.cos(hue), math.cos(hue - 2.094), math.cos(hue + 2.094)])


def _background(rng: np.random.Generator, size: int, texture: float, palette: int) -> np.ndarray:
    """Two colours blended by low-frequency noise, plus stripes and pixel noise; `texture` scales all
    of that structure (0: one flat colour)."""
    c1, c2 = _colour(rng, palette, "background"), _colour(rng, palette, "background")
    grid = (rng.uniform(0, 255, (4, 4))).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    img = c1 + texture * (c2 - c1) * field[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(2, 9), rng.uniform(0, 2 * math.pi)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    img = img + stripes[..., None] * (texture * rng.uniform(0, 40)) * rng.choice([-1.0, 1.0], 3)
    return img + rng.normal(0, 6 * texture, (size, size, 3))


def _place(rng: np.random.Generator, size: int, radius: float, taken: List[Tuple[float, float, float]]):
    for _ in range(30):
        cx, cy = rng.uniform(radius, size - radius, 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 1) ** 2 for x, y, r in taken):
            return cx, cy
    return None


def render(index: int, *, image_size: int = 64, num_classes: int = len(SHAPES), max_objects: int = 3,
           seed: int = 0, split: str = "train", texture: float = 1.0, palette: int = 0,
           rotation: float = 180.0, placement: Tuple[float, float] = (1.0, 1.0), shading: float = 0.25,
           radius_range: Tuple[float, float] = (0.2, 0.36)) -> Sample:
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if not 0.14 <= radius_range[0] <= radius_range[1] <= 0.45:  # above the distractors' 0.08-0.14
        raise ValueError(f"radius_range must satisfy 0.14 <= low <= high <= 0.45, got {list(radius_range)}")
    if not all(0.0 <= p <= 1.0 for p in placement):
        raise ValueError(f"placement must be two numbers in [0, 1], got {list(placement)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    size = image_size
    img = _background(rng, size, texture, palette)
    mask = np.zeros((size, size), np.uint8)
    n_objects = 1 + int(rng.integers(0, max(max_objects, 1)))
    taken: List[Tuple[float, float, float]] = []
    boxes, areas, classes, polygons = [], [], [], []
    for k in range(n_objects):
        cls = int(rng.integers(num_classes))
        r = rng.uniform(0.2, 0.36) if k == 0 else rng.uniform(0.08, 0.14)
        if k == 0 and tuple(radius_range) != (0.2, 0.36):  # mapped, so that the other draws stay the same
            r = radius_range[0] + (r - 0.2) / 0.16 * (radius_range[1] - radius_range[0])
        radius = size * r
        where = _place(rng, size, radius, taken)
        if where is None:
            if k == 0:  # cannot happen for an empty canvas; keep the label shape centred anyway
                where = (size / 2, size / 2)
            else:
                continue
        if k == 0 and tuple(placement) != (1.0, 1.0):  # pulled towards the centre; the draws stay the same
            where = (size / 2 + placement[0] * (where[0] - size / 2), size / 2 + placement[1] * (where[1] - size / 2))
        taken.append((where[0], where[1], radius))
        angle = math.radians(rng.uniform(-rotation, rotation))
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        poly = _POLYGONS[SHAPES[cls]] @ rot.T * radius + np.asarray(where)
        canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly * SUPERSAMPLE], fill=255)
        alpha = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
        inside = alpha >= 0.5
        if not inside.any():
            continue
        colour = _colour(rng, palette, "shape")
        for _ in range(10):  # keep the shape visible against its background
            if np.abs(colour - img[inside].mean(0)).sum() > 120:
                break
            colour = _colour(rng, palette, "shape")
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        g = rng.uniform(-1, 1, 2)
        shade = 1 + shading * ((xx - where[0]) * g[0] + (yy - where[1]) * g[1]) / radius
        fill = colour * shade[..., None]
        img = img * (1 - alpha[..., None]) + fill * alpha[..., None]
        mask[inside] = cls + 1
        ys, xs = np.nonzero(inside)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        areas.append(len(xs))
        classes.append(cls)
        polygons.append(np.clip(poly, 0, size).astype(np.float32))
    image = np.clip(img, 0, 255).astype(np.uint8)
    return Sample(image=image, label=classes[0], mask=mask, boxes=np.asarray(boxes, np.float32),
                  areas=np.asarray(areas, np.int64),
                  classes=np.asarray(classes, np.int64), polygons=polygons)


class SyntheticShapes(Dataset):
    """`ds[i] -> (PIL.Image, label)`; `ds.sample(i)` gives the full annotations."""

    def __init__(self, length: int, image_size: int = 64, num_classes: int = len(SHAPES), max_objects: int = 3,
                 seed: int = 0, split: str = "train", cache: bool = False, texture: float = 1.0, palette: int = 0,
                 rotation: float = 180.0, placement: Tuple[float, float] = (1.0, 1.0), shading: float = 0.25,
                 radius_range: Tuple[float, float] = (0.2, 0.36)):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}")
        self.length, self.split = int(length), split
        self.kw = dict(image_size=image_size, num_classes=num_classes, max_objects=max_objects, seed=seed, split=split,
                       texture=texture, palette=palette, rotation=rotation, placement=tuple(placement), shading=shading,
                       radius_range=tuple(radius_range))
        self.classes = list(SHAPES[:num_classes])
        self._images: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None
        if cache:
            samples = [render(i, **self.kw) for i in range(self.length)]
            self._images = np.stack([s.image for s in samples])
            self._labels = np.asarray([s.label for s in samples], np.int64)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Sample:
        return render(index, **self.kw)

    @property
    def targets(self) -> List[int]:
        if self._labels is not None:
            return self._labels.tolist()
        return [self.sample(i).label for i in range(self.length)]

    def __getitem__(self, index: int):
        if self._images is not None:
            return Image.fromarray(self._images[index]), int(self._labels[index])
        s = self.sample(index)
        return Image.fromarray(s.image), s.label


# ------------------------------------------------------------------------------------- export
def voc_palette() -> List[int]:
    """The PASCAL VOC colour map (class k -> the bits of k spread over R, G, B, high bits first)."""
    palette = []
    for k in range(256):
        rgb, c = [0, 0, 0], k
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        palette += rgb
    return palette


def export(out: str | Path, fmt: str, *, length: int, val_length: int, image_size: int = 64,
           num_classes: int = len(SHAPES), max_objects: int = 3, seed: int = 0, texture: float = 1.0,
           palette: int = 0, rotation: float = 180.0) -> Path:
    """Write both splits in one layout: `imagefolder`, `coco` or `voc`. Returns the output folder.
    `texture`, `palette` and `rotation` are those of `render` (the demos' easy setting: 0, 1, 0)."""
    out = Path(out)
    classes = list(SHAPES[:num_classes])
    coco = {}
    voc_lists = {}
    for split, n in (("train", length), ("val", val_length)):
        ds = SyntheticShapes(n, image_size, num_classes, max_objects, seed, split, texture=texture, palette=palette,
                             rotation=rotation)
        images, annotations, names = [], [], []
        for i in range(n):
            s = ds.sample(i)
            name = f"{split}_{i:06d}"
            if fmt == "imagefolder":
                d = out / split / classes[s.label]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(s.image).save(d / f"{name}.png")
            elif fmt == "coco":
                d = out / split
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(s.image).save(d / f"{name}.png")
                images.append({"id": i + 1, "file_name": f"{name}.png", "height": image_size, "width": image_size})
                for box, cls, poly, area in zip(s.boxes, s.classes, s.polygons, s.areas):
                    x0, y0, x1, y1 = (float(v) for v in box)
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area),
                        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]], "iscrowd": 0})
            elif fmt == "voc":
                for sub in ("JPEGImages", "SegmentationClass", "Annotations"):
                    (out / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(s.image).save(out / "JPEGImages" / f"{name}.jpg", quality=95)
                m = Image.fromarray(s.mask, mode="L").convert("P")
                m.putpalette(voc_palette())
                m.save(out / "SegmentationClass" / f"{name}.png")
                (out / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, image_size, s, classes))
                names.append(name)
            else:
                raise ValueError(f"unknown export format {fmt!r}: expected imagefolder, coco or voc")
        if fmt == "coco":
            coco[split] = {"images": images, "annotations": annotations,
                           "categories": [{"id": c + 1, "name": n, "supercategory": "shape"} for c, n in enumerate(classes)]}
        voc_lists[split] = names
    if fmt == "coco":
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        for split, data in coco.items():
            (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    if fmt == "voc":
        for sub in ("Segmentation", "Main"):
            (out / "ImageSets" / sub).mkdir(parents=True, exist_ok=True)
            for split, names in voc_lists.items():
                (out / "ImageSets" / sub / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        (out / "classes.txt").write_text("".join(["background\n"] + [c + "\n" for c in classes]))
    return out


def _voc_xml(name: str, size: int, s: Sample, classes: List[str]) -> str:
    objs = "".join(
        f"<object><name>{classes[c]}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin><xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax>"
        f"</bndbox></object>" for b, c in zip(s.boxes, s.classes))
    return (f"<annotation><folder>JPEGImages</folder><filename>{name}.jpg</filename>"
            f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"
            f"<segmented>1</segmented>{objs}</annotation>\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Export the built-in synthetic dataset")
    p.add_argument("--format", required=True, choices=["imagefolder", "coco", "voc"])
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--val-length", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=len(SHAPES))
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texture", type=float, default=1.0, help="background texture strength (0: flat)")
    p.add_argument("--palette", type=int, default=0, help="0: random colours; 1: one background and one shape colour")
    p.add_argument("--rotation", type=float, default=180.0, help="shapes rotated by up to this many degrees")
    a = p.parse_args(argv)
    out = export(a.out, a.format, length=a.length, val_length=a.val_length, image_size=a.image_size,
                 num_classes=a.num_classes, max_objects=a.max_objects, seed=a.seed, texture=a.texture,
                 palette=a.palette, rotation=a.rotation)
    print(f"wrote {a.format} layout to {out}")


if __name__ == "__main__":
    main()
