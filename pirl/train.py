"""PIRL pretraining: `python pirl/train.py --config pirl/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from pirl.data import PIRLAugConfig, PatchesAndImage
from pirl.model import PIRL, PIRLModelConfig
from shared.config import DataConfig, RunConfig, load_config
from shared.data.loader import build_image_dataset
from shared.errors import ConfigError, cli_main
from shared.pretrain import pretrain


@dataclass
class Config(RunConfig):
    aug: PIRLAugConfig = field(default_factory=PIRLAugConfig)
    model: PIRLModelConfig = field(default_factory=PIRLModelConfig)


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


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="pirl", make_transform=make_transform)


if __name__ == "__main__":
    main()
