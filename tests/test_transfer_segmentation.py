"""mmseg side of the transfer: the shipped protocol configs (their numbers), our mmseg parts (synthetic dataset,
layer-wise lr decay for ViT/Swin), the weights-fit check, and the train entry end to end on CPU.
Needs mmsegmentation (the transfer environment, `make transfer-env`); skips without it, except under
`make transfer-test` (REQUIRE_TRANSFER_STACK), where a failed import fails."""
from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
import torchvision

from conftest import ROOT, import_or_skip, run_cli

import_or_skip("mmseg", reason="mmsegmentation is not installed (make transfer-env builds .venv-transfer)")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402

from shared.data.synthetic import export  # noqa: E402
from shared.transfer import segmentation as seg  # noqa: E402
from shared.transfer.convert import to_mmseg  # noqa: E402

CONFIGS = ROOT / "shared" / "transfer" / "configs" / "mmseg"
VOC = CONFIGS / "fcn_d8_r50v1b_voc12aug_512x512_20k.py"
CITYSCAPES = CONFIGS / "fcn_d8_r50v1b_cityscapes_769x769_40k.py"
VIT = CONFIGS / "upernet_vit_b16_ade20k_512x512_160k.py"
SWIN = CONFIGS / "upernet_swin_b_ade20k_512x512_160k.py"
DEMO = CONFIGS / "fcn_r18_synthetic_demo.py"


