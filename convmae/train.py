"""ConvMAE pretraining: `python convmae/train.py --config convmae/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from convmae.model import ConvMAE, ConvMAEModelConfig, make_transform
from shared.config import RunConfig, load_config
from shared.errors import cli_main
from shared.pretrain import pretrain


@dataclass
class Config(RunConfig):
    model: ConvMAEModelConfig = field(default_factory=ConvMAEModelConfig)


def build(cfg: Config) -> ConvMAE:
    return ConvMAE(cfg.model)


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="convmae", make_transform=make_transform)


if __name__ == "__main__":
    main()
