"""MLP heads (projectors, predictors) as flat `nn.Sequential`s, so state-dict keys follow the
official repos' `projector.0.weight, projector.1.weight, ...` numbering."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn


def mlp(dims: Sequence[int], *, hidden_bn: bool = True, last_bn: bool = False, last_bn_affine: bool = True,
        bias: bool = True, last_bias: bool | None = None) -> nn.Sequential:
    """Linear layers `dims[0] -> dims[1] -> ... -> dims[-1]`.

    Hidden layers: Linear(bias) [-> BatchNorm1d if hidden_bn] -> ReLU.
    Last layer: Linear(last_bias, default `bias`) [-> BatchNorm1d(affine=last_bn_affine) if last_bn].

    Barlow Twins projector: mlp([2048, 8192, 8192, 8192], bias=False).
    MoCo v3 projector (ResNet): mlp([2048, 4096, 256], bias=False, last_bn=True, last_bn_affine=False).
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(dims)}")
    last_bias = bias if last_bias is None else last_bias
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)


def parse_dims(spec: str) -> list[int]:
    """'8192-8192-8192' -> [8192, 8192, 8192] (the official repos' command-line format)."""
    try:
        return [int(x) for x in spec.split("-")]
    except ValueError:
        raise ValueError(f"expected sizes like '8192-8192-8192', got {spec!r}") from None
