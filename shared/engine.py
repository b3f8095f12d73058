"""The training loop shared by every method (pretraining, and the linear probe of `shared.eval`).

A method is an `nn.Module` whose `forward(batch, ctx)` returns a dict with a scalar `loss` and any
other scalar logs; `batch` is what the data pipeline yields (moved to the device) and `ctx` a
`StepContext` (step, epoch, scheduled momentum-encoder coefficient, ...). Everything else lives
here: device placement, synchronised BN and DDP, AMP, channels_last, torch.compile, gradient
clipping and (where exact) accumulation, the per-step lr / weight-decay / momentum schedules,
periodic atomic checkpoints of finite states only (the previous one kept as prev.pt), auto-resume
from the output folder (falling back to prev.pt, refusing a changed schedule), a lock that keeps a
second run out of the folder, metrics (JSON lines, TensorBoard, tqdm, img/s) and a guard that stops
on a non-finite loss, naming the step and the last good checkpoint. The evaluations build on this
loop; it imports none of them (pretraining composes both: `shared.pretrain`).
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from shared import checkpoint as ckpt
from shared import dist
from shared.config import RunConfig, TrainConfig, to_dict, to_yaml
from shared.data.loader import GlobalBatchSampler, SeededDataset, make_loader, sample_seed
from shared.errors import ConfigError, TrainingError, UserError, first_line
from shared.logging import MetricLogger, Throughput
from shared.optim import apply_schedule, build_optimizer, ema_momentum, param_groups


@dataclass
class StepContext:
    step: int                     # global step being taken (0-based)
    epoch: int
    steps_per_epoch: int
    total_steps: int
    lr_factor: float              # scheduled fraction of peak lr
    ema_momentum: Optional[float]  # scheduled momentum-encoder coefficient (sched.ema_*), if any
    global_batch: int
    world_size: int


@dataclass
class FitResult:
    model: nn.Module              # the trained module, unwrapped (no DDP / compile)
    out_dir: Path
    steps: int
    last_checkpoint: Optional[Path]


def output_dir(cfg: RunConfig, method: str) -> Path:
    return Path(cfg.train.out_dir or os.path.join("runs", method, cfg.name or "run"))


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a GPU (GradScaler); use bf16 or fp32 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def global_batch(tc: TrainConfig, world: int) -> int:
    """The global batch a run uses on `world` processes: `train.batch_size` (the recipe's global
    batch, which must divide evenly), or `train.per_gpu_batch x world` when the recipe fixes the
    per-process batch. The LR scaling rule and the loss normalisations use this number."""
    if tc.per_gpu_batch > 0:
        return tc.per_gpu_batch * world
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} (the global batch) is not divisible by the world "
                          f"size {world}; choose a batch that divides, or set train.per_gpu_batch instead")
    return tc.batch_size


def amp_name(dtype: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def fit(cfg: RunConfig, model: nn.Module, dataset: Dataset, transform: Optional[Callable], *, method: str,
        out_dir: Optional[Path] = None,
        on_epoch_end: Optional[Callable[[nn.Module, int], Dict[str, float]]] = None,
        progress_desc: str = "") -> FitResult:
    """Train `model` on `dataset` (items `(x, label)`, `x` passed through `transform`) as `cfg` says.
    Rank 0 holds the output folder's lock (`checkpoint.folder_lock`) for the whole run."""
    dist.init(cfg.train.device)
    out_dir = Path(out_dir) if out_dir is not None else output_dir(cfg, method)
    with ckpt.folder_lock(out_dir, enabled=dist.is_main()):
        return _fit(cfg, model, dataset, transform, method, out_dir, on_epoch_end, progress_desc)


# Settings that move the lr / weight-decay / momentum schedules or the order of the data: a resumed run
# refuses a change to any of them unless train.allow_config_change=true (other changes are logged).
SCHEDULE_KEYS = ("train.epochs", "train.batch_size", "train.per_gpu_batch", "train.seed", "train.drop_last",
                 "train.repeated_aug",
                 "optim.", "sched.", "data.source", "data.root", "data.train_dir", "data.synthetic.")
