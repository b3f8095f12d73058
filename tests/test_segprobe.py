"""The segmentation linear probe: mIoU on a hand example, mask geometry, a probe that must succeed
(features that encode the mask) and one that must fail (constant features), determinism on a
ResNet-18, and its place in evaluate_after_training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from shared.config import RunConfig, build_config
from shared.data.synthetic import SyntheticShapes
from shared.errors import ConfigError, DataError
from shared.eval import format_table
from shared.eval.segprobe import (ImagesAndMasks, confusion_matrix, feature_map, mask_transform, seg_probe,
                                  segmentation_scores)
from shared.models import build_backbone

STEP = 25  # mask value v is drawn as grey level STEP * v


class MaskImages(SyntheticShapes):
    """Synthetic masks drawn as the images themselves (grey level STEP x mask value)."""

    def __getitem__(self, index: int):
        m = self.sample(index).mask
        return Image.fromarray(np.repeat((m * STEP)[..., None], 3, axis=2)), 0


class MaskFeatures(nn.Module):
    """A "backbone" whose feature map is the one-hot mask read back from a MaskImages image
    (eval.mean 0, std 1), average-pooled by `stride`."""

    def __init__(self, num_outputs: int, stride: int = 1):
        super().__init__()
        self.num_outputs, self.stride = num_outputs, stride

    def forward_intermediates(self, x, indices=None, intermediates_only=True):
        cls = (x[:, 0] * 255 / STEP).round().long().clamp(0, self.num_outputs - 1)
        return [F.avg_pool2d(F.one_hot(cls, self.num_outputs).permute(0, 3, 1, 2).float(), self.stride)]


class Constant(nn.Module):
    def forward_intermediates(self, x, indices=None, intermediates_only=True):
        return [torch.ones(x.shape[0], 8, x.shape[2] // 8, x.shape[3] // 8)]


def _cfg(tmp_path, *extra):
    return build_config(RunConfig, [], [
        "train.device=cpu", "data.workers=0", "train.tensorboard=false", f"train.out_dir={tmp_path}",
        "eval.image_size=32", "eval.resize=32", "eval.knn.batch_size=64",
        "eval.seg.epochs=10", "eval.seg.batch_size=16", *extra])


def test_miou_on_a_hand_example():
    target = torch.tensor([[0, 0, 0], [1, 1, 2]])
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    conf = confusion_matrix(pred, target, 4)             # class 3: in neither, so left out of the mean
    assert conf.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = segmentation_scores(conf)
    # IoU: class 0 2/(3+2-2), class 1 1/(2+2-1), class 2 1/(1+2-1)
    assert s["iou"][:3] == pytest.approx([200 / 3, 100 / 3, 50]) and s["iou"][3] is None
    assert s["miou"] == pytest.approx(50.0) and s["pixel_acc"] == pytest.approx(400 / 6)
    # a class predicted but absent from the targets counts, with IoU 0
    assert segmentation_scores(confusion_matrix(torch.tensor([3]), torch.tensor([0]), 4))["miou"] == 0.0


def test_masks_follow_the_image_geometry():
    """Resize(40) -> CenterCrop(32) of 32 px images: the shapes read back from the transformed images
    cover the transformed masks best without any shift (bilinear blending at the edges leaves a few
    pixels off), and well."""
    from shared.data.augment import eval_transform
    ds = ImagesAndMasks(MaskImages(16, 32, 8), mask_transform(32, 40))
    tf = eval_transform(32, 40, "bilinear", (0, 0, 0), (1, 1, 1))
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    agree = torch.zeros(len(shifts))
    for i in range(len(ds)):
        image, mask = ds[i]
        assert mask.shape == (32, 32) and mask.dtype == torch.uint8
        shape = tf(image)[0] * 255 / STEP > 0.5
        for j, shift in enumerate(shifts):
            agree[j] += (shape == (torch.roll(mask, shift, (0, 1)) > 0)).float().mean() / len(ds)
    assert shifts[int(agree.argmax())] == (0, 0) and agree.max() > 0.95


def test_probe_finds_features_that_encode_the_mask(tmp_path):
    cfg = _cfg(tmp_path, "eval.mean=[0,0,0]", "eval.std=[1,1,1]")
    train, val = MaskImages(64, 32, 8), MaskImages(32, 32, 8, split="val")
    res = seg_probe(cfg, MaskFeatures(9), train, val, 8, tmp_path / "seg")
    assert res["miou"] > 90 and res["pixel_acc"] > 98
    stored = json.loads((tmp_path / "seg" / "segprobe.json").read_text())
    assert stored["miou"] == res["miou"] and stored["feature_map"] == [9, 32, 32]
    assert stored["train_loss"][-1] < stored["train_loss"][0]
    coarse = seg_probe(cfg, MaskFeatures(9, stride=2), train, val, 8)   # 16x16 maps, upsampled: blurrier, still good
    assert 60 < coarse["miou"] < res["miou"]
    const = seg_probe(cfg, Constant(), train, val, 8)                   # background everywhere
    background = np.mean([(val.sample(i).mask == 0).mean() for i in range(len(val))]) * 100
    assert const["miou"] < 15 and const["pixel_acc"] == pytest.approx(background)


def test_probe_on_resnet18_is_deterministic_and_in_range(tmp_path):
    cfg = _cfg(tmp_path, "model.backbone.name=resnet18", "eval.seg.stage=2", "eval.seg.epochs=3")
    train, val = SyntheticShapes(64, 32, 8), SyntheticShapes(32, 32, 8, split="val")
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    first = seg_probe(cfg, backbone, train, val, 8, tmp_path / "a")
    assert set(first) == {"miou", "pixel_acc"} and 0 <= first["miou"] <= 100 and 0 <= first["pixel_acc"] <= 100
    assert json.loads((tmp_path / "a" / "segprobe.json").read_text())["feature_map"] == [256, 2, 2]
    assert seg_probe(cfg, backbone, train, val, 8) == first
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_stage_selection():
    torch.manual_seed(0)
    backbone = build_backbone(build_config(RunConfig, [], ["model.backbone.name=resnet18"]).model.backbone).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(feature_map(backbone, x, -1), feature_map(backbone, x, 3))
        assert feature_map(backbone, x, 0).shape == (1, 64, 8, 8)
        with pytest.raises(ConfigError, match="eval.seg.stage=4"):
            feature_map(backbone, x, 4)


def test_datasets_without_masks_are_refused(tmp_path):
    class Plain(torch.utils.data.Dataset):
        classes = ["a"]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32)), 0

    with pytest.raises(DataError, match="needs per-pixel masks: data.source=synthetic"):
        seg_probe(_cfg(tmp_path), Constant(), Plain(), Plain(), 1)
    from shared.eval import evaluate_after_training
    cfg = _cfg(tmp_path, "data.source=folder", f"data.root={tmp_path}")
    with pytest.raises(ConfigError, match="needs per-pixel masks: data.source=synthetic"):
        evaluate_after_training(cfg, Constant(), tmp_path, ["knn", "seg"])
    with pytest.raises(ConfigError, match="expected knn, linear, finetune, semisup, seg"):
        evaluate_after_training(_cfg(tmp_path), Constant(), tmp_path, ["segmentation"])


def test_evaluate_after_training_runs_seg_with_random_init(tmp_path, capsys):
    from shared.eval import evaluate_after_training
    cfg = _cfg(tmp_path, "model.backbone.name=resnet18", "data.synthetic.length=64", "data.synthetic.val_length=32",
               "data.synthetic.image_size=32", "eval.compare_random_init=true", "eval.seg.epochs=2",
               "eval.seg.stage=2")
    torch.manual_seed(0)
    res = evaluate_after_training(cfg, build_backbone(cfg.model.backbone), tmp_path, ["seg"])
    assert set(res) == {"pretrained", "random_init"} and all(set(r) == {"seg"} for r in res.values())
    assert json.loads((tmp_path / "eval.json").read_text()) == res
    assert (tmp_path / "seg_random_init" / "segprobe.json").is_file()
    out = capsys.readouterr().out
    assert "[eval] pretrained: seg probe (stage 2) mIoU" in out and "seg mIoU" in out


def test_table_shows_seg_miou():
    table = format_table({"pretrained": {"knn": {"top1": 50.0}, "seg": {"miou": 61.25, "pixel_acc": 90.0}},
                          "random_init": {"knn": {"top1": 20.0}}}).splitlines()
    assert table[0].split() == ["backbone", "knn", "top-1", "seg", "mIoU"]
    assert table[2].split() == ["pretrained", "50.00", "61.25"] and table[3].split() == ["random_init", "20.00", "-"]
