"""The fast input path (undecoded JPEGs -> views) against the PIL path, and the loader's defaults."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from shared.config import DataConfig, SyntheticConfig, ViewConfig
from shared.data.augment import MultiView, _brightness, _contrast, _draw, build_view, jpeg_reduction
from shared.data.folder import EncodedImage, ImageFolder
from shared.data.loader import SeededDataset, auto_workers, build_image_dataset, loader_options
from shared.data.synthetic import render
from shared.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
BARLOW = [ViewConfig(size=64, interpolation="bicubic", blur_p=1.0, blur_sigma=(0.1, 2.0)),
          ViewConfig(size=64, interpolation="bicubic", blur_p=0.1, solarize_p=0.2)]
MOCO = [ViewConfig(size=64, crop_scale=(0.2, 1.0), blur_p=b, solarize_p=s,
                   order=["crop", "jitter", "gray", "blur", "solarize", "flip"]) for b, s in ((1.0, 0.0), (0.1, 0.2))]
# Tolerance of the fast path against the PIL path on the same parameters, in uint8 levels (mean
# |difference| over a view's pixels). Full-size decode: 0.00-0.01 (the resize alone). Reduced
# decode (DCT scaling, crop box rounded to the reduced grid), on these noisy JPEGs: 0.5 on average
# at 1/2, 0.8-1.1 at 1/4 and 1/8, at most 5.6 for one view; over all views here 0.9.
MEAN_TOL, VIEW_TOL = 1.0, 6.0


def _jpegs(folder: Path, sizes) -> list:
    paths = []
    for i, (w, h) in enumerate(sizes):
        s = render(i, image_size=64, num_classes=8)
        img = np.asarray(Image.fromarray(s.image).resize((w, h), Image.BICUBIC), np.float32)
        img = img + np.random.default_rng(i).normal(0, 12, img.shape)
        (folder / "a").mkdir(parents=True, exist_ok=True)
        paths.append(folder / "a" / f"{i}.jpg")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    # 64-px views: a 200x150 image never allows a reduced decode, a 900x600 one mostly does
    return _jpegs(tmp_path_factory.mktemp("jpegs"), [(200, 150), (150, 200), (900, 600), (600, 900), (333, 333)])


def _levels(a: torch.Tensor, b: torch.Tensor, v: ViewConfig) -> float:
    return ((a - b) * torch.tensor(v.std).view(3, 1, 1) * 255).abs().mean().item()


@pytest.mark.parametrize("views", [BARLOW, MOCO], ids=["barlow", "mocov3"])
def test_fast_path_draws_the_same_parameters_and_matches_pil_within_tolerance(jpegs, views):
    mv, g = MultiView(views), torch.random.default_generator
    diffs, reduced = [], 0
    for seed, path in enumerate(jpegs * 3):
        g.manual_seed(seed)
        fast = mv(EncodedImage(str(path)))
        after_fast = g.get_state()
        g.manual_seed(seed)
        exact = mv(Image.open(path).convert("RGB"))
        assert torch.equal(g.get_state(), after_fast)          # the same draws, in the same order
        assert [x.shape for x in fast] == [x.shape for x in exact] == [(3, 64, 64)] * 2
        diffs += [_levels(a, b, v) for a, b, v in zip(fast, exact, views)]
        g.manual_seed(seed)
        reduced += jpeg_reduction([_draw(p, *Image.open(path).size) for p in mv.pipelines]) > 1
    assert reduced >= 3                                          # the reduced decode was exercised
    assert np.mean(diffs) <= MEAN_TOL and max(diffs) <= VIEW_TOL, (np.mean(diffs), max(diffs))


def test_full_size_decode_is_pil_and_brightness_contrast_tables_are_exact(jpegs):
    for path in jpegs:
        pixels, k = EncodedImage(str(path)).decode(1)
        assert k == 1 and np.array_equal(pixels.numpy(), np.asarray(Image.open(path).convert("RGB")))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for f in (0.0, 0.6, 0.93, 1.0, 1.37, 1.4):
        assert np.array_equal(np.asarray(_brightness(img, f)), np.asarray(TF.adjust_brightness(img, f)))
        assert np.array_equal(np.asarray(_contrast(img, f)), np.asarray(TF.adjust_contrast(img, f)))


def test_jpeg_reduction_keeps_every_crop_at_least_the_output_size():
    crop = lambda h, w: [("crop", (0, 0, h, w), (64, 64), None), ("normalize",)]
    assert jpeg_reduction([crop(600, 500), crop(300, 280)]) == 4
    assert jpeg_reduction([crop(600, 500), crop(127, 500)]) == 1
    assert jpeg_reduction([crop(1000, 1000)]) == 8
    assert jpeg_reduction([[("flip",)] + crop(300, 300)]) == 4
    assert jpeg_reduction([[("gray",)] + crop(600, 600)]) == 1       # an op at full size first: no reduction


def test_synthetic_and_pil_inputs_keep_the_pil_path_bit_identical():
    ds = build_image_dataset(DataConfig(synthetic=SyntheticConfig(length=8, image_size=48, cache=False)), "train")
    seeded = SeededDataset(ds, MultiView(BARLOW))
    assert not seeded.encoded                                    # not a file dataset
    views, _ = seeded[(3, 77)]
    torch.random.default_generator.manual_seed(77)
    img = ds[3][0]
    assert all(torch.equal(a, build_view(v)(img)) for a, v in zip(views, BARLOW))


def test_folder_dataset_takes_the_fast_path_by_config_and_skips_undecodable_files(tmp_path, jpegs):
    root = tmp_path / "data"
    _jpegs(root / "train", [(120, 90), (90, 120), (100, 100)])
    good = (root / "train" / "a" / "1.jpg").read_bytes()
    (root / "train" / "a" / "1.jpg").write_bytes(good[:400])    # header fine, data truncated
    for fast in (True, False):
        cfg = DataConfig(source="folder", root=str(root), fast_path=fast, skip_bad_files=True)
        seeded = SeededDataset(build_image_dataset(cfg, "train"), MultiView(BARLOW))
        assert seeded.encoded == fast
        views, _ = seeded[(1, 5)]                                # skipped: image 2 instead
        torch.random.default_generator.manual_seed(5)
        expected = MultiView(BARLOW)(ImageFolder(root / "train")[2][0])
        tol = 0.0 if not fast else VIEW_TOL
        assert all(_levels(a, b, v) <= tol for a, b, v in zip(views, expected, BARLOW))
        assert seeded.base.skipped == 1
    seeded = SeededDataset(build_image_dataset(DataConfig(source="folder", root=str(root)), "train"), MultiView(BARLOW))
    with pytest.raises(DataError, match=r"cannot read image '.*1\.jpg'"):
        seeded[(1, 5)]


def test_loader_settings_from_the_machine_and_overrides():
    assert auto_workers({}, affinity=16) == 15
    assert auto_workers({"LOCAL_WORLD_SIZE": "8"}, affinity=96) == 11
    assert auto_workers({"SLURM_CPUS_PER_TASK": "10"}, affinity=96) == 9
    assert auto_workers({"SLURM_CPUS_PER_TASK": "10"}, affinity=4) == 3
    assert auto_workers({}, affinity=1) == 1
    opts = loader_options(3, DataConfig(prefetch_factor=6, persistent_workers=False))
    assert opts == {"num_workers": 3, "persistent_workers": False, "prefetch_factor": 6}
    assert loader_options(0) == {"num_workers": 0}
    assert loader_options(-1)["num_workers"] == auto_workers() and DataConfig().workers == -1
    with pytest.raises(ConfigError, match="data.workers=-2"):
        loader_options(-2)


def test_benchmark_prints_one_json_line_per_recipe(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--recipes", "mocov3/configs/r50_100ep.yaml",
                        "--images", "12", "--workers", "0", "--repeats", "1", "--batch", "4", "--json",
                        "--data", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["recipe"] == "mocov3/configs/r50_100ep.yaml" and rec["workers"] == 0
    assert rec["ours_img_s_per_core"] > 0 and rec["reference_img_s_per_core"] > 0 and rec["ratio"] > 0
