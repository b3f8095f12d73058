"""JigClu: the crop geometry, the montages and their labels, the cell order of the features, SupClu
loss parity with the paper's formula (values, gradients, the temperature / base scale), the head
sizes, the official lr formula with min_lr, a 2-process gloo run against the single-process run
on the same global batch and permutation, and the same montages after kill-and-resume."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from jigclu.data import JigCluTransform, crop_boxes, make_transform
from jigclu.loss import jigclu_loss, location_loss, supcon_loss
from jigclu.model import JigClu, JigCluModelConfig, build_montages, cell_rows, permutation
from jigclu.train import Config, apply_min_lr, build
from shared import dist
from shared.config import BackboneConfig, build_config
from shared.data.loader import build_image_dataset
from shared.engine import StepContext, fit
from shared.errors import ConfigError
from shared.models import count_parameters
from shared.optim import lr_factor

from conftest import ROOT, run_distributed

CONFIGS = ROOT / "jigclu/configs"


def recipe(name: str, *overrides: str) -> Config:
    return build_config(Config, [CONFIGS / f"{name}.yaml"], ["data.root=/data", *overrides])


def ctx(step: int = 0, batch: int = 8) -> StepContext:
    return StepContext(step, 0, 10, 100, 1.0, None, batch, 1)


def tiny_model(seed: int = 0, **kw) -> JigClu:
    torch.manual_seed(seed)
    return JigClu(JigCluModelConfig(backbone=BackboneConfig(name="resnet18"), dim=16, **kw), seed=3)


# ------------------------------------------------------------------------------------------ data
def test_crop_boxes_official_geometry_and_order():
    assert crop_boxes(500, 400, 0.3) == [(0, 0, 400, 320), (0, 80, 400, 400), (100, 0, 500, 320), (100, 80, 500, 400)]
    # odd sizes: W // 2 first, then + cross * W in floats, then PIL's round (half to even)
    # 187 + 112.5 -> 300 and 187 - 112.5 -> 74 (half to even)
    assert crop_boxes(375, 500, 0.3) == [(0, 0, 300, 400), (0, 100, 300, 500), (74, 0, 375, 400), (74, 100, 375, 500)]
    assert crop_boxes(5, 5, 0.1) == [(0, 0, 2, 2), (0, 2, 2, 5), (2, 0, 5, 2), (2, 2, 5, 5)]   # 2.5 -> 2, 1.5 -> 2
    assert crop_boxes(64, 64, 0.0) == [(0, 0, 32, 32), (0, 32, 32, 64), (32, 0, 64, 32), (32, 32, 64, 64)]
    with pytest.raises(ConfigError, match="cross_ratio"):
        crop_boxes(10, 10, 0.6)


def test_transform_crops_the_boxes_in_order_then_augments_each():
    img = Image.fromarray(torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8).numpy())   # W 50, H 40
    tf = make_transform(recipe("demo"))
    assert isinstance(tf, JigCluTransform) and tf.cross == 0.3 and tf.size == 32
    crops = tf(img)
    assert len(crops) == 4 and all(c.shape == (3, 32, 32) for c in crops)
    tf.pipeline = TF.to_tensor                                             # no augmentation: the raw crops
    raw = TF.to_tensor(img)
    for crop, (l, u, r, b) in zip(tf(img), crop_boxes(50, 40, 0.3)):
        assert torch.equal(crop, raw[:, u:b, l:r])
    with pytest.raises(ConfigError, match="exactly one view"):
        make_transform(recipe("demo", "aug.views.0.n=2"))


# -------------------------------------------------------------------------------------- montages
def tagged_crops(n: int, s: int = 4) -> torch.Tensor:
    """(4n, 1, s, s): crop c = position * n + image filled with the value c."""
    return torch.arange(4 * n, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, s, s).clone()


def test_montage_cells_are_the_permuted_crops_and_labels_come_from_the_permutation():
    n, s = 5, 4
    perm = torch.randperm(4 * n, generator=torch.Generator().manual_seed(1))
    crops = torch.randn(4 * n, 3, s, s)
    m = build_montages(crops, perm)
    assert m.shape == (n, 3, 2 * s, 2 * s)
    for j in range(n):
        assert torch.equal(m[j, :, :s, :s], crops[perm[j]])                  # TL <- quarter 0
        assert torch.equal(m[j, :, :s, s:], crops[perm[n + j]])              # TR <- quarter 1
        assert torch.equal(m[j, :, s:, :s], crops[perm[2 * n + j]])          # BL <- quarter 2
        assert torch.equal(m[j, :, s:, s:], crops[perm[3 * n + j]])          # BR <- quarter 3
    # labels: crop c is image c % n at position c // n; every image has exactly 4 members
    tags = build_montages(tagged_crops(n, s), perm)
    rows = cell_rows(F.adaptive_avg_pool2d(tags, 2)).view(-1)               # the decoupled cells, TL TR BL BR
    assert torch.equal(rows.long(), perm)                                    # row k holds crop perm[k]
    images, positions = perm % n, perm // n
    assert torch.equal(torch.bincount(images, minlength=n), torch.full((n,), 4))
    for i in range(n):                                                      # the 4 members are the 4 positions
        assert sorted(positions[images == i].tolist()) == [0, 1, 2, 3]


def test_cell_features_are_aligned_with_the_permutation_through_the_resize_and_pool():
    # montages whose cells hold their crop's index, through the model's 8x8 bilinear resize and 2x2 pool
    n = 3
    perm = torch.randperm(4 * n, generator=torch.Generator().manual_seed(2))
    mont = build_montages(tagged_crops(n, 4), perm)
    cells = F.adaptive_avg_pool2d(F.interpolate(mont, size=(8, 8), mode="bilinear", align_corners=False), 2)
    assert torch.allclose(cell_rows(cells).view(-1), perm.float())


def test_permutation_is_a_function_of_seed_and_step():
    a, b = permutation(0, 7, 32, torch.device("cpu")), permutation(0, 7, 32, torch.device("cpu"))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(32))
    assert not torch.equal(a, permutation(0, 8, 32, torch.device("cpu")))
    assert not torch.equal(a, permutation(1, 7, 32, torch.device("cpu")))


# ------------------------------------------------------------------------------------------ loss
def reference_supcon(z, labels, t, base):
    """The paper's L = (1/N) sum_i -(t/base) (1/|P(i)|) sum_{p in P(i)} log( e^{z_i.z_p/t} / sum_{k != i} e^{z_i.z_k/t} ), written out."""
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        den = sum(torch.exp(torch.dot(z[i], z[k]) / t) for k in range(n) if k != i)
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        total = total - (t / base) * sum(torch.log(torch.exp(torch.dot(z[i], z[p]) / t) / den) for p in pos) / len(pos)
    return total / n


