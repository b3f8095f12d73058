"""Pretraining as every paper's `train.py` runs it: build the multi-view dataset, train with the
shared loop (`shared.engine.fit`), export the backbone, then run the evaluations the recipe lists
(`shared.eval`). It sits above both the loop and the evaluations, which import neither it nor each
other's callers: data/models/optim -> engine (the loop) -> eval and this -> the paper entry points."""
from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from shared import checkpoint as ckpt
from shared import dist
from shared.config import RunConfig
from shared.data.augment import MultiView
from shared.data.loader import build_image_dataset
from shared.engine import fit, global_batch, output_dir
from shared.errors import ConfigError
from shared.eval import check_feature_blocks, evaluate_after_training, format_table

DONE = "done.json"   # written by `pretrain` once training, export and evaluation have finished


def environment_line(device: torch.device) -> str:
    return (f"python {platform.python_version()}, torch {torch.__version__}, device {device}, "
            f"{dist.world_size()} process(es), argv: {' '.join(sys.argv)}")


def pretrain(cfg: RunConfig, build_model: Callable[[RunConfig], nn.Module], method: str,
             make_transform: Optional[Callable[[RunConfig, nn.Module], Callable]] = None,
             extra_eval: Optional[Callable[[RunConfig, nn.Module, Any, Dict[str, Any]], Dict[str, Any]]] = None
             ) -> Dict[str, Any]:
    """What every paper's `train.py` calls: build the multi-view dataset from `cfg.data`/`cfg.aug`,
    train with `fit`, export the backbone, then run the evaluations listed in `cfg.eval.after_train`.
    `make_transform(cfg, model)` replaces the multi-view transform (SimMIM: one view and a mask on
    the model's token grid). `extra_eval(cfg, model, out_dir, results)`, where given, runs after those
    evaluations (before the run counts as done) and returns the results with its own added (VADeR:
    the dense probe on its decoder), which are then printed and written to `out_dir/eval.json` again."""
    if cfg.eval.after_train and cfg.data.source == "images":
        raise ConfigError(f"eval.after_train={list(cfg.eval.after_train)} needs class labels and data.source=images "
                          "has none: set eval.after_train=[] and evaluate the checkpoint on a labelled set")
    _, device = dist.init(cfg.train.device)
    cfg.train.batch_size = global_batch(cfg.train, dist.world_size())   # before the model reads it
    # the output folder is this run's from here to the end (a second run on it stops at once)
    with ckpt.folder_lock(output_dir(cfg, method), enabled=dist.is_main()):
        return _pretrain(cfg, build_model, method, make_transform, device, extra_eval)


def _pretrain(cfg: RunConfig, build_model, method: str, make_transform, device: torch.device,
              extra_eval=None) -> Dict[str, Any]:
    if dist.is_main():
        (output_dir(cfg, method) / DONE).unlink(missing_ok=True)          # this run is not finished
    t0 = time.time()
    dataset = build_image_dataset(cfg.data, "train")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    transform = make_transform(cfg, model) if make_transform is not None else MultiView(cfg.aug.views)
    if cfg.eval.after_train:
        check_feature_blocks(cfg, model.backbone)
    dist.print0(environment_line(device))
    result = fit(cfg, model, dataset, transform, method=method)
    if dist.is_main():
        ckpt.export_backbone(result.model, result.out_dir / ckpt.BACKBONE)
    dist.barrier()
    dist.print0(f"pretraining done in {time.time() - t0:.0f} s: {result.out_dir / ckpt.LAST}, "
                f"backbone {result.out_dir / ckpt.BACKBONE}")
    report: Dict[str, Any] = {"out_dir": str(result.out_dir)}
    if cfg.eval.after_train:
        report["eval"] = evaluate_after_training(cfg, result.model.backbone, result.out_dir)
        if extra_eval is not None:
            report["eval"] = extra_eval(cfg, result.model, result.out_dir, report["eval"])
            if dist.is_main():
                (result.out_dir / "eval.json").write_text(json.dumps(report["eval"], indent=2))
                print(format_table(report["eval"]), flush=True)
    if dist.is_main():     # the launcher does not requeue a run that has written this
        (result.out_dir / DONE).write_text(json.dumps({"steps": result.steps, "time": time.time()}) + "\n")
    return report
