"""Backbones from torchvision (ResNets, torchvision key names) and timm (ViT, Swin, ...).

Every backbone `b` returned by `build_backbone` is the library's own module, so its state dict
keys are the library's own (the detectron2/mmseg converters rely on that), plus:
  - `b(x)`              -> pooled features (N, b.out_dim)
  - `b.forward_intermediates(x, indices, intermediates_only=True)` -> multi-scale maps (N, C, H, W)
    (ResNet: the outputs of layer1..layer4 = C2..C5; timm models: their own implementation)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torchvision.models import resnet as tv_resnet

from shared.config import BackboneConfig
from shared.errors import ConfigError

RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (tv_resnet.Bottleneck, [3, 8, 36, 3], {}),
    "wide_resnet50_2": (tv_resnet.Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
}


class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet (same init, same keys) with `fc = Identity`, so `forward` is the pooled
    2048-d (or 512-d) feature, plus `forward_intermediates` for C2..C5."""

    def __init__(self, block, layers, **kwargs):
        super().__init__(block, layers, **kwargs)
        self.out_dim = self.fc.in_features
        self.fc = nn.Identity()
        self.stage_channels = [64 * block.expansion * 2 ** i for i in range(4)]

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              intermediates_only: bool = True) -> List[torch.Tensor]:
        if not intermediates_only:
            raise NotImplementedError("ResNet.forward_intermediates returns the stage outputs only")
        wanted = range(4) if indices is None else ([indices] if isinstance(indices, int) else list(indices))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if i in wanted:
                out.append(x)
            if i >= max(wanted):
                break
        return out


class ConvStem(nn.Module):
    """Convolutional stem for a ViT with 16x16 patches ("Early Convolutions Help Transformers See
    Better", Xiao et al. 2021, as used by MoCo v3's `vit_conv_*`): four stride-2 3x3 convolutions
    (no bias) each with BatchNorm and ReLU, widths D/8, D/4, D/2, D, then a 1x1 convolution to D.
    Drop-in for timm's PatchEmbed (`embed_layer=`): (N, 3, H, W) -> (N, H/16 * W/16, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **_ignored):
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 16 or embed_dim % 8:
            raise ConfigError(f"model.backbone.conv_stem needs patch size 16 and a width divisible by 8, "
                              f"got patch {patch_size} and width {embed_dim}")
        self.img_size, self.patch_size = size, (16, 16)
        self.grid_size = (size[0] // 16, size[1] // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(4):
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True):
        return 16 if as_scalar else (16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    name = cfg.name
    if name in RESNETS:
        block, layers, extra = RESNETS[name]
        unknown = set(cfg.kwargs) - {"width_per_group", "groups", "replace_stride_with_dilation", "norm_layer"}
        if unknown:
            raise ConfigError(f"model.backbone.kwargs: {sorted(unknown)} not accepted by torchvision's ResNet")
        return ResNet(block, layers, zero_init_residual=cfg.zero_init_residual, **{**extra, **cfg.kwargs})
    if name not in timm.list_models():
        near = [n for n in RESNETS if n.startswith(name[:4])] + timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ConfigError(f"model.backbone.name: unknown backbone '{name}'; e.g. {', '.join(near) or 'resnet50'}")
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=cfg.drop_path, img_size=cfg.img_size, **cfg.kwargs)
    if cfg.conv_stem:
        kwargs["embed_layer"] = ConvStem
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as exc:  # convolutional timm models take no img_size
        if "img_size" not in str(exc):
            raise
        kwargs.pop("img_size")
        model = timm.create_model(name, **kwargs)
    model.out_dim = model.num_features
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
