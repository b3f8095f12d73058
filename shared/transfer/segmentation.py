"""Semantic segmentation transfer: fine-tune a converted backbone under an mmseg protocol config.

    python -m shared.transfer.convert runs/densecl/demo/last.pt --to mmseg --out r18_mmseg.pth
    python -m shared.data.synthetic --format voc --out data/synthetic-voc --length 1000 --val-length 200
    python -m shared.transfer.segmentation --config shared/transfer/configs/mmseg/fcn_r18_synthetic_demo.py \\
        --weights r18_mmseg.pth --out-dir runs/seg/demo --data-root data/synthetic-voc

A thin layer over mmengine's `Runner` (needs the transfer environment, `make transfer-env`):
- `--weights FILE` becomes the backbone's `init_cfg=dict(type='Pretrained', checkpoint=FILE)`; `--weights none`
  trains the random-init baseline. Before training, the file's keys are compared with the config's backbone:
  any missing or unexpected key stops the run (mmengine would load with strict=False and carry on, which is how
  V1b weights in a V1c backbone silently lose their stem, DenseCL#3).
- `key=value` arguments override the config (mmengine's `--cfg-options` syntax), e.g. `train_cfg.max_iters=100`.
- Launcher `pytorch` when RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set (torchrun, or
  `shared/launch.py` in every task), else none. SyncBN is kept only for distributed CUDA training; otherwise it
  becomes BN, and without CUDA the process group uses gloo.
- `--resume` continues from the newest checkpoint in the out dir (so a requeued job continues).
- At the end: one summary line and `<out-dir>/results.json` (written atomically) with mIoU, aAcc and mAcc.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from shared import checkpoint as ckpt
from shared.errors import UserError, cli_main, first_line

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# keys a pretrained backbone file may legitimately lack or carry, per mmseg backbone type
MAY_LACK = {"SwinTransformer": r"^norm\d\.",                               # per-output norms, new in mmseg
            "BEiT": r"\.relative_position_index$"}                          # a buffer mmseg saves, rebuilt
MAY_CARRY = {"SwinTransformer": r"^norm\.|\.attn_mask$|^mask_token$"}       # classifier norm, buffers, SimMIM
RESIZED = r"(^|\.)(pos_embed|absolute_pos_embed|relative_position_bias_table|relative_position_index)$"
STRIPPED = {"SwinTransformer": ("module.", "backbone.")}                   # mmseg's Swin strips both itself


def require_mmseg():
    """Import mmseg or stop with one line saying where it lives."""
    try:
        import mmseg  # noqa: F401
        import mmengine  # noqa: F401
    except ImportError as exc:
        raise UserError(f"mmsegmentation is not installed in this environment ({sys.executable}: {exc}); build the "
                        "transfer environment with `make transfer-env` and run .venv-transfer/bin/python "
                        "-m shared.transfer.segmentation") from None
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import shared.transfer.mmseg_parts  # noqa: F401  (registers our dataset and optimizer constructor)


def load_config(path: str | Path):
    from mmengine.config import Config
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        return Config.fromfile(str(path))
    except Exception as exc:  # syntax error, a missing _base_, a failed custom import
        raise UserError(f"cannot load config {path}: {first_line(exc)}") from None


def apply_overrides(cfg, overrides: List[str]) -> None:
    """`key=value` pairs, parsed as mmengine's `--cfg-options` (numbers, booleans, lists, tuples)."""
    from mmengine.config import DictAction
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise UserError(f"override {bad[0]!r} is not key=value (e.g. train_cfg.max_iters=100)")
    if overrides:
        ns = argparse.Namespace()
        DictAction(option_strings=[], dest="options")(None, ns, overrides)
        cfg.merge_from_dict(ns.options)


def datasets(cfg) -> Iterator[dict]:
    """Every dataset dict of the train/val/test dataloaders, including the parts of a ConcatDataset."""
    stack = [cfg.get(k, {}).get("dataset") for k in ("train_dataloader", "val_dataloader", "test_dataloader")]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            yield d
            stack.extend(d.get("datasets", []))
            stack.append(d.get("dataset"))


