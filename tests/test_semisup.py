"""Semi-supervised fine-tuning (Barlow Twins `evaluate.py --weights finetune --train-percent N`):
the subset file, the two learning rates and the per-epoch cosine, and a demo-sized run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from shared.config import BackboneConfig, RunConfig, build_config
from shared.data.folder import ImageFolder
from shared.data.synthetic import SyntheticShapes, export
from shared.errors import ConfigError, DataError
from shared.eval.semisup import (SemiSupModel, read_subset_file, semisup, semisup_config, subset_indices,
                                 training_subset)
from shared.models import build_backbone
from shared.optim import build_optimizer, lr_factor, param_groups


def _cfg(tmp_path, *extra):
    return build_config(RunConfig, [], [*[o for o in TINY if not o.startswith("model.")],
                                        "model.backbone.name=resnet18", f"train.out_dir={tmp_path}",
                                        "eval.semisup.epochs=2", "eval.semisup.batch_size=16",
                                        "eval.knn.batch_size=32", *extra])


def _imagenet_like(root: Path) -> Path:
    """A training split in ImageNet layout whose files are named as ImageNet's (content not read)."""
    files = {"n01440764": ["n01440764_10026.JPEG", "n01440764_10027.JPEG", "n01440764_2.JPEG"],
             "n01443537": ["n01443537_1.JPEG", "n01443537_16.JPEG"],
             "n01484850": ["n01484850_4.JPEG"]}
    for cls, names in files.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            (root / cls / n).write_bytes(b"")
    return root


def test_subset_file_in_simclr_format_selects_the_official_samples(tmp_path):
    train = ImageFolder(_imagenet_like(tmp_path / "train"))
    listed = ["n01443537_16.JPEG", "n01440764_10026.JPEG", "n01484850_4.JPEG", "n01440764_2.JPEG"]
    (tmp_path / "1percent.txt").write_text("".join(f"{n}\n" for n in listed) + "\n")   # SimCLR: one name a line
    names = read_subset_file(tmp_path / "1percent.txt")
    assert names == listed
    got = [train.samples[i] for i in subset_indices(names, train)]
    # evaluate.py: class = the name up to its first '_', path train/<class>/<name>, label class_to_idx[class]
    class_to_idx = {c: i for i, c in enumerate(sorted(p.name for p in (tmp_path / "train").iterdir()))}
    official = [(str(tmp_path / "train" / n.split("_")[0] / n), class_to_idx[n.split("_")[0]]) for n in listed]
    assert [(str(p), y) for p, y in got] == official

    (tmp_path / "bad.txt").write_text("n01440764_10026.JPEG\nn09999999_1.JPEG\nn01440764_777.JPEG\n")
    with pytest.raises(DataError) as exc:
        subset_indices(read_subset_file(tmp_path / "bad.txt"), train, str(tmp_path / "bad.txt"))
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "bad.txt") in msg and "2 of the 3 names" in msg
    assert "'n09999999_1.JPEG'" in msg
    with pytest.raises(DataError, match="file not found"):
        read_subset_file(tmp_path / "none.txt")


def test_synthetic_subset_names_are_those_of_the_imagefolder_export(tmp_path):
    export(tmp_path / "exp", "imagefolder", length=12, val_length=2, image_size=16, num_classes=4)
    folder = ImageFolder(tmp_path / "exp" / "train")
    synth = SyntheticShapes(12, 16, 4)
    names = ["train_000007.png", "train_000000.png", "train_000011.png"]
    assert subset_indices(names, synth) == [7, 0, 11]
    for i, j in zip(subset_indices(names, synth), subset_indices(names, folder)):
        assert Path(folder.samples[j][0]).name == names[[7, 0, 11].index(i)]
        assert folder.classes[folder.samples[j][1]] == synth.classes[synth[i][1]]     # the same class name
        assert np.array_equal(np.asarray(folder[j][0]), np.asarray(synth[i][0]))       # the same image
    with pytest.raises(DataError, match=r"1 of the 2 names .* \(e\.g\. '12\.png'\)"):
        subset_indices(["train_000001.png", "12.png"], synth)


