"""Evaluate a checkpoint: `python -m shared.eval runs/barlow/demo/last.pt [--what knn,linear,finetune,semisup,seg] [key=value ...]`.

Our checkpoints carry their config (data, backbone, eval protocol); `key=value` overrides it, e.g.
`eval.linear.epochs=10 eval.finetune.epochs=150 data.root=/datasets/imagenet`
(semisup: `eval.semisup.subset_file=1percent.txt`, SimCLR's list of training file names). A plain backbone
state dict (torchvision keys, e.g. an exported backbone.pt or an official resnet50.pth) needs
`--config` for the rest."""
from __future__ import annotations

import argparse
from pathlib import Path

from shared import checkpoint as ckpt
from shared import dist
from shared.config import RunConfig, from_dict, read_recipe
from shared.errors import UserError, cli_main
from shared.eval import evaluate_after_training
from shared.models import build_backbone


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a last.pt of ours, or a backbone state dict (with --config)")
    p.add_argument("--what", default="knn,linear", help="comma-separated: knn, linear, finetune, semisup, seg")
    p.add_argument("--config", action="append", default=[], help="recipe YAML (needed for a plain state dict)")
    p.add_argument("--compare-random-init", action="store_true")
    p.add_argument("--out", default="", help="output folder (default: <checkpoint folder>/eval)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_intermixed_args(argv)
    state = ckpt.load(a.checkpoint)
    if "format" in state and "model" in state:
        cfg = from_dict(RunConfig, state["config"], a.overrides)
        weights = ckpt.backbone_state_dict(state["model"])
    else:
        if not a.config:
            raise UserError(f"{a.checkpoint} is a plain state dict: pass --config <recipe.yaml> for data and backbone")
        cfg = from_dict(RunConfig, read_recipe(a.config), a.overrides, source=", ".join(a.config))
        weights = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    if a.compare_random_init:
        cfg.eval.compare_random_init = True
    backbone = build_backbone(cfg.model.backbone)
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if not m.startswith(("fc.", "head."))]:
        raise UserError(f"{a.checkpoint}: weights do not fit model.backbone.name={cfg.model.backbone.name} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    dist.init(cfg.train.device)
    evaluate_after_training(cfg, backbone, out, [w for w in a.what.split(",") if w])
    dist.shutdown()


if __name__ == "__main__":
    main()
