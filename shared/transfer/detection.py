"""Fine-tune a detectron2 detector from a converted backbone: the detection half of the transfer protocols.

    python -m shared.transfer.convert runs/densecl/in1k/last.pt --to detectron2 --out r50.pkl
    DETECTRON2_DATASETS=/datasets python -m shared.transfer.detection \\
        --config shared/transfer/configs/detectron2/voc0712_r50_c4_24k.yaml --weights r50.pkl \\
        --out-dir runs/voc_densecl --trials 5 --num-gpus 8
    python -m shared.transfer.detection --config shared/transfer/configs/detectron2/synthetic_r18_c4_demo.yaml \\
        --weights none --data-root /tmp/shapes-coco --out-dir runs/det_demo SOLVER.MAX_ITER=100

The configs (shared/transfer/configs/detectron2/) are detectron2 yacs files; `KEY=VALUE` arguments
override them (`SOLVER.BASE_LR=0.01`). `--weights none` leaves the backbone at detectron2's random
init, the baseline every pretrained number is compared with.

What this adds to detectron2's `DefaultTrainer` (everything else is detectron2's own training loop,
hooks, checkpoints and evaluators):
- the `Res5ROIHeadsExtraNorm` ROI head of MoCo's detection protocol: the res5 head ends in one more
  norm layer of `MODEL.RESNETS.NORM`. For ResNet-18/34 its res5 is made of basic blocks, so that a
  converted ResNet-18 fills it (detectron2's own Res5ROIHeads always builds bottlenecks);
- the synthetic dataset exported as COCO (`python -m shared.data.synthetic --format coco`), registered
  from `--data-root` as `synthetic_train` / `synthetic_val`. VOC and COCO come from detectron2's
  builtin registration, under `$DETECTRON2_DATASETS` (default `./datasets`);
- evaluation: PascalVOCDetectionEvaluator for VOC sets, COCOEvaluator otherwise; AP, AP50, AP75 per
  task (bbox, and segm for Mask R-CNN) in `<out-dir>/results.json`, written atomically; with
  `--trials N`, N runs with seeds 0..N-1 in `<out-dir>/trial{k}` and their mean and std (n-1);
- a check that the weights really went in: the number of tensors of the pickle found, with equal
  values, in the model before training is logged and stored in results.json;
- processes: under torchrun or `shared.launch` (RANK, WORLD_SIZE, ... in the environment) the NCCL
  process group and detectron2's per-machine group are made from the environment; otherwise
  `--num-gpus G` spawns G processes with detectron2's `launch`. Several processes need GPUs
  (detectron2's trainer gives DDP a GPU device id); on the CPU it is one process, where SyncBN and
  naiveSyncBN are plain BN. `--resume` continues from the newest checkpoint in the output folder
  (detectron2's `last_checkpoint`); a finished trial, one with its results.json, is not run again.

Bad input (config, weights, datasets, detectron2 missing) stops with one line, before any process is
spawned.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from shared import checkpoint as ckpt
from shared.dist import env_from_environ
from shared.errors import UserError, cli_main, first_line

EXTRA_NORM_HEAD = "Res5ROIHeadsExtraNorm"          # the name MoCo's detection configs use
SYNTHETIC = ("synthetic_train", "synthetic_val")   # registered from --data-root
RESULTS = "results.json"
METRICS = ("AP", "AP50", "AP75")
# blocks per stage (res2..res5) and block type -> ResNet depth, to tell which ResNet a pickle holds
DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
          ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
log = logging.getLogger("shared.transfer.detection")


# ------------------------------------------------------------------------------ command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, through cli_main
        raise UserError(f"python -m shared.transfer.detection: {message}")


def build_parser() -> _Parser:
    p = _Parser(prog="python -m shared.transfer.detection", allow_abbrev=False,
                description="Fine-tune a detectron2 detector from a converted backbone (shared.transfer.convert).")
    p.add_argument("--config", required=True, help="detectron2 yaml, e.g. shared/transfer/configs/detectron2/...")
    p.add_argument("--weights", required=True,
                   help="backbone pickle from `python -m shared.transfer.convert ... --to detectron2`, or 'none' "
                        "for a randomly initialised backbone")
    p.add_argument("--out-dir", required=True, help="output folder (checkpoints, logs, results.json)")
    p.add_argument("--data-root", help="the synthetic dataset exported as COCO (shared.data.synthetic --format coco)")
    p.add_argument("--trials", type=int, default=1, help="runs with seeds 0..N-1; results.json gets mean and std")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the newest checkpoint in the output folder (or --weights) without training")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--num-gpus", type=int, default=1, help="processes to spawn on this machine (one per GPU)")
    p.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. SOLVER.MAX_ITER=100")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    if a.trials < 1:
        raise UserError(f"--trials {a.trials}: must be at least 1")
    if a.num_gpus < 1:
        raise UserError(f"--num-gpus {a.num_gpus}: must be at least 1")
    if not Path(a.config).is_file():
        raise UserError(f"--config {a.config}: no such file")
    if a.weights != "none" and not Path(a.weights).is_file():
        raise UserError(f"--weights {a.weights}: no such file (or 'none' for a randomly initialised backbone)")
    if a.data_root is not None and not Path(a.data_root).is_dir():
        raise UserError(f"--data-root {a.data_root}: no such folder")
    a.overrides = []
    for item in a.opts:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. SOLVER.MAX_ITER=100")
        a.overrides += [key, value]
    return a


def launch_args(argv: Sequence[str]) -> Tuple[str, List[str], str]:
    """For `shared.launch` (imports no detectron2): the absolute output folder, the arguments of every
    attempt of the job (absolute paths, `--resume` so that a requeued job continues) and the file whose
    presence in the output folder means the run has finished."""
    a = parse_args(argv)
    if a.num_gpus != 1:
        raise UserError("--num-gpus: under shared.launch every task is one process; set the GPUs with "
                        "--gpus-per-node instead")
    out = str(Path(a.out_dir).resolve())
    args = ["--config", str(Path(a.config).resolve()), "--out-dir", out, "--trials", str(a.trials),
            "--weights", a.weights if a.weights == "none" else str(Path(a.weights).resolve()), "--resume"]
    if a.data_root:
        args += ["--data-root", str(Path(a.data_root).resolve())]
    if a.eval_only:
        args.append("--eval-only")
    return out, args + list(a.opts), RESULTS


# ------------------------------------------------------------------------------ detectron2 pieces
def require_detectron2() -> None:
    # detectron2 scripts a few functions at import; torch >= 2.10 warns about torch.jit.script on each
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  (the compiled ops: a half-built install fails here, not mid-run)
    except ImportError as exc:
        raise UserError(f"detectron2 is not importable ({exc}); it has no wheels for this torch: build it from "
                        "source (make transfer-env, shared/transfer/README.md)") from None


@functools.lru_cache(maxsize=None)
def register_extra_norm_head():
    """MoCo's ROI head: detectron2's Res5ROIHeads plus one norm layer (`MODEL.RESNETS.NORM`) after res5.

    Registered once per process under `Res5ROIHeadsExtraNorm`, the name in the configs; returns the class."""
    from detectron2.layers import get_norm
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if EXTRA_NORM_HEAD in ROI_HEADS_REGISTRY:   # e.g. this file also run as a script in the same process
        return ROI_HEADS_REGISTRY.get(EXTRA_NORM_HEAD)

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads whose res5 stage ends with a norm layer of the backbone's norm type. With a
        BN-family norm the head's output features are normalised like the backbone's, which MoCo's
        paper gives as the reason for the protocol. For ResNet-18/34 res5 is two/three basic blocks."""

        @classmethod
        def _build_res5_block(cls, cfg):
            r = cfg.MODEL.RESNETS
            if r.DEPTH in (18, 34):
                out_channels = r.RES2_OUT_CHANNELS * 8
                n = 2 if r.DEPTH == 18 else 3
                blocks = ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1),
                                           in_channels=out_channels // 2, out_channels=out_channels, norm=r.NORM)
                res5 = torch.nn.Sequential(*blocks)
            else:
                res5, out_channels = super()._build_res5_block(cfg)
            res5.add_module("norm", get_norm(r.NORM, out_channels))
            return res5, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
    return Res5ROIHeadsExtraNorm


