"""Semi-supervised fine-tuning on a labelled subset of the training split, the Barlow Twins protocol
(facebookresearch/barlowtwins `evaluate.py --weights finetune --train-percent {1,10}`; the paper's
Table 2), trained by the shared engine (so it checkpoints, resumes and runs under torchrun).

What the official script does, and what this module does the same way (`cfg.eval.semisup`):
  - a linear classifier on the pooled backbone output, weight ~ N(0, 0.01), bias 0;
  - every parameter trains, the whole network in train mode (BatchNorm normalises with the batch's
    statistics and updates its running ones); evaluation in eval mode after every epoch;
  - SGD, momentum 0.9, one weight decay for every parameter (no exclusions), two parameter groups:
    the classifier at `lr_classifier`, the backbone at `lr_backbone`, both absolute (no batch rule);
  - torch's CosineAnnealingLR over the epochs, stepped after each epoch: epoch e trains at
    lr * (1 + cos(pi e / epochs)) / 2 (warm-up none, floor 0);
  - training images: RandomResizedCrop(224) (scale 0.08-1, bilinear) + flip; val: Resize(256) +
    CenterCrop(224); ImageNet mean / std; fp32; the last partial batch kept; plain DDP without
    synchronised BatchNorm (each GPU's BatchNorm sees its own share of the batch);
  - the subset: SimCLR's list of training file names (`imagenet_subsets/1percent.txt`, one name a
    line, e.g. `n01440764_10026.JPEG`); the official script downloads it and builds each sample as
    `train/<name up to the first '_'>/<name>` with that folder's class. Here the file is one the user
    points to (`subset_file`), and each name is looked up among the training split's images by file
    name: the same samples on ImageNet, whose file names start with their class folder's name.
Reported: top-1 / top-5 of the last epoch and the best top-1 over the evaluations (the official
script prints both).
"""
from __future__ import annotations

import copy
import hashlib
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from shared import dist
from shared.config import OptimConfig, RunConfig, ScheduleConfig
from shared.data.augment import eval_transform, linear_train_transform
from shared.data.synthetic import SyntheticShapes
from shared.engine import autocast_dtype, fit
from shared.errors import ConfigError, DataError
from shared.eval.features import extract
from shared.eval.knn import topk_accuracy
from shared.eval.linear import BestTop1, same_as_before, same_backbone_as_before

KEY = "eval.semisup.subset_file"