@pytest.mark.parametrize("n,d,t", [(3, 8, 0.3), (4, 5, 0.07), (2, 16, 1.0)])
def test_supcon_loss_and_gradients_match_the_formula(n, d, t):
    g = torch.Generator().manual_seed(n)
    labels = torch.randperm(4 * n, generator=g) % n
    z = F.normalize(torch.randn(4 * n, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    ours = supcon_loss(z, labels, t)
    (g1,) = torch.autograd.grad(ours, z)
    ref = reference_supcon(z, labels, t, 0.07)
    (g2,) = torch.autograd.grad(ref, z)
    assert torch.allclose(ours, ref, atol=1e-10)
    assert torch.allclose(g1, g2, atol=1e-10)


def test_supcon_temperature_over_base_scale_is_4_2857_with_the_readme_temperature():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % 4
    z = F.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    scaled, plain = supcon_loss(z, labels, 0.3), supcon_loss(z, labels, 0.3, base_temperature=0.3)
    assert torch.allclose(scaled, plain * (0.3 / 0.07)) and 0.3 / 0.07 == pytest.approx(4.2857, abs=1e-4)
    # a closed form: each image's 4 rows equal, images orthogonal (3 positives at 1/t, 12 negatives at 0)
    z = torch.eye(4, dtype=torch.float64).repeat_interleave(4, 0)
    labels = torch.arange(4).repeat_interleave(4)
    e1, e0 = math.exp(1 / 0.3), 1.0
    expected = -(0.3 / 0.07) * math.log(e1 / (3 * e1 + 12 * e0))
    assert supcon_loss(z, labels, 0.3).item() == pytest.approx(expected)


def test_location_loss_is_cross_entropy_and_the_total_weights():
    g = torch.Generator().manual_seed(0)
    n = 3
    perm = torch.randperm(4 * n, generator=g)
    z = F.normalize(torch.randn(4 * n, 8, generator=g), dim=1)
    logits = torch.randn(4 * n, 4, generator=g)
    assert torch.allclose(location_loss(logits, perm // n), F.cross_entropy(logits, perm // n))
    total, clu, loc = jigclu_loss(z, logits, perm, n, 0.3, 0.07, 1.0, 1.0)
    assert torch.allclose(clu, supcon_loss(z, perm % n, 0.3)) and torch.allclose(total, clu + loc)
    total2, _, _ = jigclu_loss(z, logits, perm, n, 0.3, 0.07, 0.5, 2.0)
    assert torch.allclose(total2, 0.5 * clu + 2.0 * loc)


# ----------------------------------------------------------------------------------------- model
def test_head_parameter_counts_resnet50():
    model = JigClu(JigCluModelConfig())
    assert count_parameters(model.fc_clu) == 4_458_624       # 2048-2048 + 2048-128, biases, no BN
    assert count_parameters(model.fc_loc) == 8_196           # 2048-4
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.fc_clu.modules())
    assert count_parameters(model.backbone) == 23_508_032    # torchvision ResNet-50 without fc
    with pytest.raises(ConfigError, match="torchvision ResNet"):
        JigClu(JigCluModelConfig(backbone=BackboneConfig(name="vit_tiny_patch16_224")))


def test_forward_is_the_loss_of_the_decoupled_cells_and_layer4_goes_through_8x8():
    model = tiny_model()
    n, s = 4, 32
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(n, 3, s, s, generator=g) for _ in range(4)]
    out = model((crops, torch.zeros(n)), ctx(5, n))
    assert set(out) == {"loss", "loss_clu", "loss_loc", "loc_acc"}
    perm = permutation(3, 5, 4 * n, torch.device("cpu"))
    mont = build_montages(torch.cat(crops), perm)
    fmap = model.backbone.forward_intermediates(mont, [3])[0]
    assert fmap.shape == (n, 512, 2, 2)
    cells = F.adaptive_avg_pool2d(F.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False), 2)
    rows = cell_rows(cells)
    z = F.normalize(model.fc_clu(rows), dim=1)
    loss, clu, loc = jigclu_loss(z, model.fc_loc(rows), perm, n, 0.3)
    assert torch.allclose(out["loss"], loss, atol=1e-5) and torch.allclose(out["loss_clu"], clu, atol=1e-5)
    with pytest.raises(ConfigError, match="4 crops"):
        model((crops[:2], torch.zeros(n)), ctx())


# ------------------------------------------------------------------------------------ schedule
def official_lr(lr, epoch, epochs, min_lr):
    return lr * ((0.5 - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr)


@pytest.mark.parametrize("m", [0.0, 0.01, 0.2])
def test_lr_is_the_official_per_epoch_cosine_with_min_lr(m):
    cfg = apply_min_lr(recipe("jigclu_imagenet_200ep", f"model.min_lr={m}"))
    spe, epochs = 5004, cfg.train.epochs
    for epoch in (0, 1, 57, 100, 199):
        for within in (0, 1234):
            f = lr_factor(epoch * spe + within, spe, epochs, cfg.sched)
            assert cfg.optim.lr * f == pytest.approx(official_lr(0.03, epoch, epochs, m), rel=1e-12)
    with pytest.raises(ConfigError, match="min_lr"):
        apply_min_lr(recipe("jigclu_imagenet_200ep", "model.min_lr=0.1", "sched.final=0.1"))


def test_headline_recipe_is_the_readme_command():
    cfg = recipe("jigclu_imagenet_200ep")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_ref_batch, cfg.optim.weight_decay, cfg.optim.momentum) == \
        ("sgd", 0.03, 0, 1e-4, 0.9) and cfg.optim.no_decay == []
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.sync_bn) == (200, 256, True)
    assert (cfg.model.temperature, cfg.model.base_temperature, cfg.model.cross_ratio, cfg.model.dim) == (0.3, 0.07, 0.3, 128)
    (v,) = cfg.aug.views
    assert (v.size, tuple(v.crop_scale), tuple(v.jitter), v.jitter_p, v.gray_p, v.blur_p, tuple(v.blur_sigma)) == \
        (112, (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, (0.1, 2.0))
    assert v.order == ["crop", "jitter", "gray", "blur", "flip"]
    assert cfg.sched.per_epoch and cfg.sched.kind == "cosine" and cfg.sched.warmup_epochs == 0


# --------------------------------------------------------------------------------- 2 processes
N_GLOBAL, CROP = 8, 32


def _global_crops():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(N_GLOBAL, 3, CROP, CROP, generator=g) for _ in range(4)]


