"""DeiT's fine-tuning extras: repeated augmentation in the project's sampler (`GlobalBatchSampler(repeats=)`,
as DeiT's RASampler: each image 3 times in a row, the copies on different ranks) and the model EMA of the
fine-tuning model (timm's ModelEma formula, kept in the checkpoint, continued on resume, evaluated on request)."""
from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

from shared import engine
from shared.config import RunConfig, build_config
from shared.data.loader import _PERMUTATION, GlobalBatchSampler, sample_seed
from shared.data.synthetic import SyntheticShapes
from shared.errors import ConfigError, DataError
from shared.eval.finetune import (Finetuner, MixupCutmix, finetune, finetune_backbone, finetune_config,
                                  no_weight_decay_rules, train_transform)
from shared.models import build_backbone

N, BATCH, SEED, EPOCH = 60, 12, 7, 2


def _epoch(world: int, repeats: int = 3, n: int = N, batch: int = BATCH, seed: int = SEED, epoch: int = EPOCH,
           start: int = 0, drop_last: bool = True) -> List[List[List[Tuple[int, int]]]]:
    """[rank][step] -> that rank's (index, seed) list."""
    out = []
    for r in range(world):
        s = GlobalBatchSampler(n, batch, r, world, seed, drop_last, repeats=repeats)
        s.set_epoch(epoch, start)
        out.append(list(s))
    return out


