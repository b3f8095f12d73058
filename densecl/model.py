"""DenseCL and its MoCo v2 baseline as an nn.Module for the shared engine (ground truth:
WXinlong/DenseCL, `openselfsup/models/densecl.py`, `moco.py`, `necks.py`, configs).

query:  view 1 -> backbone (C5 map) -> neck -> q (global), q_grid (dense, every C5 cell)
key:    view 2 -> momentum backbone -> momentum neck -> k, k_grid, k_pool (pooled dense output),
        computed without gradient, with shuffle-BN across ranks; the momentum encoder (backbone +
        neck parameters, not BN buffers) is updated inside the step before the keys, m = 0.999.
match:  for each query cell, the key cell with the most similar *backbone* feature (cosine).
loss:   (1 - λ) InfoNCE(q, k, queue) + λ InfoNCE(q_grid cell, matched k_grid cell, dense queue)
queues: k -> `queue`, k_pool -> `queue_dense`, both gathered from every rank, after the loss.

Only view 1 is a query and only view 2 a key (the official loss is not symmetrised).
MoCo v2 is the same model with `neck: mocov2` (the global MLP only) and λ = 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet

from densecl.loss import dense_correspondence, densecl_loss, info_nce
from shared import dist
from shared.config import BackboneConfig, ModelConfig, choice, num
from shared.errors import ConfigError
from shared.models import build_backbone, momentum_copy, momentum_update
from shared.models.backbones import ResNet
from shared.numerics import at_least_fp32


@dataclass
class DenseCLModelConfig(ModelConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="resnet50"))
    neck: str = choice("densecl", "densecl", "mocov2")  # mocov2: global MLP only (NonLinearNeckV1)
    hidden_dim: int = num(2048, ">=1")        # neck hidden width (hid_channels)
    dim: int = num(128, ">=1")                # output width (feat_dim / out_channels)
    queue_len: int = num(65536, ">=1")        # must be divisible by the global batch
    temperature: float = num(0.2, ">0")
    loss_lambda: float = num(0.5, ">=0")      # weight of the dense loss; 0 with neck mocov2
    lambda_warmup_steps: int = num(0, ">=0")  # the official DenseCLWarmupHook (off in every shipped config): λ = 0 before this step
    bn_splits: int = num(1, ">=1")            # >1: BatchNorm over groups of batch / bn_splits images, keys shuffled across the
                                  # groups: the per-GPU BN and shuffle-BN of a bn_splits-GPU run, in each process


def openselfsup_resnet_init(resnet: nn.Module, zero_init_residual: bool) -> None:
    """OpenSelfSup's ResNet init: convolutions kaiming-normal with fan_in (torchvision: fan_out),
    BatchNorm weight 1 / bias 0, optionally the last BN of every residual branch 0."""
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in resnet.modules():
            if isinstance(m, tv_resnet.Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, tv_resnet.BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def kaiming_linear_init(module: nn.Module) -> None:
    """The necks' `init_linear='kaiming'`: every nn.Linear kaiming-normal (fan_in, relu), bias 0.
    Convolutions (the dense head) keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class Neck(nn.Module):
    """Global branch: avgpool -> Linear -> ReLU -> Linear (biases, no BN).
    Dense branch (neck `densecl`): 1x1 conv -> ReLU -> 1x1 conv on every cell of the map, and its
    average over the cells (`pooled`, used only to fill the dense queue)."""

    def __init__(self, in_dim: int, hidden: int, out: int, dense: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self.mlp2 = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, out, 1)) if dense else None
        kaiming_linear_init(self)

    def forward(self, fmap: torch.Tensor):
        """(N, C, H, W) -> global (N, D), grid (N, D, H·W) or None, pooled grid (N, D) or None."""
        g = self.mlp(fmap.mean(dim=(2, 3)))
        if self.mlp2 is None:
            return g, None, None
        grid = self.mlp2(fmap).flatten(2)
        return g, grid, grid.mean(dim=2)


