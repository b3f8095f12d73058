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
