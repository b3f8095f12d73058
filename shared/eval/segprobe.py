"""Segmentation linear probe: how linearly the classes of a frozen backbone's per-pixel features
separate, scored by mIoU on the val split's semantic masks.

One feature map (`cfg.eval.seg.stage`, via `forward_intermediates`) is extracted once for every
image with the eval transform (Resize -> CenterCrop, no augmentation); each mask goes through the
same geometry with nearest-neighbour resizing. The classifier is [affine-free BatchNorm2d] -> 1x1
convolution to num_classes + 1 outputs (0 = background); its logits are upsampled bilinearly
(align_corners=False) to the mask size and trained with pixel cross-entropy by AdamW (linear
warm-up, then cosine, per step). Training runs on the cached features identically on every rank
(no communication after the extraction), seeded by `train.seed`. mIoU averages the IoU of the
classes present in the val predictions or masks (union > 0), from one confusion matrix over the
whole val set.

Masks come from the built-in synthetic dataset (`SyntheticShapes.sample(i).mask`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from shared import dist
from shared.config import RunConfig
from shared.data.augment import eval_transform
from shared.data.synthetic import SyntheticShapes
from shared.engine import autocast_dtype
from shared.errors import ConfigError, DataError
from shared.eval.features import extract


# ------------------------------------------------------------------------------------- scores
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 pixel counts, rows = target class, columns = predicted class."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> Dict[str, Any]:
    """mIoU (mean over classes with union > 0) and pixel accuracy, in percent, and the per-class IoU
    (None for a class absent from both targets and predictions)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp / union.clamp(min=1)
    return {"miou": 100.0 * iou[present].mean().item() if present.any() else 0.0,
            "pixel_acc": 100.0 * (tp.sum() / conf.sum().clamp(min=1)).item(),
            "iou": [100.0 * v if p else None for v, p in zip(iou.tolist(), present.tolist())]}


# --------------------------------------------------------------------------------------- data
def require_masks(dataset: Dataset) -> None:
    if not isinstance(dataset, SyntheticShapes):
        raise DataError(f"the segmentation probe needs per-pixel masks: data.source=synthetic "
                        f"(got a {type(dataset).__name__})")


def sample_mask(dataset: Dataset, index: int) -> np.ndarray:
    """The (H, W) uint8 semantic mask of image `index`: 0 background, class + 1."""
    require_masks(dataset)
    return dataset.sample(index).mask


def mask_transform(image_size: int, resize: int) -> T.Compose:
    """The geometry of `eval_transform` (Resize(resize) -> CenterCrop(image_size)) for a mask, nearest-neighbour."""
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(image_size)])


class ImagesAndMasks(Dataset):
    """`ds[i] -> (PIL image, (S, S) uint8 mask)`, the mask already resized and cropped; the image is
    left to the loader's transform."""

    def __init__(self, base: Dataset, mask_tf):
        require_masks(base)
        self.base, self.mask_tf = base, mask_tf

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, _ = self.base[index]
        mask = self.mask_tf(Image.fromarray(sample_mask(self.base, index)))
        return image, torch.from_numpy(np.array(mask, dtype=np.uint8))


def feature_map(backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
    """The (N, C, h, w) map of `stage` (negative: counted from the last)."""
    maps = backbone.forward_intermediates(x, None if stage < 0 else [stage], intermediates_only=True)
    if len(maps) < (-stage if stage < 0 else 1):
        raise ConfigError(f"eval.seg.stage={stage}: the backbone has no such stage (0 = the first, -1 = the last)")
    return maps[min(stage, 0)]


# ---------------------------------------------------------------------------------------- probe
class SegHead(nn.Module):
    """[affine-free BatchNorm2d] -> 1x1 Conv2d; logits upsampled bilinearly to `size`."""

    def __init__(self, dim: int, num_outputs: int, bn: bool, generator: torch.Generator):
        super().__init__()
        # momentum None: a cumulative average, i.e. the statistics of the (fixed) training features
        self.bn = nn.BatchNorm2d(dim, affine=False, momentum=None) if bn else nn.Identity()
        self.conv = nn.Conv2d(dim, num_outputs, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.01)
            self.conv.bias.zero_()

    def forward(self, feats: torch.Tensor, size) -> torch.Tensor:
        logits = self.conv(self.bn(feats))
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def seg_probe(cfg: RunConfig, backbone: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int,
              out_dir: Optional[Path] = None, desc: str = "") -> Dict[str, float]:
    """Train the probe on `train_set`'s masks, return val {"miou", "pixel_acc"} in percent; with
    `out_dir`, also write segprobe.json there (per-class IoU, loss per epoch)."""
    _, device = dist.init(cfg.train.device)
    sc, ec = cfg.eval.seg, cfg.eval
    data = [ImagesAndMasks(ds, mask_transform(ec.image_size, ec.resize)) for ds in (train_set, val_set)]
    tf = eval_transform(ec.image_size, ec.resize, ec.interpolation, ec.mean, ec.std)
    backbone = backbone.to(device).eval()
    dtype = autocast_dtype(cfg.train.amp, device)
    (tr_f, tr_m), (va_f, va_m) = [extract(lambda x: feature_map(backbone, x, sc.stage), d, tf, ec.knn.batch_size,
                                          device, cfg.data.workers, dtype) for d in data]
    k = num_classes + 1
    if max(int(tr_m.max()), int(va_m.max())) >= k:
        raise DataError(f"segmentation probe: a mask holds class {max(int(tr_m.max()), int(va_m.max())) - 1}, "
                        f"but num_classes={num_classes}")

    g = torch.Generator().manual_seed(cfg.train.seed)
    head = SegHead(tr_f.shape[1], k, sc.bn, g).to(device)
    opt = torch.optim.AdamW([{"params": [head.conv.weight], "weight_decay": sc.weight_decay},
                             {"params": [head.conv.bias], "weight_decay": 0.0}], lr=sc.lr)
    steps_per_epoch = -(-len(tr_f) // sc.batch_size)
    total = max(1, sc.epochs * steps_per_epoch)
    warmup = min(total - 1, round(sc.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    size = tuple(tr_m.shape[-2:])
    losses = []
    head.train()
    for _ in range(sc.epochs):
        order, epoch_loss = torch.randperm(len(tr_f), generator=g), 0.0
        for s in range(steps_per_epoch):
            idx = order[s * sc.batch_size:(s + 1) * sc.batch_size]
            loss = F.cross_entropy(head(tr_f[idx].to(device), size), tr_m[idx].to(device).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx) / len(tr_f)
        losses.append(epoch_loss)

    head.eval()
    conf = torch.zeros(k, k, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(va_f), sc.batch_size):
            pred = head(va_f[i:i + sc.batch_size].to(device), tuple(va_m.shape[-2:])).argmax(1).cpu()
            conf += confusion_matrix(pred, va_m[i:i + sc.batch_size], k)
    scores = segmentation_scores(conf)
    if out_dir is not None and dist.is_main():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        names = ["background", *getattr(val_set, "classes", [str(c) for c in range(num_classes)])]
        (Path(out_dir) / "segprobe.json").write_text(json.dumps(
            {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "stage": sc.stage,
             "feature_map": list(tr_f.shape[1:]), "iou": dict(zip(names, scores["iou"])), "train_loss": losses},
            indent=2))
    if desc and losses:
        dist.print0(f"{desc}: {sc.epochs} epochs on {tuple(tr_f.shape[1:])} feature maps, "
                    f"final train loss {losses[-1]:.4f}")
    return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"]}
