"""PIRL pretraining: `python pirl/train.py --config pirl/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from pirl.data import PIRLAugConfig, PatchesAndImage
from pirl.model import PIRL, PIRLModelConfig
from shared import dist
from shared.config import DataConfig, EvalConfig, RunConfig, load_config
from shared.data.augment import eval_transform
from shared.data.loader import build_image_dataset
from shared.errors import ConfigError, cli_main
from shared.eval import knn_eval, recompute_bn_statistics
from shared.pretrain import pretrain


@dataclass
class PIRLEvalConfig(EvalConfig):
    # ours, off in every recipe but the demo: also report kNN of the pretrained trunk with its BatchNorm
    # running statistics recomputed on the training images (eval transform), as the shared random-init
    # baseline gets them. The trained statistics average PIRL's two passes (patches, then images), which
    # eval-mode BatchNorm then applies to whole images. Written as "pretrained_bn_recomputed" in eval.json;
    # "pretrained" stays the trunk as trained.
    bn_recompute: bool = False


@dataclass
class Config(RunConfig):
    aug: PIRLAugConfig = field(default_factory=PIRLAugConfig)
    model: PIRLModelConfig = field(default_factory=PIRLModelConfig)
    eval: PIRLEvalConfig = field(default_factory=PIRLEvalConfig)


def num_train_images(data: DataConfig) -> int:
    """The memory bank's rows: the training split's size (the synthetic set's length without rendering it)."""
    if data.source == "synthetic":
        return data.synthetic.length
    return len(build_image_dataset(data, "train"))


def build(cfg: Config) -> PIRL:
    if cfg.aug.num_patches != cfg.model.num_patches:
        raise ConfigError(f"aug.num_patches={cfg.aug.num_patches} and model.num_patches={cfg.model.num_patches} "
                          "must be equal (the patch head concatenates one embedding per patch)")
    if cfg.model.num_data == 0:
        cfg.model.num_data = num_train_images(cfg.data)
    return PIRL(cfg.model)


def make_transform(cfg: Config, model: PIRL) -> PatchesAndImage:
    return PatchesAndImage(cfg.aug)


def knn_bn_recomputed(cfg: Config, model: PIRL, out_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    """`eval.bn_recompute` (ours): kNN of a copy of the trunk whose BatchNorm statistics are those of
    the training images, treated exactly as the random-init baseline (`shared.eval.random_backbone`)."""
    if not cfg.eval.bn_recompute or "knn" not in cfg.eval.after_train:
        return results
    _, device = dist.init(cfg.train.device)
    train_set, val_set = build_image_dataset(cfg.data, "train"), build_image_dataset(cfg.data, "val")
    ec = cfg.eval
    tf = eval_transform(ec.image_size, ec.resize, ec.interpolation, ec.mean, ec.std)
    trunk = recompute_bn_statistics(copy.deepcopy(model.backbone).to(device), train_set, tf, ec.knn.batch_size,
                                    device, cfg.data.workers)
    res = knn_eval(cfg, trunk, train_set, val_set)
    results["pretrained_bn_recomputed"] = {"knn": res}
    dist.print0(f"[eval] pretrained, BatchNorm statistics recomputed on the training images (ours): kNN top-1 "
                f"{res['top1']:.2f}")
    return results


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="pirl", make_transform=make_transform, extra_eval=knn_bn_recomputed)


if __name__ == "__main__":
    main()
