"""PIRL: loss parity against the paper's formulas, patch geometry, the memory bank and Z, heads,
recipes and schedule, a 2-process gloo run against one process, and a kill-and-resume."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, run_distributed
from pirl.data import PIRLAugConfig, PatchesAndImage, patch_boxes, patch_geometry
from pirl.loss import info_nce_memory_loss, memory_scores, nce_loss, partition_constant, sample_rows
from pirl.model import PIRL, PIRLModelConfig, init_memory
from pirl.train import Config, build, make_transform
from shared.config import BackboneConfig, load_config
from shared.data.loader import SeededDataset
from shared.errors import ConfigError
from shared.models.backbones import count_parameters
from shared.optim import lr_factor, param_groups


def recipe(name: str, *overrides: str) -> Config:
    return load_config(Config, ["--config", str(ROOT / f"pirl/configs/{name}.yaml"), *overrides])


# ------------------------------------------------------------------------------------ losses
def reference_nce(sim, t, z, n):
    """The paper's NCE with a uniform noise distribution 1/N and K noise samples, written per entry."""
    b, k = sim.shape[0], sim.shape[1] - 1
    eps = float(np.finfo(np.float32).eps)
    total = 0.0
    for i in range(b):
        p = [math.exp(float(v) / t) / z for v in sim[i]]
        total += math.log(p[0] / (p[0] + k / n + eps))
        total += sum(math.log((k / n) / (pj + k / n + eps)) for pj in p[1:])
    return -total / b


