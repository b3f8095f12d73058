"""The synthetic dataset, its exports, ImageFolder errors, augmentation recipes and the sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from shared.config import DataConfig, SyntheticConfig, ViewConfig
from shared.data.augment import MultiView, RandomGaussianBlur, RandomSolarize, build_view
from shared.data.folder import ImageFolder
from shared.data.loader import GlobalBatchSampler, SeededDataset, build_image_dataset
from shared.data.synthetic import SHAPES, SyntheticShapes, export, render
from shared.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------ synthetic
def test_synthetic_is_a_pure_function_of_seed_split_index():
    a, b = render(7, image_size=48, seed=3), render(7, image_size=48, seed=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.label == b.label
    assert not np.array_equal(a.image, render(7, image_size=48, seed=4).image)
    assert not np.array_equal(a.image, render(7, image_size=48, seed=3, split="val").image)
    assert not np.array_equal(a.image, render(8, image_size=48, seed=3).image)
    ds = SyntheticShapes(20, 48, seed=3)
    cached = SyntheticShapes(20, 48, seed=3, cache=True)
    assert np.array_equal(np.asarray(ds[7][0]), a.image) and ds[7][1] == a.label
    assert np.array_equal(np.asarray(cached[7][0]), a.image) and cached.targets == ds.targets


@pytest.mark.parametrize("size", [24, 64, 131])
def test_synthetic_annotations_are_consistent(size):
    for i in range(12):
        s = render(i, image_size=size, num_classes=8, max_objects=4, seed=1)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (size, size) and s.label == s.classes[0]
        assert len(s.boxes) == len(s.classes) == len(s.polygons) == len(s.areas) >= 1
        assert s.areas[0] == s.areas.max()          # the labelled shape is the largest one
        assert s.mask.max() <= 8
        for box, cls, area in zip(s.boxes, s.classes, s.areas):
            x0, y0, x1, y1 = box.astype(int)
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            if (s.classes == cls).sum() > 1:
                continue                             # another shape of this class may share the box
            inside = s.mask[y0:y1, x0:x1] == cls + 1
            assert inside.sum() == area == (s.mask == cls + 1).sum()
            assert inside[:, 0].any() and inside[:, -1].any() and inside[0].any() and inside[-1].any()
        assert (s.mask > 0).sum() == s.areas.sum()   # shapes never overlap


def test_synthetic_placement_radius_and_shading_change_only_what_they_name():
    easy = dict(image_size=40, max_objects=1, texture=0.0, palette=1, rotation=0.0)
    for i in range(16):
        base = render(i, **easy)
        assert np.array_equal(base.image, render(i, **easy, placement=(1, 1), shading=0.25,
                                                 radius_range=(0.2, 0.36)).image)   # the defaults
        centred = render(i, **easy, placement=(0, 0))
        row = render(i, **easy, placement=(1, 0))
        fixed = render(i, **easy, radius_range=(0.3, 0.3))
        flat = render(i, **easy, shading=0.0)
        assert base.label == centred.label == row.label == fixed.label == flat.label   # the same draws
        cx, cy = (centred.boxes[0, 0] + centred.boxes[0, 2]) / 2, (centred.boxes[0, 1] + centred.boxes[0, 3]) / 2
        assert abs(cx - 20) <= 1.5 and abs(cy - 20) <= 1.5
        assert abs((row.boxes[0, 1] + row.boxes[0, 3]) / 2 - 20) <= 1.5
        assert np.abs(row.boxes[0, [0, 2]] - base.boxes[0, [0, 2]]).max() <= 1        # x is untouched
        if base.label == 0:                                                            # circles: 2r wide
            assert abs((fixed.boxes[0, 2] - fixed.boxes[0, 0]) - 0.6 * 40) <= 1.5
        m = np.pad(flat.mask == flat.label + 1, 1)
        core = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]   # the eroded shape
        _, counts = np.unique(flat.image[core], axis=0, return_counts=True)
        assert counts.max() >= 0.95 * core.sum()               # one flat colour (but at concave corners)
        assert len(np.unique(base.image[core], axis=0)) > 5    # the default ramp
    with pytest.raises(ValueError, match="radius_range"):
        render(0, radius_range=(0.1, 0.3))
    with pytest.raises(ValueError, match="placement"):
        render(0, placement=(1.5, 0))
    with pytest.raises(ConfigError, match=r"^data\.synthetic\.radius_range must satisfy"):
        build_image_dataset(DataConfig(synthetic=SyntheticConfig(length=4, val_length=4, radius_range=(0.5, 0.6))), "val")


def test_synthetic_labels_cover_all_classes():
    ds = SyntheticShapes(400, 32, num_classes=5, seed=0, cache=True)
    assert sorted(set(ds.targets)) == list(range(5)) and ds.classes == list(SHAPES[:5])


def test_export_imagefolder(tmp_path):
    export(tmp_path, "imagefolder", length=16, val_length=8, image_size=32, num_classes=4)
    ds = ImageFolder(tmp_path / "train")
    ref = SyntheticShapes(16, 32, num_classes=4)
    assert len(ds) == 16 and ds.classes == sorted(SHAPES[:4])
    by_name = {p.split("/")[-1]: (p, y) for p, y in ds.samples}
    p, y = by_name["train_000005.png"]
    assert ds.classes[y] == ref.classes[ref.targets[5]]
    assert np.array_equal(np.asarray(Image.open(p)), ref.sample(5).image)
    assert len(ImageFolder(tmp_path / "val")) == 8


def test_export_coco(tmp_path):
    export(tmp_path, "coco", length=10, val_length=4, image_size=40, max_objects=3)
    data = json.loads((tmp_path / "annotations/instances_train.json").read_text())
    assert len(data["images"]) == 10 and [c["id"] for c in data["categories"]] == list(range(1, 9))
    ref = SyntheticShapes(10, 40, max_objects=3)
    n_ann = sum(len(ref.sample(i).classes) for i in range(10))
    assert len(data["annotations"]) == n_ann
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 40 and y + h <= 40 and w > 0 and h > 0
        poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        px, py = poly[:, 0], poly[:, 1]
        shoelace = 0.5 * abs(np.dot(px, np.roll(py, 1)) - np.dot(py, np.roll(px, 1)))
        assert abs(shoelace - ann["area"]) <= 0.25 * ann["area"] + 6
    first = [a for a in data["annotations"] if a["image_id"] == 1][0]
    assert first["category_id"] == ref.targets[0] + 1
    assert (tmp_path / "train" / data["images"][0]["file_name"]).is_file()


def test_export_voc(tmp_path):
    export(tmp_path, "voc", length=6, val_length=3, image_size=32)
    names = (tmp_path / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(names) == 6 and (tmp_path / "ImageSets/Main/val.txt").read_text().split()[0] == "val_000000"
    m = Image.open(tmp_path / "SegmentationClass" / f"{names[2]}.png")
    assert m.mode == "P" and m.getpalette()[3:6] == [128, 0, 0]   # VOC colour of class 1
    assert np.array_equal(np.asarray(m), SyntheticShapes(6, 32).sample(2).mask)
    xml = (tmp_path / "Annotations" / f"{names[2]}.xml").read_text()
    assert xml.count("<object>") == len(SyntheticShapes(6, 32).sample(2).classes)
    assert Image.open(tmp_path / "JPEGImages" / f"{names[0]}.jpg").size == (32, 32)


def test_export_in_the_demos_easy_setting(tmp_path):
    easy = dict(texture=0.0, palette=1, rotation=0.0)
    export(tmp_path, "coco", length=3, val_length=1, image_size=32, **easy)
    ref = SyntheticShapes(3, 32, **easy).sample(1)
    assert not np.array_equal(ref.image, SyntheticShapes(3, 32).sample(1).image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "train" / "train_000001.png")), ref.image)


# ---------------------------------------------------------------------------------- ImageFolder
def _folder(tmp_path, n=3):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    return tmp_path


def test_imagefolder_reads_layout(tmp_path):
    ds = ImageFolder(_folder(tmp_path))
    assert ds.classes == ["a", "b"] and len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    img, y = ds[4]
    assert img.mode == "RGB" and y == 1


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found: '.*nowhere'"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders in '.*empty'"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "noimg")
    with pytest.raises(DataError, match="data.source=folder needs data.root"):
        build_image_dataset(DataConfig(source="folder"), "train")


def test_corrupt_image_error_and_skip_option(tmp_path, capsys):
    root = _folder(tmp_path)
    bad = root / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"cannot read image '.*a/1\.png'"):
        ImageFolder(root)[1]
    ds = ImageFolder(root, skip_bad_files=True)
    img, y = ds[1]                                   # the next readable image instead
    assert np.asarray(img)[0, 0, 0] == 80 and ds.skipped == 1
    assert "skipped an unreadable image (1 so far" in capsys.readouterr().err


# -------------------------------------------------------------------------------- augmentation
def test_view_pipeline_follows_recipe_order():
    v = ViewConfig(size=32, blur_p=1.0, solarize_p=0.2, order=["crop", "jitter", "gray", "blur", "solarize", "flip"])
    ops = build_view(v).transforms
    kinds = [type(o) for o in ops]
    assert kinds == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale, RandomGaussianBlur, RandomSolarize,
                     T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert ops[0].scale == (0.08, 1.0) and ops[1].p == 0.8 and ops[2].p == 0.2 and ops[3].p == 1.0
    jitter = ops[1].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    no_blur = build_view(ViewConfig(blur_p=0.0, solarize_p=0.0)).transforms
    assert not any(isinstance(o, (RandomGaussianBlur, RandomSolarize)) for o in no_blur)
    with pytest.raises(ConfigError, match="order"):
        build_view(ViewConfig(order=["crop", "rotate"]))


def test_solarize_and_blur_ops():
    img = Image.fromarray(np.array([[[10, 128, 250]]], np.uint8))
    assert np.asarray(RandomSolarize(1.0)(img)).tolist() == [[[10, 127, 5]]]
    assert RandomSolarize(0.0)(img) is img
    flat = Image.fromarray(np.zeros((9, 9, 3), np.uint8))
    flat.putpixel((4, 4), (255, 255, 255))
    blurred = np.asarray(RandomGaussianBlur(1.0, (2.0, 2.0))(flat))
    assert 0 < blurred[4, 4, 0] < 255 and blurred[4, 6, 0] > 0


def test_views_depend_only_on_sample_seed():
    ds = SeededDataset(SyntheticShapes(4, 32), MultiView([ViewConfig(size=24, n=2), ViewConfig(size=16)]))
    (views_a, _), (views_b, _) = ds[(1, 1234)], ds[(1, 1234)]
    assert [v.shape for v in views_a] == [(3, 24, 24), (3, 24, 24), (3, 16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(views_a, views_b))
    assert not torch.equal(views_a[0], views_a[1])   # two crops of the same recipe differ
    assert not torch.equal(ds[(1, 99)][0][0], views_a[0])


# ------------------------------------------------------------------------------------- sampler
def test_global_batches_do_not_depend_on_world_size():
    one = GlobalBatchSampler(50, 8, 0, 1, seed=5, drop_last=True)
    two = [GlobalBatchSampler(50, 8, r, 2, seed=5, drop_last=True) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(3)
    for b1, b20, b21 in zip(one, *two):
        assert b1 == b20 + b21
    assert len(one) == 6
    one.set_epoch(4)
    assert list(one)[0] != list(two[0])[0] + list(two[1])[0]


def test_sampler_epoch_covers_dataset_and_resumes_mid_epoch():
    s = GlobalBatchSampler(21, 4, seed=0, drop_last=False)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == 6 and len(batches[-1]) == 1
    assert sorted(i for b in batches for i, _ in b) == list(range(21))
    s.set_epoch(0, start_step=4)
    assert list(s) == batches[4:]
    # the last partial batch is padded so that it splits evenly over ranks
    r = [GlobalBatchSampler(21, 4, k, 2, seed=0, drop_last=False) for k in range(2)]
    last = [list(x)[-1] for x in r]
    assert len(last[0]) == len(last[1]) == 1 and last[0][0][0] == batches[-1][0][0]
    with pytest.raises(DataError, match="not divisible"):
        GlobalBatchSampler(21, 5, 0, 2)
