"""SimMIM pretraining: `python simmim/train.py --config simmim/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import RunConfig, load_config
from shared.pretrain import pretrain
from shared.errors import cli_main
from simmim.model import SimMIM, SimMIMModelConfig, make_transform


@dataclass
class Config(RunConfig):
    model: SimMIMModelConfig = field(default_factory=SimMIMModelConfig)


def build(cfg: Config) -> SimMIM:
    return SimMIM(cfg.model)


@cli_main
def main(argv=None):
    cfg = load_config(Config, argv, description=__doc__)
    return pretrain(cfg, build, method="simmim", make_transform=make_transform)


if __name__ == "__main__":
    main()
