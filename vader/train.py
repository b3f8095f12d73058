"""VADeR pretraining: `python vader/train.py --config vader/configs/<recipe>.yaml [key=value ...]`.

After the shared evaluations of the ResNet (`eval.after_train`), a recipe listing `seg` also runs the
dense probe on the frozen decoder output (the 128-d unit embeddings at stride 4), for the pretrained
network and, with `eval.compare_random_init`, a random-init ResNet + decoder; both land in
`eval.json` as `seg_decoder`."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

from shared import dist
from shared.config import RunConfig, load_config
from shared.data.loader import build_image_dataset
from shared.errors import cli_main
from shared.eval import random_backbone
from shared.eval.segprobe import seg_probe
from shared.pretrain import pretrain
from vader.model import STRIDE, DenseEncoder, FPNDecoder, VADeR, VADeRModelConfig
from vader.views import PairedViews


@dataclass
class Config(RunConfig):
    model: VADeRModelConfig = field(default_factory=VADeRModelConfig)


def build(cfg: Config) -> VADeR:
    return VADeR(cfg.model, cfg.train.batch_size)   # the engine has resolved the global batch


def make_transform(cfg: Config, model: VADeR) -> PairedViews:
    return PairedViews(cfg.aug.views, STRIDE, cfg.model.matches)


def decoder_probe(cfg: Config, model: VADeR, out_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    """The segmentation probe on the decoder's embedding map (pretrained, and random init)."""
    if "seg" not in cfg.eval.after_train:
        return results
    train_set, val_set = build_image_dataset(cfg.data, "train"), build_image_dataset(cfg.data, "val")
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.eval.seg.stage = 0          # the wrapper returns its one map for any stage
    nets = {"pretrained": model.dense_encoder()}
    if cfg.eval.compare_random_init:
        backbone = random_backbone(cfg, train_set)
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        nets["random_init"] = DenseEncoder(backbone, FPNDecoder(backbone.stage_channels, m.fpn_dim, m.head_dim, m.dim,
                                                                     m.gn_groups))
    for name, net in nets.items():
        res = seg_probe(probe_cfg, net, train_set, val_set, len(train_set.classes), out_dir / f"seg_decoder_{name}",
                        desc=f"seg probe on the decoder ({name})")
        results.setdefault(name, {})["seg_decoder"] = res
        dist.print0(f"[eval] {name}: seg probe on the decoder output mIoU {res['miou']:.2f}, "
                    f"pixel acc {res['pixel_acc']:.2f}")
    return results


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="vader", make_transform=make_transform, extra_eval=decoder_probe)


if __name__ == "__main__":
    main()
