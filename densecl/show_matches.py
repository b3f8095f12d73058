"""Draw what the dense loss learns from: for pairs of augmented views of the same image, the cell of
view 2 that each cell of view 1 is matched to (the argmax of backbone-feature cosine similarity,
online encoder for view 1, momentum encoder for view 2, as in training).

    python densecl/show_matches.py runs/densecl/demo/last.pt [--pairs 4] [--split val] [--out FILE]

Writes `matches.png` next to the checkpoint: one row per image, view 1 left, view 2 right, the C5
grid drawn over both, and a curve from every query cell to its matched key cell (one colour per
query cell; curved so that matches along one grid row do not overlap)."""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from densecl.loss import dense_correspondence
from densecl.train import Config, build
from shared import checkpoint as ckpt
from shared.data.augment import MultiView, to_pil
from shared.data.loader import build_image_dataset
from shared.errors import cli_main


def arc(a: tuple[float, float], b: tuple[float, float], bow: float = 0.2, n: int = 24) -> list[tuple[float, float]]:
    """Points of a quadratic curve from a to b that bows sideways by `bow` x its length, so that matches
    along one grid row (which would draw as overlapping straight lines) stay apart."""
    (ax, ay), (bx, by) = a, b
    cx, cy = (ax + bx) / 2 + bow * (ay - by), (ay + by) / 2 - bow * (bx - ax)
    return [((1 - t) ** 2 * ax + 2 * t * (1 - t) * cx + t * t * bx, (1 - t) ** 2 * ay + 2 * t * (1 - t) * cy + t * t * by)
            for t in (j / n for j in range(n + 1))]


def draw_pair(v1: Image.Image, v2: Image.Image, match: torch.Tensor, grid: tuple[int, int], gap: int) -> Image.Image:
    """v1 | gap | v2 with the grid on both and a curve per query cell to its matched key cell."""
    w, h = v1.size
    canvas = Image.new("RGB", (2 * w + gap, h), "white")
    canvas.paste(v1, (0, 0))
    canvas.paste(v2, (w + gap, 0))
    d = ImageDraw.Draw(canvas)
    gh, gw = grid
    for x0 in (0, w + gap):
        for i in range(1, gw):
            d.line([(x0 + i * w / gw, 0), (x0 + i * w / gw, h)], fill=(128, 128, 128))
        for j in range(1, gh):
            d.line([(x0, j * h / gh), (x0 + w, j * h / gh)], fill=(128, 128, 128))

    def centre(cell: int, x0: int):
        return x0 + (cell % gw + 0.5) * w / gw, (cell // gw + 0.5) * h / gh

    cells = gh * gw
    for i in range(cells):
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / cells, 0.9, 1.0))
        a, b = centre(i, 0), centre(int(match[i]), w + gap)
        d.line(arc(a, b), fill=colour, width=2)
        for (x, y) in (a, b):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return canvas


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a DenseCL last.pt (model and config)")
    p.add_argument("--pairs", type=int, default=4, help="how many images (one row each)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    p.add_argument("--out", default="", help="PNG path (default: matches.png next to the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=...")
    a = p.parse_args(argv)
    cfg, model = ckpt.load_trained_model(a.checkpoint, Config, build, a.overrides, "DenseCL")
    dataset = build_image_dataset(cfg.data, a.split)
    views = MultiView(cfg.aug.views)
    v1cfg, v2cfg = cfg.aug.views[0], cfg.aug.views[-1]
    rows = []
    for i in range(min(a.pairs, len(dataset))):
        torch.manual_seed(a.seed + i)
        x1, x2 = views(dataset[i][0])[:2]
        with torch.no_grad():
            q = model.c5(model.backbone, x1[None])
            k = model.c5(model.momentum_backbone, x2[None])
        match = dense_correspondence(q, k)[0]
        scale = max(1, 256 // x1.shape[-1])
        rows.append(draw_pair(to_pil(x1, v1cfg.mean, v1cfg.std, scale), to_pil(x2, v2cfg.mean, v2cfg.std, scale),
                              match, tuple(q.shape[-2:]), gap=16))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows) - 8), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 8
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / "matches.png"
    sheet.save(out)
    print(f"wrote {out} ({len(rows)} pairs, {q.shape[-2]}x{q.shape[-1]} cells)")


if __name__ == "__main__":
    main()
