"""Evaluation: weighted kNN, the linear probe, end-to-end fine-tuning, semi-supervised fine-tuning on a
labelled subset and the segmentation linear probe, after pretraining or on any checkpoint
(`python -m shared.eval <checkpoint>`)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from shared import dist
from shared.config import RunConfig
from shared.data.augment import eval_transform
from shared.data.loader import build_image_dataset
from shared.engine import autocast_dtype
from shared.eval.features import extract
from shared.eval.knn import knn_scores, topk_accuracy
from shared.models import build_backbone

EVALUATIONS = ("knn", "linear", "finetune", "semisup", "seg")
# evaluation -> (metric in its result, column header of the table)
TABLE_COLUMNS = {"knn": ("top1", "knn top-1"), "linear": ("top1", "linear top-1"),
                 "finetune": ("top1", "finetune top-1"), "semisup": ("top1", "semisup top-1"),
                 "seg": ("miou", "seg mIoU")}


def check_feature_blocks(cfg: RunConfig, backbone: nn.Module) -> None:
    """Stop before training when the `eval.knn.block` / `eval.linear.block` of an evaluation in
    `eval.after_train` name a block the backbone lacks."""
    from shared.eval.linear import BlockFeatures
    for what, block in (("knn", cfg.eval.knn.block), ("linear", cfg.eval.linear.block)):
        if block and what in cfg.eval.after_train:
            key = f"eval.{what}.block"
            BlockFeatures(backbone, block, key)


def knn_eval(cfg: RunConfig, backbone: nn.Module, train_set, val_set) -> Dict[str, float]:
    _, device = dist.init(cfg.train.device)
    ec = cfg.eval
    tf = eval_transform(ec.image_size, ec.resize, ec.interpolation, ec.mean, ec.std)
    if ec.knn.block:
        from shared.eval.linear import BlockFeatures
        backbone = BlockFeatures(backbone, ec.knn.block, "eval.knn.block")
    backbone = backbone.to(device).eval()
    dtype = autocast_dtype(cfg.train.amp, device)
    tr_f, tr_y = extract(backbone, train_set, tf, ec.knn.batch_size, device, cfg.data.workers, dtype)
    va_f, va_y = extract(backbone, val_set, tf, ec.knn.batch_size, device, cfg.data.workers, dtype)
    scores = knn_scores(tr_f.to(device), tr_y.to(device), va_f.to(device), len(train_set.classes), ec.knn.k,
                        ec.knn.temperature)
    top1, top5 = topk_accuracy(scores.cpu(), va_y, (1, 5))
    return {"top1": top1, "top5": top5}


def random_backbone(cfg: RunConfig, train_set) -> nn.Module:
    """The strongest untrained baseline of the configured architecture: the library's default
    initialisation (seed `train.seed`; no zero-initialised residual branches, which would make an
    untrained ResNet nearly trivial) with BatchNorm statistics computed on the training images
    (eval transform), so that eval-mode BatchNorm does not run on its initial mean 0 / variance 1."""
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(replace(cfg.model.backbone, zero_init_residual=False))
    _, device = dist.init(cfg.train.device)
    ec = cfg.eval
    tf = eval_transform(ec.image_size, ec.resize, ec.interpolation, ec.mean, ec.std)
    return recompute_bn_statistics(backbone.to(device), train_set, tf, ec.knn.batch_size, device, cfg.data.workers)


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, dataset, transform, batch_size: int, device: torch.device,
                            workers: int = 0) -> nn.Module:
    """Set every BatchNorm's running mean/var to the (cumulative) statistics of `dataset`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None            # cumulative average over all batches
    model.train()
    extract(model, dataset, transform, batch_size, device, workers)
    for m, mom in zip(bns, saved):
        m.momentum = mom
        if dist.is_dist():  # each rank saw its own shard: average the estimates
            m.running_mean.copy_(dist.all_reduce_mean(m.running_mean))
            m.running_var.copy_(dist.all_reduce_mean(m.running_var))
    return model.eval()


