"""What a backbone's features encode on the built-in dataset:
`python -m shared.eval.nuisance runs/mocov3/demo/last.pt [--directions 3] [--compare-random-init] [key=value ...]`.

For the validation images (eval transform) it takes the l2-normalised pooled features, centres them,
and reports the share of their variance in the top `--directions` principal directions and, for each
annotated quantity of the labelled shape (horizontal and vertical centre, size, class), the R² of a
least-squares fit from those directions. A diagnostic for shortcuts: features that encode where a
shape is and how large it is rather than which shape it is (see mocov3/README.md, "The demo")."""
from __future__ import annotations

import argparse
import json
from typing import Dict

import numpy as np

from shared import checkpoint as ckpt
from shared import dist
from shared.config import RunConfig, from_dict
from shared.data.augment import eval_transform
from shared.data.loader import build_image_dataset
from shared.errors import UserError, cli_main
from shared.eval import random_backbone
from shared.eval.features import extract
from shared.models import build_backbone


def r2_from_directions(features: np.ndarray, targets: Dict[str, np.ndarray], directions: int) -> Dict[str, float]:
    """Variance share of the top principal directions of the l2-normalised, centred `features`, and
    for each (N,) or (N, K) target the R² (pooled over its columns) of a linear fit from them."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    f = f - f.mean(0)
    _, s, vt = np.linalg.svd(f, full_matrices=False)
    out = {"variance_share": float((s[:directions] ** 2).sum() / (s ** 2).sum())}
    x = np.c_[f @ vt[:directions].T, np.ones(len(f))]
    for name, y in targets.items():
        y = y.reshape(len(y), -1).astype(np.float64)
        w, *_ = np.linalg.lstsq(x, y, rcond=None)
        out[name] = float(1 - ((y - x @ w) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    return out


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a last.pt of ours (it carries its config)")
    p.add_argument("--directions", type=int, default=3)
    p.add_argument("--compare-random-init", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_intermixed_args(argv)
    state = ckpt.load(a.checkpoint)
    if "config" not in state or "model" not in state:
        raise UserError(f"{a.checkpoint} is not a training checkpoint of ours (no config): pass a last.pt")
    cfg = from_dict(RunConfig, state["config"], a.overrides)
    if cfg.data.source != "synthetic":
        raise UserError(f"{a.checkpoint}: data.source is {cfg.data.source}; this diagnostic needs the "
                        "built-in dataset's annotations (data.source=synthetic)")
    _, device = dist.init(cfg.train.device)
    val = build_image_dataset(cfg.data, "val")
    samples = [val.sample(i) for i in range(len(val))]
    boxes = np.stack([s.boxes[0] for s in samples])
    targets = {"x_centre": (boxes[:, 0] + boxes[:, 2]) / 2, "y_centre": (boxes[:, 1] + boxes[:, 3]) / 2,
               "size": (boxes[:, 2] - boxes[:, 0] + boxes[:, 3] - boxes[:, 1]) / 2,
               "class": np.eye(len(val.classes))[[s.label for s in samples]]}
    trained = build_backbone(cfg.model.backbone)
    trained.load_state_dict(ckpt.backbone_state_dict(state["model"]))
    backbones = {"pretrained": trained}
    if a.compare_random_init:
        backbones["random_init"] = random_backbone(cfg, build_image_dataset(cfg.data, "train"))
    ec = cfg.eval
    tf = eval_transform(ec.image_size, ec.resize, ec.interpolation, ec.mean, ec.std)
    for name, backbone in backbones.items():
        feats, _ = extract(backbone.to(device).eval(), val, tf, ec.knn.batch_size, device, cfg.data.workers)
        res = r2_from_directions(feats.numpy().astype(np.float64), targets, a.directions)
        print(json.dumps({"backbone": name, "directions": a.directions, **{k: round(v, 3) for k, v in res.items()}}))


if __name__ == "__main__":
    main()
