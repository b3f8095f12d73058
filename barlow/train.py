"""Barlow Twins pretraining: `python barlow/train.py --config barlow/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from barlow.model import BarlowModelConfig, BarlowTwins
from shared.config import RunConfig, load_config
from shared.pretrain import pretrain
from shared.errors import cli_main


@dataclass
class Config(RunConfig):
    model: BarlowModelConfig = field(default_factory=BarlowModelConfig)


def build(cfg: Config) -> BarlowTwins:
    return BarlowTwins(cfg.model, cfg.train.batch_size)


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="barlow")


if __name__ == "__main__":
    main()
