"""ConvMAE must learn on the CPU demo: the reconstruction loss falls. The demo does NOT beat a random-init
encoder on kNN (measured below, convmae/README.md "The demo"): that part of issue #19 is not met."""
from __future__ import annotations

import json

import pytest

from conftest import demo_results


@pytest.mark.slow
def test_convmae_demo_reconstruction_loss_falls(tmp_path):
    # the demo recipe as shipped (10 epochs of 16 steps; 160 s of training + 40 s of kNN at OMP_NUM_THREADS=1
    # on this machine with load 8 from other jobs: over the 2-minute budget). Measured 2026-12-03, torch 2.14.1:
    # loss of the first logged epoch -> last: seed 0 1.54 -> 0.41, seed 1 1.39 -> 0.42, seed 2 1.39 -> 0.39.
    # kNN top-1 pretrained / random init: seed 0 72.3 / 81.6, seed 1 74.2 / 79.7, seed 2 75.8 / 80.3 (random init wins by 4.5 to 9.4).
    pre, rnd = demo_results("convmae", tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0], losses
    assert pre["knn"]["top1"] >= 50.0, (pre, rnd)        # 8 classes: chance is 12.5
