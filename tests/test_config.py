"""Config loading: typed merge, overrides, inheritance, and one-line errors naming key, file, nearest keys."""
from __future__ import annotations

import pytest

from barlow.train import Config
from shared.config import RunConfig, build_config, from_dict, to_dict
from shared.errors import ConfigError

from conftest import ROOT, run_cli


def test_overrides_types_and_lists(tmp_path):
    cfg = build_config(Config, [ROOT / "barlow/configs/demo.yaml"],
                       ["optim.lr=0.1", "train.epochs=3", "aug.views.1.solarize_p=0.5", "sched.milestones=[700, 800]",
                        "optim.weight_decay=1e-6"])
    assert cfg.optim.lr == 0.1 and cfg.train.epochs == 3 and cfg.optim.weight_decay == 1e-6
    assert cfg.aug.views[1].solarize_p == 0.5 and cfg.aug.views[0].solarize_p == 0.0
    assert cfg.sched.milestones == [700.0, 800.0] and cfg.name == "demo"
    assert isinstance(cfg.train.epochs, int)


def test_base_chain_and_anchors():
    cfg = build_config(Config, [ROOT / "barlow/configs/demo.yaml"])
    assert cfg.model.backbone.name == "resnet18"          # demo
    assert cfg.optim.name == "lars" and cfg.optim.no_decay == ["ndim<=1"]   # inherited from the headline recipe
    assert cfg.sched.final == 0.001 and cfg.optim.lr_no_decay == 0.0384     # ... and overridden by the demo
    v1, v2 = cfg.aug.views
    assert (v1.blur_p, v2.blur_p, v2.solarize_p, v2.size) == (1.0, 0.1, 0.2, v1.size)


def test_unknown_key_in_file_names_key_file_and_nearest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        build_config(Config, [f])
    msg = str(e.value)
    assert "'optim.lrr'" in msg and str(f) in msg and "nearest valid keys: optim.lr" in msg
    assert "\n" not in msg


def test_unknown_key_in_override_and_list_item():
    with pytest.raises(ConfigError, match=r"'train.epoch' in command-line override 'train.epoch=3'.*train.epochs"):
        build_config(Config, [], ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"aug.views.0.sise.*aug.views.N.size"):
        build_config(Config, [], ["aug.views.0.sise=3"])
    with pytest.raises(ConfigError, match=r"'optm'.*nearest valid keys: optim"):
        build_config(Config, [], ["optm.lr=3"])


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"bad value for config key 'optim.lr'.*'abc'"):
        build_config(Config, [], ["optim.lr=abc"])
    f = tmp_path / "amp.yaml"
    f.write_text("train:\n  amp: fp8\n")
    with pytest.raises(ConfigError, match=rf"'train.amp' in {f}: expected one of auto, bf16, fp16, fp32, got 'fp8'"):
        build_config(Config, [f])
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(Config, [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        build_config(Config, [bad])
    with pytest.raises(ConfigError, match="expected key=value"):
        build_config(Config, [], ["optim.lr"])


def test_round_trip_through_plain_dict():
    cfg = build_config(Config, [ROOT / "barlow/configs/in1k_1000ep.yaml"])
    d = to_dict(cfg)
    assert d["aug"]["views"][0]["crop_scale"] == [0.08, 1.0]
    assert build_config(Config, [], []) != cfg
    generic = from_dict(RunConfig, d, ["eval.linear.epochs=5"])
    assert generic.model.backbone.name == "resnet50" and generic.eval.linear.epochs == 5
    assert generic.optim == cfg.optim


def test_cli_reports_one_line_and_exit_code(tmp_path):
    r = run_cli(["barlow/train.py", "--config", "barlow/configs/demo.yaml", "optim.lrr=1"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'optim.lrr'")
    assert "nearest valid keys: optim.lr" in lines[0]
    r = run_cli(["barlow/train.py", "--config", "barlow/configs/demo.yaml", "--print-config"])
    assert r.returncode == 0 and "projector: 1024-1024-1024" in r.stdout
