"""Training throughput of a paper's recipe through the shared engine.

    python benchmarks/train_throughput.py barlow --config barlow/configs/in1k_1000ep.yaml --steps 30 \
        train.batch_size=256 [key=value ...]

Data: `--data synthetic` renders and augments the built-in dataset in DataLoader workers (the
whole pipeline); `--data tensors` feeds pre-made random views of the recipe's size (for a method
with its own transform, such as SimMIM's image + mask, a pool of its outputs), so the figure
is the model + optimizer step (what a GPU benchmark should isolate). Prints the median images/s
over the steps after `--warmup`, and the peak GPU memory when on GPU. Runs on any device; quote
figures with the command and the machine that produced them (see benchmarks/README.md).

`--optim-step` times the optimizer step alone instead: the recipe's model, parameter groups and
optimizer (as the engine builds them, with the schedule applied at mid-training), fixed random
gradients, and the median milliseconds of `optimizer.step()` over the steps after `--warmup`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from shared import dist
from shared.config import build_config
from shared.data.augment import MultiView
from shared.data.loader import build_image_dataset
from shared.engine import amp_name, autocast_dtype, fit
from shared.optim import apply_schedule, build_optimizer, param_groups


def optim_step_ms(cfg, model: torch.nn.Module, device: torch.device, steps: int, warmup: int) -> dict:
    """Median wall-clock ms of the recipe's `optimizer.step()` on `model`'s parameters."""
    model.to(device)
    groups = param_groups(model, cfg.optim, cfg.train.batch_size)
    optimizer = build_optimizer(groups, cfg.optim)
    spe, epochs = 100, max(cfg.train.epochs, 1)
    apply_schedule(optimizer, spe * epochs // 2, spe, epochs, cfg.sched)   # mid-training lr and weight decay
    params = [p for g in optimizer.param_groups for p in g["params"]]
    g = torch.Generator(device="cpu").manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=device, dtype=p.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps + warmup):
        sync()
        t = time.perf_counter()
        optimizer.step()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return {"optimizer": type(optimizer).__name__, "param_tensors": len(params),
            "params_m": sum(p.numel() for p in params) / 1e6, "steps_measured": steps,
            "step_ms_median": statistics.median(times[warmup:])}


class RandomViews(Dataset):
    def __init__(self, n: int, sizes: list[int]):
        self.n, self.sizes = n, sizes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return [torch.randn(3, s, s) for s in self.sizes], 0


class PremadeItems(Dataset):
    """For methods with their own input transform (SimMIM: image and mask): `pool` items made once
    by that transform from noise images, then served in turn, so the loader costs next to nothing."""

    def __init__(self, n: int, transform, size: int, pool: int):
        g = torch.Generator().manual_seed(0)
        noise = [torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g) for _ in range(pool)]
        self.n, self.items = n, [(transform(Image.fromarray(x.numpy())), 0) for x in noise]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.items[i % len(self.items)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", help="paper folder whose train.py defines Config and build(cfg), e.g. barlow")
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", choices=["synthetic", "tensors"], default="tensors")
    p.add_argument("--optim-step", action="store_true", help="time optimizer.step() alone (see the docstring)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    module = importlib.import_module(f"{a.method}.train")
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    cfg = build_config(module.Config, [a.config], a.overrides + [
        f"train.out_dir={out}", "train.resume=false", "train.log_every=1", "train.tensorboard=false",
        "train.ckpt_every_epochs=0", "eval.after_train=[]", "data.source=synthetic", "train.drop_last=true"])
    n = cfg.train.batch_size * (a.steps + a.warmup)
    sizes = [v.size for v in cfg.aug.views for _ in range(v.n)]
    epochs, cfg.train.epochs = cfg.train.epochs, 1
    _, device = dist.init(cfg.train.device)
    torch.manual_seed(0)
    model = module.build(cfg)
    if a.optim_step:
        cfg.train.epochs = epochs
        result = {"method": a.method, "config": a.config, "overrides": a.overrides,
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "threads": torch.get_num_threads(), **optim_step_ms(cfg, model, device, a.steps, a.warmup)}
        print(json.dumps(result), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return
    make_transform = getattr(module, "make_transform", None)   # a method's own input pipeline, if it has one
    transform = make_transform(cfg, model) if make_transform is not None else MultiView(cfg.aug.views)
    if a.data == "synthetic":
        cfg.data.synthetic.length = n
        cfg.data.synthetic.image_size = max(sizes)
        dataset = build_image_dataset(cfg.data, "train")
    elif make_transform is not None:
        dataset, transform = PremadeItems(n, transform, max(sizes), cfg.train.batch_size), None
    else:
        dataset, transform = RandomViews(n, sizes), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fit(cfg, model, dataset, transform, method=f"bench-{a.method}")
    if dist.is_main():      # only rank 0 writes metrics
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = [r["img_per_s"] for r in records if "img_per_s" in r][a.warmup:]
        result = {"method": a.method, "config": a.config, "overrides": a.overrides, "data": a.data,
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "world_size": dist.world_size(), "global_batch": cfg.train.batch_size, "amp": amp_name(autocast_dtype(cfg.train.amp, device)),
                  "steps_measured": len(steady), "img_per_s_median": statistics.median(steady) if steady else None}
        if device.type == "cuda":
            result["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        print(json.dumps(result), flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
