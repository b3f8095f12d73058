"""Backbone checkpoints -> detectron2 and mmsegmentation key names. Pure torch: neither library is
imported, so this runs (and is tested) anywhere.

    python -m shared.transfer.convert runs/densecl/demo/last.pt --to detectron2 --out r50.pkl
    python -m shared.transfer.convert densecl_r50_imagenet_200ep.pth --to mmseg --out r50_mmseg.pth

Inputs: our `last.pt` and `backbone.pt`, and the authors' released files, recognised by their layout:
MoCo v1/v2 (`state_dict`, `module.encoder_q.*`), MoCo v3 (`state_dict`, `module.base_encoder.*`),
DenseCL (`state_dict` with plain keys after `tools/extract_backbone_weights.py`, or `backbone.*` in a
training checkpoint), Barlow Twins (`resnet50.pth`, plain torchvision keys), DeiT-style `{'model': ...}`.
A classifier (`fc.*`, `head.*`) is dropped. Architectures: torchvision ResNets (both targets), timm
ViTs and timm Swins (mmseg only; detectron2 has no ViT backbone in its ResNet configs).

Outputs:
- detectron2: a pickle `{'model': {name: numpy array}, '__author__': ..., 'matching_heuristics': True}`
  in detectron2's ResNet names (`stem.conv1(.norm)`, `res2`-`res5`, `convK.norm`, `shortcut(.norm)`);
  load it with `MODEL.WEIGHTS r50.pkl`.
- mmseg: `{'state_dict': ..., 'meta': ...}` via `torch.save`. ResNets keep torchvision's names, which are
  those of mmseg's `ResNet` with the 7x7 stem (V1b; DenseCL's `ResNetNormal`), **not** `ResNetV1c`'s deep
  stem. ViTs get mmseg `VisionTransformer` names (`layers.i.ln1`, fused `attn.attn.in_proj_weight`, ...).
  Swins (SimMIM's) get mmseg `SwinTransformer` names, as mmseg's `swin2mmseg.py` gives them from the
  official Swin: `stages.i`, `attn.w_msa`, `ffn.layers`, `patch_embed.projection`; timm opens stage i
  with the patch merging that the official Swin and mmseg close stage i - 1 with, and mmseg's merging
  unfolds its 2x2 neighbourhood channel by channel, so the merging weights move back one stage and
  their input channels are reordered. The final norm is dropped (mmseg normalises each output with
  its own `norm0..3`).
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Dict, Tuple

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from shared import checkpoint as ckpt
from shared.errors import UserError, cli_main

# wrappers around the backbone's own keys, tried in this order (the first one present wins)
PREFIXES = (
    ("module.encoder_q.", "MoCo v1/v2 checkpoint"),
    ("module.base_encoder.", "MoCo v3 checkpoint"),
    ("backbone.", "training checkpoint with a .backbone (ours, DenseCL/OpenSelfSup)"),
    ("module.", "DDP-wrapped state dict"),
)
CLASSIFIER = ("fc.", "head.")
STAGES = {BasicBlock: {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)},                   # blocks per stage of torchvision's
          Bottleneck: {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}}   # ResNets


def read_backbone(path: str | Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """The backbone state dict inside any supported checkpoint (classifier dropped), and what it was."""
    raw = ckpt.load(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    if "format" in raw and "model" in raw:
        sd, what = raw["model"], "our training checkpoint"
    elif isinstance(raw.get("state_dict"), dict):
        sd, what = raw["state_dict"], "'state_dict' checkpoint"
    elif isinstance(raw.get("model"), dict):
        sd, what = raw["model"], "'model' checkpoint"
    else:
        sd, what = raw, "plain state dict"
    for prefix, name in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            what = what if what == "our training checkpoint" else name
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith(CLASSIFIER)}
    if not sd:
        raise UserError(f"{path}: no backbone tensors found ({what})")
    return sd, what


def architecture(sd: Dict[str, torch.Tensor], source: str | Path = "checkpoint") -> str:
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "resnet"
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.q_bias" in sd:
        return "beit"
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "vit"
    if "patch_embed.proj.weight" in sd and "layers.0.blocks.0.attn.qkv.weight" in sd:
        return "swin"
    raise UserError(f"{source}: not a torchvision ResNet (conv1.weight, layer1.0.*), a timm ViT "
                    f"(patch_embed.proj.weight, blocks.0.attn.qkv.*) nor a timm Swin (layers.0.blocks.0.*); "
                    f"its keys begin {sorted(sd)[:4]}")


def check_resnet(sd: Dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """Every key of the torchvision ResNet these stages describe is present with its shape, and nothing else."""
    depths = [1 + max((int(m.group(1)) for k in sd for m in [re.match(rf"layer{i}\.(\d+)\.", k)] if m), default=-1)
              for i in range(1, 5)]
    block = Bottleneck if "layer1.0.conv3.weight" in sd else BasicBlock
    known = STAGES[block]
    if tuple(depths) not in known.values():
        raise UserError(f"{source}: truncated ResNet checkpoint or not a torchvision depth: blocks per stage {depths}; "
                        + ", ".join(f"ResNet-{d} has {list(s)}" for d, s in known.items()))
    kwargs = {"width_per_group": sd["layer1.0.conv1.weight"].shape[0]} if block is Bottleneck else {}
    ref = {k: v.shape for k, v in ResNet(block, depths, **kwargs).state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(ref) - set(sd))
    extra = sorted(set(sd) - set(ref))
    if missing:
        raise UserError(f"{source}: truncated ResNet checkpoint, {len(missing)} keys missing, e.g. {missing[:3]}")
    if extra:
        more = " ..." if len(extra) > 3 else ""
        raise UserError(f"{source}: keys a torchvision ResNet does not have: {extra[:3]}{more}")
    bad = [k for k in ref if tuple(sd[k].shape) != tuple(ref[k])]
    if bad:
        raise UserError(f"{source}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, a ResNet with these stages "
                        f"expects {tuple(ref[bad[0]])}")


def detectron2_key(k: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name."""
    if not k.startswith("layer"):
        k = "stem." + k
    k = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
    k = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", k)
    return k.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def to_detectron2(sd: Dict[str, torch.Tensor], author: str, source: str | Path = "checkpoint") -> dict:
    if architecture(sd, source) != "resnet":
        raise UserError(f"{source}: detectron2 conversion takes a ResNet; ViTs go to mmseg (--to mmseg)")
    check_resnet(sd, source)
    model = {detectron2_key(k): v.detach().cpu().numpy() for k, v in sd.items()}
    return {"model": model, "__author__": author, "matching_heuristics": True}


