"""End-to-end transfer on the built-in dataset, on the CPU, in the transfer environment:

    make transfer-demo          # = .venv-transfer/bin/python -m shared.transfer.demo --out runs/transfer-demo

1. export the synthetic dataset (3 shapes per image, 64 px) as COCO json in its default setting
   (textured backgrounds, random colours: in the easy setting random init already reaches AP 72 in
   300 iterations) and as VOC masks in the demos' easy setting (on the textured one 300 iterations of
   the FCN learn only background, from either init);
2. pretrain a ResNet-18 with the Barlow Twins demo recipe (`barlow/configs/demo.yaml`), or take
   `--checkpoint`;
3. convert it for detectron2 and for mmseg (`shared.transfer.convert`);
4. fine-tune a detectron2 Faster R-CNN R18-C4 and an mmseg FCN R18 on the exports, once from the
   pretrained backbone and once from random init (`shared.transfer.detection`, `.segmentation`);
5. print AP / AP50 / AP75 and mIoU side by side, and write them to `<out>/results.json`.

Every step runs as a subprocess of this interpreter with its output in `<out>/logs/<step>.log`. A step
whose result is already there is not run again, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from shared import checkpoint as ckpt
from shared.errors import UserError, cli_main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
DET_CONFIG = CONFIGS / "detectron2" / "synthetic_r18_c4_demo.yaml"
SEG_CONFIG = CONFIGS / "mmseg" / "fcn_r18_synthetic_demo.py"
EASY = ["--texture", "0", "--palette", "1", "--rotation", "0"]   # as in the pretraining demos' data (VOC export)
INITS = ("pretrained", "random_init")


def run_step(name: str, argv: List[str], out: Path, done: Path) -> None:
    """Run `python <argv>` unless `done` exists; its output goes to <out>/logs/<name>.log."""
    if done.exists():
        print(f"[demo] {name}: already done ({done})", flush=True)
        return
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[demo] {name}: {' '.join(argv)}  (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = [l for l in log.read_text().splitlines() if l.strip()][-1:] or ["(no output)"]
        raise UserError(f"demo step {name!r} failed (exit {rc}): {tail[0].strip()} -- full log: {log}")
    if not done.exists():
        raise UserError(f"demo step {name!r} finished but did not write {done} -- log: {log}")
    print(f"[demo] {name}: done in {time.time() - t0:.0f} s", flush=True)


def read_results(path: Path) -> Dict:
    return json.loads(path.read_text())


def table(results: Dict[str, Dict[str, Optional[float]]]) -> str:
    cols = ("AP", "AP50", "AP75", "mIoU")
    lines = [f"{'backbone':<14}" + "".join(f"{c:>8}" for c in cols), "-" * (14 + 8 * len(cols))]
    for init, r in results.items():
        lines.append(f"{init:<14}" + "".join(f"{r[c]:8.2f}" if r.get(c) is not None else f"{'-':>8}" for c in cols))
    return "\n".join(lines)


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="End-to-end transfer demo on the built-in dataset (CPU)")
    p.add_argument("--out", default="runs/transfer-demo", help="output folder (default: runs/transfer-demo)")
    p.add_argument("--checkpoint", help="a pretrained last.pt / backbone.pt to transfer instead of pretraining one")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--length", type=int, default=1024, help="training images exported")
    p.add_argument("--val-length", type=int, default=256, help="validation images exported")
    p.add_argument("--skip", choices=["detection", "segmentation"], action="append", default=[],
                   help="leave one task out (repeatable)")
    p.add_argument("--iters", type=int, help="fine-tuning iterations of both tasks instead of the configs' 300 "
                                               "(a quick check of the pipeline, not a result)")
    a = p.parse_args(argv)
    if a.iters is not None and a.iters < 1:
        raise UserError(f"--iters {a.iters}: must be at least 1")
    det_opts = [] if a.iters is None else [f"SOLVER.MAX_ITER={a.iters}", "TEST.PRECISE_BN.NUM_ITER=1"]
    seg_opts = [] if a.iters is None else [f"train_cfg.max_iters={a.iters}", f"train_cfg.val_interval={a.iters}"]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"

    export = ["-m", "shared.data.synthetic", "--length", str(a.length), "--val-length", str(a.val_length),
              "--image-size", str(a.image_size), "--max-objects", "3"]
    if "detection" not in a.skip:
        run_step("export_coco", [*export, "--format", "coco", "--out", str(data / "coco")], out,
                 data / "coco" / "annotations" / "instances_val.json")
    if "segmentation" not in a.skip:
        run_step("export_voc", [*export, *EASY, "--format", "voc", "--out", str(data / "voc")], out,
                 data / "voc" / "classes.txt")

    if a.checkpoint:
        source = Path(a.checkpoint).resolve()
        if not source.is_file():
            raise UserError(f"--checkpoint {a.checkpoint}: no such file")
    else:
        pre = out / "pretrain"
        run_step("pretrain", ["barlow/train.py", "--config", "barlow/configs/demo.yaml", f"train.out_dir={pre}",
                              "eval.after_train=[]", "eval.compare_random_init=false", "train.tensorboard=false"],
                 out, pre / "last.pt")
        source = pre / "last.pt"

    weights = {"detection": out / "backbone_detectron2.pkl", "segmentation": out / "backbone_mmseg.pth"}
    results: Dict[str, Dict[str, Optional[float]]] = {init: {} for init in INITS}
    if "detection" not in a.skip:
        run_step("convert_detectron2", ["-m", "shared.transfer.convert", str(source), "--to", "detectron2",
                                        "--out", str(weights["detection"])], out, weights["detection"])
        for init in INITS:
            run_dir = out / "detection" / init
            w = str(weights["detection"]) if init == "pretrained" else "none"
            run_step(f"detection_{init}", ["-m", "shared.transfer.detection", "--config", str(DET_CONFIG),
                                           "--weights", w, "--data-root", str(data / "coco"), "--out-dir", str(run_dir),
                                           *det_opts],
                     out, run_dir / "results.json")
            bbox = read_results(run_dir / "results.json").get("bbox", {})
            results[init].update(AP=bbox.get("AP"), AP50=bbox.get("AP50"), AP75=bbox.get("AP75"))
    if "segmentation" not in a.skip:
        run_step("convert_mmseg", ["-m", "shared.transfer.convert", str(source), "--to", "mmseg",
                                   "--out", str(weights["segmentation"])], out, weights["segmentation"])
        for init in INITS:
            run_dir = out / "segmentation" / init
            w = str(weights["segmentation"]) if init == "pretrained" else "none"
            run_step(f"segmentation_{init}", ["-m", "shared.transfer.segmentation", "--config", str(SEG_CONFIG),
                                              "--weights", w, "--data-root", str(data / "voc"),
                                              "--out-dir", str(run_dir), *seg_opts],
                     out, run_dir / "results.json")
            results[init]["mIoU"] = read_results(run_dir / "results.json").get("mIoU")

    ckpt.save_json({"backbone": str(source), "results": results}, out / "results.json")
    print(table(results))
    print(f"[demo] results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
