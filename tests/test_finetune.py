"""End-to-end fine-tuning (DeiT recipe, as MoCo v3 uses it): the schedule against timm's scheduler
stepped as DeiT steps it, parameter groups (no weight decay, layer-wise lr decay) computed by hand,
mixup/cutmix against timm's Mixup, and a tiny fine-tune that checkpoints and resumes."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import RunConfig, build_config
from shared.data.synthetic import SyntheticShapes
from shared.errors import ConfigError
from shared.eval.finetune import (Finetuner, MixupCutmix, finetune, finetune_backbone, finetune_config,
                                  no_weight_decay_rules, smooth_one_hot, soft_target_cross_entropy, train_transform)
from shared.eval.linear import fingerprint
from shared.models import build_backbone
from shared.optim import apply_schedule, build_optimizer, param_groups

TINY_VIT = ["model.backbone.name=vit_tiny_patch16_224", "model.backbone.img_size=32",
            "model.backbone.kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"]


def _cfg(tmp_path: Path, *extra: str) -> RunConfig:
    return build_config(RunConfig, [], [
        *TINY_VIT, "data.workers=0", "train.tensorboard=false", "train.log_every=1", f"train.out_dir={tmp_path}",
        "eval.image_size=32", "eval.resize=36", "eval.knn.batch_size=32", "eval.after_train=[]",
        "eval.finetune.epochs=2", "eval.finetune.batch_size=16", "eval.finetune.warmup_epochs=1", *extra])


def _tiny_data(classes: int = 4):
    train, val = SyntheticShapes(64, 32, classes), SyntheticShapes(32, 32, classes, split="val")
    return train, val


def _model(cfg: RunConfig, num_classes: int = 4, layer_decay: float = 1.0) -> Finetuner:
    torch.manual_seed(0)
    backbone = finetune_backbone(cfg, build_backbone(cfg.model.backbone))
    return Finetuner(backbone, num_classes, MixupCutmix(num_classes), layer_decay=layer_decay)


# ------------------------------------------------------------------------------------ schedule
def test_schedule_is_timm_cosine_stepped_after_each_epoch_as_deit(tmp_path):
    """DeiT: `create_scheduler` (CosineLRScheduler, t_in_epochs) then `lr_scheduler.step(epoch)` after
    each epoch. Every step of every epoch must get the lr timm's scheduler holds during that epoch."""
    from timm.scheduler import CosineLRScheduler
    epochs, spe, batch = 150, 3, 1024
    cfg = _cfg(tmp_path, f"eval.finetune.epochs={epochs}", f"eval.finetune.batch_size={batch}",
               "eval.finetune.warmup_epochs=5")
    fcfg = finetune_config(cfg, tmp_path)
    peak = 5e-4 * batch / 512
    w = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer(param_groups(nn.ParameterList([w]), fcfg.optim, batch), fcfg.optim)
    ref_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=peak)
    ref = CosineLRScheduler(ref_opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5,
                            cycle_limit=1, t_in_epochs=True)
    ours = []
    for e in range(epochs):
        for i in range(spe):
            apply_schedule(opt, e * spe + i, spe, epochs, fcfg.sched)
            assert math.isclose(opt.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"], rel_tol=1e-9), (e, i)
        ours.append(opt.param_groups[0]["lr"])
        ref.step(e)
    # the values at chosen epochs, by hand
    cos = lambda t: 1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * t / epochs))  # noqa: E731
    assert math.isclose(ours[0], 1e-6) and math.isclose(ours[1], 1e-6)         # the warm-up lr, twice
    assert math.isclose(ours[2], 1e-6 + (peak - 1e-6) / 5)
    assert math.isclose(ours[5], 1e-6 + 4 * (peak - 1e-6) / 5)
    assert math.isclose(ours[6], cos(5)) and ours[6] < peak and max(ours) == ours[6]  # peak never reached
    assert math.isclose(ours[-1], cos(epochs - 2)) and ours[-1] > 1e-5          # nor min_lr
    assert fcfg.optim.name == "adamw" and tuple(fcfg.optim.betas) == (0.9, 0.999) and fcfg.optim.eps == 1e-8
    assert fcfg.train.drop_last and fcfg.train.batch_size == batch and not fcfg.train.sync_bn


