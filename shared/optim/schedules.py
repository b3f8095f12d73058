"""Per-iteration schedules as pure functions of the step (all values at chosen steps are testable).

lr(step) = peak * lr_factor(step): linear warmup from `warmup_start` to 1 over `warmup_epochs`,
then cosine to `final` (the Barlow Twins/MoCo v3 form `q + final * (1 - q)`, q = (1 + cos(pi t/T))/2),
or step decay by `gamma` at each milestone epoch, or constant. `per_epoch` freezes the step at the
start of its epoch (what torch's epoch-stepped CosineAnnealingLR gives). `warmup_prefix=False` makes
the cosine a function of the step counted from 0 over all steps, warmup included (timm's
CosineLRScheduler default), and `lag_epochs` delays the lr schedule by whole epochs (DeiT calls
`scheduler.step(epoch)` after epoch `epoch`, so epoch e trains at the value of epoch max(e - 1, 0)).
"""
from __future__ import annotations

import math
from typing import Optional

from shared.config import ScheduleConfig


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int) -> float:
    """The linear scaling rule `base_lr * global_batch / ref_batch` (ref_batch 0: no scaling)."""
    return base_lr * global_batch / ref_batch if ref_batch else base_lr


def lr_factor(step: int, steps_per_epoch: int, epochs: int, s: ScheduleConfig) -> float:
    total = steps_per_epoch * epochs
    step = max(step - s.lag_epochs * steps_per_epoch, 0)
    if s.per_epoch:
        step = (step // steps_per_epoch) * steps_per_epoch
    warmup = round(s.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return s.warmup_start + (1.0 - s.warmup_start) * step / warmup
    if s.kind == "constant":
        return 1.0
    if s.kind == "step":
        epoch = step / steps_per_epoch
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    start = warmup if s.warmup_prefix else 0
    q = 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(total - start, 1)))
    return q + s.final * (1.0 - q)


def cosine_between(start: float, end: float, step: int, total: int) -> float:
    """From `start` at step 0 to `end` at step `total`, along half a cosine."""
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def ema_momentum(step: int, steps_per_epoch: int, epochs: int, s: ScheduleConfig) -> Optional[float]:
    """MoCo v3 / BYOL: m = 1 - (1 - m0) * (1 + cos(pi t / T)) / 2 (ema_final = 1), or constant."""
    if s.ema_start is None:
        return None
    if s.ema_kind == "constant":
        return s.ema_start
    return cosine_between(s.ema_start, s.ema_final, step, steps_per_epoch * epochs)


def weight_decay(step: int, steps_per_epoch: int, epochs: int, base_wd: float, s: ScheduleConfig) -> float:
    if s.wd_final is None:
        return base_wd
    return cosine_between(base_wd, s.wd_final, step, steps_per_epoch * epochs)
