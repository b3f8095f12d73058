"""Linear probe on a frozen backbone, trained by the shared engine (so it resumes, logs, runs DDP).

The backbone stays in eval mode (BatchNorm statistics frozen) and under no_grad; only the
classifier (weight ~ N(0, 0.01), bias 0) trains. After every evaluation the backbone is compared
with its state before the probe and the run stops if any weight or buffer changed. The protocol
(optimizer, lr, wd, batch, epochs, schedule) comes from `cfg.eval.linear`, which each paper's
recipe sets to its own protocol.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from shared import dist
from shared.config import OptimConfig, RunConfig, ScheduleConfig
from shared.data.augment import eval_transform, linear_train_transform
from shared.engine import autocast_dtype, fit
from shared.errors import ConfigError, TrainingError
from shared.eval.features import extract
from shared.eval.knn import topk_accuracy


class LinearProbe(nn.Module):
    """`backbone` (frozen, eval mode; None when the inputs are features already) -> [BN] -> Linear."""

    def __init__(self, backbone: Optional[nn.Module], dim: int, num_classes: int, bn: bool = False):
        super().__init__()
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            with torch.no_grad():
                x = self.backbone(x)
        return self.fc(self.bn(x.float()))

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        x, y = batch
        out = self.logits(x)
        return {"loss": F.cross_entropy(out, y), "acc1": (out.argmax(1) == y).float().mean() * 100}


class _Pairs(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def probe_config(cfg: RunConfig, out_dir: Path, cached: bool, log_every: int) -> RunConfig:
    """The engine config of the probe: optimizer, schedule and batch from `cfg.eval.linear`."""
    lc = cfg.eval.linear
    return replace(
        cfg,
        data=replace(cfg.data, workers=0 if cached else cfg.data.workers),
        optim=OptimConfig(name=lc.optimizer, lr=lc.lr, lr_ref_batch=lc.lr_ref_batch, weight_decay=lc.weight_decay,
                          momentum=lc.momentum),
        sched=ScheduleConfig(kind="cosine", warmup_epochs=lc.warmup_epochs, per_epoch=lc.schedule == "cosine_epoch"),
        train=replace(cfg.train, accum_steps=1, amp=lc.amp, epochs=lc.epochs, batch_size=lc.batch_size, per_gpu_batch=0, drop_last=False, out_dir=str(out_dir),
                      sync_bn=False, compile=False, ckpt_every_epochs=1, ckpt_every_steps=0, keep_every_epochs=0,
                      log_every=log_every),
    )


FINGERPRINT = "backbone.sha256"


def fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_backbone_as_before(backbone: nn.Module, out_dir: Path, what: str = "linear probe") -> bool:
    """Whether an evaluation run (probe, fine-tune) left in `out_dir` started from this backbone
    (then it may resume). One of another backbone (the folder of an earlier pretraining) is started
    afresh, with a note."""
    return same_as_before(out_dir, FINGERPRINT, fingerprint(backbone),
                          f"{what}: {out_dir} holds a run of another backbone; starting afresh")


def same_as_before(out_dir: Path, name: str, mine: str, note: str) -> bool:
    """Whether the fingerprint `mine` equals the one a run left in `out_dir/name` (or none is there);
    records `mine` there, and prints `note` when a different run's checkpoint will be started afresh."""
    path = Path(out_dir) / name
    before = path.read_text().strip() if path.is_file() else None
    dist.barrier()
    if dist.is_main():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path.write_text(mine + "\n")
        if before is not None and before != mine and (Path(out_dir) / "last.pt").is_file():
            print(note, flush=True)
    return before is None or before == mine


def logged_best(out_dir: Path) -> List[float]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(float(json.loads(line)["best_top1"]))
        except (ValueError, KeyError, TypeError):
            continue
    return values


