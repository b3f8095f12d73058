"""What a user's file, a second run, a bad value or a broken state must never do: run code, corrupt
another run, train on garbage, save a poisoned state, shift labels, or lose the run."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, TINY, run_cli
from shared import checkpoint as ckpt
from shared.config import RunConfig, build_config
from shared.errors import ConfigError, UserError


class Touch:
    """Unpickling this runs `touch <marker>`: what a malicious weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- 1. no code from a file
def test_a_malicious_detectron2_pickle_is_refused_without_running_it(tmp_path):
    from shared.transfer.detection import read_weights
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Touch(marker)}, "__author__": "x"}))
    with pytest.raises(UserError) as exc:
        read_weights(bad)
    msg = str(exc.value)
    assert "refused" in msg and str(bad) in msg and "system" in msg, msg
    assert not marker.exists()
    # a genuine detectron2 pickle (numpy arrays, NumPy 1.x or 2.x names) still loads
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.ones((2, 3), np.float32),
                                             "stem.conv1.norm.num_batches_tracked": np.int64(3)},
                                   "__author__": "x", "matching_heuristics": True}))
    model = read_weights(good)
    assert model["stem.conv1.weight"].shape == (2, 3) and int(model["stem.conv1.norm.num_batches_tracked"]) == 3


def test_a_malicious_torch_zip_is_refused_without_running_it(tmp_path):
    from shared.transfer.convert import read_backbone
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {"backbone.conv1.weight": Touch(marker)}}, bad)
    for load in (ckpt.load, read_backbone):
        with pytest.raises(UserError) as exc:
            load(bad)
        assert str(bad) in str(exc.value)
    assert not marker.exists()


def test_a_yaml_python_tag_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as exc:
        build_config(RunConfig, [recipe])
    assert str(recipe) in str(exc.value)
    # on the command line a value that safe YAML cannot read stays the text it is
    cfg = build_config(RunConfig, [], [f'name=!!python/object/apply:os.system ["touch {marker}"]'])
    assert cfg.name.startswith("!!python/object/apply:os.system")
    assert not marker.exists()


def test_an_empty_checkpoint_is_one_error_line(tmp_path):
    empty = tmp_path / "last.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError) as exc:
        ckpt.load(empty)
    assert str(empty) in str(exc.value)


# ------------------------------------------------------------------- 2. one run per output folder
from barlow.train import Config, build                     # noqa: E402
from shared.data.augment import MultiView                  # noqa: E402
from shared.data.loader import build_image_dataset         # noqa: E402
from shared.engine import fit                              # noqa: E402
from shared.errors import TrainingError                    # noqa: E402

DEMO = str(ROOT / "barlow/configs/demo.yaml")
HOLD = ("import sys, time\nfrom shared import checkpoint as c\nwith c.folder_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


def tiny_fit(out, *extra):
    cfg = build_config(Config, [DEMO], TINY + [f"train.out_dir={out}", *extra])
    torch.manual_seed(0)
    return fit(cfg, build(cfg), build_image_dataset(cfg.data, "train"), MultiView(cfg.aug.views), method="barlow")


def test_a_second_run_on_a_busy_folder_stops_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([PY, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, f"train.out_dir={out}"])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert f"output folder {out} is in use by another run" in lines[0] and f"pid {holder.pid}," in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]      # nothing of the holder's was touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert tiny_fit(out, "train.epochs=1").steps == 4                  # taken over at once after kill -9
    with ckpt.folder_lock(out), ckpt.folder_lock(out):                 # re-entrant within one process
        pass