def test_two_learning_rates_and_the_per_epoch_cosine(tmp_path):
    cfg = _cfg(tmp_path)          # the official 1 % defaults: lr 0.005 backbone, 0.5 classifier, wd 0, 20 epochs
    sc = cfg.eval.semisup
    assert (sc.epochs, sc.lr_backbone, sc.lr_classifier, sc.weight_decay) == (2, 0.005, 0.5, 0.0)
    assert RunConfig().eval.semisup.epochs == 20 and RunConfig().eval.semisup.batch_size == 256
    cfg = _cfg(tmp_path, "eval.semisup.weight_decay=1e-6", "eval.semisup.epochs=20")
    model = SemiSupModel(build_backbone(cfg.model.backbone), 8, 0.005, 0.5)
    assert model.fc.bias.abs().sum() == 0 and 0.008 < model.fc.weight.std() < 0.012
    scfg = semisup_config(cfg, tmp_path)
    groups = param_groups(model, scfg.optim, scfg.train.batch_size)
    opt = build_optimizer(groups, scfg.optim)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 2
    head, body = opt.param_groups
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert {id(p) for p in body["params"]} == {id(p) for p in model.backbone.parameters()}
    assert head["peak_lr"] == pytest.approx(0.5) and body["peak_lr"] == pytest.approx(0.005)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-6 for g in opt.param_groups)  # wd on every param
    assert not scfg.train.sync_bn and not scfg.train.drop_last and scfg.train.amp == "fp32"

    # CosineAnnealingLR(T_max=epochs), stepped after each epoch: lr_e = base (1 + cos(pi e / epochs)) / 2
    epochs, spe = 20, 7
    for epoch in (0, 1, 5, 10, 19):
        official = 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert lr_factor(step, spe, epochs, scfg.sched) == pytest.approx(official, abs=1e-12)
    # and the same numbers from torch's scheduler itself
    ref = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.5}, {"params": [torch.zeros(1)], "lr": 0.005}],
                          0, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, epochs)
    for epoch in range(epochs):
        f = lr_factor(epoch * spe + 3, spe, epochs, scfg.sched)
        assert [g["lr"] for g in ref.param_groups] == pytest.approx([0.5 * f, 0.005 * f], rel=1e-9, abs=1e-15)
        ref.step()
        sched.step()


def test_demo_sized_run_fine_tunes_a_copy_in_train_mode(tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("".join(f"train_{i:06d}.png\n" for i in range(0, 64, 2)))     # half of the 64 images
    cfg = _cfg(tmp_path, f"eval.semisup.subset_file={subset}", "eval.semisup.train_percent=50")
    train, val = SyntheticShapes(64, 32, 8), SyntheticShapes(32, 32, 8, split="val")
    assert len(training_subset(cfg, train)) == 32
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    res = semisup(cfg, backbone, train, val, 8, tmp_path / "semisup")
    assert set(res) == {"top1", "top5", "best_top1", "train_images"} and res["train_images"] == 32
    assert 0 <= res["top1"] <= 100 and res["best_top1"] >= res["top1"]
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())   # a copy was trained
    state = torch.load(tmp_path / "semisup" / "last.pt", weights_only=True)["model"]
    assert int(state["backbone.bn1.num_batches_tracked"]) == 4             # train mode: 2 epochs x 2 steps
    assert not torch.equal(state["backbone.conv1.weight"], before["conv1.weight"])  # the backbone trained
    lines = [json.loads(x) for x in (tmp_path / "semisup" / "metrics.jsonl").read_text().splitlines()]
    assert any("top1" in x for x in lines)


@pytest.mark.parametrize("bad", ["eval.semisup.lr_classifier=0", "eval.semisup.train_percent=0"])
def test_bad_values_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        _cfg(tmp_path, bad)


def test_eval_command_runs_semisup_on_a_backbone(tmp_path):
    torch.manual_seed(0)
    torch.save(build_backbone(BackboneConfig(name="resnet18")).state_dict(),
               tmp_path / "backbone.pt")
    (tmp_path / "subset.txt").write_text("".join(f"train_{i:06d}.png\n" for i in range(16)))
    r = run_cli(["-m", "shared.eval", str(tmp_path / "backbone.pt"), "--what", "semisup", "--config",
                 "barlow/configs/demo.yaml", *[o for o in TINY if o.startswith(("data.", "eval."))],
                 "eval.semisup.epochs=1", "eval.semisup.batch_size=8",
                 f"eval.semisup.subset_file={tmp_path / 'subset.txt'}",
                 "train.tensorboard=false"])
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(res["pretrained"]) == {"semisup"} and res["pretrained"]["semisup"]["train_images"] == 16
    assert "semisup top-1" in r.stdout and "16 of 64 training images" in r.stdout
    (tmp_path / "bad.txt").write_text("train_000001.png\nn01440764_1.JPEG\n")
    r = run_cli(["-m", "shared.eval", str(tmp_path / "backbone.pt"), "--what", "semisup", "--config",
                 "barlow/configs/demo.yaml", *[o for o in TINY if o.startswith(("data.", "eval."))],
                 f"eval.semisup.subset_file={tmp_path / 'bad.txt'}", "train.tensorboard=false",
                 f"--out={tmp_path / 'eval2'}"])
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "1 of the 2 names" in r.stderr and "'n01440764_1.JPEG'" in r.stderr