class BestTop1:
    """The best top-1 of an evaluation run so far; a resumed run also counts the evaluations its
    earlier attempts logged (read once, at its first evaluation)."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.value, self.read = Path(out_dir), 0.0, False

    def update(self, top1: float) -> float:
        if not self.read:
            self.read = True
            self.value = max([self.value, *logged_best(self.out_dir)])
        self.value = max(self.value, top1)
        return self.value


class BlockFeatures(nn.Module):
    """`backbone`'s patch tokens after block `block` (1-based), averaged: (N, width). For probing an
    intermediate layer, as SimMIM probes ViT-B at its 8th block (no class token, no final norm)."""

    def __init__(self, backbone: nn.Module, block: int, key: str = "eval.linear.block"):
        super().__init__()
        depth = len(getattr(backbone, "blocks", ()))
        if not 1 <= block <= depth:
            raise ConfigError(f"{key}={block}: expected a block of the ViT, 1..{depth}"
                              if depth else f"{key}={block} needs a ViT backbone (with `blocks`)")
        self.backbone, self.block = backbone, block
        self.out_dim = backbone.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_intermediates(x, indices=[self.block - 1], norm=False, intermediates_only=True)
        return maps[0].mean((2, 3))


def linear_probe(cfg: RunConfig, backbone: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int,
                 out_dir: Path, desc: str = "linear") -> Dict[str, float]:
    """Train and evaluate a linear classifier on `backbone`'s pooled features. Returns top-1/top-5
    of the last epoch and the best top-1 over evaluations (both are reported by the papers' code)."""
    _, device = dist.init(cfg.train.device)
    lc, ec = cfg.eval.linear, cfg.eval
    if lc.block:
        backbone = BlockFeatures(backbone, lc.block)
    backbone = backbone.to(device).eval()
    reference = copy.deepcopy(backbone.state_dict())
    dtype = autocast_dtype(lc.amp, device)
    val_tf = eval_transform(ec.image_size, ec.resize, ec.interpolation, ec.mean, ec.std)
    if lc.cache_features:
        tr_x, tr_y = extract(backbone, train_set, val_tf, cfg.eval.knn.batch_size, device, cfg.data.workers, dtype)
        va_x, va_y = extract(backbone, val_set, val_tf, cfg.eval.knn.batch_size, device, cfg.data.workers, dtype)
        probe = LinearProbe(None, tr_x.shape[1], num_classes, lc.bn)
        train_data, train_tf, val_data, val_tf_used = _Pairs(tr_x, tr_y), None, _Pairs(va_x, va_y), None
    else:
        probe = LinearProbe(backbone, backbone.out_dim, num_classes, lc.bn)
        train_data = train_set
        train_tf = linear_train_transform(ec.image_size, lc.crop_scale, lc.interpolation, ec.mean, ec.std)
        val_data, val_tf_used = val_set, val_tf
    resume = cfg.train.resume and same_backbone_as_before(backbone, out_dir)
    best = BestTop1(out_dir)
    last: Dict[str, float] = {}

    def check_frozen() -> None:
        for k, v in backbone.state_dict().items():
            if not torch.equal(v, reference[k]):
                raise TrainingError(f"linear probe: backbone tensor '{k}' changed during the probe; it must stay frozen")

    def evaluate(model: nn.Module, epoch: int) -> Dict[str, float]:
        if (epoch + 1) % max(1, lc.eval_every_epochs) and epoch + 1 != lc.epochs:
            return {}
        model.eval()
        logits, labels = extract(model.logits, val_data, val_tf_used, cfg.eval.knn.batch_size, device,
                                 0 if lc.cache_features else cfg.data.workers, dtype)
        top1, top5 = topk_accuracy(logits, labels, (1, 5))
        check_frozen()
        best.update(top1)
        last.update(top1=top1, top5=top5)
        return {"top1": top1, "top5": top5, "best_top1": best.value}

    steps_per_epoch = -(-len(train_data) // lc.batch_size)
    log_every = steps_per_epoch * max(1, lc.eval_every_epochs)
    pcfg = probe_config(cfg, out_dir, lc.cache_features, log_every)
    pcfg.train.resume = resume
    result = fit(pcfg, probe, train_data, train_tf, method="linear",
                 out_dir=out_dir, on_epoch_end=evaluate, progress_desc=desc)
    if not last:  # resumed after the probe had finished: evaluate the stored classifier once
        evaluate(result.model, lc.epochs - 1)
    check_frozen()
    return {"top1": last["top1"], "top5": last["top5"], "best_top1": best.value}