NOT_COMPARED = ("train.out_dir", "train.resume", "train.allow_config_change")


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and any(isinstance(v, dict) for v in d):
        out = {f"{prefix}len": len(d)}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def config_changes(stored: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, stored value, current value) for every setting of `stored` that `current` has otherwise
    (a key that `stored` lacks is a setting added since it was written: not a change)."""
    a, b = _flat(stored or {}), _flat(current)
    return [(k, a[k], b.get(k)) for k in sorted(a) if a[k] != b.get(k) and not k.startswith(NOT_COMPARED)]


def check_accumulation(model: nn.Module, method: str, k: int, per_rank: int) -> None:
    """Gradient accumulation is the same optimisation as the full batch only when the loss is a mean
    of per-sample terms: a method says so with `BATCH_COUPLING = None` (otherwise it names what couples
    the batch), and no BatchNorm may see the micro-batches."""
    why = getattr(type(ckpt.unwrap(model)), "BATCH_COUPLING", "its loss is not declared a mean of per-sample terms")
    if why is None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        why = "its BatchNorm statistics would come from the micro-batches"
    if why is not None:
        raise ConfigError(f"train.accum_steps={k} is not exact for {method}: {why}, so {k} micro-batches are not "
                          f"the same update as one batch; set train.accum_steps=1 (use more GPUs, or a smaller "
                          f"train.batch_size with the recipe's lr rule)")
    if per_rank % k:
        raise ConfigError(f"train.accum_steps={k} must divide the per-process batch {per_rank} "
                          f"(train.batch_size / world size)")


def split_batch(batch: Any, k: int) -> List[Any]:
    """`batch` (tensors, in tuples / lists / dicts) cut into k equal micro-batches along dim 0."""
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(k))
    if isinstance(batch, (list, tuple)):
        return [type(batch)(parts) for parts in zip(*(split_batch(b, k) for b in batch))]
    if isinstance(batch, dict):
        cut = {key: split_batch(v, k) for key, v in batch.items()}
        return [{key: cut[key][j] for key in batch} for j in range(k)]
    return [batch] * k


def accumulate(train_model: nn.Module, parts: List[Any], ctx: StepContext, scaler, device: torch.device,
               dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Forward and backward each micro-batch with its loss / k, gradients summing in .grad; under DDP
    only the last backward all-reduces. Returns the mean of each logged value over the micro-batches."""
    k = len(parts)
    inner = getattr(train_model, "_orig_mod", train_model)
    ddp = inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None
    outs = []
    for j, part in enumerate(parts):
        with ddp.no_sync() if ddp is not None and j < k - 1 else nullcontext():
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                o = train_model(part, ctx)
            scaler.scale(o["loss"] / k).backward()
        outs.append({n: torch.as_tensor(v, device=device).detach().float() for n, v in o.items()})
    return {n: torch.stack([o[n] for o in outs]).mean() for n in outs[0]}