VIT_RULES = (  # timm VisionTransformer -> mmseg VisionTransformer, applied in order
    (r"^norm\.", "ln1."),
    (r"^blocks\.", "layers."),
    (r"\.norm(\d)\.", r".ln\1."),
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"\.attn\.qkv\.(weight|bias)$", r".attn.attn.in_proj_\1"),
    (r"\.attn\.proj\.", ".attn.attn.out_proj."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
)
VIT_KEEP = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
                      r"blocks\.\d+\.(norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(weight|bias))$")


def mmseg_vit_key(k: str) -> str:
    for pattern, repl in VIT_RULES:
        k = re.sub(pattern, repl, k)
    return k


SWIN_RULES = (  # timm SwinTransformer (blocks, stage norms) -> mmseg SwinTransformer, applied in order
    (r"^layers\.", "stages."),
    (r"\.attn\.", ".attn.w_msa."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
)
SWIN_KEEP = re.compile(r"^(patch_embed\.(proj|norm)\.(weight|bias)|norm\.(weight|bias)|"
                       r"layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))|"
                       r"layers\.\d+\.blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.relative_position_bias_table|"
                       r"attn\.(qkv|proj)\.(weight|bias)|mlp\.fc[12]\.(weight|bias)))$")


def unfold_channel_order(v: torch.Tensor) -> torch.Tensor:
    """A patch-merging tensor over 4C input channels, from timm's / the official order (the 2x2
    neighbours (0,0), (1,0), (0,1), (1,1) one after the other, C channels each) to nn.Unfold's
    (for each channel its 4 neighbours (0,0), (0,1), (1,0), (1,1)): the last dimension is permuted."""
    c = v.shape[-1] // 4
    return v.reshape(*v.shape[:-1], 4, c)[..., [0, 2, 1, 3], :].transpose(-1, -2).reshape(v.shape)


def to_mmseg_swin(sd: Dict[str, torch.Tensor], source: str | Path = "checkpoint") -> Dict[str, torch.Tensor]:
    odd = sorted(k for k in sd if not SWIN_KEEP.match(k))
    if odd:
        raise UserError(f"{source}: Swin keys mmseg's SwinTransformer has no place for: {odd[:3]}")
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu().clone()
        merge = re.match(r"^layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$", k)
        if merge:
            stage = int(merge.group(1)) - 1
            out[f"stages.{stage}.downsample.{merge.group(2)}.{merge.group(3)}"] = unfold_channel_order(v)
        elif not k.startswith("norm."):
            for pattern, repl in SWIN_RULES:
                k = re.sub(pattern, repl, k)
            out[k] = v
    return out


BEIT_KEEP = re.compile(r"^(cls_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
                       r"rel_pos_bias\.relative_position_bias_table|blocks\.\d+\.(gamma_[12]|norm[12]\.(weight|bias)|"
                       r"attn\.(q_bias|v_bias|qkv\.weight|proj\.(weight|bias)|relative_position_bias_table)|"
                       r"mlp\.fc[12]\.(weight|bias)))$")
BEIT_RULES = VIT_RULES[:4] + (VIT_RULES[6], VIT_RULES[7])   # no fused-attention renaming: mmseg's BEiT keeps qkv


def to_mmseg_beit(sd: Dict[str, torch.Tensor], source: str | Path = "checkpoint") -> Dict[str, torch.Tensor]:
    """A BEiT-style timm ViT (SimMIM's: q/v biases, layer scale, relative position bias shared or per
    block) in mmseg `BEiT` names, as mmseg's `beit2mmseg`; a shared table is copied into every layer."""
    odd = sorted(k for k in sd if not BEIT_KEEP.match(k))
    if odd:
        raise UserError(f"{source}: BEiT-style ViT keys mmseg's BEiT has no place for: {odd[:3]} (fc_norm: pass "
                        "a pretrained, not a fine-tuned, backbone)")
    sd = dict(sd)
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if shared is not None:
        for i in range(depth):
            sd[f"blocks.{i}.attn.relative_position_bias_table"] = shared
    out = {}
    for k, v in sd.items():
        for pattern, repl in BEIT_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v.detach().cpu().clone()
    return out


def to_mmseg(sd: Dict[str, torch.Tensor], author: str, source: str | Path = "checkpoint") -> dict:
    arch = architecture(sd, source)
    if arch == "resnet":
        check_resnet(sd, source)
        out = {k: v.detach().cpu().clone() for k, v in sd.items()}
    elif arch == "swin":
        out = to_mmseg_swin(sd, source)
    elif arch == "beit":
        out = to_mmseg_beit(sd, source)
    else:
        odd = sorted(k for k in sd if not VIT_KEEP.match(k))
        if odd:
            raise UserError(f"{source}: ViT keys mmseg's VisionTransformer has no place for: {odd[:3]} (a conv stem, "
                            "register tokens or fc_norm are not supported)")
        out = {mmseg_vit_key(k): v.detach().cpu().clone() for k, v in sd.items()}
    return {"state_dict": out, "meta": {"author": author, "architecture": arch, "names": "mmseg"}}


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--to", required=True, choices=["detectron2", "mmseg"])
    p.add_argument("--out", required=True, help="output file (.pkl for detectron2, .pth for mmseg)")
    a = p.parse_args(argv)
    if a.to == "detectron2" and not a.out.endswith(".pkl"):
        raise UserError(f"--out {a.out}: detectron2 reads converted weights from a .pkl file")
    sd, what = read_backbone(a.checkpoint)
    author = f"ssl-reference ({what})"
    if a.to == "detectron2":
        path = ckpt.save_atomic(to_detectron2(sd, author, a.checkpoint), a.out, write=pickle.dump)
    else:
        path = ckpt.save_atomic(to_mmseg(sd, author, a.checkpoint), a.out)
    n = len(sd)
    print(f"{a.checkpoint} ({what}, {architecture(sd, a.checkpoint)}, {n} tensors) -> {path} [{a.to}]")


if __name__ == "__main__":
    main()