def register_synthetic(root: str | Path) -> None:
    """`synthetic_train` / `synthetic_val` from an export of `shared.data.synthetic --format coco`."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    root = Path(root).resolve()
    for name in SYNTHETIC:
        split = name.split("_")[1]
        json_file, images = root / "annotations" / f"instances_{split}.json", root / split
        if not json_file.is_file() or not images.is_dir():
            raise UserError(f"--data-root {root}: expected {json_file} and {images}/ "
                            f"(python -m shared.data.synthetic --format coco --out {root})")
        if name in DatasetCatalog.list():
            continue
        register_coco_instances(name, {}, str(json_file), str(images))


def check_datasets(cfg, data_root: Optional[str]) -> None:
    """Every dataset of the config is registered and its files are where detectron2 will look."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        if name in SYNTHETIC and data_root is None:
            raise UserError(f"the config uses {name}: pass --data-root <the synthetic dataset exported as COCO>")
        if name not in DatasetCatalog.list():
            raise UserError(f"dataset {name!r} (DATASETS.TRAIN/TEST) is not registered in detectron2")
        meta = MetadataCatalog.get(name)
        for attr in ("dirname", "json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path and not os.path.exists(path):
                raise UserError(f"dataset {name}: {path} not found; set DETECTRON2_DATASETS to the folder with "
                                f"detectron2's layout (VOC2007/, VOC2012/, coco/), now "
                                f"{os.environ.get('DETECTRON2_DATASETS', './datasets')!r}")


def read_weights(path: str | Path) -> Dict[str, object]:
    """The `model` dict of a detectron2 weights pickle, or a one-line error saying how to make one."""
    hint = "make one with: python -m shared.transfer.convert <checkpoint> --to detectron2 --out r50.pkl"
    # restricted to plain data and numpy arrays: detectron2 unpickles the file without limits, so it is
    # handed the file only after this has read it
    obj = ckpt.load_pickle(path, "--weights", "detectron2 weights pickle", hint)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "__author__" in obj):
        raise UserError(f"--weights {path}: not a detectron2 weights pickle (expected a dict with 'model' and "
                        f"'__author__'); {hint}")
    model = obj["model"]
    if not any(k.startswith("stem.") for k in model):
        raise UserError(f"--weights {path}: no detectron2 ResNet names (stem.*, res2.* ... res5.*); its keys "
                        f"begin {sorted(model)[:3]}; {hint}")
    return model


