"""DenseCL / MoCo v2 pretraining: `python densecl/train.py --config densecl/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from densecl.model import DenseCL, DenseCLModelConfig
from shared.config import RunConfig, load_config
from shared.pretrain import pretrain
from shared.errors import ConfigError, cli_main


@dataclass
class Config(RunConfig):
    model: DenseCLModelConfig = field(default_factory=DenseCLModelConfig)


def build(cfg: Config) -> DenseCL:
    if cfg.model.bn_splits > 1 and cfg.train.sync_bn:
        raise ConfigError(f"model.bn_splits={cfg.model.bn_splits} asks for per-group BatchNorm and train.sync_bn=true "
                          "for BatchNorm over the global batch: set one of them off")
    return DenseCL(cfg.model, cfg.train.batch_size)   # the engine has resolved the global batch


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="densecl")


if __name__ == "__main__":
    main()
