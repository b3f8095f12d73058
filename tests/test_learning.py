"""Pretraining must learn: a short CPU run of the demo recipe beats the strongest untrained baseline
(default init, BatchNorm statistics from the data) on kNN and on the linear probe. This proves
learning, not fidelity (that is what the parity tests are for)."""
from __future__ import annotations

import json

import pytest

from conftest import demo_results


@pytest.mark.slow
def test_short_pretraining_beats_random_init(tmp_path):
    # the demo recipe with 12 epochs instead of 16 (about 2 minutes on 2 cores). Over train.seed 0-4
    # (barlow/README.md, 2026-12-02, torch 2.14.1) the linear margin was 31.3 to 45.5 points (min of the
    # pretrained top-1 86.9), the kNN margin -11.3 to +6.8: kNN is not asserted, it would hold for 2 seeds of 5
    pre, rnd = demo_results("barlow", tmp_path, "train.epochs=12")
    res = {"pretrained": pre, "random_init": rnd}
    assert pre["linear"]["top1"] >= rnd["linear"]["top1"] + 20.0, res
    assert pre["linear"]["top1"] >= 80.0, res


@pytest.mark.slow
def test_mocov3_demo_beats_random_init_on_knn(tmp_path):
    # the MoCo v3 demo recipe without the linear probe (about 5 minutes on 2 cores). Measured on this
    # machine: kNN 99.6 vs 93.6 for random init (linear 99.8 vs 87.5); with 12 epochs the kNN margin
    # shrinks to 3.7 points, so all 16 are run.
    pre, rnd = demo_results("mocov3", tmp_path, "eval.after_train=[knn]")
    res = {"pretrained": pre, "random_init": rnd}
    assert pre["knn"]["top1"] >= rnd["knn"]["top1"] + 3.0, res


@pytest.mark.slow
def test_densecl_demo_beats_random_init_on_knn_and_the_segmentation_probe(tmp_path):
    # the DenseCL demo recipe as shipped (about 4.5 minutes on 2 cores). Measured on this machine:
    # kNN 98.05 vs 95.90 for random init, segmentation probe on C4 mIoU 64.02 vs 43.12.
    # Over train.seed 0-4 (densecl/README.md): kNN margin +0.58 to +5.66, segmentation +17.0 to +20.9.
    pre, rnd = demo_results("densecl", tmp_path)
    res = {"pretrained": pre, "random_init": rnd}
    assert pre["knn"]["top1"] >= rnd["knn"]["top1"], res
    assert pre["seg"]["miou"] >= rnd["seg"]["miou"] + 10.0, res


@pytest.mark.slow
def test_simmim_demo_reconstructs_better_and_beats_random_init_on_knn(tmp_path):
    # the SimMIM demo recipe without the linear probe (about 3 minutes on 2 cores). Measured on this
    # machine: the masked-pixel L1 falls from 0.63 (first epoch) to 0.36; kNN on the mean patch token
    # after block 3 of 4: 69.5 vs 59.6 for random init. (On the output after the final LayerNorm the
    # pretrained network is worse than random init, 60.6 vs 65.4: see simmim/README.md.)
    # Over train.seed 0-4 the kNN margin was +1.0 to +10.0 and seeds 2 and 3 stayed on the loss plateau
    # (simmim/README.md, "Seeds"): these thresholds hold for seed 0, as shipped, not for every seed.
    pre, rnd = demo_results("simmim", tmp_path, "eval.after_train=[knn]")
    res = {"pretrained": pre, "random_init": rnd}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.75 * losses[0], losses
    assert pre["knn"]["top1"] >= rnd["knn"]["top1"] + 5.0, res