# ------------------------------------------------------------ 4. no poisoned checkpoint is written
def test_a_diverging_run_never_saves_a_non_finite_state(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as exc:
        tiny_fit(out, "train.ckpt_every_steps=1", "optim.lr=1e6", "train.epochs=2")
    msg = str(exc.value)
    assert "Last good checkpoint: " in msg, msg
    named = msg.split("Last good checkpoint: ")[1].split(" (intact)")[0]
    for name in ("last.pt", "prev.pt"):
        if (out / name).is_file():
            state = ckpt.load(out / name)
            assert ckpt.nonfinite(ckpt.state_tensors({"m": state["model"], "o": state["optimizer"]})) == []
    if named != "none written yet":
        assert ckpt.load(named)["step"] >= 1


def test_nonfinite_names_the_bad_tensors_with_one_reduction():
    state = {"w": torch.ones(3), "bn": {"running_var": torch.tensor([1.0, float("inf")])},
             "n": torch.tensor(3), "h": torch.full((2,), float("nan"), dtype=torch.float16), "e": torch.empty(0)}
    assert ckpt.nonfinite(ckpt.state_tensors(state)) == ["bn.running_var", "h"]
    assert ckpt.nonfinite(ckpt.state_tensors({"w": torch.full((4,), 3e38)})) == []   # huge is finite


# ------------------------------------------- 5 and 6. stale temporaries, changed config, fallback
def test_resume_falls_back_to_the_previous_checkpoint_and_refuses_a_changed_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"x" * 1000)
    tiny_fit(out, "train.epochs=2")
    assert not (out / ".last.pt.k1ll3d.tmp").exists()
    assert ckpt.load(out / "last.pt")["step"] == 8 and ckpt.load(out / "prev.pt")["step"] == 4
    full = ckpt.load(out / "last.pt")["model"]

    good_prev = (out / "prev.pt").read_bytes()
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"garbage" * 10):
        (out / "last.pt").write_bytes(damage((out / "last.pt").read_bytes()))
        capsys.readouterr()
        res = tiny_fit(out, "train.epochs=2")
        printed = capsys.readouterr().out
        assert f"resuming from the previous checkpoint {out / 'prev.pt'} instead" in printed, printed
        assert f"resumed from {out / 'prev.pt'} at step 4/8" in printed and res.steps == 8
        again = ckpt.load(out / "last.pt")["model"]
        assert all(torch.equal(full[k], again[k]) for k in full)     # the same run as without the damage
        assert (out / "prev.pt").read_bytes() == good_prev           # the damaged file was not kept as prev.pt

    with pytest.raises(ConfigError, match=r"optim\.lr 1\.6 -> 0\.5"):
        tiny_fit(out, "train.epochs=2", "optim.lr=0.5")
    capsys.readouterr()
    tiny_fit(out, "train.epochs=2", "train.log_every=3")                          # logged, accepted
    assert "resuming with a changed setting: train.log_every 1 -> 3" in capsys.readouterr().out
    tiny_fit(out, "train.epochs=3", "train.allow_config_change=true")            # said explicitly
    assert ckpt.load(out / "last.pt")["step"] == 12

    for name in ("last.pt", "prev.pt"):
        (out / name).write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint in .* can be resumed from"):
        tiny_fit(out, "train.epochs=3")


# --------------------------------------------------------------- 3. every numeric value is checked
import dataclasses                                          # noqa: E402
import typing                                               # noqa: E402

from shared.config import check_values, in_range           # noqa: E402

PAPERS = ("barlow", "mocov3", "densecl", "simmim")


def paper_config(paper):
    return __import__(f"{paper}.train", fromlist=["Config"]).Config


