"""Official SimMIM checkpoints <-> ours.

    python simmim/convert.py simmim_pretrain__vit_base__img224__800ep.pth backbone.pt

writes the encoder of an official pretraining checkpoint (`{'model': {'encoder.*', 'decoder.*'}}`)
as our backbone state dict (timm key names), which `python -m shared.eval backbone.pt --config
simmim/configs/<recipe>.yaml --what finetune` fine-tunes and `shared/transfer` converts.

Key differences: the official model is `encoder.*` + `decoder.*` with the mask token inside the
encoder; ours is `backbone.*` (a timm model) + `decoder.*` with `mask_token` beside it. The official
Swin ends stage i with its patch merging (`layers.i.downsample`), timm's opens stage i + 1 with it
(`layers.{i+1}.downsample`). Buffers that both rebuild (relative_position_index, attn_mask,
relative_coords_table) are dropped; ViT keys are the same in both.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict

import torch

from shared import checkpoint as ckpt
from shared.errors import UserError, cli_main, first_line

BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def _shift_downsample(key: str, by: int) -> str:
    return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + by}.downsample.", key)


def from_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official SimMIM state dict (`encoder.*`, `decoder.*`) as ours (`backbone.*`, `mask_token`,
    `decoder.*`). A state dict without the `encoder.` prefix is taken as a bare encoder."""
    if not any(k.startswith("encoder.") for k in sd):
        sd = {f"encoder.{k}": v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if any(b in k for b in BUFFERS):
            continue
        if k == "encoder.mask_token":
            out["mask_token"] = v
        elif k.startswith("encoder."):
            out["backbone." + _shift_downsample(k[len("encoder."):], +1)] = v
        elif k.startswith("decoder."):
            out[k] = v
        else:
            raise UserError(f"not a SimMIM checkpoint: unexpected key {k!r} (expected encoder.* / decoder.*)")
    return out


def to_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Ours (`backbone.*`, `mask_token`, `decoder.*`) in the official key names (without buffers)."""
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            out["encoder.mask_token"] = v
        elif k.startswith("backbone."):
            out["encoder." + _shift_downsample(k[len("backbone."):], -1)] = v
        else:
            out[k] = v
    return out


def backbone_of(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("official", help="an official SimMIM checkpoint (.pth with 'model', or a bare state dict)")
    p.add_argument("out", help="where to write our backbone state dict")
    a = p.parse_args(argv)
    try:
        state = torch.load(a.official, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable input gets one line
        raise UserError(f"{a.official}: cannot read a checkpoint ({first_line(exc)})") from None
    sd = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{a.official}: no state dict inside (expected a dict with 'model')")
    backbone = backbone_of(from_official(sd))
    ckpt.save_atomic(backbone, Path(a.out))
    print(f"wrote {a.out}: {len(backbone)} backbone tensors")


if __name__ == "__main__":
    main()