# --------------------------------------------------------------------------- repeated augmentation
@pytest.mark.parametrize("world", [2, 4])
def test_each_selected_index_three_times_an_epoch_on_different_ranks(world):
    ranks = _epoch(world)
    assert all(len(steps) == N // BATCH for steps in ranks)          # as many steps as without repeats
    assert all(len(b) == BATCH // world for steps in ranks for b in steps)
    where: Dict[int, List[int]] = defaultdict(list)
    seeds: Dict[int, set] = defaultdict(set)
    for r, steps in enumerate(ranks):
        for batch in steps:
            for i, s in batch:
                where[i].append(r)
                seeds[i].add(s)
    perm = GlobalBatchSampler(N, BATCH, seed=SEED, repeats=3)
    perm.set_epoch(EPOCH)
    assert set(where) == set(perm._order()[:N // 3])   # the first n / 3 images of the epoch's permutation
    assert all(len(r) == 3 for r in where.values())    # each exactly 3 times across the ranks
    assert all(len(s) == 3 for s in seeds.values())    # 3 different augmentation seeds
    if world >= 3:
        assert all(len(set(r)) == 3 for r in where.values())   # the 3 copies on 3 different ranks
    else:   # 2 ranks: every image on both, two of its copies on one of them (as DeiT's stride on 2 GPUs)
        assert all(sorted(Counter(r).values()) == [1, 2] for r in where.values())


def test_global_batches_do_not_depend_on_the_world_size_and_order_is_seeded():
    def global_batches(world, seed=SEED):
        ranks = _epoch(world, seed=seed)
        return [sorted(x for r in range(world) for x in ranks[r][t]) for t in range(N // BATCH)]
    one = global_batches(1)
    assert global_batches(2) == one and global_batches(4) == one
    assert global_batches(2) == global_batches(2)                    # deterministic from the seed
    assert global_batches(2, seed=SEED + 1) != one
    # entry j of a global batch goes to rank j mod world (DeiT's indices[rank::num_replicas])
    s = GlobalBatchSampler(N, BATCH, seed=SEED, repeats=3)
    s.set_epoch(EPOCH)
    for world in (2, 4):
        ranks = _epoch(world)
        for t in range(N // BATCH):
            flat = s.global_batch_indices(t)
            assert [[i for i, _ in ranks[r][t]] for r in range(world)] == [flat[r::world] for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resuming_mid_epoch_gives_the_remaining_batches(world):
    full, resumed = _epoch(world), _epoch(world, start=3)
    assert all(resumed[r] == full[r][3:] for r in range(world))
    assert all(len(GlobalBatchSampler(N, BATCH, r, world, SEED, repeats=3)) == N // BATCH for r in range(world))


def _reference(n, batch, rank, world, seed, epoch, drop_last):
    """The sampler as it was before `repeats`: contiguous rank slices, seeds of (seed, epoch, index)."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, _PERMUTATION))
    order = torch.randperm(n, generator=g).tolist()
    steps = n // batch if drop_last else -(-n // batch)
    out = []
    for t in range(steps):
        idx = order[t * batch:(t + 1) * batch]
        idx = idx + order[:-len(idx) % world]
        per = len(idx) // world
        out.append([(i, sample_seed(seed, epoch, i)) for i in idx[rank * per:(rank + 1) * per]])
    return out


@pytest.mark.parametrize("world,drop_last", [(1, True), (2, True), (4, False), (2, False)])
def test_repeats_1_is_the_sampler_as_before(world, drop_last):
    got = _epoch(world, repeats=1, n=50, batch=8, drop_last=drop_last)
    assert got == [_reference(50, 8, r, world, SEED, EPOCH, drop_last) for r in range(world)]


def test_partial_last_batch_and_bad_repeats():
    ranks = _epoch(2, n=21, batch=4, drop_last=False)   # 6 steps, the last (1 entry) padded from the epoch's start
    assert [len(b) for b in ranks[0]] == [2] * 5 + [1]
    counts = Counter(i for steps in ranks for b in steps for i, _ in b)
    assert sum(counts.values()) == 22 and len(counts) == 7
    with pytest.raises(DataError, match="repeats=0"):
        GlobalBatchSampler(8, 4, repeats=0)


# ------------------------------------------------------------------------------------ model EMA
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out_dim = nn.Linear(6, 5), nn.BatchNorm1d(5), 5

    def forward(self, x):
        return self.bn(self.fc(x))


def test_ema_is_timms_formula_on_parameters_and_buffers():
    torch.manual_seed(0)
    model = Finetuner(_Tiny(), 3, MixupCutmix(3, 0, 0), ema_decay=0.8)
    assert not any(p.requires_grad for p in model.ema.parameters())
    expect = {k: v.clone().double() for k, v in model.ema.state_dict().items()}
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("ema.")], lr=0.1)
    for _ in range(4):
        loss = model((torch.randn(8, 6), torch.randint(0, 3, (8,))))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step()
        online = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
                  **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
        for k, v in online.items():
            if v.is_floating_point():
                expect[k] = 0.8 * expect[k] + 0.2 * v.double()
    got = model.ema.state_dict()
    for k, v in expect.items():
        if k.endswith("num_batches_tracked"):
            assert got[k].item() == 0                   # integer buffers are kept
        else:
            assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k
    assert not torch.allclose(got["backbone.bn.running_mean"], torch.zeros(5))
    assert not torch.equal(got["head.weight"], model.head.weight)
    assert "ema" not in Finetuner(_Tiny(), 3, MixupCutmix(3, 0, 0)).state_dict().__str__()


TINY_VIT = ["model.backbone.name=vit_tiny_patch16_224", "model.backbone.img_size=32",
            "model.backbone.kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"]


def _cfg(tmp_path, *extra: str) -> RunConfig:
    return build_config(RunConfig, [], [
        *TINY_VIT, "data.workers=0", "train.tensorboard=false", "train.log_every=1", f"train.out_dir={tmp_path}",
        "eval.image_size=32", "eval.resize=36", "eval.knn.batch_size=32", "eval.after_train=[]",
        "eval.finetune.epochs=2", "eval.finetune.batch_size=12", "eval.finetune.warmup_epochs=1", *extra])


def _fit(cfg, train, out, keep: bool):
    torch.manual_seed(0)
    model = Finetuner(finetune_backbone(cfg, build_backbone(cfg.model.backbone)), 4, MixupCutmix(4),
                      ema_decay=cfg.eval.finetune.model_ema_decay)
    fcfg = finetune_config(cfg, out, no_weight_decay_rules(model.backbone))
    fcfg.train.keep_every_epochs = 1 if keep else 0
    start = model.head.weight.detach().clone()
    return start, engine.fit(fcfg, model, train, train_transform(cfg), method="finetune", out_dir=out).model


def test_ema_is_checkpointed_and_continued_on_resume(tmp_path):
    cfg = _cfg(tmp_path, "eval.finetune.model_ema_decay=0.9")
    train = SyntheticShapes(36, 32, 4)
    start, whole = _fit(cfg, train, tmp_path / "a", keep=True)          # 2 epochs of 3 steps, without a break
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert state["step"] == 6 and any(k.startswith("ema.backbone.") for k in state["model"])
    (tmp_path / "b").mkdir()                                    # the same run stopped after epoch 1 and resumed
    shutil.copyfile(tmp_path / "a" / "checkpoint_epoch0001.pt", tmp_path / "b" / "last.pt")
    _, resumed = _fit(cfg, train, tmp_path / "b", keep=False)
    for (k, v), (k2, w) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
    ema = whole.ema["head"].weight
    assert not torch.equal(ema, whole.head.weight) and not torch.equal(ema, start)   # moved, and behind


def test_finetune_uses_repeated_aug_and_reports_the_ema_on_request(tmp_path, monkeypatch):
    seen = []

    class Recording(GlobalBatchSampler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(self.repeats)

    monkeypatch.setattr(engine, "GlobalBatchSampler", Recording)
    cfg = _cfg(tmp_path, "eval.finetune.eval_ema=true", "eval.finetune.epochs=1")
    assert (cfg.eval.finetune.repeated_aug, cfg.train.repeated_aug) == (3, 1)
    assert finetune_config(cfg, tmp_path).train.repeated_aug == 3
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    res = finetune(cfg, backbone, SyntheticShapes(24, 32, 4), SyntheticShapes(16, 32, 4, split="val"), 4,
                   tmp_path / "ft")
    assert seen == [3]
    assert set(res) == {"top1", "top5", "best_top1", "ema_top1", "ema_top5"}
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema_top1"] for r in records if "ema_top1" in r] == [res["ema_top1"]]
    bad = _cfg(tmp_path, "eval.finetune.eval_ema=true", "eval.finetune.model_ema=false")
    with pytest.raises(ConfigError, match="model_ema"):
        finetune(bad, backbone, SyntheticShapes(24, 32, 4), SyntheticShapes(16, 32, 4, split="val"), 4,
                 tmp_path / "ft2")
