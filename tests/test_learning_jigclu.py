"""JigClu must learn: the demo recipe (ResNet-18, 64 px montages of four 32 px crops, 128 steps on
the built-in dataset). What it asserts is what held over three seeds (jigclu/README.md, "The demo"):
the clustering loss falls below chance, the location head beats chance, and kNN is not worse than
a random-init ResNet-18 by more than a point. kNN *beating* random init held for seeds 0 and 1 only.
Learning, not fidelity (that is tests/test_jigclu.py)."""
from __future__ import annotations

import json

import pytest

from conftest import demo_results


def logged(path, key):
    return [json.loads(line)[key] for line in path.read_text().splitlines() if f'"{key}"' in line]


@pytest.mark.slow
def test_jigclu_demo_learns_and_keeps_up_with_random_init_on_knn(tmp_path):
    # Measured 2026-12-03 on this machine (torch 2.14.1, 2 threads, under a load of 5-12 from other jobs:
    # 13-19 minutes a run there; unloaded it is estimated at about 2 minutes, not measured).
    # train.seed 0 / 1 / 2: kNN top-1 pretrained vs random init 93.75 vs 91.60 (+2.15), 92.77 vs 92.58 (+0.20),
    # 93.16 vs 93.55 (-0.39); clustering loss over the first 32 steps 23.75 (chance: 4.2857 log 255 = 23.75),
    # over the last 32 steps 22.36 / 23.12 / 23.00 (drops 1.39 / 0.63 / 0.75); location accuracy of the last
    # 32 steps 38.0 / 38.7 / 39.3 % (chance 25 %). Thresholds: below the smallest value seen, with a margin.
    pre, rnd = demo_results("jigclu", tmp_path)
    res = {"pretrained": pre, "random_init": rnd}
    clu = logged(tmp_path / "metrics.jsonl", "loss_clu")
    acc = logged(tmp_path / "metrics.jsonl", "loc_acc")
    assert clu[-1] <= clu[0] - 0.4, clu
    assert acc[-1] >= 33.0, acc
    assert pre["knn"]["top1"] >= rnd["knn"]["top1"] - 1.0, res
