"""Backbones (torchvision/timm), MLP heads, momentum encoders."""
from shared.models.backbones import build_backbone, count_parameters  # noqa: F401
from shared.models.heads import mlp, parse_dims  # noqa: F401
from shared.models.momentum import momentum_copy, momentum_update  # noqa: F401
from shared.models import convvit  # noqa: F401,E402  (registers ConvMAE's ConvViT with timm)
