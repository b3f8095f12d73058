"""PIRL's demo pretraining beats a random-init backbone on the linear probe. It does NOT beat it on
kNN (pirl/README.md, "The demo"): kNN is asserted only to stay clear of the collapse the previous
demo's lr caused, with the trunk's BatchNorm statistics recomputed on the training images as the
random-init baseline gets them (`eval.bn_recompute`, ours)."""
from __future__ import annotations

import json

import pytest

from conftest import demo_results


@pytest.mark.slow
def test_pirl_demo_beats_random_init_on_the_linear_probe(tmp_path):
    # Measured 2026-12-03 (torch 2.14.1) on a shared 2-core machine at load 5-8, train.seed 0 with 2
    # threads as here, seeds 1 and 2 with 1 thread (pirl/README.md, "Seeds"):
    #   seed  linear pretrained / random (margin)   kNN as trained / BN recomputed / random
    #   0     94.14 / 83.20 (+10.9)                 82.03 / 88.28 / 91.02
    #   1     94.53 / 79.30 (+15.2)                 77.34 / 87.70 / 90.04
    #   2     92.19 / 79.49 (+12.7)                 74.22 / 87.89 / 92.58
    # The lr 0.03 of the previous demo collapsed the trunk (kNN 37-58, every score equal).
    # This test (seed 0, 2 threads): 81 s at load 1.8-2.0, linear 93.36 / 83.20 (+10.2), kNN 78.32 / 88.48 / 91.02;
    # at load 2-6 beside other runs it hit run_cli's 600 s timeout (two threads on two busy cores).
    pre, rnd = demo_results("pirl", tmp_path)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert pre["linear"]["top1"] >= rnd["linear"]["top1"] + 8.0, res
    assert res["pretrained_bn_recomputed"]["knn"]["top1"] >= 80.0, res      # no collapse
    assert 0.0 <= pre["knn"]["top1"] <= 100.0 and 0.0 <= rnd["knn"]["top1"] <= 100.0
