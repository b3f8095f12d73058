"""Shared test helpers: a 2-process gloo runner, tiny configs, subprocess runs of the CLIs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Sequence

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# `make test` runs the fast tests in two pytest-xdist workers side by side, one thread each (the
# subprocesses they start inherit OMP_NUM_THREADS), and the learning tests alone with two threads.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from shared import dist
    dist.init("cpu")
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.shutdown()


def run_distributed(fn: Callable, world: int, tmp_path: Path, *args) -> List:
    """Run `fn(rank, world, *args)` in `world` gloo processes on the CPU; return each rank's result.
    `fn` must be a module-level function of an importable module (it is pickled by name)."""
    mp.spawn(_worker, args=(world, free_port(), fn, args, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_cli(args: Sequence[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)


# The smallest pretraining that still exercises every part of the engine (a few seconds on CPU).
TINY = [
    "data.synthetic.length=64", "data.synthetic.val_length=32", "data.synthetic.image_size=32",
    "data.workers=0", "aug.views.0.size=16", "aug.views.1.size=16", "model.projector=64-64-64",
    "train.batch_size=16", "train.epochs=2", "train.log_every=1", "train.tensorboard=false",
    "sched.warmup_epochs=1", "eval.after_train=[]", "eval.compare_random_init=false",
    "eval.image_size=16", "eval.resize=16",
]


def import_or_skip(module: str, reason: str):
    """`pytest.importorskip`, except where the environment variable REQUIRE_TRANSFER_STACK names the
    module (comma-separated): there a failed import fails the test. `make transfer-test` sets it, so
    a broken transfer environment cannot pass as skipped tests."""
    required = {m.strip() for m in os.environ.get("REQUIRE_TRANSFER_STACK", "").split(",") if m.strip()}
    if module.split(".")[0] in required:
        return __import__(module)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture
def tiny_overrides(tmp_path) -> List[str]:
    return TINY + [f"train.out_dir={tmp_path / 'run'}"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    yield


def demo_results(paper: str, tmp_path, *overrides: str):
    """Run `<paper>/train.py` on its demo recipe (with overrides); return (pretrained, random_init) results."""
    # two threads, as the margins below were measured (the last digits, and at this budget sometimes more,
    # depend on the thread count), whatever the machine's core count or the worker's setting
    r = run_cli([f"{paper}/train.py", "--config", str(ROOT / f"{paper}/configs/demo.yaml"), *overrides,
                 f"train.out_dir={tmp_path}", "train.tensorboard=false"], env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    return res["pretrained"], res["random_init"]
