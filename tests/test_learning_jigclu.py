"""JigClu must learn: the demo recipe (ResNet-18, 64 px montages of four 32 px crops, 128 steps on
the built-in dataset) beats a random-init ResNet-18 on kNN. Learning, not fidelity (tests/test_jigclu.py)."""
from __future__ import annotations

import pytest

from conftest import demo_results


@pytest.mark.slow
def test_jigclu_demo_beats_random_init_on_knn(tmp_path):
    # Measured 2026-12-03 on this machine (torch 2.14.1, 2 threads, under a load of 8 from other jobs):
    # kNN top-1 pretrained vs random init, train.seed 0: 93.75 vs 91.60 (+2.15); seeds 1, 2: see
    # jigclu/README.md "The demo". The threshold is the smallest margin seen, rounded down.
    pre, rnd = demo_results("jigclu", tmp_path)
    res = {"pretrained": pre, "random_init": rnd}
    assert pre["knn"]["top1"] >= rnd["knn"]["top1"], res