def evaluate_after_training(cfg: RunConfig, backbone: nn.Module, out_dir: Path,
                            what: List[str] | None = None) -> Dict[str, Dict[str, Any]]:
    """Run `cfg.eval.after_train` (knn, linear, finetune, semisup, seg) on `backbone`, and on a random-init backbone
    when `cfg.eval.compare_random_init`; print a table and write `out_dir/eval.json` (rank 0).
    Fine-tuning (finetune, semisup) trains a copy: `backbone` is left unchanged."""
    from shared.errors import ConfigError
    from shared.eval.finetune import finetune
    from shared.eval.linear import linear_probe
    from shared.eval.segprobe import seg_probe
    from shared.eval.semisup import semisup

    what = list(what if what is not None else cfg.eval.after_train)
    unknown = set(what) - set(EVALUATIONS)
    if unknown:
        raise ConfigError(f"eval.after_train: unknown evaluation(s) {sorted(unknown)}; expected {', '.join(EVALUATIONS)}")
    if "seg" in what and cfg.data.source != "synthetic":
        raise ConfigError(f"eval.after_train: the segmentation probe (seg) needs per-pixel masks: data.source=synthetic, "
                          f"not {cfg.data.source}")
    train_set = build_image_dataset(cfg.data, "train")
    val_set = build_image_dataset(cfg.data, "val")
    candidates: List[Tuple[str, nn.Module]] = [("pretrained", backbone)]
    if cfg.eval.compare_random_init:
        candidates.append(("random_init", random_backbone(cfg, train_set)))
    results: Dict[str, Dict[str, Any]] = {}
    for name, bb in candidates:
        res: Dict[str, Any] = {}
        if "knn" in what:
            res["knn"] = knn_eval(cfg, bb, train_set, val_set)
            dist.print0(f"[eval] {name}: kNN (k={cfg.eval.knn.k}, T={cfg.eval.knn.temperature}) "
                        f"top-1 {res['knn']['top1']:.2f}")
        if "linear" in what:
            res["linear"] = linear_probe(cfg, bb, train_set, val_set, len(train_set.classes),
                                         out_dir / f"linear_{name}", desc=f"linear ({name})")
            dist.print0(f"[eval] {name}: linear probe top-1 {res['linear']['top1']:.2f}")
        if "finetune" in what:
            res["finetune"] = finetune(cfg, bb, train_set, val_set, len(train_set.classes),
                                       out_dir / f"finetune_{name}", desc=f"finetune ({name})")
            dist.print0(f"[eval] {name}: fine-tuning top-1 {res['finetune']['top1']:.2f} "
                        f"(best {res['finetune']['best_top1']:.2f})")
        if "semisup" in what:
            res["semisup"] = semisup(cfg, bb, train_set, val_set, len(train_set.classes), out_dir / f"semisup_{name}",
                                     desc=f"semisup ({name})")
            dist.print0(f"[eval] {name}: semi-supervised fine-tuning ({res['semisup']['train_images']} images) "
                        f"top-1 {res['semisup']['top1']:.2f} (best {res['semisup']['best_top1']:.2f})")
        if "seg" in what:
            res["seg"] = seg_probe(cfg, bb, train_set, val_set, len(train_set.classes), out_dir / f"seg_{name}",
                                   desc=f"seg probe ({name})")
            dist.print0(f"[eval] {name}: seg probe (stage {cfg.eval.seg.stage}) mIoU {res['seg']['miou']:.2f}, "
                        f"pixel acc {res['seg']['pixel_acc']:.2f}")
        results[name] = res
    if dist.is_main():
        (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
        print(format_table(results), flush=True)
    return results


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
    cols = [c for c in EVALUATIONS if any(c in r for r in results.values())]
    head = f"{'backbone':<14}" + "".join(f"{TABLE_COLUMNS[c][1]:>16}" for c in cols)
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(f"{name:<14}" + "".join(f"{r[c][TABLE_COLUMNS[c][0]]:>16.2f}" if c in r else f"{'-':>16}"
                                            for c in cols))
    return "\n".join(rows)