def set_data_root(cfg, root: Optional[str]) -> None:
    """`--data-root` replaces every dataset's data_root; then each root and list file must exist."""
    for d in datasets(cfg):
        if root is not None and "data_root" in d:
            d["data_root"] = root
        if d.get("data_root") is not None:
            base = Path(d["data_root"])
            if not base.is_dir():
                raise UserError(f"data root not found: {base} (pass --data-root DIR)")
            if d.get("ann_file") and not (base / d["ann_file"]).is_file():
                raise UserError(f"{d.get('type')}: list file {base / d['ann_file']} not found")


def set_weights(cfg, weights: str) -> Optional[Path]:
    """The backbone's init: Pretrained from `weights`, or mmseg's random init for `none`."""
    cfg.model.pop("pretrained", None)
    if weights.lower() == "none":
        cfg.model.backbone.init_cfg = None
        return None
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"weights not found: {path} (convert a checkpoint with python -m shared.transfer.convert "
                        "<ckpt> --to mmseg --out FILE, or pass --weights none)")
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(path))
    return path


def launcher() -> str:
    return "pytorch" if all(v in os.environ for v in DIST_VARS) else "none"


def replace_syncbn(node: Any) -> int:
    """SyncBN -> BN in a config subtree (mmengine ConfigDicts are dicts); returns how many were replaced."""
    n = 0
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
            n += 1
        for v in node.values():
            n += replace_syncbn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            n += replace_syncbn(v)
    return n


def adapt_to_machine(cfg) -> Tuple[str, str]:
    """Launcher, SyncBN and the distributed backend for this machine; returns (launcher, device)."""
    import torch
    cuda = torch.cuda.is_available()
    how = launcher()
    if not (cuda and how == "pytorch"):
        replace_syncbn(cfg.model)
    if not cuda:
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
    return how, "cuda" if cuda else "cpu"


def backbone_file_keys(path: Path, backbone_type: str) -> Dict[str, Any]:
    """The tensors mmseg's init would load from `path` into the backbone, under the names it would use."""
    raw = ckpt.load(path)
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict (or {{'state_dict': ...}}), found {type(raw).__name__}")
    for prefix in STRIPPED.get(backbone_type, ("module.",)):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if hasattr(v, "shape")}


def check_fit(cfg, weights: Path) -> int:
    """Stop with one line unless every key of the weights file has a place of the same shape in the config's
    backbone and every backbone key is in the file (up to the per-type allowances above). Returns the count."""
    from mmseg.registry import MODELS
    bcfg = cfg.model.backbone.copy()
    bcfg.pop("init_cfg", None)
    kind = bcfg["type"]
    backbone = MODELS.build(bcfg)
    want = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    have = backbone_file_keys(weights, kind)
    lack_ok, carry_ok = MAY_LACK.get(kind), MAY_CARRY.get(kind)
    missing = sorted(k for k in want if k not in have and not (lack_ok and re.search(lack_ok, k)))
    extra = sorted(k for k in have if k not in want and not (carry_ok and re.search(carry_ok, k)))
    wrong = sorted(k for k in have if k in want and tuple(have[k].shape) != want[k] and not re.search(RESIZED, k))
    if missing or extra:
        hint = ""
        if "conv1.weight" in have and any(k.startswith("stem.") for k in missing):
            hint = (" -- these are torchvision-named V1b weights (7x7 stem); they fit model.backbone.type=ResNet "
                    f"(DenseCL's protocol), not {kind}'s deep 3x3 stem")
        raise UserError(f"--weights {weights} does not fit the config's backbone {kind}: {len(missing)} backbone keys "
                        f"missing from the file {missing[:3]}, {len(extra)} file keys the backbone lacks "
                        f"{extra[:3]}{hint}")
    if wrong:
        k = wrong[0]
        raise UserError(f"--weights {weights} does not fit the config's backbone {kind}: {k} has shape "
                        f"{tuple(have[k].shape)} in the file, {want[k]} in the backbone ({len(wrong)} such keys)")
    return len(have)