def _step(model, crops, step):
    out = model((crops, torch.zeros(crops[0].shape[0])), ctx(step, N_GLOBAL))
    out["loss"].backward()
    mont, perm, _ = model.montages(crops, step)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out, mont, perm, grads


def _two_process_step(rank, world):
    model = dist.convert_sync_batchnorm(tiny_model(), torch.device("cpu"))     # GlobalBatchNorm, as the engine does
    b = N_GLOBAL // world
    crops = [c[rank * b:(rank + 1) * b] for c in _global_crops()]
    out, mont, perm, grads = _step(model, crops, step=4)
    grads = {k: dist.all_reduce_mean(v) for k, v in grads.items()}             # what DDP's gradient average gives
    return {k: v.detach() for k, v in out.items()}, mont, perm, grads


@pytest.mark.dist
def test_two_process_run_equals_the_single_process_run(tmp_path):
    results = run_distributed(_two_process_step, 2, tmp_path)
    out, mont, perm, grads = _step(tiny_model(), _global_crops(), step=4)
    assert torch.equal(results[0][2], perm) and torch.equal(results[1][2], perm)    # one permutation, from seed + step
    assert torch.equal(torch.cat([results[0][1], results[1][1]]), mont)              # each rank its slice of the montages
    for r in range(2):
        for k in ("loss", "loss_clu", "loss_loc"):
            assert torch.allclose(results[r][0][k], out[k].detach(), atol=1e-5), k
        for k, v in grads.items():
            assert torch.allclose(results[r][3][k], v, atol=1e-5, rtol=1e-4), k


