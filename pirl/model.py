"""PIRL as an nn.Module for the shared engine (ground truth: facebookresearch/vissl,
`configs/config/pretrain/pirl/*.yaml`, `vissl/losses/nce_loss.py`, heads `mlp` and
`siamese_concat_view`, trunk `resnext.py`).

trunk:    one ResNet, run on the 9B patches and then on the B images in two forward passes
          (per-GPU BatchNorm, so each pass normalises with its own statistics); res5 -> avgpool.
g:        Linear 2048 -> 128 on every patch, the 9 outputs of an image concatenated in their
          shuffled order (1152) -> Linear 1152 -> 128.
f:        Linear 2048 -> 128 on the image. (MLP-head recipe: 2048 -> 2048 -> 128 with a ReLU
          between, and a ReLU after the patch MLP too, as VISSL's `skip_last_layer_relu_bn: False`.)
memory:   N x 128 unit rows (uniform init, normalised), compared with as constants; after the loss
          each image's row becomes normalize(0.5 m + 0.5 f(image)), with the embeddings and indices
          gathered from every rank so that every replica applies the same update.
loss:     0.5 L(g(patches), memory) + 0.5 L(f(image), memory), L = NCE with a partition constant Z
          frozen at its first-batch estimate (headline), or InfoNCE (MLP-head recipe); 1 + K rows
          per sample, the sample's own row first, K drawn uniformly again for each term.
The bank and Z are buffers, so checkpoints carry them and a resumed run continues with both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pirl.loss import info_nce_memory_loss, memory_scores, nce_loss, partition_constant, sample_rows
from shared import dist
from shared.config import BackboneConfig, ModelConfig, choice, num
from shared.errors import ConfigError
from shared.models import build_backbone
from shared.models.backbones import ResNet
from shared.models.heads import mlp
from shared.numerics import at_least_fp32


@dataclass
class PIRLModelConfig(ModelConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="resnet50"))
    width: int = num(1, ">=1")                # VISSL's WIDTH_MULTIPLIER: every channel count x width (w2: 4096-d res5)
    head: str = choice("linear", "linear", "mlp")   # linear: pirl_jigsaw_4node_resnet50; mlp: models/resnet50_mlphead
    hidden_dim: int = num(0, ">=0")           # mlp head's hidden width; 0: the trunk's feature width (2048)
    dim: int = num(128, ">=1")                # embedding_dim
    loss: str = choice("nce", "nce", "cross_entropy")   # VISSL loss_type
    temperature: float = num(0.07, ">0")
    num_negatives: int = num(32000, ">=1")
    bank_momentum: float = num(0.5, "[0,1]")  # memory_params.momentum
    loss_weights: Tuple[float, float] = num((0.5, 0.5), ">=0")   # (patches -> memory, image -> memory)
    num_data: int = num(0, ">=0")             # memory rows = training images (VISSL num_train_samples); 0: from the dataset
    num_patches: int = num(9, ">=1")          # towers of siamese_concat_view (must equal aug.num_patches)
    vissl_init: bool = True                   # the trunk's convolutions as VISSL leaves them (PyTorch's default init)


def vissl_resnet_init(resnet: nn.Module) -> None:
    """VISSL's ResNet trunk rebuilds conv1, bn1 and layer1-4 after torchvision's constructor has
    initialised the originals, so the trunk it trains starts from PyTorch's default init: every
    Conv2d kaiming-uniform(a=sqrt 5) (bound 1/sqrt(fan_in)), every BatchNorm weight 1, bias 0,
    fresh running statistics."""
    for m in resnet.modules():
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            m.reset_parameters()


def widen_resnet(net: ResNet, width: int) -> ResNet:
    """VISSL's WIDTH_MULTIPLIER: the stem and every stage `width` times as wide (64w stem channels,
    stage planes 64w, 128w, 256w, 512w with width_per_group 64), so ResNet-50-w2 ends at 4096 channels.
    (torchvision's wide_resnet50_2 widens only the bottleneck's inner convolutions.)"""
    if width == 1:
        return net
    block = type(net.layer1[0])
    depths = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
    net.inplanes, net.dilation = 64 * width, 1
    net.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * width)
    net.layer1 = net._make_layer(block, 64 * width, depths[0])
    net.layer2 = net._make_layer(block, 128 * width, depths[1], stride=2)
    net.layer3 = net._make_layer(block, 256 * width, depths[2], stride=2)
    net.layer4 = net._make_layer(block, 512 * width, depths[3], stride=2)
    net.stage_channels = [64 * width * block.expansion * 2 ** i for i in range(4)]
    net.out_dim = net.stage_channels[-1]
    return net


def build_trunk(cfg: PIRLModelConfig) -> ResNet:
    net = build_backbone(cfg.backbone)
    if not isinstance(net, ResNet):
        raise ConfigError(f"model.backbone.name: PIRL's trunk is a torchvision ResNet, got {cfg.backbone.name}")
    if cfg.width > 1 and cfg.backbone.kwargs:
        raise ConfigError("model.width > 1 rebuilds the ResNet's stages: leave model.backbone.kwargs empty")
    net = widen_resnet(net, cfg.width)
    if cfg.vissl_init:
        vissl_resnet_init(net)
    return net


class PatchHead(nn.Module):
    """g: a per-patch head, the num_patches outputs of an image concatenated (siamese_concat_view),
    then Linear(num_patches x dim -> dim)."""

    def __init__(self, per_patch: nn.Module, dim: int, num_patches: int):
        super().__init__()
        self.per_patch, self.num_patches = per_patch, num_patches
        self.joint = nn.Linear(num_patches * dim, dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B x num_patches, C), image-major -> (B, dim)."""
        z = self.per_patch(feats)
        return self.joint(z.reshape(feats.shape[0] // self.num_patches, -1))


def build_heads(cfg: PIRLModelConfig, in_dim: int) -> Tuple[nn.Module, PatchHead]:
    if cfg.head == "linear":
        image, per_patch = nn.Linear(in_dim, cfg.dim), nn.Linear(in_dim, cfg.dim)
    else:
        hidden = cfg.hidden_dim or in_dim
        image = mlp([in_dim, hidden, cfg.dim], hidden_bn=False)
        per_patch = nn.Sequential(*mlp([in_dim, hidden, cfg.dim], hidden_bn=False), nn.ReLU(inplace=True))
    return image, PatchHead(per_patch, cfg.dim, cfg.num_patches)


def init_memory(num_data: int, dim: int) -> torch.Tensor:
    """VISSL's bank init: U(-s, s) with s = 1/sqrt(dim/3), then every row L2-normalised."""
    stdv = 1.0 / (dim / 3) ** 0.5
    return F.normalize(torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv), dim=1)


class PIRL(nn.Module):
    BATCH_COUPLING = "BatchNorm sees the batch, and the memory bank is updated once per step from the whole batch"

    def __init__(self, cfg: PIRLModelConfig):
        super().__init__()
        if cfg.num_data < 1:
            raise ConfigError("model.num_data: the memory bank needs the number of training images (train.py sets it "
                              "from the dataset when the recipe leaves 0)")
        if len(cfg.loss_weights) != 2:
            raise ConfigError(f"model.loss_weights: expected two weights (patches, image), got {cfg.loss_weights}")
        self.backbone = build_trunk(cfg)
        self.image_head, self.patch_head = build_heads(cfg, self.backbone.out_dim)
        self.loss_type, self.temperature = cfg.loss, cfg.temperature
        self.num_negatives, self.num_data, self.momentum = cfg.num_negatives, cfg.num_data, cfg.bank_momentum
        self.weights = tuple(float(w) for w in cfg.loss_weights)
        self.num_patches = cfg.num_patches
        self.register_buffer("memory", init_memory(cfg.num_data, cfg.dim))
        self.register_buffer("Z", torch.tensor(-1.0))      # < 0: not estimated yet (VISSL norm_constant -1)
        # identical on every rank (synchronised once, then updated with gathered rows): DDP need not
        # broadcast the bank (626 MiB for ImageNet) from rank 0 at every forward
        self._ddp_params_and_buffers_to_ignore = ["memory", "Z"]
        self._synced = False

    # ------------------------------------------------------------------ memory bank
    @torch.no_grad()
    def sync_memory(self) -> None:
        """Average the bank over ranks once, before the first step, as VISSL does (every rank starts
        from the same seed here, so it changes nothing unless they differ)."""
        if dist.is_dist():
            self.memory.copy_(dist.all_reduce_mean(self.memory))
        self._synced = True

    @torch.no_grad()
    def update_memory(self, z: torch.Tensor, index: torch.Tensor) -> None:
        """m[i] <- normalize(momentum m[i] + (1 - momentum) z) for the gathered (z, i) of every rank."""
        z, index = dist.all_gather_nograd(z.detach().float()), dist.all_gather_nograd(index)
        rows = self.memory[index] * self.momentum + z.to(self.memory.dtype) * (1.0 - self.momentum)
        self.memory.index_copy_(0, index, F.normalize(rows, dim=1))

    def draw_rows(self, index: torch.Tensor, term: int) -> torch.Tensor:
        """(B, 1+K) memory rows for loss term `term` (0 patches, 1 image): the positive, then K uniform."""
        return sample_rows(index, self.num_negatives, self.num_data)

    @torch.no_grad()
    def estimate_z(self, sim: torch.Tensor) -> None:
        """Z from this first batch's scores, averaged over ranks, then frozen (VISSL: the patch term's)."""
        self.Z.fill_(float(dist.all_reduce_mean(partition_constant(sim, temperature=self.temperature,
                                                                   num_data=self.num_data))))

    def criterion(self, sim: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "cross_entropy":
            return info_nce_memory_loss(sim, temperature=self.temperature)
        if float(self.Z) < 0:
            self.estimate_z(sim)
        return nce_loss(sim, temperature=self.temperature, Z=self.Z.item(), num_data=self.num_data)

    # ------------------------------------------------------------------ forward
    def embeddings(self, image: torch.Tensor, patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings (g(patches), f(image)), each (B, dim): the trunk on the patches first, then
        on the images (VISSL's input order), each pass with its own BatchNorm statistics."""
        b = image.shape[0]
        if patches.dim() != 5 or patches.shape[:2] != (b, self.num_patches):
            raise ConfigError(f"PIRL expects patches (B, {self.num_patches}, 3, P, P) for B={b} images, got "
                              f"{tuple(patches.shape)}: aug.num_patches and model.num_patches must agree")
        g = self.patch_head(self.backbone(patches.flatten(0, 1)))
        f = self.image_head(self.backbone(image))
        with torch.autocast(image.device.type, enabled=False):
            return F.normalize(at_least_fp32(g), dim=1), F.normalize(at_least_fp32(f), dim=1)

    def check_index(self, index: torch.Tensor) -> None:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= self.num_data:
            raise ConfigError(f"model.num_data={self.num_data} memory rows, but the dataset yields index "
                              f"{hi if lo >= 0 else lo}: set model.num_data to the number of training images "
                              "(0: counted from the dataset)")

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        x, _ = batch
        image, patches, index = x["image"], x["patches"], x["index"].long()
        if not self._synced:
            self.check_index(index)
            self.sync_memory()
        z_g, z_f = self.embeddings(image, patches)
        with torch.autocast(image.device.type, enabled=False):
            # both terms score against the bank before this step's update
            sim_g = memory_scores(z_g, self.memory, self.draw_rows(index, 0))
            loss_g = self.criterion(sim_g)
            sim_f = memory_scores(z_f, self.memory, self.draw_rows(index, 1))
            loss_f = self.criterion(sim_f)
            loss = self.weights[0] * loss_g + self.weights[1] * loss_f
        self.update_memory(z_f, index)          # only from the image branch, after the loss
        out = {"loss": loss, "loss_patches": loss_g.detach(), "loss_image": loss_f.detach()}
        if self.loss_type == "nce":
            out["Z"] = self.Z.detach().clone()
        return out
