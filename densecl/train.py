"""DenseCL / MoCo v2 pretraining: `python densecl/train.py --config densecl/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from densecl.model import DenseCL, DenseCLModelConfig
from shared.config import RunConfig, load_config
from shared.engine import pretrain
from shared.errors import cli_main


@dataclass
class Config(RunConfig):
    model: DenseCLModelConfig = field(default_factory=DenseCLModelConfig)


def build(cfg: Config) -> DenseCL:
    return DenseCL(cfg.model, cfg.train.batch_size)   # the engine has resolved the global batch


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="densecl")


if __name__ == "__main__":
    main()
