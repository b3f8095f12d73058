"""Feature extraction over a dataset, split over ranks and gathered back in dataset order."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Tuple

import torch
from torch.utils.data import Dataset

from shared import dist
from shared.data.loader import GlobalBatchSampler, SeededDataset, make_loader


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, transform: Optional[Callable],
            batch_size: int, device: torch.device, workers: int = 0,
            dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`fn(x)` for every item of `dataset` -> (N, D) float32 features and (N,) labels, on the CPU,
    identical on every rank. Each rank computes its slice of every global batch."""
    world, rank = dist.world_size(), dist.rank()
    per_rank = max(1, batch_size // world)
    sampler = GlobalBatchSampler(len(dataset), per_rank * world, rank, world, seed=0, drop_last=False, shuffle=False)
    loader = make_loader(SeededDataset(dataset, transform), sampler, workers, device.type == "cuda")
    feats, labels = [], []
    n = len(dataset)
    for b, (x, y) in enumerate(loader):
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            f = fn(x.to(device, non_blocking=True))
        f = dist.all_gather_nograd(f.float().contiguous())
        y = dist.all_gather_nograd(torch.as_tensor(y, device=device))
        real = min(sampler.batch, n - b * sampler.batch)
        feats.append(f[:real].cpu())
        labels.append(y[:real].cpu())
    return torch.cat(feats), torch.cat(labels)