def _first_and_last_lr(cfg: RunConfig, tmp_path: Path, spe: int):
    """The lr the fine-tune's schedule applies at its first and its last iteration."""
    fcfg = finetune_config(cfg, tmp_path)
    opt = build_optimizer(param_groups(nn.ParameterList([nn.Parameter(torch.zeros(2, 2))]), fcfg.optim,
                                       fcfg.train.batch_size), fcfg.optim)
    out = []
    for t in (0, spe * fcfg.train.epochs - 1):
        apply_schedule(opt, t, spe, fcfg.train.epochs, fcfg.sched)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("batch", [1024, 2048])
def test_warmup_and_min_lr_of_the_simmim_and_deit_recipes(tmp_path, batch):
    """SimMIM's main_finetune.py multiplies BASE_LR, WARMUP_LR and MIN_LR (1.25e-3, 2.5e-7, 2.5e-7) by
    batch / 512: the schedule starts and ends at 1e-6 at batch 2048, 5e-7 at 1024. DeiT (MoCo v3's
    fine-tune) scales only the lr: warm-up from 1e-6 and floor 1e-5 at any batch."""
    from mocov3.train import Config as MoCoConfig
    from simmim.train import Config as SimMIMConfig
    root = Path(__file__).resolve().parents[1]
    spe = 100                                         # iterations per epoch
    cfg = build_config(SimMIMConfig, [root / "simmim/configs/vit_base_800ep.yaml"],
                       ["data.root=/x", f"eval.finetune.batch_size={batch}"])
    first, last = _first_and_last_lr(cfg, tmp_path, spe)
    peak, floor, total = 1.25e-3 * batch / 512, 2.5e-7 * batch / 512, spe * 100
    assert math.isclose(first, floor, rel_tol=1e-9)
    # timm's per-iteration cosine over all iterations, warm-up included, at the last one
    assert math.isclose(last, floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)),
                        rel_tol=1e-9)
    assert math.isclose(last, floor, rel_tol=1e-3)
    cfg = build_config(MoCoConfig, [root / "mocov3/configs/vit_base_300ep.yaml"],
                       ["data.root=/x", f"eval.finetune.batch_size={batch}"])
    first, last = _first_and_last_lr(cfg, tmp_path, spe)
    peak, epochs = 5e-4 * batch / 512, 150
    assert math.isclose(first, 1e-6, rel_tol=1e-9)
    # epoch-wise, one epoch behind: the last epoch trains at the value for epoch 148 of 150
    assert math.isclose(last, 1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * (epochs - 2) / epochs)),
                        rel_tol=1e-9)


