"""Input-pipeline throughput per core: a recipe's training views through our loader vs the reference.

    python benchmarks/input_pipeline.py [--recipes barlow/configs/in1k_1000ep.yaml ...] [--images 256] \
        [--workers 1 all] [--repeats 2] [--json] [--data DIR]

Data: the built-in dataset exported as an ImageFolder of JPEGs at ImageNet-like sizes, made by the
benchmark itself (into --data, reused when already there): 70 % of the images 500 px on the long
side (ImageNet's most common size), 30 % log-uniform in 200-1200 px, aspect ratios 4:3, 3:2, 1:1,
3:4, 2:3; each a 128-px render upsampled (bicubic) with pixel noise (sigma 16) added so that JPEG
quality 90 gives files of about ImageNet's mean size (~110 kB).

Ours: `build_image_dataset` + `MultiView(cfg.aug.views)` + `SeededDataset` + `GlobalBatchSampler`
+ `make_loader` (the training loader; `--set data.fast_path=false` for the PIL path). Reference: the
same augmentation parameters composed from plain torchvision PIL transforms (RandomResizedCrop,
RandomApply(ColorJitter), RandomGrayscale, PIL GaussianBlur, solarize, RandomHorizontalFlip,
ToTensor, Normalize, in the recipe's order) applied one sample at a time to each PIL image of
torchvision's ImageFolder, as the official codes do, in a DataLoader with the same workers and
batch. Both are timed interleaved, `--repeats` times each, from the second batch (worker start-up
excluded) to the end of one pass over the images. Images/s per core = images/s / workers.
Prints a table, or with --json one JSON object per (recipe, workers) on its own line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from shared.config import ViewConfig, build_config
from shared.data.augment import MultiView
from shared.data.loader import GlobalBatchSampler, SeededDataset, build_image_dataset, make_loader
from shared.data.synthetic import SHAPES, render

HEADLINE = ["barlow/configs/in1k_1000ep.yaml", "mocov3/configs/r50_100ep.yaml",
            "densecl/configs/densecl_imagenet_200ep.yaml"]
ASPECTS, ASPECT_P = [4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3], [0.45, 0.25, 0.1, 0.12, 0.08]


def make_dataset(root: Path, n: int, quality: int = 90, seed: int = 0) -> Path:
    """`n` JPEGs at ImageNet-like sizes under root/train/<class>/ (kept and reused: a marker names n)."""
    marker = root / f".made-{n}-q{quality}-s{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        long = 500 if rng.random() < 0.7 else int(np.exp(rng.uniform(np.log(200), np.log(1200))))
        a = ASPECTS[rng.choice(len(ASPECTS), p=ASPECT_P)]
        w, h = (long, round(long / a)) if a >= 1 else (round(long * a), long)
        s = render(i, image_size=128, num_classes=8, seed=seed)
        img = np.asarray(Image.fromarray(s.image).resize((w, h), Image.BICUBIC), np.float32)
        img = np.clip(img + rng.normal(0, 16, img.shape), 0, 255).astype(np.uint8)
        d = root / "train" / SHAPES[s.label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.JPEG", quality=quality)
    marker.touch()
    return root


# ------------------------------------------------------------------------------ the reference
class GaussianBlur:
    """The official codes' blur: PIL GaussianBlur with radius ~ U(sigma)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(self.sigma[0], self.sigma[1])))


class Solarize:
    def __call__(self, x):
        return ImageOps.solarize(x)


def reference_view(v: ViewConfig) -> T.Compose:
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[v.interpolation]
    ops = {"crop": T.RandomResizedCrop(v.size, scale=tuple(v.crop_scale), ratio=tuple(v.crop_ratio),
                                       interpolation=interp),
           "flip": T.RandomHorizontalFlip(v.flip_p),
           "jitter": T.RandomApply([T.ColorJitter(*v.jitter)], p=v.jitter_p),
           "gray": T.RandomGrayscale(v.gray_p),
           "blur": T.RandomApply([GaussianBlur(tuple(v.blur_sigma))], p=v.blur_p),
           "solarize": T.RandomApply([Solarize()], p=v.solarize_p)}
    return T.Compose([ops[o] for o in v.order] + [T.ToTensor(), T.Normalize(v.mean, v.std)])


class ReferenceViews:
    def __init__(self, views):
        self.pipes = [reference_view(v) for v in views for _ in range(v.n)]

    def __call__(self, img):
        return [p(img) for p in self.pipes]


# ---------------------------------------------------------------------------------- timing
def timed_pass(loader) -> float:
    """Images/s from the end of the first batch to the end of the pass."""
    n, t0 = 0, None
    for views, _ in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += views[0].shape[0]
    return n / (time.perf_counter() - t0)


def ours_loader(cfg, workers: int, batch: int):
    ds = build_image_dataset(cfg.data, "train")
    sampler = GlobalBatchSampler(len(ds), batch, seed=0, drop_last=False)
    return make_loader(SeededDataset(ds, MultiView(cfg.aug.views)), sampler, workers, False)


def reference_loader(cfg, workers: int, batch: int):
    ds = datasets.ImageFolder(str(Path(cfg.data.root) / "train"), transform=ReferenceViews(cfg.aug.views))
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=HEADLINE, help="<paper>/configs/*.yaml (default: the headline three)")
    p.add_argument("--images", type=int, default=256, help="JPEGs in the benchmark's dataset (one pass each run)")
    p.add_argument("--workers", nargs="+", default=["1", "all"], help="worker counts; 'all': the CPUs this process may use")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each pipeline")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "ssl-input-pipeline"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for our side, e.g. data.fast_path=false")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    root = make_dataset(Path(a.data), a.images)
    for recipe in a.recipes:
        paper = Path(recipe).parts[0]
        cfg = build_config(importlib.import_module(f"{paper}.train").Config, [recipe],
                           [f"data.root={root}", "data.source=folder", *a.set])
        for w in a.workers:
            workers = cores if w == "all" else int(w)
            runs: Dict[str, List[float]] = {"ours": [], "reference": []}
            for _ in range(a.repeats):
                runs["ours"].append(timed_pass(ours_loader(cfg, workers, a.batch)))
                runs["reference"].append(timed_pass(reference_loader(cfg, workers, a.batch)))
            per_core = {k: statistics.median(v) / max(workers, 1) for k, v in runs.items()}
            rec = {"recipe": recipe, "workers": workers, "cores": cores,
                   "ours_img_s_per_core": round(per_core["ours"], 2),
                   "reference_img_s_per_core": round(per_core["reference"], 2),
                   "ratio": round(per_core["ours"] / per_core["reference"], 3),
                   "ours_runs_img_s": [round(x, 2) for x in runs["ours"]],
                   "reference_runs_img_s": [round(x, 2) for x in runs["reference"]],
                   "images": a.images, "batch": a.batch, "fast_path": cfg.data.fast_path,
                   "machine": f"{cpu_name()}, {cores} CPUs", "torch": torch.__version__}
            if a.json:
                print(json.dumps(rec), flush=True)
            else:
                print(f"{recipe:48s} workers {workers:2d}  ours {rec['ours_img_s_per_core']:7.1f}  reference "
                      f"{rec['reference_img_s_per_core']:7.1f} img/s/core  ratio {rec['ratio']:.2f}  "
                      f"(runs: ours {rec['ours_runs_img_s']}, reference {rec['reference_runs_img_s']})", flush=True)


if __name__ == "__main__":
    main()