def resnet_depth(weights: Dict[str, object]) -> Optional[int]:
    """The torchvision depth of the ResNet in a converted pickle (None if it is none of them)."""
    blocks = tuple(1 + max((int(m.group(1)) for k in weights for m in [re.match(rf"res{s}\.(\d+)\.", k)] if m),
                           default=-1) for s in range(2, 6))
    return DEPTHS.get((blocks, "res2.0.conv3.weight" in weights))


def build_cfg(a: argparse.Namespace, out_dir: Path, seed: int):
    """The detectron2 config of one run: the yaml, the run's settings, then the KEY=VALUE overrides."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    try:
        cfg.merge_from_file(a.config, allow_unsafe=False)   # detectron2 falls back to yaml.unsafe_load otherwise
    except Exception as exc:   # unknown key, bad _BASE_, yaml syntax, a !!python tag
        raise UserError(f"--config {a.config}: {type(exc).__name__}: {first_line(exc)}") from None
    cfg.MODEL.WEIGHTS = "" if a.weights == "none" else str(Path(a.weights).resolve())
    cfg.OUTPUT_DIR = str(out_dir)
    cfg.SEED = seed
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg.merge_from_list(a.overrides)
    except Exception as exc:
        raise UserError(f"override: {type(exc).__name__}: {first_line(exc)}") from None
    cfg.freeze()
    return cfg


@functools.lru_cache(maxsize=None)
def trainer_class():
    """detectron2's DefaultTrainer with the evaluators of the protocols (as MoCo's train_net.py)."""
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            if MetadataCatalog.get(dataset_name).get("evaluator_type") == "pascal_voc":
                return PascalVOCDetectionEvaluator(dataset_name)
            folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            return COCOEvaluator(dataset_name, output_dir=folder)

    return Trainer


def count_loaded(model: torch.nn.Module, weights: Dict[str, object]) -> Tuple[int, int, List[str]]:
    """How many tensors of the pickle are in the model with equal values, matched as detectron2 matches
    them (a model key equal to the pickle key or ending in '.' + it). BN's num_batches_tracked counters
    are left out. Returns (found, total, some of those not found)."""
    state = model.state_dict()
    found, missing = 0, []
    names = [k for k in weights if not k.endswith("num_batches_tracked")]
    for k in names:
        value = torch.as_tensor(weights[k])
        hits = [m for m in state if m == k or m.endswith("." + k)]
        if any(state[m].shape == value.shape and torch.equal(state[m].detach().cpu(), value.to(state[m].dtype))
               for m in hits):
            found += 1
        else:
            missing.append(k)
    return found, len(names), missing[:5]


# ------------------------------------------------------------------------------ running
def _write_json(obj: dict, path: Path) -> None:
    def clean(x):   # NaN (no detections at all) -> null, so that the file is strict JSON
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    ckpt.save_json(clean(obj), path)


def metrics(results: dict, test_sets: Sequence[str]) -> dict:
    """AP/AP50/AP75 per task from detectron2's results ({task: ...}, or {dataset: {task: ...}} with
    several test sets): the first test set's tasks at the top, every set under `by_dataset`."""
    if not test_sets or not results:
        return {}
    per_set = {test_sets[0]: results} if len(test_sets) == 1 else results
    by_dataset = {name: {task: {m: float(v[m]) for m in METRICS if m in v} for task, v in r.items()}
                  for name, r in per_set.items()}
    out = dict(by_dataset.get(test_sets[0], {}))
    if len(test_sets) > 1:
        out["by_dataset"] = by_dataset
    return out