# ----------------------------------------------------------------------------------- the subset
def read_subset_file(path: str | Path) -> List[str]:
    """The image file names listed in `path`, one a line (SimCLR's subset format), blank lines and
    surrounding white space ignored, in file order (a name listed twice is used twice, as officially)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{KEY}: file not found: {path}")
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{KEY}: cannot read {path}: {exc}") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{KEY}: {path} lists no image names (expected one file name a line, "
                        f"e.g. n01440764_10026.JPEG)")
    return names


def sample_names(dataset: Dataset) -> List[str]:
    """The file name of each training sample, the key a subset file refers to it by. An image folder:
    the file's name. The built-in synthetic dataset has no files; its image i is called by the name
    `shared.data.synthetic.export` writes it under (`train_000012.png`), so one subset file selects
    the same images from the dataset and from its ImageFolder export (data.source=folder)."""
    if isinstance(dataset, SyntheticShapes):
        return [f"{dataset.split}_{i:06d}.png" for i in range(len(dataset))]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError(f"{KEY}: the training split ({type(dataset).__name__}) has no file names to match")
    return [os.path.basename(str(p)) for p, _ in samples]


def subset_indices(names: Sequence[str], dataset: Dataset, source: str = "the subset file") -> List[int]:
    """The index in `dataset` of each listed name; stops with one line when some match no training
    image, or when a listed name belongs to more than one image (of different class folders)."""
    where: Dict[str, List[int]] = {}
    for i, n in enumerate(sample_names(dataset)):
        where.setdefault(n, []).append(i)
    missing = [n for n in names if n not in where]
    if missing:
        raise DataError(f"{KEY}: {len(missing)} of the {len(names)} names in {source} match no image of the "
                        f"training split (e.g. {missing[0]!r})")
    twice = [n for n in dict.fromkeys(names) if len(where[n]) > 1]
    if twice:
        raise DataError(f"{KEY}: {len(twice)} of the names in {source} belong to more than one image of the "
                        f"training split (e.g. {twice[0]!r}, {len(where[twice[0]])} images)")
    return [where[n][0] for n in names]


class Subset(Dataset):
    """`base` restricted to `indices`, keeping what the loader reads from it (its classes, its
    `DataConfig`)."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        self.classes = getattr(base, "classes", None)
        self.loader_config = getattr(base, "loader_config", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def training_subset(cfg: RunConfig, train_set: Dataset) -> Dataset:
    """`train_set`, or the part of it that `eval.semisup.subset_file` lists."""
    sc = cfg.eval.semisup
    if not sc.subset_file:
        return train_set
    names = read_subset_file(sc.subset_file)
    sub = Subset(train_set, subset_indices(names, train_set, sc.subset_file))
    targets = getattr(train_set, "targets", None)      # read once: the synthetic dataset's is computed
    counts = Counter(targets[i] for i in sub.indices) if targets is not None else {}
    dist.print0(f"semi-supervised: {len(sub)} of {len(train_set)} training images "
                f"({100.0 * len(sub) / len(train_set):.2f} %; train_percent {sc.train_percent:g}) from "
                f"{sc.subset_file}" + (f", {len(counts)} classes" if counts else ""))
    return sub


def subset_fingerprint(dataset: Dataset) -> str:
    indices = getattr(dataset, "indices", None)
    h = hashlib.sha256(str(len(dataset)).encode())
    if indices is not None:
        h.update(torch.tensor(indices, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def same_subset_as_before(dataset: Dataset, out_dir: Path) -> bool:
    """Whether a run left in `out_dir` trained on these images (then it may resume); else it starts
    afresh, with a note."""
    return same_as_before(out_dir, "subset.sha256", subset_fingerprint(dataset),
                          f"semi-supervised: {out_dir} holds a run on other training images; starting afresh")


# -------------------------------------------------------------------------------------- model
class SemiSupModel(nn.Module):
    """`backbone` (trained, train mode) -> Linear; the classifier and the backbone get their own lr
    through `lr_scale` (read by `shared.optim.param_groups`, relative to the classifier's)."""

    def __init__(self, backbone: nn.Module, num_classes: int, lr_backbone: float, lr_classifier: float):
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        self.fc = nn.Linear(backbone.out_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.backbone_scale = lr_backbone / lr_classifier

    def lr_scale(self, name: str) -> float:
        return 1.0 if name.startswith("fc.") else self.backbone_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        x, y = batch
        out = self.logits(x)
        return {"loss": F.cross_entropy(out.float(), y), "acc1": (out.argmax(1) == y).float().mean() * 100}


def semisup_config(cfg: RunConfig, out_dir: Path) -> RunConfig:
    """The engine config of the run: SGD at the classifier's lr (the backbone's through `lr_scale`),
    cosine held per epoch down to 0, batch and epochs from `cfg.eval.semisup`."""
    sc = cfg.eval.semisup
    return replace(
        cfg,
        optim=OptimConfig(name="sgd", lr=sc.lr_classifier, lr_ref_batch=0, weight_decay=sc.weight_decay,
                          momentum=sc.momentum, no_decay=[]),
        sched=ScheduleConfig(kind="cosine", warmup_epochs=0.0, final=0.0, per_epoch=True),
        train=replace(cfg.train, accum_steps=1, amp=sc.amp, epochs=sc.epochs, batch_size=sc.batch_size,
                      per_gpu_batch=0, drop_last=False, out_dir=str(out_dir), sync_bn=False, compile=False,
                      ckpt_every_epochs=1, ckpt_every_steps=0, keep_every_epochs=0),
    )


# ----------------------------------------------------------------------------------------- run
def semisup(cfg: RunConfig, backbone: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int,
            out_dir: Path, desc: str = "semisup") -> Dict[str, float]:
    """Fine-tune a copy of `backbone` with a linear classifier on the `eval.semisup.subset_file` part of
    `train_set` and evaluate on `val_set`. Returns top-1 / top-5 of the last epoch, the best top-1 and
    the number of training images. A second call with the same backbone, images and folder resumes."""
    _, device = dist.init(cfg.train.device)
    sc, ec = cfg.eval.semisup, cfg.eval
    data = training_subset(cfg, train_set)
    resume = cfg.train.resume and same_backbone_as_before(backbone, out_dir, "semi-supervised fine-tuning")
    resume = same_subset_as_before(data, out_dir) and resume
    torch.manual_seed(cfg.train.seed)
    model = SemiSupModel(copy.deepcopy(backbone), num_classes, sc.lr_backbone, sc.lr_classifier)
    dtype = autocast_dtype(sc.amp, device)
    train_tf = linear_train_transform(ec.image_size, sc.crop_scale, "bilinear", ec.mean, ec.std)
    val_tf = eval_transform(ec.image_size, ec.resize, "bilinear", ec.mean, ec.std)
    best = BestTop1(out_dir)
    last: Dict[str, float] = {}

    def evaluate(net: nn.Module, epoch: int) -> Dict[str, float]:
        if (epoch + 1) % sc.eval_every_epochs and epoch + 1 != sc.epochs:
            return {}
        net.eval()
        logits, labels = extract(net.logits, val_set, val_tf, ec.knn.batch_size, device, cfg.data.workers, dtype)
        top1, top5 = topk_accuracy(logits, labels, (1, 5))
        best.update(top1)
        last.update(top1=top1, top5=top5)
        return {"top1": top1, "top5": top5, "best_top1": best.value}

    scfg = semisup_config(cfg, out_dir)
    scfg.train.resume = resume
    result = fit(scfg, model, data, train_tf, method="semisup", out_dir=out_dir, on_epoch_end=evaluate,
                 progress_desc=desc)
    if not last:  # resumed after the run had finished: evaluate the stored model once
        evaluate(result.model, sc.epochs - 1)
    return {"top1": last["top1"], "top5": last["top5"], "best_top1": best.value, "train_images": len(data)}
