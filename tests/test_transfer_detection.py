"""The detectron2 transfer entry (shared/transfer/detection.py) and its configs: every shipped yaml merges
with the protocol's values, the extra-norm res5 head, a tiny end-to-end fine-tune on the synthetic
dataset on the CPU (weights really loaded, AP written, trials averaged, resume), and one-line errors.
Everything but `launch_args` needs detectron2 and skips without it."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from shared.transfer import detection
from shared.transfer.convert import to_detectron2

from conftest import ROOT, import_or_skip, run_cli

CONFIGS = ROOT / "shared" / "transfer" / "configs" / "detectron2"
DEMO = CONFIGS / "synthetic_r18_c4_demo.yaml"
TORCHVISION_INPUT = {"MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
                     "INPUT.FORMAT": "RGB", "MODEL.RESNETS.STRIDE_IN_1X1": False}
MOCO_C4 = {**TORCHVISION_INPUT, "MODEL.RESNETS.NORM": "naiveSyncBN", "MODEL.BACKBONE.FREEZE_AT": 0,
           "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm", "TEST.PRECISE_BN.ENABLED": True,
           "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000, "MODEL.RESNETS.DEPTH": 50,
           "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.02}
FPN_SYNCBN = {**TORCHVISION_INPUT, "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone", "MODEL.BACKBONE.FREEZE_AT": 0,
              "MODEL.RESNETS.NORM": "SyncBN", "MODEL.FPN.NORM": "SyncBN", "MODEL.ROI_BOX_HEAD.NORM": "SyncBN",
              "MODEL.ROI_BOX_HEAD.NUM_CONV": 4, "MODEL.ROI_BOX_HEAD.NUM_FC": 1, "TEST.PRECISE_BN.ENABLED": True}
VOC = {"DATASETS.TRAIN": ("voc_2007_trainval", "voc_2012_trainval"), "DATASETS.TEST": ("voc_2007_test",),
       "MODEL.ROI_HEADS.NUM_CLASSES": 20, "MODEL.MASK_ON": False, "INPUT.MIN_SIZE_TEST": 800,
       "INPUT.MIN_SIZE_TRAIN": tuple(range(480, 801, 32))}
COCO_1X = {"DATASETS.TRAIN": ("coco_2017_train",), "DATASETS.TEST": ("coco_2017_val",), "MODEL.MASK_ON": True,
           "MODEL.ROI_HEADS.NUM_CLASSES": 80, "INPUT.MIN_SIZE_TRAIN": tuple(range(640, 801, 32)),
           "SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000, "SOLVER.WARMUP_ITERS": 1000}
EXPECTED = {   # the values of the official files each config names (see its header)
    "voc0712_r50_c4_24k.yaml": {**MOCO_C4, **VOC, "SOLVER.STEPS": (18000, 22000), "SOLVER.MAX_ITER": 24000,
                                "SOLVER.WARMUP_ITERS": 100},
    "voc0712_r50_c4_25k_pirl.yaml": {**TORCHVISION_INPUT, **VOC, "SOLVER.BASE_LR": 0.002, "SOLVER.WARMUP_ITERS": 1000,
                                     "SOLVER.STEPS": (17000,), "SOLVER.MAX_ITER": 25000, "SOLVER.IMS_PER_BATCH": 16,
                                     "MODEL.RESNETS.NORM": "FrozenBN", "MODEL.BACKBONE.FREEZE_AT": 2,
                                     "MODEL.ROI_HEADS.NAME": "Res5ROIHeads", "TEST.PRECISE_BN.ENABLED": False},
    "voc0712_r50_fpn_jigclu.yaml": {**FPN_SYNCBN, **VOC, "SOLVER.IMS_PER_BATCH": 8, "SOLVER.BASE_LR": 0.01,
                                    "SOLVER.STEPS": (18000, 22000), "SOLVER.MAX_ITER": 24000, "SOLVER.WARMUP_ITERS": 100,
                                    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000, "MODEL.ROI_HEADS.NAME": "StandardROIHeads"},
    "coco_r50_c4_1x.yaml": {**MOCO_C4, **COCO_1X},
    "coco_r50_c4_2x.yaml": {**MOCO_C4, **COCO_1X, "SOLVER.STEPS": (120000, 160000), "SOLVER.MAX_ITER": 180000},
    "coco_r50_fpn_1x.yaml": {**FPN_SYNCBN, **COCO_1X, "MODEL.ROI_MASK_HEAD.NORM": "SyncBN", "SOLVER.IMS_PER_BATCH": 16,
                             "SOLVER.BASE_LR": 0.02},
    "synthetic_r18_c4_demo.yaml": {**TORCHVISION_INPUT, "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
                                   "MODEL.RESNETS.NORM": "BN", "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
                                   "MODEL.ROI_HEADS.NUM_CLASSES": 8, "MODEL.BACKBONE.FREEZE_AT": 0,
                                   "DATASETS.TRAIN": ("synthetic_train",), "DATASETS.TEST": ("synthetic_val",)},
}


@pytest.fixture(scope="module")
def d2():
    import_or_skip("detectron2", reason="detectron2 is not installed (no wheel exists; build it from source)")
    detection.register_extra_norm_head()


def _cfg(path: Path, **overrides):
    from detectron2.config import get_cfg
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_every_shipped_config_merges_with_the_official_values(d2):
    shipped = {p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("base_")}
    assert shipped == set(EXPECTED)
    for name, expected in EXPECTED.items():
        text = (CONFIGS / name).read_text()
        assert text.startswith("#") and ("Follows" in text or "Not a paper's setting" in text), name
        cfg = _cfg(CONFIGS / name)
        for key, want in expected.items():
            got = _get(cfg, key)
            if isinstance(want, (list, tuple)):
                got, want = tuple(got), tuple(want)
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, (name, key, got, want)


def test_extra_norm_head_adds_a_norm_after_res5(d2):
    from detectron2.modeling import build_model
    for path, depth, channels in ((CONFIGS / "voc0712_r50_c4_24k.yaml", 50, 2048), (DEMO, 18, 512)):
        cfg = _cfg(path, **{"MODEL.DEVICE": "cpu", "MODEL.RESNETS.NORM": "BN"})
        extra = build_model(cfg).roi_heads
        cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
        plain = build_model(cfg).roi_heads
        assert type(extra).__name__ == "Res5ROIHeadsExtraNorm"
        last = list(extra.res5.children())[-1]
        assert last is extra.res5.norm and isinstance(last, torch.nn.BatchNorm2d) and last.num_features == channels
        n_extra, n_plain = (sum(p.numel() for p in m.parameters()) for m in (extra, plain))
        if depth == 50:
            assert n_extra - n_plain == 2 * channels                     # the norm's weight and bias, nothing else
        else:                                                            # res5 of basic blocks, as a ResNet-18's
            assert [type(b).__name__ for b in extra.res5][:2] == ["BasicBlock", "BasicBlock"]
            assert extra.res5[0].conv1.weight.shape == (512, 256, 3, 3)
        x = torch.randn(2, channels // 2, 8, 8)
        extra.eval()
        body = torch.nn.Sequential(*list(extra.res5.children())[:-1])
        assert torch.allclose(extra.res5(x), extra.res5.norm(body(x)))  # the norm is applied to res5's output


@pytest.fixture(scope="module")
def tiny(d2, tmp_path_factory):
    """A 32/8-image synthetic COCO export at 64 px and a converted ResNet-18 whose every tensor is
    perturbed (so that an equal value in the model can only come from loading it)."""
    root = tmp_path_factory.mktemp("det")
    from shared.data.synthetic import export
    export(root / "coco", "coco", length=32, val_length=8, image_size=64)
    torch.manual_seed(0)
    sd = {k: v + torch.rand_like(v.float()).to(v.dtype) if v.is_floating_point() else v
          for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    with open(root / "r18.pkl", "wb") as f:
        pickle.dump(to_detectron2(sd, "test"), f)
    return root


FAST = ["SOLVER.MAX_ITER=3", "SOLVER.IMS_PER_BATCH=2", "DATALOADER.NUM_WORKERS=0", "TEST.PRECISE_BN.NUM_ITER=1",
        "INPUT.MIN_SIZE_TRAIN=(64,)", "INPUT.MAX_SIZE_TRAIN=64", "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=64",
        "MODEL.RPN.POST_NMS_TOPK_TEST=10"]


def _entry(tiny, out, *extra, weights=None):
    return run_cli(["-m", "shared.transfer.detection", "--config", str(DEMO), "--data-root", str(tiny / "coco"),
                    "--weights", str(weights or tiny / "r18.pkl"), "--out-dir", str(out), *extra, *FAST],
                   env={"OMP_NUM_THREADS": "2"})


def test_end_to_end_on_the_synthetic_dataset(tiny):
    out = tiny / "run"
    r = _entry(tiny, out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["bbox"]) == {"AP", "AP50", "AP75"} and res["test_set"] == "synthetic_val"
    assert all(v is None or 0 <= v <= 100 for v in res["bbox"].values())
    # every converted tensor (100 of a ResNet-18 without its BN counters) is in the model, stem to res5
    assert res["weights_loaded"] == {"found": 100, "total": 100, "not_found": []}
    assert res["iterations"] == 3 and (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    assert "synthetic_val: bbox AP " in r.stdout and "AP50" in r.stdout
    # evaluating the trained model again gives the same numbers
    r = _entry(tiny, out, "--eval-only")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["bbox"] == pytest.approx(res["bbox"], nan_ok=True) and again["eval_only"] is True


def test_trials_give_mean_and_std_and_resume_skips_finished_ones(tiny):
    out = tiny / "trials"
    r = _entry(tiny, out, "--trials", "2", weights="none")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    per = [json.loads((out / f"trial{k}" / "results.json").read_text()) for k in range(2)]
    assert res["trials"] == 2 and res["seeds"] == [0, 1] and [p["seed"] for p in per] == [0, 1]
    assert "weights_loaded" not in per[0] and per[0]["weights"] is None      # --weights none: random init
    for m in ("AP", "AP50", "AP75"):
        vals = [p["bbox"][m] for p in per]
        if None not in vals:
            assert res["bbox"][m] == pytest.approx(sum(vals) / 2)
            assert res["std"]["bbox"][m] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    assert "mean ± std of 2 trials" in r.stdout
    # a requeued job (shared.launch adds --resume) does not run a finished trial again
    r = _entry(tiny, out, "--trials", "2", "--resume", weights="none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trial 0: finished before" in r.stdout and "trial 1: finished before" in r.stdout
    assert json.loads((out / "results.json").read_text())["bbox"] == res["bbox"]


def test_bad_input_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def error(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            detection.main([*argv])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    ok = ["--config", str(DEMO), "--data-root", str(tiny / "coco"), "--out-dir", str(tmp_path / "o")]
    assert "--config nope.yaml: no such file" in error("--config", "nope.yaml", "--weights", "none", "--out-dir", "o")
    assert "--weights nope.pkl: no such file" in error(*ok, "--weights", "nope.pkl")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "last.pt")
    assert "not a detectron2 weights pickle" in error(*ok, "--weights", str(tmp_path / "last.pt"))
    with open(tmp_path / "tv.pkl", "wb") as f:
        pickle.dump({"model": {"conv1.weight": torch.zeros(1).numpy()}, "__author__": "x"}, f)
    assert "no detectron2 ResNet names" in error(*ok, "--weights", str(tmp_path / "tv.pkl"))
    assert "holds a ResNet-18 but the config builds a ResNet-50" in error(
        *ok, "--weights", str(tiny / "r18.pkl"), "MODEL.RESNETS.DEPTH=50", "MODEL.RESNETS.RES2_OUT_CHANNELS=256")
    assert "pass --data-root" in error("--config", str(DEMO), "--weights", "none", "--out-dir", str(tmp_path / "o"))
    assert "set DETECTRON2_DATASETS" in error("--config", str(CONFIGS / "voc0712_r50_c4_24k.yaml"), "--weights", "none",
                                              "--out-dir", str(tmp_path / "o"))
    assert "expected KEY=VALUE" in error(*ok, "--weights", "none", "SOLVER.MAX_ITER")
    assert "SOLVER.NOPE" in error(*ok, "--weights", "none", "SOLVER.NOPE=1")
    monkeypatch.setitem(sys.modules, "detectron2", None)                     # as if it were not installed
    assert "detectron2 is not importable" in error(*ok, "--weights", "none")
    monkeypatch.undo()
    r = run_cli(["-m", "shared.transfer.detection", *ok, "--weights", str(tmp_path / "last.pt")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_launch_args_make_every_attempt_resume(tmp_path, monkeypatch):
    """What shared.launch submits (no detectron2 needed): absolute paths, --resume, results.json as the done file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pkl").write_bytes(b"")
    out, args, done = detection.launch_args(["--config", str(DEMO), "--weights", "w.pkl", "--out-dir", "runs/voc",
                                             "--trials", "5", "SOLVER.BASE_LR=0.01"])
    assert out == str(tmp_path / "runs" / "voc") and done == "results.json"
    assert args[args.index("--weights") + 1] == str(tmp_path / "w.pkl") and "--resume" in args
    assert args[args.index("--trials") + 1] == "5" and args[-1] == "SOLVER.BASE_LR=0.01"
    from shared.errors import UserError
    with pytest.raises(UserError, match="--gpus-per-node"):
        detection.launch_args(["--config", str(DEMO), "--weights", "none", "--out-dir", "o", "--num-gpus", "8"])
