"""Draw what SimMIM learns: for a few images, the input, the input with its masked units greyed out,
the model's reconstruction, and the reconstruction of the masked units pasted into the visible ones.

    python simmim/show_reconstruction.py runs/simmim/demo/last.pt [--images 6] [--split val] [--out FILE]

Works from any SimMIM training checkpoint (`last.pt`, which holds the model and its config). Each
image gets the pretraining transform (its crop and flip) and a mask from the recipe's generator,
seeded by `--seed` and the image's index. Writes `reconstruction.png` next to the checkpoint, one
row per image, and prints the masked-pixel L1 loss over those images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shared import checkpoint as ckpt
from shared.data.augment import reconstruction_sheet
from shared.data.loader import build_image_dataset
from shared.errors import cli_main
from simmim.loss import masked_l1_loss, pixel_mask
from simmim.train import Config, build
from simmim.model import make_transform

@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a SimMIM last.pt (model and config)")
    p.add_argument("--images", type=int, default=6, help="how many images (one row each)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and masks")
    p.add_argument("--out", default="", help="PNG path (default: reconstruction.png next to the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=...")
    a = p.parse_args(argv)
    cfg, model = ckpt.load_trained_model(a.checkpoint, Config, build, a.overrides, "SimMIM")
    transform = make_transform(cfg, model)
    dataset = build_image_dataset(cfg.data, a.split)
    xs, masks = [], []
    for i in range(min(a.images, len(dataset))):
        torch.manual_seed(a.seed * 100_003 + i)
        x, m = transform(dataset[i][0])
        xs.append(x)
        masks.append(m)
    x, mask = torch.stack(xs), torch.stack(masks)
    with torch.no_grad():
        rec = model.reconstruct(x, mask)
        loss = masked_l1_loss(x, rec, mask).item()
    pix = pixel_mask(mask, x.shape[-2], x.shape[-1]).to(x.dtype)
    view = cfg.aug.views[0]
    sheet = reconstruction_sheet(x, pix, rec, view.mean, view.std)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / "reconstruction.png"
    sheet.save(out)
    print(f"wrote {out} ({len(xs)} images, masked-pixel L1 {loss:.4f})")


if __name__ == "__main__":
    main()