def summary(result: dict) -> str:
    std = result.get("std", {})
    parts = []
    for task in ("bbox", "segm"):
        if task in result:
            vals = " ".join(f"{m} {_fmt(result[task].get(m))}" + (f"±{_fmt(std[task].get(m))}" if task in std else "")
                            for m in METRICS)
            parts.append(f"{task} {vals}")
    return " | ".join(parts) or "no evaluation results"


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def run_one(a: argparse.Namespace, out_dir: Path, seed: int, weights: Optional[Dict[str, object]]) -> Optional[dict]:
    """One training (or evaluation) run into `out_dir`. Returns its results on rank 0, None elsewhere."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    rank = comm.get_rank()
    cfg = build_cfg(a, out_dir, seed)
    if rank == 0:
        ckpt.save_atomic(cfg.dump(), out_dir / "config.yaml", write=lambda text, f: f.write(text.encode()))
    seed_all_rng(seed + rank)
    Trainer = trainer_class()
    t0 = time.time()
    if a.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        trained = checkpointer.has_checkpoint()
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        loaded = count_loaded(model, weights) if weights is not None and not trained else None
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=a.resume)
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        loaded = count_loaded(model, weights) if weights is not None and trainer.start_iter == 0 else None
        if loaded is not None:
            log.info(f"weights: {loaded[0]} of {loaded[1]} tensors of {a.weights} are in the model"
                     + (f"; not found: {loaded[2]}" if loaded[2] else ""))
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None) or {}
    if rank != 0:
        return None
    out = {**metrics(results, cfg.DATASETS.TEST), "test_set": cfg.DATASETS.TEST[0], "seed": seed,
           "config": str(Path(a.config).resolve()), "weights": cfg.MODEL.WEIGHTS or None,
           "iterations": cfg.SOLVER.MAX_ITER, "eval_only": a.eval_only, "world_size": comm.get_world_size(),
           "time_s": round(time.time() - t0, 1)}
    if loaded is not None:
        out["weights_loaded"] = {"found": loaded[0], "total": loaded[1], "not_found": loaded[2]}
    _write_json(out, out_dir / RESULTS)
    return out


def aggregate(runs: List[dict]) -> dict:
    """Mean and sample std (n-1) of AP/AP50/AP75 over trials; a metric that is null in any trial is null."""
    mean, std = {}, {}
    for task in ("bbox", "segm"):
        if all(task in r for r in runs):
            mean[task], std[task] = {}, {}
            for m in METRICS:
                vals = [r[task].get(m) for r in runs]
                ok = all(v is not None and math.isfinite(v) for v in vals)
                mean[task][m] = statistics.fmean(vals) if ok else None
                std[task][m] = (statistics.stdev(vals) if len(vals) > 1 else 0.0) if ok else None
    return {**mean, "std": std, "trials": len(runs), "seeds": [r["seed"] for r in runs],
            "test_set": runs[0].get("test_set"), "config": runs[0].get("config"), "weights": runs[0].get("weights"),
            "per_trial": [{k: r[k] for k in ("seed", "bbox", "segm", "time_s") if k in r} for r in runs]}


def run(a: argparse.Namespace) -> None:
    """Every trial, in every process (the trainer synchronises them); rank 0 writes the results."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    register_extra_norm_head()
    if a.data_root:
        register_synthetic(a.data_root)
    out_root = Path(a.out_dir).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    rank = comm.get_rank()
    for name in ("detectron2", "fvcore", log.name):
        setup_logger(str(out_root), distributed_rank=rank, name=name, abbrev_name="d2" if name == "detectron2" else None)
    weights = read_weights(a.weights) if a.weights != "none" else None
    runs = []
    for k in range(a.trials):
        out_dir = out_root if a.trials == 1 else out_root / f"trial{k}"
        done = out_dir / RESULTS
        if a.resume and not a.eval_only and done.is_file():
            log.info(f"trial {k}: finished before ({done}), not run again")
            runs.append(json.loads(done.read_text()))
            continue
        runs.append(run_one(a, out_dir, seed=k, weights=weights))
        comm.synchronize()
    if rank != 0:
        return
    result = runs[0] if a.trials == 1 else aggregate(runs)
    if a.trials > 1:
        _write_json(result, out_root / RESULTS)
    n = f" (mean ± std of {a.trials} trials)" if a.trials > 1 else ""
    print(f"{result.get('test_set')}: {summary(result)}{n} -> {out_root / RESULTS}", flush=True)