@pytest.fixture(scope="module")
def models():
    seg.require_mmseg()
    from mmseg.registry import MODELS
    return MODELS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic VOC export and a converted random torchvision ResNet-18."""
    d = tmp_path_factory.mktemp("seg")
    export(d / "voc", "voc", length=16, val_length=8, image_size=64)
    torch.manual_seed(0)
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(to_mmseg(sd, "test"), d / "r18.pth")
    return d


def _crop(cfg):
    return next(t["crop_size"] for t in cfg.train_pipeline if t["type"] == "RandomCrop")


def test_densecl_fcn_configs_have_the_forks_numbers(models):
    voc, city = Config.fromfile(VOC), Config.fromfile(CITYSCAPES)
    for cfg in (voc, city):
        b = cfg.model.backbone
        assert (b.type, b.depth, b.dilations, b.strides, b.contract_dilation, b.norm_eval, b.style) == \
            ("ResNet", 50, (1, 1, 2, 4), (1, 2, 1, 1), True, False, "pytorch")          # V1b, not ResNetV1c
        assert b.norm_cfg.type == "SyncBN" and "init_cfg" not in b and "pretrained" not in cfg.model
        h, a = cfg.model.decode_head, cfg.model.auxiliary_head
        assert (h.in_channels, h.in_index, h.channels, h.num_convs, h.concat_input, h.dropout_ratio) == \
            (2048, 3, 512, 2, True, 0.1)
        assert (a.in_channels, a.in_index, a.channels, a.num_convs, a.loss_decode.loss_weight) == (1024, 2, 256, 1, 0.4)
        opt = cfg.optim_wrapper.optimizer
        assert (opt.type, opt.lr, opt.momentum, opt.weight_decay) == ("SGD", 0.01, 0.9, 0.0005)
        (poly,) = cfg.param_scheduler
        assert (poly.type, poly.power, poly.eta_min, poly.end, poly.by_epoch) == \
            ("PolyLR", 0.9, 1e-4, cfg.train_cfg.max_iters, False)
        assert cfg.train_cfg.val_interval == cfg.default_hooks.checkpoint.interval == cfg.train_cfg.max_iters // 10
        assert [t["type"] for t in cfg.train_pipeline][2:6] == \
            ["RandomResize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion"]
        assert cfg.train_pipeline[2]["ratio_range"] == (0.5, 2.0) and cfg.train_pipeline[3]["cat_max_ratio"] == 0.75
    assert voc.train_cfg.max_iters == 20000 and _crop(voc) == (512, 512) == voc.model.data_preprocessor.size
    assert voc.model.decode_head.num_classes == voc.model.auxiliary_head.num_classes == 21
    assert not voc.model.decode_head.align_corners
    parts = voc.train_dataloader.dataset.datasets                                    # VOC 2012 train + SBD aug
    assert [(p.data_prefix.seg_map_path, p.ann_file) for p in parts] == [
        ("SegmentationClass", "ImageSets/Segmentation/train.txt"),
        ("SegmentationClassAug", "ImageSets/Segmentation/aug.txt")]
    assert voc.train_dataloader.batch_size * 4 == voc.auto_scale_lr.base_batch_size == 16     # 4 GPUs x 4
    assert city.train_cfg.max_iters == 40000 and _crop(city) == (769, 769) == city.model.data_preprocessor.size
    assert city.model.decode_head.num_classes == 19 and city.model.decode_head.align_corners
    assert city.model.auxiliary_head.align_corners
    assert (city.model.test_cfg.mode, city.model.test_cfg.stride) == ("slide", (513, 513))
    assert city.train_dataloader.batch_size * 4 == city.auto_scale_lr.base_batch_size == 8    # 4 GPUs x 2


def test_upernet_configs_have_the_mim_numbers(models):
    vit, swin = Config.fromfile(VIT), Config.fromfile(SWIN)
    for cfg in (vit, swin):
        assert cfg.train_cfg.max_iters == 160000 == cfg.param_scheduler[1].end and _crop(cfg) == (512, 512)
        warm, poly = cfg.param_scheduler
        assert (warm.type, warm.start_factor, warm.end, poly.power, poly.eta_min) == ("LinearLR", 1e-6, 1500, 1.0, 0.0)
        assert cfg.optim_wrapper.constructor == "LayerDecayOptimWrapperConstructor"
        assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.betas == (0.9, 0.999)
        assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16    # 8 GPUs x 2
        assert cfg.model.decode_head.type == "UPerHead" and cfg.model.decode_head.num_classes == 150
        assert cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
    b, opt = vit.model.backbone, vit.optim_wrapper
    assert (b.type, b.patch_size, b.embed_dims, b.num_layers, b.num_heads, b.out_indices) == \
        ("VisionTransformer", 16, 768, 12, 12, (3, 5, 7, 11))
    assert b.patch_bias is True and b.final_norm is True and b.norm_cfg.eps == 1e-6 and b.drop_path_rate == 0.1
    assert (opt.optimizer.lr, opt.optimizer.weight_decay, opt.paramwise_cfg.decay_rate) == (1e-4, 0.05, 0.65)
    assert vit.model.test_cfg.stride == (341, 341) and vit.model.neck.rescales == [4, 2, 1, 0.5]
    b, opt = swin.model.backbone, swin.optim_wrapper
    assert (b.type, b.embed_dims, b.depths, b.num_heads, b.window_size, b.drop_path_rate) == \
        ("SwinTransformer", 128, [2, 2, 18, 2], [4, 8, 16, 32], 7, 0.3)
    assert (opt.optimizer.lr, opt.optimizer.weight_decay, opt.paramwise_cfg.decay_rate) == (6e-5, 0.01, 0.9)


def test_voc_protocol_model_takes_a_converted_resnet50(models, tmp_path):
    torch.manual_seed(0)
    sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "r50.pth"
    torch.save(to_mmseg(sd, "test"), path)
    cfg = Config.fromfile(VOC)
    seg.set_weights(cfg, str(path))
    assert seg.check_fit(cfg, path) == 318
    assert seg.replace_syncbn(cfg.model) == 3                                         # backbone and both heads
    backbone = models.build(cfg.model.backbone)                                       # the FCN-D8 trains in
    backbone.init_weights()                                                           # test_transfer.py
    got = backbone.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    bad = Config.fromfile(VOC)
    bad.model.backbone.type = "ResNetV1c"
    with pytest.raises(seg.UserError, match=r"18 backbone keys missing .*'stem.0.weight'.* 6 file keys the backbone "
                                            r"lacks .*'bn1.bias'.* fit model.backbone.type=ResNet"):
        seg.check_fit(bad, path)


def test_vit_config_takes_a_converted_timm_vit(models, tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    path = tmp_path / "vit.pth"
    torch.save(to_mmseg(vit, "test"), path)
    cfg = Config.fromfile(VIT)
    cfg.model.backbone.update(embed_dims=192, num_heads=3)                            # ViT-Ti: same layout, 12 blocks
    assert seg.check_fit(cfg, path) == len(vit) == 150                                # patch bias and final norm too
    cfg.model.backbone.patch_bias = False                                             # mmseg's default drops the bias
    with pytest.raises(seg.UserError, match=r"1 file keys the backbone lacks \['patch_embed.projection.bias'\]"):
        seg.check_fit(cfg, path)


def _lrs(model, optim_cfg):
    opt = build_optim_wrapper(model, optim_cfg).optimizer
    where = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters()}


def test_layer_decay_for_vit_and_swin(models):
    cfg = Config.fromfile(VIT)
    cfg.model.backbone.update(embed_dims=32, num_heads=2, num_layers=4, out_indices=(0, 1, 2, 3), img_size=(64, 64))
    cfg.model.neck.embed_dim = 32
    cfg.model.decode_head.update(in_channels=[32] * 4, channels=16)
    cfg.model.auxiliary_head.update(in_channels=32, channels=8)
    seg.replace_syncbn(cfg.model)
    model = models.build(cfg.model)
    lr = _lrs(model, cfg.optim_wrapper)
    base, r = 1e-4, 0.65                                                               # 4 blocks: ids 0..5
    assert lr["backbone.patch_embed.projection.weight"] == pytest.approx((base * r ** 5, 0.05))
    assert lr["backbone.cls_token"] == pytest.approx((base * r ** 5, 0.0))
    assert lr["backbone.pos_embed"] == pytest.approx((base * r ** 5, 0.0))
    assert lr["backbone.layers.0.attn.attn.in_proj_weight"] == pytest.approx((base * r ** 4, 0.05))
    assert lr["backbone.layers.3.ln1.weight"] == pytest.approx((base * r, 0.0))
    assert lr["backbone.ln1.weight"] == lr["decode_head.conv_seg.bias"] == pytest.approx((base, 0.0))
    assert lr["decode_head.conv_seg.weight"] == lr["neck.upsample_4x.0.weight"] == pytest.approx((base, 0.05))
    from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor
    with pytest.raises(NotImplementedError):                                          # why we have our own
        LearningRateDecayOptimizerConstructor(
            dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=base)),
            dict(num_layers=4, decay_rate=r))(model)

    cfg = Config.fromfile(SWIN)
    cfg.model.backbone.update(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=16)
    cfg.model.auxiliary_head.update(in_channels=64, channels=8)
    seg.replace_syncbn(cfg.model)
    lr = _lrs(models.build(cfg.model), cfg.optim_wrapper)
    base, r = 6e-5, 0.9                                                                # 8 blocks: ids 0..9
    assert lr["backbone.patch_embed.projection.weight"] == pytest.approx((base * r ** 9, 0.01))
    assert lr["backbone.stages.0.blocks.1.ffn.layers.1.weight"] == pytest.approx((base * r ** 7, 0.01))
    assert lr["backbone.stages.0.downsample.reduction.weight"] == pytest.approx((base * r ** 7, 0.01))
    assert lr["backbone.stages.2.blocks.0.attn.w_msa.relative_position_bias_table"] == \
        pytest.approx((base * r ** 4, 0.0))
    assert lr["backbone.stages.3.blocks.1.norm2.weight"] == pytest.approx((base * r, 0.0))
    assert lr["backbone.norm3.weight"] == lr["decode_head.conv_seg.bias"] == pytest.approx((base, 0.0))


def test_demo_runs_end_to_end_and_resumes(tiny):
    out = tiny / "run"
    common = ["-m", "shared.transfer.segmentation", "--config", str(DEMO), "--weights", str(tiny / "r18.pth"),
              "--out-dir", str(out), "--data-root", str(tiny / "voc"), "default_hooks.checkpoint.interval=2",
              "param_scheduler.0.end=4"]
    env = {"OMP_NUM_THREADS": "1"}
    r = run_cli(common + ["train_cfg.max_iters=2", "train_cfg.val_interval=2"], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "all 120 tensors fit backbone ResNet" in r.stdout
    first = json.loads((out / "results.json").read_text())
    assert first["iters"] == 2 and 0 <= first["mIoU"] <= 100 and {"aAcc", "mAcc"} <= set(first)
    assert f"mIoU {first['mIoU']:.2f}" in r.stdout.splitlines()[-1]
    r = run_cli(common + ["--resume", "train_cfg.max_iters=4", "train_cfg.val_interval=4"], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    log = sorted(out.glob("*/*.log"))[-1].read_text()                                # mmengine's log of this run
    assert "resumed epoch: 0, iter: 2" in log
    assert json.loads((out / "results.json").read_text())["iters"] == 4


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        seg.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_inputs_stop_with_one_line(tiny, capsys, monkeypatch):
    ok = ["--config", DEMO, "--weights", tiny / "r18.pth", "--out-dir", tiny / "bad", "--data-root", tiny / "voc"]
    assert "config not found: nope.py" in _error(capsys, *ok[2:], "--config", "nope.py")
    assert "weights not found: nope.pth" in _error(capsys, *ok[:2], "--weights", "nope.pth", *ok[4:])
    assert "data root not found: /nonexistent" in _error(capsys, *ok[:6], "--data-root", "/nonexistent")
    assert "'max_iters' is not key=value" in _error(capsys, *ok, "max_iters")
    line = _error(capsys, *ok, "model.backbone.type=ResNetV1c")                       # DenseCL#3
    assert "does not fit the config's backbone ResNetV1c" in line and "fit model.backbone.type=ResNet" in line
    line = _error(capsys, *ok, "model.backbone.depth=50")
    assert "does not fit the config's backbone ResNet:" in line and "layer1.0.bn3.bias" in line
    monkeypatch.setitem(sys.modules, "mmseg", None)
    assert "mmsegmentation is not installed" in _error(capsys, *ok)
    assert not (tiny / "bad").exists()
