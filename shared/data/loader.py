"""Datasets from config, and a sampler that makes every run reproducible by construction.

`GlobalBatchSampler` cuts each epoch's permutation (seeded by seed and epoch) into *global*
batches and gives rank r its contiguous slice, so step t sees the same global batch whatever the
world size. Each sample carries its own seed, a function of (seed, epoch, index), which
`SeededDataset` loads into torch's generator before the augmentation runs. A run resumed at step t
therefore sees exactly the batches and views of an uninterrupted run, and a 2-process run exactly
the views of the 1-process run.

`build_image_dataset` attaches its `DataConfig` to the dataset (`loader_config`), so that
`SeededDataset` and `make_loader` apply its loader settings wherever the dataset goes: the fast
path (`data.fast_path`: undecoded image files handed to a transform that takes them) and the
DataLoader's workers (`-1`: from the machine, `auto_workers`), persistence and prefetch depth.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.config import DataConfig
from shared.data.folder import ImageFolder, class_folders
from shared.data.synthetic import SyntheticShapes
from shared.errors import ConfigError, DataError

_MASK64 = (1 << 64) - 1
_PERMUTATION = _MASK64  # the "index" whose seed draws an epoch's permutation


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ index) & ((1 << 63) - 1)


class SeededDataset(Dataset):
    """`ds[(index, seed)] -> transform(base[index])` with torch's CPU generator seeded first.

    Where the base offers undecoded files (an `ImageFolder` built with `data.fast_path`) and the
    transform takes them (`MultiView`), it hands over the file, which the transform decodes; a
    file that fails to decode there is skipped as the base skips unreadable files (the next
    image, with the generator seeded afresh, as if the base had skipped it).

    A transform with `takes_index = True` is called as `transform(x, index=index)`: for a method whose
    sample needs its dataset index (PIRL: the memory-bank row). Other transforms are called as before."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None):
        self.base, self.transform = base, transform
        self.takes_index = bool(getattr(transform, "takes_index", False))
        cfg = getattr(base, "loader_config", None)
        self.encoded = bool(getattr(cfg, "fast_path", False) and getattr(transform, "takes_encoded", False)
                            and hasattr(base, "skip"))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        if not self.encoded:
            torch.random.default_generator.manual_seed(seed)
            x, y = self.base[index]
            return (self._apply(x, index) if self.transform is not None else x), y
        for attempt in range(len(self.base)):
            torch.random.default_generator.manual_seed(seed)
            x, y = self.base.__getitem__((index + attempt) % len(self.base), encoded=True)
            try:
                return self._apply(x, (index + attempt) % len(self.base)), y
            except DataError as exc:
                self.base.skip(exc)
        raise DataError("no readable image in the dataset")

    def _apply(self, x, index: int):
        return self.transform(x, index=index) if self.takes_index else self.transform(x)


class GlobalBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields this rank's `(index, sample_seed)` list for each step of the current epoch.

    drop_last=False keeps the final partial global batch (padded by wrap-around so that it splits
    evenly over ranks, as torch's DistributedSampler pads).

    `repeats` > 1 is repeated augmentation (DeiT's RASampler): the epoch's permutation with each index
    written `repeats` times in a row, cut after n entries (so an epoch has as many steps as without it
    and covers about n / repeats distinct images), and each global batch dealt to the ranks in turn
    (entry j to rank j mod world) rather than in contiguous slices, so the consecutive copies of an
    image land on different ranks when world >= repeats (world 2, repeats 3: both ranks, one of them
    twice). Each copy has its own seed (the copy number enters it), so the copies are augmented
    differently. The global batch of a step, as a set, does not depend on the world size, and a
    resumed epoch continues with the same batches. Both take the first entries of the repeated list:
    DeiT num_selected_samples = floor((n // 256) * 256 / world) per rank, so (n // 256) * 256 // global
    batch steps with its drop_last loader; ours n // global batch steps (drop_last), the same whenever
    the global batch is a multiple of 256 (DeiT's 1024), else up to n mod 256 samples more (at most one
    step for a global batch of 256 or more). DeiT uses the RASampler only when distributed; here
    `repeats` holds for any world size (one process: the copies share a rank)."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True, shuffle: bool = True, repeats: int = 1):
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if n < (global_batch if drop_last else 1):
            raise DataError(f"dataset has {n} samples, fewer than one global batch of {global_batch} (drop_last)")
        if repeats < 1:
            raise DataError(f"repeats={repeats}: expected 1 (no repeated augmentation) or more")
        self.n, self.batch, self.rank, self.world = n, global_batch, rank, world_size
        self.seed, self.drop_last, self.shuffle, self.repeats = seed, drop_last, shuffle, repeats
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch if self.drop_last else -(-self.n // self.batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def global_batch_indices(self, step: int) -> List[int]:
        return [i for i, _ in self._batch(self._slots(), step)]

    def _order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, _PERMUTATION))
        return torch.randperm(self.n, generator=g).tolist()

    def _slots(self) -> List[Tuple[int, int]]:
        """The epoch's n entries (index, copy number)."""
        order = self._order()
        if self.repeats == 1:
            return [(i, 0) for i in order]
        return [(i, c) for i in order[:-(-self.n // self.repeats)] for c in range(self.repeats)][:self.n]

    def _seed(self, index: int, copy: int) -> int:
        if self.repeats == 1:     # unchanged by the repeated augmentation option
            return sample_seed(self.seed, self.epoch, index)
        return sample_seed(self.seed, self.epoch, index * self.repeats + copy)

    def _batch(self, slots: List[Tuple[int, int]], step: int) -> List[Tuple[int, int]]:
        idx = slots[step * self.batch:(step + 1) * self.batch]
        pad = -len(idx) % self.world
        return idx + slots[:pad]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        slots = self._slots()
        for step in range(self.start_step, self.steps_per_epoch):
            idx = self._batch(slots, step)
            per = len(idx) // self.world
            mine = idx[self.rank * per:(self.rank + 1) * per] if self.repeats == 1 else idx[self.rank::self.world]
            yield [(i, self._seed(i, c)) for i, c in mine]


def build_image_dataset(data: DataConfig, split: str) -> Dataset:
    """The configured image source for `split` ('train' or 'val'), yielding (PIL image, label)."""
    if data.source == "synthetic":
        s = data.synthetic
        try:
            ds = SyntheticShapes(s.length if split == "train" else s.val_length, s.image_size, s.num_classes,
                                 s.max_objects, s.seed, split, cache=s.cache, texture=s.texture, palette=s.palette,
                                 rotation=s.rotation, placement=s.placement, shading=s.shading,
                                 radius_range=s.radius_range)
        except ValueError as exc:  # an out-of-range setting, e.g. num_classes or radius_range
            raise ConfigError(f"data.synthetic.{exc}") from None
        ds.loader_config = data
        return ds
    sub = data.train_dir if split == "train" else data.val_dir
    if not data.root:
        raise DataError(f"data.source={data.source} needs data.root: the dataset folder holding "
                        f"{data.train_dir}/ and {data.val_dir}/")
    classes, train_root = None, Path(data.root) / data.train_dir
    if split != "train" and data.source == "folder" and train_root.is_dir():
        classes = class_folders(train_root)   # the training split's names decide the labels of every split
    folder = ImageFolder(Path(data.root) / sub, skip_bad_files=data.skip_bad_files,
                         key=f"data.root + data.{'train' if split == 'train' else 'val'}_dir",
                         labelled=data.source == "folder", classes=classes or None, classes_from=str(train_root))
    folder.loader_config = data
    return folder


def num_classes(ds: Dataset) -> int:
    return len(ds.classes)


def auto_workers(env: Mapping[str, str] = os.environ, affinity: Optional[int] = None) -> int:
    """DataLoader workers for one process: the CPUs it may use (its CPU affinity, and at most
    SLURM_CPUS_PER_TASK under Slurm) shared by the processes on this node (LOCAL_WORLD_SIZE under
    torchrun; one task per GPU under Slurm), minus one for the training process itself; at least 1."""
    cpus = affinity if affinity is not None else len(os.sched_getaffinity(0))
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cpus = min(cpus, int(env["SLURM_CPUS_PER_TASK"]))
    procs = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE", "").isdigit() else 1
    return max(1, cpus // max(procs, 1) - 1)


def loader_options(workers: int, data: Optional[DataConfig] = None) -> dict:
    """The DataLoader keywords for `workers` (-1: `auto_workers()`) and a `DataConfig`'s settings."""
    data = data if data is not None else DataConfig()
    if workers < -1:
        raise ConfigError(f"data.workers={workers}: expected a number of workers >= 0, or -1 (from the machine)")
    n = auto_workers() if workers == -1 else workers
    opts = dict(num_workers=n)
    if n > 0:
        opts["persistent_workers"] = data.persistent_workers
        if data.prefetch_factor > 0:
            opts["prefetch_factor"] = data.prefetch_factor
    return opts


def make_loader(dataset: SeededDataset, sampler: GlobalBatchSampler, workers: int, pin_memory: bool) -> DataLoader:
    """`workers` -1: from the machine (`auto_workers`); persistence and prefetch depth from the
    dataset's `DataConfig` where `build_image_dataset` made it, else the `DataConfig` defaults."""
    data = getattr(getattr(dataset, "base", dataset), "loader_config", None)
    return DataLoader(dataset, batch_sampler=sampler, pin_memory=pin_memory, **loader_options(workers, data))