def init_from_environment(num_gpus: int = 1) -> bool:
    """Join the process group described by the environment (torchrun, shared.launch, srun) and make
    detectron2's per-machine group. Returns False for a single process outside any launcher."""
    import torch.distributed as dist
    from detectron2.utils import comm

    env = env_from_environ()
    if env.source == "single" or env.world_size == 1:
        return False
    if num_gpus != 1:
        raise UserError("--num-gpus spawns processes itself; under torchrun or shared.launch leave it at 1")
    if not torch.cuda.is_available():
        raise UserError(f"{env.world_size} processes need GPUs: detectron2's trainer puts the model in DDP with a "
                        "GPU device id; on the CPU run a single process")
    torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group("nccl", init_method="env://", rank=env.rank, world_size=env.world_size)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None:   # shared.launch and srun do not say: count the processes on this host
        hosts: List[Optional[str]] = [None] * env.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        local = hosts.count(socket.gethostname())
    comm.create_local_process_group(int(local))
    comm.synchronize()
    return True


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    a = parse_args(argv)
    require_detectron2()
    # check everything that can be wrong with the input here, before any process is started
    register_extra_norm_head()
    if a.data_root:
        register_synthetic(a.data_root)
    cfg = build_cfg(a, Path(a.out_dir).resolve(), seed=0)
    check_datasets(cfg, a.data_root)
    if a.weights != "none":
        depth = resnet_depth(read_weights(a.weights))
        if depth is not None and depth != cfg.MODEL.RESNETS.DEPTH:
            raise UserError(f"--weights {a.weights} holds a ResNet-{depth} but the config builds a ResNet-"
                            f"{cfg.MODEL.RESNETS.DEPTH} (MODEL.RESNETS.DEPTH)")
    if init_from_environment(a.num_gpus):
        try:
            run(a)
        finally:
            import torch.distributed as dist
            dist.destroy_process_group()
    elif a.num_gpus > 1:
        if not torch.cuda.is_available():
            raise UserError(f"--num-gpus {a.num_gpus}: no GPU visible (detectron2's trainer needs GPUs for DDP); "
                            "on the CPU run a single process")
        from detectron2.engine import launch
        launch(run, a.num_gpus, dist_url="auto", args=(a,))
    else:
        run(a)


if __name__ == "__main__":
    main()