def metrics_of(runner) -> Dict[str, float]:
    """The last validation's metrics (logged by the final val of the train loop), or a fresh validation."""
    scalars = runner.message_hub.log_scalars
    got = {k: round(float(scalars[f"val/{k}"].current()), 2) for k in ("mIoU", "aAcc", "mAcc") if f"val/{k}" in scalars}
    if "mIoU" not in got:  # e.g. resumed after the last iteration: the loop had nothing left to do
        got = {k: round(float(v), 2) for k, v in runner.val().items() if k in ("mIoU", "aAcc", "mAcc")}
    return got


def write_results(out_dir: Path, results: dict) -> Path:
    return ckpt.save_json(results, out_dir / "results.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="an mmseg config, e.g. shared/transfer/configs/mmseg/*.py")
    p.add_argument("--weights", required=True, help="backbone from `shared.transfer.convert --to mmseg`, or none")
    p.add_argument("--out-dir", required=True, help="work dir: logs, checkpoints, results.json")
    p.add_argument("--data-root", help="replaces the data_root of every dataset in the config")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (mmengine cfg-options)")
    return p


def launch_args(argv) -> Tuple[str, List[str], str]:
    """For `shared.launch` (imports no mmseg): the absolute output folder, the arguments of every attempt
    of the job (absolute paths, `--resume` so that a requeued job continues) and the file whose presence
    in the output folder means the run has finished."""
    a = build_parser().parse_intermixed_args(argv)
    for flag, value in (("--config", a.config), ("--weights", None if a.weights == "none" else a.weights)):
        if value is not None and not Path(value).is_file():
            raise UserError(f"{flag} {value}: no such file")
    if a.data_root is not None and not Path(a.data_root).is_dir():
        raise UserError(f"--data-root {a.data_root}: no such folder")
    out = str(Path(a.out_dir).resolve())
    args = ["--config", str(Path(a.config).resolve()), "--out-dir", out, "--resume",
            "--weights", a.weights if a.weights == "none" else str(Path(a.weights).resolve())]
    if a.data_root:
        args += ["--data-root", str(Path(a.data_root).resolve())]
    return out, args + list(a.overrides), "results.json"


@cli_main
def main(argv=None) -> dict:
    a = build_parser().parse_intermixed_args(argv)   # overrides may come before and after the flags

    require_mmseg()
    cfg = load_config(a.config)
    weights = set_weights(cfg, a.weights)
    apply_overrides(cfg, a.overrides)
    set_data_root(cfg, a.data_root)
    how, device = adapt_to_machine(cfg)
    out_dir = Path(a.out_dir).resolve()
    cfg.work_dir = str(out_dir)
    cfg.launcher = how
    cfg.resume = bool(a.resume)
    cfg.load_from = None
    if weights is not None:
        n = check_fit(cfg, weights)
        print(f"weights {weights}: all {n} tensors fit backbone {cfg.model.backbone.type}", flush=True)

    from mmengine.dist import get_rank, get_world_size
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    total = get_world_size() * cfg.train_dataloader.batch_size
    base = cfg.get("auto_scale_lr", {}).get("base_batch_size")
    if base and total != base and get_rank() == 0:
        print(f"note: total batch {total} ({get_world_size()} process(es) x {cfg.train_dataloader.batch_size}) "
              f"differs from the protocol's {base}; the lr is not rescaled", flush=True)
    start = time.time()
    runner.train()
    metrics = metrics_of(runner)
    results = {"config": str(a.config), "weights": str(weights) if weights else None, "iters": runner.iter,
               "world_size": get_world_size(), "device": device, "train_seconds": round(time.time() - start, 1),
               **metrics}
    if get_rank() == 0:
        path = write_results(out_dir, results)
        shown = "  ".join(f"{k} {metrics[k]:.2f}" for k in ("mIoU", "aAcc", "mAcc") if k in metrics)
        print(f"{shown}  ({runner.iter} iters, weights {weights or 'none (random init)'}) -> {path}", flush=True)
    return results


if __name__ == "__main__":
    main()
