"""Draw what ConvMAE learns: for a few images, the input, the input with its masked 16x16 blocks greyed
out, the reconstruction, and the reconstruction of the masked blocks pasted into the visible ones.

    python convmae/show_reconstruction.py runs/convmae/demo/last.pt [--images 6] [--split val] [--out FILE]

Works from any ConvMAE training checkpoint (`last.pt`: model and config). Each image gets the
pretraining transform (crop and flip) and a random mask, seeded by `--seed` and the image's index.
With `norm_pix_loss` the prediction is per-patch normalised; it is drawn with each patch's own mean and
standard deviation put back (as MAE's visualisation does). Writes `reconstruction.png` next to the
checkpoint and prints the loss over those images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from convmae.loss import patchify, unpatchify
from convmae.model import make_transform, upsample_mask
from convmae.train import Config, build
from shared import checkpoint as ckpt
from shared.data.augment import reconstruction_sheet
from shared.data.loader import build_image_dataset
from shared.errors import cli_main

@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a ConvMAE last.pt (model and config)")
    p.add_argument("--images", type=int, default=6, help="how many images (one row each)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and masks")
    p.add_argument("--out", default="", help="PNG path (default: reconstruction.png next to the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=...")
    a = p.parse_args(argv)
    cfg, model = ckpt.load_trained_model(a.checkpoint, Config, build, a.overrides, "ConvMAE")
    transform = make_transform(cfg, model)
    dataset = build_image_dataset(cfg.data, a.split)
    xs = []
    for i in range(min(a.images, len(dataset))):
        torch.manual_seed(a.seed * 100_003 + i)
        xs.append(transform(dataset[i][0])[0])
    x = torch.stack(xs)
    torch.manual_seed(a.seed)
    with torch.no_grad():
        loss, pred, mask = model.reconstruct(x)
    ps = model.backbone.stride
    if model.norm_pix:
        target = patchify(x, ps)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    rec = unpatchify(pred, ps)
    pix = upsample_mask(mask, model.backbone.grid, ps).to(x.dtype)
    view = cfg.aug.views[0]
    sheet = reconstruction_sheet(x, pix, rec, view.mean, view.std)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / "reconstruction.png"
    sheet.save(out)
    print(f"wrote {out} ({len(xs)} images, loss {loss.item():.4f})")


if __name__ == "__main__":
    main()
