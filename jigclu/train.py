"""Jigsaw Clustering pretraining: `python jigclu/train.py --config jigclu/configs/<recipe>.yaml [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field

from jigclu.data import make_transform
from jigclu.model import JigClu, JigCluModelConfig
from shared.config import RunConfig, load_config
from shared.errors import ConfigError, cli_main
from shared.pretrain import pretrain


@dataclass
class Config(RunConfig):
    model: JigCluModelConfig = field(default_factory=JigCluModelConfig)


def apply_min_lr(cfg: Config) -> Config:
    """The official `--min-lr m`: lr(e) = lr * ((0.5 - m)(1 + cos(pi e / E)) + m), per epoch, which
    starts at lr (1 - m) and ends at lr m. The shared cosine, peak' * (q + final' (1 - q)) with
    q = (1 + cos(pi e / E)) / 2, is the same curve for peak' = lr (1 - m), final' = m / (1 - m)."""
    m = cfg.model.min_lr
    if m == 0.0:
        return cfg
    if cfg.sched.kind != "cosine" or cfg.sched.final != 0.0 or cfg.sched.warmup_epochs != 0.0:
        raise ConfigError(f"model.min_lr={m} is the official cosine floor: it needs sched.kind=cosine, sched.final=0 "
                          f"and no warm-up (got {cfg.sched.kind}, final {cfg.sched.final}, warmup {cfg.sched.warmup_epochs})")
    cfg.optim.lr *= 1.0 - m
    cfg.sched.final = m / (1.0 - m)
    return cfg


def build(cfg: Config) -> JigClu:
    return JigClu(cfg.model, seed=cfg.train.seed)


@cli_main
def main(argv=None):
    cfg = apply_min_lr(load_config(Config, argv, description=__doc__))
    return pretrain(cfg, build, method="jigclu", make_transform=make_transform)


if __name__ == "__main__":
    main()