def numeric_fields(obj, prefix=""):
    """(key, field, value) for every numeric leaf of a config instance (lists of sections as `N.`)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from numeric_fields(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            yield from numeric_fields(value[0], f"{key}.0.")
        else:
            hint = str(f.type)
            if "bool" not in hint and any(t in hint for t in ("int", "float")) and "Dict" not in hint:
                yield key, f, value


def _set(obj, key, value):
    *path, leaf = key.split(".")
    for part in path:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    setattr(obj, leaf, value)


def test_every_numeric_field_declares_its_range_and_rejects_what_is_outside(tmp_path):
    """Each numeric leaf of each paper's Config (a field added later included) is set to 0, -1, NaN and
    inf where its range excludes them; the loader's check must name the key. Set on the built object
    (one `build_config` per value would take minutes); a sample goes through the command line too."""
    tried = 0
    for paper in PAPERS:
        cls = paper_config(paper)
        for key, f, default in numeric_fields(cls()):
            if paper != PAPERS[0] and not key.startswith("model."):
                continue                     # the shared sections are the same in every paper's Config
            valid = f.metadata.get("range")
            assert valid, f"{paper}: config key {key} ({f.type}) declares no valid range (shared.config.num)"
            for bad in (0, -1, float("nan"), float("inf")):
                if in_range(bad, valid):
                    continue
                cfg = cls()
                _set(cfg, key, type(default)([bad, bad]) if isinstance(default, (tuple, list)) else bad)
                with pytest.raises(ConfigError) as exc:
                    check_values(cfg, {key: "somewhere.yaml"})
                assert f"'{key}' in somewhere.yaml" in str(exc.value), str(exc.value)
                tried += 1
    for override in ("optim.lr=.nan", "aug.views.1.gray_p=1.5", "model.temperature=-.inf", "sched.milestones=[-1]"):
        with pytest.raises(ConfigError) as exc:
            build_config(paper_config("mocov3"), [], [override])
        key = override.split("=")[0]
        assert f"'{key}' in command-line override '{override}'" in str(exc.value), str(exc.value)
    assert tried > 150, tried
    # a (min, max) pair that decreases
    with pytest.raises(ConfigError, match=r"aug\.views\.0\.crop_scale.*not decreasing"):
        build_config(RunConfig, [], ["aug.views.0.crop_scale=[0.9,0.2]"])


def test_every_shipped_recipe_is_within_the_ranges():
    for paper in PAPERS:
        for recipe in sorted((ROOT / paper / "configs").glob("*.yaml")):
            build_config(paper_config(paper), [recipe])


def test_the_examples_of_the_issue_stop_with_one_line_before_any_work(tmp_path):
    for override, expected in (("train.batch_size=-4", "'train.batch_size' in command-line override"),
                               ("train.batch_size=0", "the global batch must be >= 1"),
                               ("train.log_every=0", "'train.log_every'"),
                               ("data.workers=-2", "'data.workers'")):
        r = run_cli(["barlow/train.py", "--config", DEMO, *TINY, f"train.out_dir={tmp_path / 'x'}", override])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (override, r.stderr)
        assert not (tmp_path / "x").exists()
    assert build_config(RunConfig, [], ["train.batch_size=0", "train.per_gpu_batch=8"]).train.per_gpu_batch == 8


# ------------------------------------------------- 5. classes matched across splits, 16-bit images
from PIL import Image                                       # noqa: E402

from shared.config import DataConfig                       # noqa: E402
from shared.data.folder import ImageFolder                  # noqa: E402
from shared.data.loader import build_image_dataset as build_split  # noqa: E402
from shared.errors import DataError                         # noqa: E402


def _tree(root, split, classes, n=1):
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / c / f"{i}.png")


def test_every_split_takes_the_training_classes_by_name(tmp_path):
    data = DataConfig(source="folder", root=str(tmp_path), workers=0)
    _tree(tmp_path, "train", ["ant", "bee", "cat"])
    _tree(tmp_path, "val", ["ant", "cat"])
    with pytest.raises(DataError, match=r"lacks class 'bee'"):
        build_split(data, "val")
    _tree(tmp_path, "val", ["bee", "dog"])
    with pytest.raises(DataError, match=r"has class 'dog' that .*train lacks"):
        build_split(data, "val")
    (tmp_path / "val" / "dog" / "0.png").unlink()
    (tmp_path / "val" / "dog").rmdir()
    val = build_split(data, "val")
    assert val.classes == ["ant", "bee", "cat"] and [y for _, y in val.samples] == [0, 1, 2]
    (tmp_path / "train" / "eel").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*eel' holds no images"):
        build_split(data, "train")


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 30000], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    (tmp_path / "k").mkdir()
    (tmp_path / "x.png").rename(tmp_path / "k" / "x.png")
    img, _ = ImageFolder(tmp_path)[0]
    assert img.mode == "RGB" and np.asarray(img)[..., 0].tolist() == (a >> 8).tolist()


def test_a_setting_added_since_a_checkpoint_was_written_is_not_a_change():
    from shared.engine import config_changes
    old = {"train": {"epochs": 2, "seed": 0}, "aug": {"views": [{"size": 16}]}}
    new = {"train": {"epochs": 2, "seed": 0, "repeated_aug": 1}, "aug": {"views": [{"size": 16}, {"size": 8}]}}
    assert config_changes(old, new) == [("aug.views.len", 1, 2)]