def test_default_recipe_is_deit():
    fc = RunConfig().eval.finetune
    assert (fc.epochs, fc.batch_size, fc.lr, fc.lr_ref_batch, fc.weight_decay) == (300, 1024, 5e-4, 512, 0.05)
    assert (fc.warmup_epochs, fc.warmup_lr, fc.min_lr, fc.drop_path, fc.layer_decay) == (5, 1e-6, 1e-5, 0.1, 1.0)
    assert not fc.scale_warmup_min_lr                 # absolute, as DeiT's arguments
    assert (fc.rand_augment, fc.reprob, fc.remode, fc.recount, fc.color_jitter) == (
        "rand-m9-mstd0.5-inc1", 0.25, "pixel", 1, 0.4)
    assert (fc.mixup, fc.cutmix, fc.mixup_prob, fc.mixup_switch_prob, fc.smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
    assert (fc.repeated_aug, fc.model_ema, fc.model_ema_decay, fc.eval_ema) == (3, True, 0.99996, False)


# -------------------------------------------------------------------------------- param groups
def test_param_groups_without_layer_decay_match_timm(tmp_path):
    from timm.optim import param_groups_weight_decay
    cfg = _cfg(tmp_path)
    model = _model(cfg)
    fcfg = finetune_config(cfg, tmp_path, no_weight_decay_rules(model.backbone))
    groups = param_groups(model, fcfg.optim, 16)
    assert [g["group"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = (set(g["param_names"]) for g in groups)
    assert decay == {"backbone.patch_embed.proj.weight", "head.weight",
                     *(f"backbone.blocks.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))}
    assert {"backbone.pos_embed", "backbone.cls_token", "head.bias", "backbone.norm.weight"} <= no_decay
    assert all(g["peak_lr"] == 5e-4 * 16 / 512 for g in groups)
    assert groups[0]["base_wd"] == 0.05 and groups[1]["base_wd"] == 0.0
    # timm's create_optimizer filter, on the backbone alone
    ref_no_decay, ref_decay = param_groups_weight_decay(model.backbone, 0.05, no_weight_decay_list=model.backbone.no_weight_decay())
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(ref_decay["params"]) == ids(groups[0]["params"]) - {id(model.head.weight)}
    assert ids(ref_no_decay["params"]) == ids(groups[1]["params"]) - {id(model.head.bias)}


def test_layer_decay_scales_for_a_depth_2_vit(tmp_path):
    """depth 2, decay 0.5: embeddings (layer 0) 0.5^3, block 0 0.5^2, block 1 0.5, norm and head 1."""
    cfg = _cfg(tmp_path, "eval.finetune.layer_decay=0.5")
    model = _model(cfg, layer_decay=0.5)
    fcfg = finetune_config(cfg, tmp_path, no_weight_decay_rules(model.backbone))
    groups = param_groups(model, fcfg.optim, 16)
    scale = {n: (g["lr_scale"], g["group"]) for g in groups for n in g["param_names"]}
    expect = {"backbone.cls_token": 0.125, "backbone.pos_embed": 0.125, "backbone.patch_embed.proj.weight": 0.125,
              "backbone.patch_embed.proj.bias": 0.125, "backbone.blocks.0.attn.qkv.weight": 0.25,
              "backbone.blocks.0.norm1.bias": 0.25, "backbone.blocks.1.mlp.fc2.weight": 0.5,
              "backbone.norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    assert {n: scale[n][0] for n in expect} == expect
    assert len(scale) == sum(1 for p in model.parameters())
    assert [(g["group"], g["lr_scale"]) for g in groups] == [
        ("decay", 1.0), ("decay", 0.5), ("decay", 0.25), ("decay", 0.125),
        ("no_decay", 1.0), ("no_decay", 0.5), ("no_decay", 0.25), ("no_decay", 0.125)]
    for g in groups:
        assert math.isclose(g["peak_lr"], 5e-4 * 16 / 512 * g["lr_scale"])
    opt = build_optimizer(groups, fcfg.optim)
    apply_schedule(opt, 0, 4, 2, fcfg.sched)    # the whole schedule scales: warm-up lr x scale
    assert all(math.isclose(g["lr"], 1e-6 * g["lr_scale"]) for g in opt.param_groups)
    with pytest.raises(ConfigError, match="layer_decay=0.5 needs a ViT"):
        lin = nn.Linear(3, 3)
        lin.out_dim = 3
        Finetuner(lin, 4, MixupCutmix(4), layer_decay=0.5)


# ---------------------------------------------------------------------------- mixup / cutmix
def _rand_bbox_timm_0_3_2(img_shape, lam, margin=0., count=None):
    """timm 0.3.2 (DeiT's pinned version): both half-sides of the box round down; timm >= 0.9 rounds
    the upper one up. Everything else in the comparison below is the installed timm's Mixup."""
    h, w = img_shape[-2:]
    r = np.sqrt(1 - lam)
    ch, cw = int(h * r), int(w * r)
    cy, cx = np.random.randint(0, h, size=count), np.random.randint(0, w, size=count)
    return (np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h),
            np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w))


@pytest.mark.parametrize("mixup,cutmix,prob", [(0.8, 1.0, 1.0), (0.8, 0.0, 1.0), (0.0, 1.0, 1.0), (0.8, 1.0, 0.5)])
def test_mixup_cutmix_match_timm(monkeypatch, mixup, cutmix, prob):
    import timm.data.mixup as tm
    monkeypatch.setattr(tm, "rand_bbox", _rand_bbox_timm_0_3_2)
    ref = tm.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=0.5, mode="batch",
                   label_smoothing=0.1, num_classes=10)
    ours = MixupCutmix(10, mixup, cutmix, prob, 0.5, 0.1)
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for seed in range(40):
        x = torch.randn(6, 3, 13, 11, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        np.random.seed(seed)
        rx, rt = ref(x.clone(), y.clone())
        ox, ot = ours(x.clone(), y, np.random.RandomState(seed))
        assert torch.equal(ox, rx) and torch.allclose(ot, rt, rtol=0, atol=1e-7)
        assert torch.allclose(ot.sum(1), torch.ones(6)) and ot.min() >= 0.01 - 1e-7
        kinds.add("none" if torch.equal(ox, x) else "cut" if (ox == x).any() else "mix")
    assert kinds >= ({"mix"} if cutmix == 0 else {"cut"} if mixup == 0 else {"mix", "cut"})
    assert prob == 1 or "none" in kinds     # (a cutmix box can also be empty)


def test_no_mixing_is_label_smoothing_cross_entropy():
    from timm.loss import LabelSmoothingCrossEntropy
    mix = MixupCutmix(5, mixup=0.0, cutmix=0.0, smoothing=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 4, 1])
    ox, t = mix(x, y)
    assert ox is x and torch.allclose(t, smooth_one_hot(y, 5, 0.1))
    assert torch.allclose(t[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    logits = torch.randn(4, 5)
    loss = soft_target_cross_entropy(logits, t)
    assert torch.allclose(loss, F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(loss, LabelSmoothingCrossEntropy(0.1)(logits, y))


def test_train_transform_is_seeded_by_torch_and_leaves_global_generators_alone(tmp_path):
    cfg = _cfg(tmp_path)
    tf = train_transform(cfg)
    img = SyntheticShapes(2, 32, 4)[0][0]
    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(3)
    a = tf(img)
    torch.manual_seed(3)
    b = tf(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert (random.random(), np.random.rand()) == before
    names = [type(t).__name__ for t in tf.transform.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing" and "ColorJitter" not in names
    posterize = [op for op in tf.transform.transforms[2].ops if op.name == "PosterizeIncreasing"][0].aug_fn
    assert np.asarray(posterize(img, 0)).max() == 0 and posterize(img, 4).size == img.size


# ------------------------------------------------------------------------------- end to end
def test_finetune_runs_checkpoints_and_resumes(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    train, val = _tiny_data()
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    pos_before = backbone.pos_embed.detach().clone()
    before = fingerprint(backbone)
    out = tmp_path / "ft"
    res = finetune(cfg, backbone, train, val, 4, out)
    assert set(res) == {"top1", "top5", "best_top1"} and 0 <= res["top1"] <= res["best_top1"] <= 100
    assert fingerprint(backbone) == before          # the caller's backbone is not trained
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 8 and state["model"]["head.weight"].shape == (4, 32)
    assert not torch.equal(state["model"]["backbone.pos_embed"], pos_before)   # the backbone was fine-tuned
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(8))
    assert len([r for r in records if "top1" in r]) == 2
    mtime = (out / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    again = finetune(cfg, backbone, train, val, 4, out)
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 8/8" in printed
    assert again == res and (out / "last.pt").stat().st_mtime_ns == mtime
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_evaluate_after_training_runs_finetune(tmp_path):
    from shared.eval import evaluate_after_training
    cfg = _cfg(tmp_path, "data.synthetic.length=32", "data.synthetic.val_length=16", "data.synthetic.image_size=32",
               "data.synthetic.num_classes=4", "eval.finetune.epochs=1")
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    res = evaluate_after_training(cfg, backbone, tmp_path, ["finetune"])
    assert set(res["pretrained"]) == {"finetune"}
    assert json.loads((tmp_path / "eval.json").read_text())["pretrained"]["finetune"] == res["pretrained"]["finetune"]
    assert (tmp_path / "finetune_pretrained" / "last.pt").is_file()
    with pytest.raises(ConfigError, match="expected knn, linear, finetune"):
        evaluate_after_training(cfg, backbone, tmp_path, ["finetuning"])


def test_eval_command_finetunes_a_backbone_state_dict(tmp_path):
    import yaml
    from conftest import run_cli
    recipe = {"model": {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32,
                                     "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}},
              "data": {"workers": 0, "synthetic": {"length": 32, "val_length": 16, "image_size": 32, "num_classes": 4}},
              "train": {"tensorboard": False, "device": "cpu"},
              "eval": {"image_size": 32, "resize": 36, "knn": {"batch_size": 16},
                       "finetune": {"epochs": 1, "batch_size": 16, "warmup_epochs": 1, "layer_decay": 0.75}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    torch.manual_seed(0)
    torch.save(build_backbone(_cfg(tmp_path).model.backbone).state_dict(), tmp_path / "backbone.pt")
    r = run_cli(["-m", "shared.eval", str(tmp_path / "backbone.pt"), "--config", str(tmp_path / "recipe.yaml"),
                 "--what", "finetune"])
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(res["pretrained"]["finetune"]) == {"top1", "top5", "best_top1"} and "finetune top-1" in r.stdout
