"""What our mmseg configs need and mmseg 1.4.2 lacks. Importing this module registers both in mmseg's
registries (the configs list it under `custom_imports`, so mmseg's own `tools/train.py` finds them too).

- `SyntheticShapesDataset`: the VOC export of the built-in synthetic dataset
  (`python -m shared.data.synthetic --format voc ...`): background + the 8 shape classes, VOC palette.
- `LayerDecayOptimWrapperConstructor`: layer-wise lr decay for mmseg's `VisionTransformer` and
  `SwinTransformer`. mmseg's own `LearningRateDecayOptimizerConstructor` only accepts backbones whose
  class is ConvNeXt, BEiT or MAE and raises NotImplementedError for these two. Layer ids follow SimMIM's
  fine-tuning code (microsoft/SimMIM `optimizer.py`, `get_vit_layer` / `get_swin_layer`, the same rule as
  BEiT's and mmseg's ViT one), on mmseg's parameter names:
    ViT:  cls_token, pos_embed, patch_embed -> 0;  layers.i -> i + 1;  the rest -> L + 1
    Swin: patch_embed, absolute_pos_embed -> 0;  stages.s.blocks.b -> sum(depths[:s]) + b + 1;
          stages.s.downsample -> sum(depths[:s + 1]);  the rest -> L + 1
  where L is the number of blocks. A parameter with layer id i gets lr = base_lr * decay_rate ** (L + 1 - i),
  so the decode head and neck (outside the backbone, id L + 1) train at base_lr. Biases, norms (1-d
  parameters) and position embeddings / tables get no weight decay, as in SimMIM, BEiT and mmseg.
  Config: `optim_wrapper=dict(..., constructor='LayerDecayOptimWrapperConstructor',
  paramwise_cfg=dict(decay_rate=0.65))`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS, OPTIM_WRAPPER_CONSTRUCTORS

from shared.data.synthetic import SHAPES, voc_palette
from shared.errors import UserError

CLASSES = ("background",) + tuple(SHAPES)
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "absolute_pos_embed", "relative_position_bias_table")


@DATASETS.register_module()
class SyntheticShapesDataset(BaseSegDataset):
    """The synthetic dataset's VOC layout: `JPEGImages/*.jpg`, `SegmentationClass/*.png` (pixel = class
    index, 0 = background), `ImageSets/Segmentation/{train,val}.txt`, `classes.txt`."""

    METAINFO = dict(classes=CLASSES, palette=[voc_palette()[3 * k:3 * k + 3] for k in range(len(CLASSES))])

    def __init__(self, ann_file: str = "", img_suffix: str = ".jpg", seg_map_suffix: str = ".png", **kwargs):
        listed = Path(kwargs.get("data_root") or "") / "classes.txt"
        if listed.is_file():
            names = tuple(listed.read_text().split())
            if names != CLASSES:
                raise UserError(f"{listed} lists {list(names)}, this dataset has {list(CLASSES)} (export all 8 "
                                "classes: python -m shared.data.synthetic --format voc without --num-classes)")
        super().__init__(ann_file=ann_file, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)


def vit_layer(name: str, num_blocks: int) -> int:
    """Layer id of a parameter of mmseg's VisionTransformer (name without the `backbone.` prefix)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def swin_layer(name: str, depths: Sequence[int]) -> int:
    """Layer id of a parameter of mmseg's SwinTransformer (name without the `backbone.` prefix)."""
    if name == "absolute_pos_embed" or name.startswith("patch_embed."):
        return 0
    if name.startswith("stages."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":           # patch merging closes its stage
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


def layer_rule(backbone) -> Tuple[int, Callable[[str], int]]:
    """(number of blocks, name -> layer id) for the backbones this constructor knows."""
    kind = type(backbone).__name__
    if kind == "VisionTransformer":
        n = len(backbone.layers)
        return n, lambda name: vit_layer(name, n)
    if kind == "SwinTransformer":
        depths = [len(stage.blocks) for stage in backbone.stages]
        return sum(depths), lambda name: swin_layer(name, depths)
    raise UserError(f"layer-wise lr decay is implemented for VisionTransformer and SwinTransformer backbones, "
                    f"not {kind}")


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise lr decay over a ViT or Swin backbone; `paramwise_cfg=dict(decay_rate=...)`."""

    def add_params(self, params: List[dict], module, **kwargs) -> None:
        if "decay_rate" not in self.paramwise_cfg:
            raise UserError("LayerDecayOptimWrapperConstructor needs optim_wrapper.paramwise_cfg.decay_rate")
        rate = float(self.paramwise_cfg["decay_rate"])
        num_blocks, layer_of = layer_rule(module.backbone)
        groups: Dict[Tuple[int, bool], dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer = layer_of(name[len("backbone."):]) if name.startswith("backbone.") else num_blocks + 1
            no_decay = param.ndim == 1 or name.endswith(".bias") or name.split(".")[-1] in NO_WEIGHT_DECAY
            group = groups.get((layer, no_decay))
            if group is None:
                scale = rate ** (num_blocks + 1 - layer)
                group = groups[(layer, no_decay)] = dict(
                    params=[], lr=self.base_lr * scale, weight_decay=0.0 if no_decay else (self.base_wd or 0.0),
                    lr_scale=scale, group_name=f"layer_{layer}_{'no_decay' if no_decay else 'decay'}")
            group["params"].append(param)
        params.extend(groups[k] for k in sorted(groups))
