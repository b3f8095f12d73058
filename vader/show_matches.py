"""Draw what VADeR learns from and what it learned: for pairs of views of one image, the matched cells
(from the crop geometry, as in training) and, for a few query cells of view 1, the similarity of the
query's embedding (online network) to every cell of view 2 (momentum network).

    python vader/show_matches.py runs/vader/demo/last.pt [--pairs 3] [--queries 3] [--split val] [--out FILE]

Writes `matches.png` next to the checkpoint: one row per image: view 1 and view 2 with a line from
each sampled cell of view 1 to the cell of view 2 it shows (one colour per pair), then one panel per
query: view 2 shaded by cosine similarity (bright: similar), the query's true match ringed."""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from shared import checkpoint as ckpt
from shared.data.augment import to_pil
from shared.data.loader import build_image_dataset
from shared.errors import cli_main
from vader.model import STRIDE
from vader.train import Config, build
from vader.views import PairedViews


def colour(i: int, n: int) -> tuple:
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 1.0))


def centre(cell: int, grid: int, size: int, x0: int = 0) -> tuple:
    return x0 + (cell % grid + 0.5) * size / grid, (cell // grid + 0.5) * size / grid


def draw_matches(v1: Image.Image, v2: Image.Image, cells1, cells2, grid: int, gap: int) -> Image.Image:
    w = v1.width
    canvas = Image.new("RGB", (2 * w + gap, w), "white")
    canvas.paste(v1, (0, 0))
    canvas.paste(v2, (w + gap, 0))
    d = ImageDraw.Draw(canvas)
    for n, (a, b) in enumerate(zip(cells1.tolist(), cells2.tolist())):
        pa, pb = centre(a, grid, w), centre(b, grid, w, w + gap)
        c = colour(n, len(cells1))
        d.line([pa, pb], fill=c, width=1)
        for (x, y) in (pa, pb):
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
    return canvas


def similarity_panel(v2: Image.Image, sim: torch.Tensor, match: int, grid: int, c: tuple) -> Image.Image:
    """v2 darkened where the (grid, grid) similarity map is low; the true match ringed in colour c."""
    lo, hi = float(sim.min()), float(sim.max())
    s = ((sim - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
    heat = Image.fromarray((s * 255).byte().numpy(), "L").resize(v2.size, Image.NEAREST)
    panel = Image.composite(v2, Image.new("RGB", v2.size, "black"), heat)
    d = ImageDraw.Draw(panel)
    x, y = centre(match, grid, v2.width)
    r = v2.width / grid
    d.ellipse([x - r, y - r, x + r, y + r], outline=c, width=2)
    return panel


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a VADeR last.pt (model and config)")
    p.add_argument("--pairs", type=int, default=3, help="how many images (one row each)")
    p.add_argument("--queries", type=int, default=3, help="query cells with a similarity panel, per image")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    p.add_argument("--out", default="", help="PNG path (default: matches.png next to the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=...")
    a = p.parse_args(argv)
    cfg, model = ckpt.load_trained_model(a.checkpoint, Config, build, a.overrides, "VADeR")
    model.eval()
    dataset = build_image_dataset(cfg.data, a.split)
    views = PairedViews(cfg.aug.views, STRIDE, cfg.model.matches)
    vc = cfg.aug.views[0]
    grid = vc.size // STRIDE
    rows = []
    for i in range(min(a.pairs, len(dataset))):
        torch.manual_seed(a.seed + i)
        out = views(dataset[i][0])
        with torch.no_grad():
            q = model.embed(model.backbone, model.decoder, out["view1"][None])[0].flatten(1)        # (D, G*G)
            k = model.embed(model.momentum_backbone, model.momentum_decoder, out["view2"][None])[0].flatten(1)
        scale = max(1, 192 // vc.size)
        v1, v2 = to_pil(out["view1"], vc.mean, vc.std, scale), to_pil(out["view2"], vc.mean, vc.std, scale)
        panels = [draw_matches(v1, v2, out["cells1"], out["cells2"], grid, gap=8)]
        for n in range(min(a.queries, len(out["cells1"]))):
            cell, match = int(out["cells1"][n]), int(out["cells2"][n])
            sim = (q[:, cell:cell + 1] * k).sum(0).view(grid, grid)
            panels.append(similarity_panel(v2, sim, match, grid, colour(n, len(out["cells1"]))))
        row = Image.new("RGB", (sum(pn.width for pn in panels) + 8 * (len(panels) - 1), v1.height), "white")
        x = 0
        for pn in panels:
            row.paste(pn, (x, 0))
            x += pn.width + 8
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows) - 8), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 8
    path = Path(a.out) if a.out else Path(a.checkpoint).parent / "matches.png"
    sheet.save(path)
    print(f"wrote {path} ({len(rows)} pairs, {grid}x{grid} cells, {a.queries} similarity maps each)")


if __name__ == "__main__":
    main()
