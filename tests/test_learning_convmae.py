"""ConvMAE must learn on the CPU demo: the reconstruction loss falls, and fine-tuning the pretrained encoder
beats fine-tuning a random-init encoder of the same shape with the same recipe (ConvMAE's headline protocol
is fine-tuning). kNN, the linear probe and the segmentation probe do NOT beat random init on this demo
(measured, convmae/README.md "The demo")."""
from __future__ import annotations

import json

import pytest

from conftest import demo_results


@pytest.mark.slow
def test_convmae_demo_loss_falls_and_finetuning_beats_random_init(tmp_path):
    # the demo recipe (10 epochs of 16 steps) with the fine-tuning evaluation only (`eval.finetune` of demo.yaml:
    # the ConvViT-B recipe shortened to 10 epochs, run on the pretrained and on a random-init encoder).
    # Measured 2026-12-03, torch 2.14.1, OMP_NUM_THREADS=1, load 3-8 from other jobs on 2 cores: 330-500 s in
    # all (training 130 s, each fine-tuning about 150 s) -- over the 2-minute budget. This test itself (2 threads,
    # load 2-5): passed in 450 s, seed 0 fine-tuning 37.3 / 20.9, the same figures as at 1 thread.
    # loss of the first logged epoch -> last: seed 0 1.54 -> 0.41, seed 1 1.39 -> 0.42, seed 2 1.39 -> 0.39.
    # Fine-tuning top-1 (last epoch) pretrained / random init: seed 0 37.3 / 20.9 (+16.4), seed 1 34.6 / 18.8
    # (+15.8), seed 2 39.3 / 18.6 (+20.7), seed 3 26.4 / 20.1 (+6.2; loss 1.48 -> 0.45).
    # kNN (not asserted): 72.3 / 81.6, 74.2 / 79.7, 75.8 / 80.3 (seeds 0-2).
    # threshold 3 points: about half the smallest margin, as the val top-1 moves by several points between epochs
    pre, rnd = demo_results("convmae", tmp_path, "eval.after_train=[finetune]")
    res = {"pretrained": pre, "random_init": rnd}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0], losses
    assert pre["finetune"]["top1"] >= rnd["finetune"]["top1"] + 3.0, res
