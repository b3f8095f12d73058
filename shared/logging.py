"""Rank-0 metrics: JSON lines, TensorBoard scalars, a tqdm progress bar and console lines."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm


class MetricLogger:
    """Writes `metrics.jsonl` (one object per log event, with `step`) and TensorBoard scalars under
    `out_dir/tb`. A run resumed at step S continues both: records of steps >= S left by the
    interrupted attempt are dropped (TensorBoard's `purge_step`, and the same for the JSON lines),
    so each step appears once; a run starting at step 0 starts the JSON lines afresh. Inactive off
    rank 0."""

    def __init__(self, out_dir: Path, active: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, desc: str = ""):
        self.active = active
        self.tb = None
        self.bar = None
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if path.is_file():     # from step 0 (a fresh run in an old folder) this empties it
            _drop_records_from(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                        disable=None, file=sys.stderr, leave=False)

    def log(self, step: int, values: Dict[str, float], prefix: str = "train", echo: bool = True) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                                   for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if echo:
            line = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            self.write(f"[{prefix} step {step}] {line}")

    def write(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1, postfix: Optional[Dict[str, float]] = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


class Throughput:
    """Images per second between step-end marks. A mark is a host clock reading on CPU and a CUDA
    event on GPU, so a rate read one step late (the engine drains stats lagged) still covers
    exactly the steps whose images were counted."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start, self.n = self.mark(), 0

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, n: int) -> None:
        self.n += n

    def rate(self, end) -> float:
        """Images added since the previous `rate` call over the time from its mark to `end`."""
        if self.cuda:
            end.synchronize()
            seconds = self.start.elapsed_time(end) / 1000.0
        else:
            seconds = end - self.start
        r = self.n / max(seconds, 1e-9)
        self.start, self.n = end, 0
        return r


def _drop_records_from(path: Path, step: int) -> None:
    """Rewrite (atomically) a JSON-lines file without the records whose `step` is >= `step`."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) >= step:
                continue
        except ValueError:          # a line cut short by a kill: drop it too
            continue
        keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)