class DenseCL(nn.Module):
    BATCH_COUPLING = "BatchNorm and shuffle-BN see the batch, and the queue takes the whole batch once per step"

    def __init__(self, cfg: DenseCLModelConfig, global_batch: int):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone)
        if not isinstance(self.backbone, ResNet):
            raise ConfigError(f"model.backbone.name: DenseCL takes a torchvision ResNet, got {cfg.backbone.name}")
        openselfsup_resnet_init(self.backbone, cfg.backbone.zero_init_residual)
        local_batch = global_batch // dist.world_size()
        if cfg.bn_splits < 1 or local_batch % cfg.bn_splits:
            raise ConfigError(f"model.bn_splits={cfg.bn_splits} must be a positive divisor of the per-process batch "
                              f"{local_batch} (train.batch_size={global_batch} over {dist.world_size()} process(es))")
        self.bn_splits = cfg.bn_splits
        self.backbone = dist.convert_split_batchnorm(self.backbone, cfg.bn_splits)
        dense = cfg.neck == "densecl"
        if not dense and cfg.loss_lambda != 0:
            raise ConfigError(f"model.loss_lambda={cfg.loss_lambda}: the mocov2 neck has no dense branch; set it to 0")
        if not dense and cfg.lambda_warmup_steps:
            raise ConfigError("model.lambda_warmup_steps: the mocov2 neck has no dense loss to warm up; set it to 0")
        if not 0.0 <= cfg.loss_lambda <= 1.0:
            raise ConfigError(f"model.loss_lambda must be in [0, 1], got {cfg.loss_lambda}")
        if cfg.queue_len <= 0 or cfg.queue_len % global_batch:
            raise ConfigError(f"model.queue_len={cfg.queue_len} must be a positive multiple of the global batch "
                              f"train.batch_size={global_batch} (the queue advances one global batch per step)")
        self.neck = Neck(self.backbone.out_dim, cfg.hidden_dim, cfg.dim, dense)
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_neck = momentum_copy(self.neck)
        self.temperature, self.loss_lambda, self.warmup = cfg.temperature, cfg.loss_lambda, cfg.lambda_warmup_steps
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_len, cfg.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        if dense:
            self.register_buffer("queue_dense", F.normalize(torch.randn(cfg.queue_len, cfg.dim), dim=1))
            self.register_buffer("queue_dense_ptr", torch.zeros((), dtype=torch.long))

    @property
    def dense(self) -> bool:
        return self.neck.mlp2 is not None

    def c5(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return backbone.forward_intermediates(x, [3])[0]

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(k_map, k, k_grid, k_pool) of the momentum encoder, computed on a shuffled batch and
        returned in the caller's order; the map is l2-normalised over channels, the rest too."""
        x, inverse = dist.shuffle_batch(x)
        # with bn_splits, also within the process: each BN group of keys mixes images of several query groups
        local = torch.randperm(x.shape[0], device=x.device) if self.bn_splits > 1 else None
        if local is not None:
            x = x[local]
        fmap = self.c5(self.momentum_backbone, x)
        k, k_grid, k_pool = self.momentum_neck(fmap)
        outs = [F.normalize(fmap.flatten(2).float(), dim=1), F.normalize(k.float(), dim=1)]
        if k_grid is not None:
            outs += [F.normalize(k_grid.float(), dim=1), F.normalize(k_pool.float(), dim=1)]
        if local is not None:
            back = torch.argsort(local)
            outs = [t[back] for t in outs]
        return tuple(dist.unshuffle_batch(t, inverse) for t in outs)

    @torch.no_grad()
    def enqueue(self, name: str, keys: torch.Tensor) -> None:
        """Write the keys of the global batch (gathered from every rank) at the pointer, FIFO."""
        queue, ptr = getattr(self, name), getattr(self, name + "_ptr")
        keys = dist.all_gather_nograd(keys)
        n, start = keys.shape[0], int(ptr)
        if queue.shape[0] % n:
            raise ConfigError(f"model.queue_len={queue.shape[0]} is not a multiple of the global batch {n}")
        queue[start:start + n] = keys.to(queue.dtype)
        ptr.fill_((start + n) % queue.shape[0])

    def forward(self, batch, ctx) -> Dict[str, torch.Tensor]:
        (x_q, x_k), _ = batch
        if ctx.ema_momentum is None:
            raise ConfigError("DenseCL needs a momentum coefficient: set sched.ema_start (0.999, ema_kind constant)")
        q_map = self.c5(self.backbone, x_q)
        q, q_grid, _ = self.neck(q_map)
        momentum_update(self.backbone, self.momentum_backbone, ctx.ema_momentum)   # before the keys
        momentum_update(self.neck, self.momentum_neck, ctx.ema_momentum)
        keys = self.keys(x_k)
        k_map, k = keys[0], keys[1]
        with torch.autocast(q.device.type, enabled=False):
            q = F.normalize(at_least_fp32(q), dim=1)
            if self.dense:
                k_grid, k_pool = keys[2], keys[3]
                lam = 0.0 if ctx.step < self.warmup else self.loss_lambda
                match = dense_correspondence(q_map.detach(), k_map)
                q_grid = F.normalize(at_least_fp32(q_grid), dim=1)
                # the queues are cloned: they are overwritten below, after autograd saved them
                loss, single, dense = densecl_loss(q, k, self.queue.clone(), q_grid, k_grid, match,
                                                   self.queue_dense.clone(), self.temperature, lam)
            else:
                loss = single = info_nce(q, k, self.queue.clone(), self.temperature)
        self.enqueue("queue", k)
        out = {"loss": loss, "loss_single": single.detach()}
        if self.dense:
            self.enqueue("queue_dense", k_pool)
            out["loss_dense"] = dense.detach()
        return out