# ------------------------------------------------------------------------------- resume, montages
class _Recording(JigClu):
    """JigClu that records each step's montage checksum and loss, and can be killed at a step."""
    log: list = []
    kill_at = -1

    def forward(self, batch, ctx):
        if ctx.step == self.kill_at:
            raise KeyboardInterrupt("killed")
        mont, _, _ = self.montages(batch[0], ctx.step)
        out = super().forward(batch, ctx)
        self.log.append((ctx.step, float(mont.double().sum()), float(mont.double().abs().sum()), float(out["loss"].detach())))
        return out


def _fit(out_dir, kill_at):
    cfg = recipe("demo", "data.synthetic.length=16", "data.synthetic.val_length=16", "data.synthetic.image_size=32",
                 "data.workers=0", "aug.views.0.size=16", "train.batch_size=4", "train.epochs=2",
                 "train.ckpt_every_steps=5", "train.tensorboard=false", "eval.after_train=[]", f"train.out_dir={out_dir}")
    torch.manual_seed(0)
    model = _Recording(replace(cfg.model, backbone=BackboneConfig(name="resnet18"), dim=16), seed=cfg.train.seed)
    model.log, model.kill_at = [], kill_at
    try:
        fit(cfg, model, build_image_dataset(cfg.data, "train"), make_transform(cfg), method="jigclu")
    except KeyboardInterrupt:
        pass
    return model.log


def test_killed_run_resumes_with_the_same_montages_and_losses(tmp_path):
    full = _fit(tmp_path / "full", -1)
    first = _fit(tmp_path / "killed", 5)
    resumed = _fit(tmp_path / "killed", -1)
    assert [s for s, *_ in full] == list(range(8)) and [s for s, *_ in first] == list(range(5))
    assert [s for s, *_ in resumed] == [5, 6, 7]
    assert first == full[:5]
    for a, b in zip(resumed, full[5:]):
        assert a[:3] == b[:3]                                   # the same montages
        assert a[3] == pytest.approx(b[3], rel=1e-6)            # and the same state


# ------------------------------------------------------------------------------------- transfer
def test_coco_detection_config_merges_with_the_official_values():
    from conftest import import_or_skip
    import_or_skip("detectron2", reason="detectron2 is not installed (the transfer environment)")
    from detectron2.config import get_cfg
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "detectron2" / "coco_r50_fpn_jigclu_180k.yaml"))
    assert (cfg.MODEL.MASK_ON, cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM) == \
        (False, 0, "SyncBN", "SyncBN")
    assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC, cfg.MODEL.ROI_BOX_HEAD.NORM) == (4, 1, "SyncBN")
    assert (cfg.MODEL.RESNETS.STRIDE_IN_1X1, cfg.INPUT.FORMAT, cfg.TEST.PRECISE_BN.ENABLED) == (False, "RGB", True)
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.MAX_ITER) == \
        (8, 0.01, (120000, 160000), 180000)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32)) and cfg.DATASETS.TRAIN == ("coco_2017_train",)


def test_our_checkpoint_converts_to_detectron2_names_without_the_heads(tmp_path):
    from shared import checkpoint as ckpt
    from shared.config import to_dict
    from shared.transfer.convert import read_backbone, to_detectron2
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.training_state(model, opt, torch.amp.GradScaler("cuda", enabled=False), 1, 0, to_dict(recipe("demo")),
                                "jigclu")
    torch.save(state, tmp_path / "last.pt")
    sd, _ = read_backbone(tmp_path / "last.pt")
    names = set(to_detectron2(sd, "jigclu")["model"])
    assert "stem.conv1.weight" in names and "stem.conv1.norm.running_mean" in names
    assert "res5.1.conv2.norm.weight" in names and not any("fc" in n for n in names)
