"""Distributed helpers: process-group init (torchrun, Slurm/submitit, single process), gathers and
reductions with and without autograd, rank-0 printing, synchronised BatchNorm on GPU *and* CPU."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import UserError
from shared.numerics import at_least_fp32


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"        # single | torchrun | slurm | submitit


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand Slurm's compressed host list, e.g. `gpu[001-003,7],cpu1` -> gpu001 gpu002 gpu003 gpu7 cpu1."""
    hosts: List[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def env_from_environ(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Where this process sits: torchrun's variables first, then a Slurm task of a multi-task step
    (srun / submitit), else a single process. The Slurm master is the first host of the allocation
    and the port is derived from the job id, so every task computes the same address."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", 0)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun")
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1")))
    if "SLURM_PROCID" in env and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        hosts = expand_nodelist(nodelist) if nodelist else ["127.0.0.1"]
        job = env.get("SLURM_JOB_ID", "0")      # unique per array task too
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=ntasks,
                       local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=hosts[0],
                       master_port=int(env.get("MASTER_PORT", port_from_job_id(job))), source="slurm")
    return DistEnv()


def port_from_job_id(job_id: str) -> int:
    """The rendezvous port, in [20000, 40000), that every task of a job (and the job again after a
    requeue) derives from the job id alike. MASTER_PORT in the environment overrides it."""
    return 20000 + int(re.sub(r"\D", "", str(job_id)) or 0) % 20000


_ENV = DistEnv()


def init(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Initialise the process group when launched with several processes (idempotent).

    Returns the environment and the device this process should use (NCCL on GPU, gloo on CPU)."""
    global _ENV
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible")
    env = env_from_environ()
    if want_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", init_method="env://",
                                rank=env.rank, world_size=env.world_size,
                                device_id=dev if want_cuda else None)
    _ENV = env
    return env, dev


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ collectives
@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, without gradient (MoCo's `concat_all_gather`).
    Every rank must pass the same shape."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        # every rank holds d(its loss)/d(all inputs); the gradient of the sum of all ranks' losses
        # w.r.t. this rank's slice is the sum over ranks of that slice
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, with gradient flowing back to each rank's slice."""
    return _AllGather.apply(x) if is_dist() else x


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
    """Sum over ranks. Differentiable: the gradient is that of the sum of every rank's loss.
    Not differentiable: the value is the global sum, but the gradient flows only through the local
    term (what `torch.distributed.all_reduce` inside a forward gives, e.g. in Barlow Twins' code)."""
    if not is_dist():
        return x
    if differentiable:
        return _AllReduceSum.apply(x)
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(x, src)
    return x


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """MoCo's shuffle-BN: this rank's slice of a random permutation of the global batch (the
    permutation drawn on rank 0 and broadcast), and the inverse permutation for `unshuffle_batch`.
    BatchNorm in the key encoder then sees a different mix of images on each rank, so the keys
    cannot cheat through per-rank batch statistics. Single process: `x` itself (BatchNorm over the
    whole batch does not depend on the order), inverse None."""
    if not is_dist():
        return x, None
    gathered = all_gather_nograd(x)
    perm = broadcast(torch.randperm(gathered.shape[0], device=x.device), 0)
    mine = perm.view(world_size(), -1)[rank()]
    return gathered[mine], torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, inverse: Optional[torch.Tensor]) -> torch.Tensor:
    """Undo `shuffle_batch`: each rank gets back the rows of its own images, in their order."""
    if inverse is None:
        return x
    return all_gather_nograd(x)[inverse.view(world_size(), -1)[rank()]]


# ---------------------------------------------------------------------------- synchronised BN
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, with exact
    gradients (statistics reduced with an autograd-aware all-reduce). Semantics of torch's
    SyncBatchNorm (biased variance to normalise, unbiased for the running estimate), but it also
    runs on CPU/gloo, where torch's SyncBatchNorm refuses to. Any input rank (N, C, ...)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and is_dist()):
            return super().forward(x)
        if self.momentum is None:
            raise NotImplementedError("GlobalBatchNorm needs a momentum value")
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float64)
        count = all_reduce_sum(count, differentiable=False).item()
        xf = at_least_fp32(x)
        mean = all_reduce_sum(xf.sum(dims), differentiable=True) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims), differentiable=True) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.mul_(1 - self.momentum).add_(mean.to(self.running_mean.dtype), alpha=self.momentum)
                self.running_var.mul_(1 - self.momentum).add_(unbiased.to(self.running_var.dtype), alpha=self.momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm on GPU; `GlobalBatchNorm` elsewhere (CPU/gloo tests and runs)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    return _replace_batchnorm(module, GlobalBatchNorm, lambda bn: GlobalBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats))


def _replace_batchnorm(module: nn.Module, cls: type, make) -> nn.Module:
    """`module` with every BatchNorm that is not a `cls` replaced by `make(bn)`, which shares the
    old layer's parameters and buffers (same names: state dicts are unchanged)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
        out = make(module)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _replace_batchnorm(child, cls, make))
    return out


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that, in training, normalises each of `splits` groups of the batch with the group's
    own statistics: the per-GPU BatchNorm of a `splits`-GPU run, simulated in one process (the MoCo
    authors' CIFAR demo does the same). Sample i belongs to group i mod splits. The running estimates
    move by the mean of the groups' updates. In eval mode it is a plain BatchNorm."""

    def __init__(self, num_features: int, splits: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.splits = splits

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        if self.momentum is None:
            raise NotImplementedError("SplitBatchNorm needs a momentum value")
        n, c, g = x.shape[0], x.shape[1], self.splits
        if n % g:
            raise ValueError(f"SplitBatchNorm: a batch of {n} does not split into {g} equal groups")
        # (n, c, ...) -> (n / g, g * c, ...): channel block j holds the samples j, j + g, j + 2g, ...
        grouped = x.reshape(n // g, g * c, *x.shape[2:])
        stats = None
        if self.track_running_stats:
            stats = (self.running_mean.repeat(g), self.running_var.repeat(g))
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        out = F.batch_norm(grouped, *(stats or (None, None)), weight, bias, True, self.momentum, self.eps)
        if stats is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.copy_(stats[0].view(g, c).mean(0))
                self.running_var.copy_(stats[1].view(g, c).mean(0))
        return out.reshape(x.shape)


def convert_split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """Every BatchNorm of `module` as a `SplitBatchNorm` over `splits` groups (1: unchanged)."""
    if splits == 1:
        return module
    return _replace_batchnorm(module, SplitBatchNorm, lambda bn: SplitBatchNorm(
        bn.num_features, splits, bn.eps, bn.momentum, bn.affine, bn.track_running_stats))