def _fit(cfg: RunConfig, model: nn.Module, dataset: Dataset, transform: Optional[Callable], method: str,
         out_dir: Path, on_epoch_end, progress_desc: str) -> FitResult:
    _, device = dist.init(cfg.train.device)
    world, rank = dist.world_size(), dist.rank()
    tc = cfg.train
    main = rank == 0
    tc.batch_size = global_batch(tc, world)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in ckpt.remove_stale_temporaries(out_dir):
            print(f"removed {p}, a temporary file left by a write that was killed", flush=True)

    sampler = GlobalBatchSampler(len(dataset), tc.batch_size, rank, world, tc.seed, tc.drop_last,
                                 repeats=tc.repeated_aug)
    spe, epochs = sampler.steps_per_epoch, tc.epochs
    total = spe * epochs
    loader = make_loader(SeededDataset(dataset, transform), sampler, cfg.data.workers,
                         cfg.data.pin_memory and device.type == "cuda")

    dtype = autocast_dtype(tc.amp, device)
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and tc.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    groups = param_groups(model, cfg.optim, tc.batch_size)
    optimizer = build_optimizer(groups, cfg.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    start = 0
    last = out_dir / ckpt.LAST
    state, resumed_from = ckpt.load_for_resume(out_dir, say=dist.print0) if tc.resume else (None, None)
    if state is not None:
        changes = config_changes(state.get("config"), to_dict(cfg))
        moved = [c for c in changes if c[0].startswith(SCHEDULE_KEYS)]
        if moved and not tc.allow_config_change:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in moved[:4])
            raise ConfigError(f"{resumed_from} was trained with other settings that move the schedule or the data "
                              f"order ({what}{', ...' if len(moved) > 4 else ''}); resume with the same settings, "
                              f"set train.allow_config_change=true to continue anyway, or use another train.out_dir")
        for k, old, new in changes:
            dist.print0(f"resuming with a changed setting: {k} {old!r} -> {new!r}")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {resumed_from} does not match this model/optimizer "
                            f"({first_line(exc)}); use another train.out_dir or train.resume=false") from None
        for g, fresh in zip(optimizer.param_groups, groups):  # the config's lr / wd win over stored ones
            g["peak_lr"], g["base_wd"] = fresh["peak_lr"], fresh["base_wd"]
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        dist.print0(f"resumed from {resumed_from} at step {start}/{total}")
        del state
    if main:
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        train_model = torch.compile(train_model)

    logger = MetricLogger(out_dir, main, total, start, tc.tensorboard, desc=progress_desc or method)
    if main and start == 0:
        logger.write(f"{method}: {total} steps ({epochs} epochs x {spe}), global batch {tc.batch_size} on "
                     f"{world} process(es), device {device.type}, amp {amp_name(dtype)}, output {out_dir}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    accum = tc.accum_steps
    if accum > 1:
        check_accumulation(model, method, accum, tc.batch_size // world)
    last_saved: Optional[Path] = resumed_from if start > 0 else None
    pending: List[Any] = []          # the previous step's stats, read one step late (no host sync per step)
    sums: Dict[str, float] = {}
    count = 0
    speed = Throughput(device)

    def drain() -> None:
        nonlocal count
        if not pending:
            return
        step_p, names, stats, lr_f, ema, mark = pending.pop()
        values = stats.tolist()
        if not all(math.isfinite(v) for v in values[:1]):
            where = f"{last_saved} (intact)" if last_saved else "none written yet"
            raise TrainingError(f"loss is {values[0]} at step {step_p} (epoch {step_p // spe}); training stopped. "
                                f"Last good checkpoint: {where}")
        for n, v in zip(names, values):
            sums[n] = sums.get(n, 0.0) + v
        count += 1
        logger.advance(1, {"loss": values[0]})
        if (step_p + 1) % tc.log_every == 0 or step_p + 1 == total:
            rec = {n: s / count for n, s in sums.items()}
            rec.update(lr=optimizer.param_groups[0]["peak_lr"] * lr_f, epoch=step_p // spe,
                       img_per_s=speed.rate(mark))
            if ema is not None:
                rec["ema_momentum"] = ema
            logger.log(step_p, rec)
            sums.clear()
            count = 0

    def save(step_done: int, epoch_done: int) -> None:
        nonlocal last_saved
        drain()
        # a state with an inf/NaN anywhere (weights, BN statistics, optimiser moments) is never written:
        # the loss can still be finite when the state already is not. Every rank checks its own.
        bad = ckpt.nonfinite(ckpt.state_tensors({"model": ckpt.unwrap(model).state_dict(),
                                                 "optimizer": optimizer.state_dict()["state"]}))
        if dist.all_reduce_mean(torch.tensor([float(bool(bad))], device=device)).item() > 0:
            where = f"{last_saved} (intact)" if last_saved else "none written yet"
            shown = f" ({len(bad)} tensors, e.g. {', '.join(bad[:3])})" if bad else " (on another rank)"
            raise TrainingError(f"the training state after step {step_done - 1} (epoch {epoch_done}) holds inf/NaN"
                                f"{shown}; not saved, training stopped. Last good checkpoint: {where}")
        if main:
            state = ckpt.training_state(model, optimizer, scaler, step_done, epoch_done, to_dict(cfg), method)
            # last.pt becomes prev.pt only when it is known to be good (this run wrote it or resumed from
            # it): a damaged last.pt that the run fell back past must not replace the good prev.pt
            last_saved = ckpt.save_atomic(state, last, backup=out_dir / ckpt.PREV if last_saved == last else None)
            if tc.keep_every_epochs and step_done % spe == 0 and epoch_done % tc.keep_every_epochs == 0:
                shutil.copyfile(last, out_dir / f"checkpoint_epoch{epoch_done:04d}.pt")
        else:
            last_saved = last
        dist.barrier()

    def epoch_save_due(epoch: int) -> bool:
        return epoch + 1 == epochs or bool(tc.ckpt_every_epochs and (epoch + 1) % tc.ckpt_every_epochs == 0)

    step = start
    try:
        train_model.train()
        for epoch in range(start // spe, epochs):
            sampler.set_epoch(epoch, step - epoch * spe)
            for batch in loader:
                torch.manual_seed(sample_seed(tc.seed, step, rank))
                lr_f = apply_schedule(optimizer, step, spe, epochs, cfg.sched)
                ema = ema_momentum(step, spe, epochs, cfg.sched)
                ctx = StepContext(step, epoch, spe, total, lr_f, ema, tc.batch_size, world)
                batch = to_device(batch, device, tc.channels_last)
                if accum == 1:
                    with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                        out = train_model(batch, ctx)
                    loss = out["loss"]
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    out = accumulate(train_model, split_batch(batch, accum), ctx, scaler, device, dtype)
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                if hasattr(model, "after_optimizer_step"):   # a model's own bookkeeping, e.g. a weight EMA
                    model.after_optimizer_step()

                names = ["loss"] + [k for k in out if k != "loss"]
                stats = torch.stack([torch.as_tensor(out[k], device=device).detach().float().reshape(())
                                     for k in names])
                stats = dist.all_reduce_mean(stats)
                drain()
                pending.append((step, names, stats, lr_f, ema, speed.mark()))
                speed.add(tc.batch_size)
                step += 1
                if tc.ckpt_every_steps and step % tc.ckpt_every_steps == 0 and not (
                        step % spe == 0 and epoch_save_due(epoch)):
                    save(step, epoch)
            drain()
            if on_epoch_end is not None:
                logs = on_epoch_end(model, epoch)
                if logs:
                    logger.log(step - 1, logs, prefix="eval")
                train_model.train()
            if epoch_save_due(epoch):
                save(step, epoch + 1)
        drain()
        if last_saved is None or step != total:
            save(step, epochs)
    finally:
        logger.close()
    return FitResult(model=ckpt.unwrap(model), out_dir=out_dir, steps=step, last_checkpoint=last_saved)