@pytest.mark.parametrize("t,z,n", [(0.07, 2000.0, 1000), (0.1, 50.0, 64), (0.5, 3.0e4, 1281167)])
def test_nce_loss_matches_the_formula_in_value_and_gradient(t, z, n):
    g = torch.Generator().manual_seed(0)
    sim = (torch.rand(5, 9, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    got = nce_loss(sim, temperature=t, Z=z, num_data=n)
    assert got.dim() == 0
    assert got.item() == pytest.approx(reference_nce(sim.detach(), t, z, n), rel=1e-9)
    got.backward()
    # d/ds of -log(P/(P+c)) = -(1/T) c/(P+c); of -log(c/(P_j+c)) = (1/T) P_j/(P_j+c)   (c = K/N + eps)
    k, eps = sim.shape[1] - 1, float(np.finfo(np.float32).eps)
    p = torch.exp(sim.detach() / t) / z
    c = k / n + eps
    want = p / (p + c) / t
    want[:, 0] = -(c / (p[:, 0] + c)) / t
    assert torch.allclose(sim.grad, want / sim.shape[0], rtol=1e-9, atol=1e-12)


def test_info_nce_memory_loss_matches_the_formula_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    sim = (torch.rand(4, 7, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    t = 0.1
    got = info_nce_memory_loss(sim, temperature=t)
    ref = np.mean([-(float(r[0]) / t) + math.log(sum(math.exp(float(v) / t) for v in r)) for r in sim.detach()])
    assert got.item() == pytest.approx(ref, rel=1e-12)
    got.backward()
    want = torch.softmax(sim.detach() / t, dim=1)
    want[:, 0] -= 1
    assert torch.allclose(sim.grad, want / t / sim.shape[0], rtol=1e-9)


def test_partition_constant_is_the_mean_exponentiated_score_times_n():
    sim = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -1.0]])
    want = np.mean([math.exp(v / 0.07) for v in sim.flatten().tolist()]) * 100
    assert partition_constant(sim, temperature=0.07, num_data=100).item() == pytest.approx(want, rel=1e-6)


def test_scores_are_b_by_1_plus_k_with_the_positive_first_and_no_gradient_into_the_bank():
    g = torch.Generator().manual_seed(2)
    memory = F.normalize(torch.randn(50, 8, generator=g), dim=1).requires_grad_()
    z = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    target = torch.tensor([3, 7, 0, 49, 7, 12])
    idx = sample_rows(target, 20, 50, generator=g)
    assert idx.shape == (6, 21) and torch.equal(idx[:, 0], target) and idx.min() >= 0 and idx.max() < 50
    sim = memory_scores(z, memory, idx)
    assert sim.shape == (6, 21)
    assert torch.allclose(sim[:, 0], (z * memory[target]).sum(1))
    assert torch.allclose(sim, torch.einsum("bd,bkd->bk", z, memory[idx]))
    sim.sum().backward()
    assert memory.grad is None and z.grad is not None
    # the K negatives are uniform over the whole bank, the positive not excluded
    many = sample_rows(torch.zeros(2000, dtype=torch.long), 50, 50, generator=g)[:, 1:]
    counts = torch.bincount(many.flatten(), minlength=50).float()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


# ------------------------------------------------------------------------------------- data
def grid_image(size=255, cells=3):
    """Every cell of a `cells` x `cells` grid one flat colour that names it."""
    a = np.zeros((size, size, 3), np.uint8)
    step = size // cells
    for i in range(cells):
        for j in range(cells):
            a[j * step:(j + 1) * step, i * step:(i + 1) * step] = (40 + 60 * i, 40 + 60 * j, 128)
    return Image.fromarray(a)


def test_patch_geometry_255_in_3x3_cells_of_85_with_64_px_patches_at_offsets_in_each_cell():
    assert patch_geometry(255, 9, 21) == (3, 85, 64)
    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        boxes = patch_boxes(255, 9, 21)
        assert len(boxes) == 9
        for n, (left, top, right, bottom) in enumerate(boxes):
            i, j = divmod(n, 3)                         # column-major: x outer, y inner
            assert right - left == 64 and bottom - top == 64
            assert i * 85 <= left <= i * 85 + 20 and j * 85 <= top <= j * 85 + 20
            seen.update({left - i * 85, top - j * 85})
    assert seen == set(range(21))
    with pytest.raises(ConfigError, match="square"):
        patch_geometry(255, 8, 21)


def no_colour_aug(**kw) -> PIRLAugConfig:
    return PIRLAugConfig(jitter=(0.0, 0.0, 0.0, 0.0), photometric_p=0.0, gray_p=0.0, flip_p=0.0,
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kw)


def test_sample_is_an_image_and_nine_shuffled_patches_one_from_each_cell():
    tf = PatchesAndImage(no_colour_aug(jigsaw_scale=(1.0, 1.0)))
    orders = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = tf(grid_image(), index=17)
        assert out["image"].shape == (3, 224, 224) and out["patches"].shape == (9, 3, 64, 64)
        assert out["index"].item() == 17
        cells = []
        for p in out["patches"]:
            r, g = (p[0] * 255).round(), (p[1] * 255).round()
            assert r.min() == r.max() and g.min() == g.max()      # inside one cell
            cells.append((int(r[0, 0]) - 40) // 60 * 3 + (int(g[0, 0]) - 40) // 60)
        assert sorted(cells) == list(range(9))                    # one patch from every cell
        orders.add(tuple(cells))
    assert len(orders) == 8                                       # in a random order


def test_each_of_the_ten_elements_is_augmented_with_its_own_draws():
    flat = Image.new("RGB", (255, 255), (120, 120, 120))
    tf = PatchesAndImage(PIRLAugConfig(jitter=(0.4, 0.0, 0.0, 0.0), photometric_p=0.0, gray_p=0.0, flip_p=0.0,
                                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    torch.manual_seed(0)
    out = tf(flat, index=0)
    levels = [out["image"].mean().item()] + [p.mean().item() for p in out["patches"]]
    assert len({round(v, 4) for v in levels}) >= 8                # ten brightness draws (8-bit levels may tie), not one
    # and with the same per-sample seed, the same sample (what the loader relies on)
    torch.manual_seed(0)
    again = tf(flat, index=0)
    assert torch.equal(again["patches"], out["patches"])


class _Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return Image.new("RGB", (40, 40), (10 * i, 0, 0)), i


def test_seeded_dataset_passes_the_index_only_to_transforms_that_take_it():
    taking = SeededDataset(_Indexed(), make_transform(recipe("demo"), None))
    x, y = taking[(3, 123)]
    assert x["index"].item() == 3 and y == 3
    plain = SeededDataset(_Indexed(), lambda img: img.size)        # the default path is unchanged
    assert plain[(2, 5)] == ((40, 40), 2)


# ------------------------------------------------------------------------------------ model
def tiny(num_data=16, k=8, **kw) -> PIRL:
    torch.manual_seed(0)
    cfg = PIRLModelConfig(backbone=BackboneConfig(name="resnet18"), num_data=num_data, num_negatives=k, dim=8, **kw)
    return PIRL(cfg)


def tiny_batch(b=4, image=16, patch=8, seed=0, offset=0):
    g = torch.Generator().manual_seed(seed)
    x = {"image": torch.randn(b, 3, image, image, generator=g), "patches": torch.randn(b, 9, 3, patch, patch, generator=g),
         "index": torch.arange(offset, offset + b) * 3 % 16}
    return x, torch.zeros(b, dtype=torch.long)


def test_head_parameter_counts_and_the_w2_trunk():
    # built on the meta device: the same modules and shapes, without allocating or initialising 94M weights
    def heads(**kw):
        with torch.device("meta"):
            m = PIRL(PIRLModelConfig(num_data=4, **kw))
        return count_parameters(m.image_head), count_parameters(m.patch_head), m
    img, pat, m = heads()
    assert (img, pat) == (2048 * 128 + 128, 2048 * 128 + 128 + 1152 * 128 + 128) == (262_272, 409_856)
    assert count_parameters(m.backbone) == 23_508_032 and m.backbone.out_dim == 2048
    img, pat, _ = heads(head="mlp")
    mlp = 2048 * 2048 + 2048 + 2048 * 128 + 128
    assert (img, pat) == (mlp, mlp + 1152 * 128 + 128)
    img, pat, m = heads(width=2)
    assert (img, pat) == (4096 * 128 + 128, 4096 * 128 + 128 + 1152 * 128 + 128)
    assert m.backbone.out_dim == 4096 and m.backbone.conv1.out_channels == 128
    assert m.backbone.layer1[0].conv2.out_channels == 128 and m.backbone.layer4[0].conv1.out_channels == 1024
    assert count_parameters(m.backbone) == 93_907_072   # ResNet-50 (2x) as SimCLR / VISSL: 94M
    # every widened layer fits the next: the trunk and both heads run end to end (shapes, on meta)
    x, _ = tiny_batch(2, 64, 32)
    g = m.patch_head(m.backbone(x["patches"].flatten(0, 1).to("meta")))
    f = m.image_head(m.backbone(x["image"].to("meta")))
    assert g.shape == f.shape == (2, 128)


def test_trunk_starts_from_pytorchs_default_init_as_vissl_leaves_it():
    m = tiny()
    w = m.backbone.layer3[0].conv1.weight                # kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), ..)
    fan_in = w[0].numel()
    assert w.abs().max() <= 1 / math.sqrt(fan_in) and w.abs().max() > 0.95 / math.sqrt(fan_in)
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in m.backbone.modules()
               if isinstance(b, nn.BatchNorm2d))


def test_bank_rows_are_unit_after_init_and_the_update_touches_only_the_image_rows():
    mem = init_memory(1000, 128)
    assert torch.allclose(mem.norm(dim=1), torch.ones(1000), atol=1e-6)
    assert mem.abs().max() < 1 and mem.min() < 0 < mem.max()
    m = tiny()
    batch = tiny_batch()
    ref = copy.deepcopy(m)
    z_g, z_f = ref.embeddings(batch[0]["image"], batch[0]["patches"])
    before = m.memory.clone()
    m(batch, None)
    idx = batch[0]["index"]
    changed = (m.memory != before).any(dim=1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(idx.tolist())
    want = F.normalize(0.5 * before[idx] + 0.5 * z_f.detach(), dim=1)   # f(image), not g(patches)
    assert torch.allclose(m.memory[idx], want, atol=1e-6)
    assert torch.allclose(m.memory.norm(dim=1), torch.ones(16), atol=1e-6)


def test_z_is_estimated_once_from_the_patch_term_then_frozen_and_in_the_state_dict():
    m = tiny()
    rows = {}

    def draw(index, term):
        r = torch.randint(16, (index.shape[0], 9))
        r[:, 0] = index
        rows[term] = r
        return r
    m.draw_rows = draw
    batch = tiny_batch()
    ref = copy.deepcopy(m)
    mem0 = m.memory.clone()
    z_g, _ = ref.embeddings(batch[0]["image"], batch[0]["patches"])
    assert m.Z.item() < 0
    m(batch, None)
    want = partition_constant(memory_scores(z_g.detach(), mem0, rows[0]), temperature=0.07, num_data=16)
    assert m.Z.item() == pytest.approx(want.item(), rel=1e-5)
    z = m.Z.item()
    m(tiny_batch(seed=1), None)
    assert m.Z.item() == z
    state = m.state_dict()
    assert {"memory", "Z"} <= set(state)
    fresh = tiny()
    fresh.load_state_dict(state)
    assert fresh.Z.item() == z and torch.equal(fresh.memory, m.memory)
    fresh(tiny_batch(seed=2), None)
    assert fresh.Z.item() == z                                    # restored, not re-estimated
    assert "Z" not in tiny(loss="cross_entropy")(batch, None)     # InfoNCE needs no Z


def test_loss_is_half_patches_plus_half_image_and_bad_inputs_are_config_errors():
    m = tiny()
    out = m(tiny_batch(), None)
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_patches"].item() + 0.5 * out["loss_image"].item(), rel=1e-6)
    with pytest.raises(ConfigError, match="num_patches"):
        m(({"image": torch.randn(2, 3, 16, 16), "patches": torch.randn(2, 4, 3, 8, 8),
            "index": torch.tensor([0, 1])}, None), None)
    with pytest.raises(ConfigError, match="model.num_data=16"):
        tiny()(({"image": torch.randn(2, 3, 16, 16), "patches": torch.randn(2, 9, 3, 8, 8),
                 "index": torch.tensor([0, 16])}, None), None)
    with pytest.raises(ConfigError, match="aug.num_patches=4 and model.num_patches=9"):
        build(recipe("demo", "aug.num_patches=4"))


# ------------------------------------------------------------------------------ recipes, schedule
def test_recipes_match_vissl_and_the_lr_is_cosine_per_epoch_to_1e3_of_peak():
    cfg = recipe("pirl_jigsaw_4node_resnet50")
    m, a = cfg.model, cfg.aug
    assert (m.temperature, m.num_negatives, m.bank_momentum, tuple(m.loss_weights), m.num_data) == \
        (0.07, 32000, 0.5, (0.5, 0.5), 1281167)
    assert (m.loss, m.head, m.dim, m.width) == ("nce", "linear", 128, 1)
    assert (a.image_size, tuple(a.image_scale), a.jigsaw_size, tuple(a.jigsaw_scale), a.patch_jitter) == \
        (224, (0.08, 1.0), 255, (0.6, 1.0), 21)
    assert (tuple(a.jitter), a.photometric_p, a.gray_p, a.flip_p) == ((0.4, 0.4, 0.4, 0.2), 0.66, 0.2, 0.5)
    assert cfg.train.batch_size == 1024 and cfg.train.epochs == 800 and not cfg.train.sync_bn
    assert cfg.optim.name == "sgd" and (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-4)
    assert recipe("pirl_jigsaw_4node_resnet50_200ep").train.epochs == 200
    mlp = recipe("pirl_jigsaw_4node_resnet50_mlphead").model
    assert (mlp.head, mlp.loss, mlp.temperature) == ("mlp", "cross_entropy", 0.1)
    w2 = recipe("pirl_jigsaw_4node_resnet50_w2")
    assert (w2.model.width, w2.train.epochs, w2.train.amp) == (2, 400, "fp16")
    # lr: 0.03 x 1024 / 256 = 0.12, BN and biases without weight decay
    model = PIRL(PIRLModelConfig(num_data=4))
    groups = param_groups(model, cfg.optim, 1024)
    assert all(g["peak_lr"] == pytest.approx(0.12) for g in groups)
    nd = {n for g in groups if g["group"] == "no_decay" for n in g["param_names"]}
    assert "backbone.bn1.weight" in nd and "image_head.bias" in nd and "patch_head.joint.bias" in nd
    assert "backbone.conv1.weight" not in nd and "image_head.weight" not in nd
    spe = 1251                              # 1281167 // 1024
    lr = lambda epoch, within=0: 0.12 * lr_factor(epoch * spe + within, spe, 800, cfg.sched)   # noqa: E731
    assert lr(0) == pytest.approx(0.12) and lr(0, spe - 1) == lr(0)           # per epoch, no warm-up
    for epoch in (1, 200, 400, 799):        # classy CosineParamScheduler(start 0.12, end 0.00012)
        want = 0.00012 + 0.5 * (0.12 - 0.00012) * (1 + math.cos(math.pi * epoch / 800))
        assert lr(epoch) == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------- 2 processes
class FixedRows(PIRL):
    """Negatives drawn from each sample's own seed, so that any split of the batch draws the same."""
    step = 0

    def draw_rows(self, index, term):
        rows = []
        for i in index.tolist():
            g = torch.Generator().manual_seed(1000 * self.step + 10 * i + term)
            rows.append(torch.randint(self.num_data, (self.num_negatives + 1,), generator=g))
        r = torch.stack(rows)
        r[:, 0] = index
        return r


def fixed_model() -> FixedRows:
    torch.manual_seed(0)
    m = FixedRows(PIRLModelConfig(backbone=BackboneConfig(name="resnet18"), num_data=16, num_negatives=8, dim=8))
    return m.eval()      # BatchNorm on running statistics: per-sample, whatever the split


def two_steps(model, rank=0, world=1):
    out = []
    for step in range(2):
        model.step = step
        x, y = tiny_batch(8, seed=step, offset=step)
        per = 8 // world
        mine = ({k: v[rank * per:(rank + 1) * per] for k, v in x.items()}, y[rank * per:(rank + 1) * per])
        model.zero_grad()
        loss = model(mine, None)["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out.append((loss.detach(), grads, model.memory.clone(), model.Z.clone()))
    return out


def _two_process_pirl(rank, world):
    from shared import dist
    model = fixed_model()
    if rank:                                 # a bank of its own on rank 1, made identical by the first-step sync
        torch.manual_seed(101)
        model.memory.copy_(init_memory(16, 8))
    res = two_steps(model, rank, world)
    return [(loss, dist.all_reduce_mean(g), mem, z) for loss, g, mem, z in res]


@pytest.mark.dist
def test_two_processes_keep_identical_banks_equal_to_one_process_on_the_full_batch(tmp_path):
    results = run_distributed(_two_process_pirl, 2, tmp_path)
    ref_model = fixed_model()
    torch.manual_seed(101)
    other = init_memory(16, 8)
    ref_model.memory.copy_((ref_model.memory + other) / 2)   # the all-reduce mean of the two starting banks
    single = two_steps(ref_model)
    for step in range(2):
        loss, grads, mem, z = single[step]
        r0, r1 = results[0][step], results[1][step]
        assert torch.equal(r0[2], r1[2]) and r0[3].item() == r1[3].item()      # replicas identical
        assert torch.allclose(r0[2], mem, atol=1e-6)                            # = one process
        assert r0[3].item() == pytest.approx(z.item(), rel=1e-5)
        assert ((r0[0] + r1[0]) / 2).item() == pytest.approx(loss.item(), rel=1e-5)
        assert torch.allclose(r0[1], grads, rtol=1e-4, atol=1e-6) and torch.equal(r0[1], r1[1])


# ------------------------------------------------------------------------------- kill and resume
class Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_bank_z_and_weights(tmp_path):
    from shared.data.loader import build_image_dataset
    from shared.engine import fit
    over = ["data.synthetic.length=16", "data.synthetic.image_size=16", "data.workers=0", "aug.image_size=16",
            "aug.jigsaw_size=18", "aug.patch_jitter=2", "model.num_negatives=16", "model.loss=nce",
            "model.temperature=0.07", "train.batch_size=8",
            "train.epochs=2", "train.log_every=1", "train.tensorboard=false", "eval.after_train=[]",
            "eval.compare_random_init=false"]

    def run(out, stop_at=None):
        cfg = recipe("demo", *over, f"train.out_dir={out}")
        torch.manual_seed(cfg.train.seed)
        model = build(cfg)
        ds = build_image_dataset(cfg.data, "train")

        def hook(_, epoch):
            if epoch == stop_at:
                raise Killed
        return fit(cfg, model, ds, make_transform(cfg, model), method="pirl", on_epoch_end=hook).model

    full = run(tmp_path / "full")
    with pytest.raises(Killed):
        run(tmp_path / "killed", stop_at=1)                    # after epoch 0's checkpoint, before epoch 1's
    saved = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["model"]["Z"].item() > 0
    resumed = run(tmp_path / "killed")
    assert resumed.Z.item() == full.Z.item() == saved["model"]["Z"].item()
    assert torch.allclose(resumed.memory, full.memory, atol=1e-6)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), n
