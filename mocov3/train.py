"""MoCo v3 pretraining: `python mocov3/train.py --config mocov3/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from mocov3.model import MoCoV3, MoCoV3ModelConfig
from shared.config import RunConfig, load_config
from shared.pretrain import pretrain
from shared.errors import cli_main


@dataclass
class Config(RunConfig):
    model: MoCoV3ModelConfig = field(default_factory=MoCoV3ModelConfig)


def build(cfg: Config) -> MoCoV3:
    return MoCoV3(cfg.model)


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="mocov3")


if __name__ == "__main__":
    main()
