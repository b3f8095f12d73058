"""End-to-end fine-tuning of a pretrained backbone with a linear head, trained by the shared engine
(so it checkpoints, resumes and runs under torchrun like pretraining).

The recipe (`cfg.eval.finetune`) defaults to DeiT's (facebookresearch/deit main.py of 2021 on timm
0.3.2), which MoCo v3 fine-tunes its ViTs with ("using all the default DeiT configs", ViT-B for 150
epochs; MoCo v3 loads the pretrained weights into a freshly created DeiT model and trains it in
train mode):
  - AdamW (0.9, 0.999), eps 1e-8, lr 5e-4 x global batch / 512, weight decay 0.05, none on 1-D
    parameters, biases and the backbone's `no_weight_decay()` set (pos_embed, cls_token), as timm's
    `create_optimizer` (filter_bias_and_bn);
  - timm's epoch-wise cosine (CosineLRScheduler, warmup_prefix=False): 5 warm-up epochs linear from
    1e-6, then min_lr + (peak - min_lr)(1 + cos(pi e / epochs)) / 2 with e counted from 0, the
    warm-up included. DeiT steps the scheduler after epoch e with e, so epoch e trains at the value
    for epoch max(e - 1, 0): epochs 0 and 1 both run at 1e-6, and neither the peak nor min_lr is
    ever reached exactly (`lag_epochs=1`, `warmup_prefix=false` in `finetune_config`);
  - drop path 0.1; timm's `create_transform` (random resized crop, bicubic, flip, RandAugment
    rand-m9-mstd0.5-inc1, random erasing p 0.25 'pixel' x1; timm applies colour jitter only when
    RandAugment is off); eval Resize(eval.resize = 256) + CenterCrop(224), bicubic;
  - mixup 0.8 / cutmix 1.0 per batch (prob 1, switch prob 0.5, 'batch' mode, cutmix area-corrected
    lambda, the box of timm 0.3.2) on label-smoothed (0.1) one-hot targets, soft-target cross-entropy;
  - the classifier weight ~ trunc_normal(std 0.02), bias 0 (timm 0.3.2's ViT init of its head).
Layer-wise lr decay (BEiT/MAE `param_groups_lrd`, SimMIM `get_vit_layer`/`get_swin_layer`, off by
default): patch/position embedding and class token are layer 0, ViT block i layer i + 1, Swin block
j of stage i layer depths[0] + .. + depths[i-1] + j + 1 and a stage's patch merging the layer of
that stage's last block, everything after the blocks (final norm, head) layer depth + 1 (depth =
number of blocks); a layer's lr (its whole schedule) is scaled by layer_decay^(depth + 1 - layer).

SimMIM's recipe differs from DeiT's by configuration only (`eval.finetune` in simmim/configs): a
per-iteration schedule without the lag, its own weight-decay rules, another resolution or window,
and a fine-tuning backbone with one relative position bias per block and a pooled `fc_norm`;
`shared.eval.remap` fits the pretrained weights into it.

Repeated augmentation, as DeiT's RASampler (`repeated_aug` = 3, on by default as in DeiT's main.py;
1 = off): each epoch takes the first images of its permutation, each 3 times in a row, as many
samples as the dataset holds (so about a third of the images an epoch, the same number of steps),
and deals each global batch to the ranks in turn, so that the 3 copies of an image go to 3
different ranks (world >= 3; on 2 ranks one rank gets two of them) and are augmented with 3
different seeds (`GlobalBatchSampler(repeats=)`; the epoch length against DeiT's
num_selected_samples is stated there). DeiT applies it only when distributed; here it holds on any
world size, so that a step's global batch does not depend on it.
Model EMA, as DeiT keeps it (timm's ModelEma: `model_ema`, decay `model_ema_decay` = 0.99996): a
copy of the backbone and head made before the first step, ema = decay * ema + (1 - decay) * model
for every parameter and floating buffer after each optimiser step (whether or not a fp16 step was
skipped, as DeiT), on the model's device (DeiT's model_ema_force_cpu is not offered), saved in the
checkpoint with the model (`ema.*`) so that a resumed fine-tune continues it. DeiT only saves it and
reports the trained model, as here; `eval_ema` also evaluates it (ema_top1, ema_top5).

Deviations from DeiT: mixed precision follows `amp` (auto: bf16 on GPU) where DeiT used fp16 with a
loss scaler (`amp=fp16`). Mixup's and timm's augmentation draws come from generators seeded per
(seed, step, rank) and per (seed, epoch, image, copy), and the data order per (seed, epoch), so a
resumed fine-tune sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import create_transform
from torch.utils.data import Dataset

from shared import dist
from shared.config import OptimConfig, RunConfig, ScheduleConfig
from shared.data.augment import eval_transform
from shared.engine import autocast_dtype, fit
from shared.errors import ConfigError, UserError, first_line
from shared.eval.features import extract
from shared.eval.knn import topk_accuracy
from shared.eval.linear import BestTop1, same_backbone_as_before
from shared.eval.remap import adapt_state_dict
from shared.models import build_backbone
from shared.models.momentum import momentum_copy, momentum_update
from shared.optim import scaled_lr

EMBEDDING_PARAMS = ("cls_token", "pos_embed", "dist_token", "reg_token")  # layer 0, with patch_embed.*


# ------------------------------------------------------------------------------------- targets
def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(N, C) targets: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
    off = smoothing / num_classes
    t = torch.full((y.shape[0], num_classes), off, device=y.device)
    return t.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c target_c log softmax(logits)_c (in fp32)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float,
               rs: np.random.RandomState) -> Tuple[Tuple[int, int, int, int], float]:
    """A box of side sqrt(1 - lam) x the image around a uniform centre, clipped to the image, and
    lambda corrected to the share of the image left outside it (timm 0.3.2: each half-side rounds down)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rs.randint(0, height)), int(rs.randint(0, width))
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


class MixupCutmix:
    """Mixup / CutMix of a whole batch with its reverse (timm's Mixup in 'batch' mode, as DeiT
    uses it), returning the mixed images and the mixed label-smoothed targets. With both alphas 0
    the images pass unchanged and the targets are the smoothed one-hot vectors (DeiT's label
    smoothing loss). The draws come from a NumPy RandomState seeded from torch's generator, in
    timm's order: apply?, cutmix?, lambda ~ Beta(alpha, alpha), then the box centre (y, x)."""

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
        if mixup < 0 or cutmix < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1 or not 0 <= smoothing < 1:
            raise ConfigError(f"eval.finetune: mixup={mixup}, cutmix={cutmix} must be >= 0 and mixup_prob={prob}, "
                              f"mixup_switch_prob={switch_prob}, smoothing={smoothing} in [0, 1]")
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, smoothing

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def draw(self, rs: np.random.RandomState) -> Tuple[float, bool]:
        """(lambda, use cutmix) for one batch; lambda 1 means no mixing."""
        if not self.active or rs.rand() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix > 0
        if self.mixup > 0 and self.cutmix > 0:
            use_cutmix = bool(rs.rand() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        return float(rs.beta(alpha, alpha)), use_cutmix

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 rs: Optional[np.random.RandomState] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        target = smooth_one_hot(y, self.num_classes, self.smoothing)
        if not self.active:
            return x, target
        if rs is None:
            rs = np.random.RandomState(int(torch.randint(0, 2 ** 32, (1,)).item()))
        lam, use_cutmix = self.draw(rs)
        if lam == 1.0:
            return x, target
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_box(x.shape[-2], x.shape[-1], lam, rs)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, target * lam + target.flip(0) * (1.0 - lam)


# --------------------------------------------------------------------------------------- model
def layer_id(name: str, depth: int, stage_depths: Optional[Sequence[int]] = None) -> int:
    """BEiT/MAE/SimMIM layer of a parameter of a timm ViT, or of a timm Swin given its
    `stage_depths` (names without the `backbone.` prefix): embeddings 0, block k of the whole
    sequence k + 1, anything else (final norm, head) depth + 1. timm's Swin opens stage i > 0 with
    the patch merging that the official Swin ends stage i - 1 with: it gets the layer of that
    stage's last block."""
    if name in EMBEDDING_PARAMS or name.startswith("patch_embed.") or name == "mask_token":
        return 0
    parts = name.split(".")
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    if parts[0] == "layers" and stage_depths is not None:
        stage = int(parts[1])
        before = sum(stage_depths[:stage])
        if parts[2] == "downsample":
            return before
        if parts[2] == "blocks":
            return before + int(parts[3]) + 1
    return depth + 1


def stage_depths(backbone: nn.Module) -> Optional[List[int]]:
    """Blocks per stage of a Swin-like backbone (`layers[i].blocks`), else None."""
    layers = getattr(backbone, "layers", None)
    if layers is None or not all(hasattr(layer, "blocks") for layer in layers):
        return None
    return [len(layer.blocks) for layer in layers]


class Finetuner(nn.Module):
    """`backbone` (trained) -> Linear head; `forward` mixes the batch and returns the soft-target loss.
    With `ema_decay` it keeps `ema`, a frozen copy of backbone and head (in its state dict, so in the
    checkpoint) that `after_optimizer_step`, which the engine calls after each optimiser step, moves
    towards the weights: parameters and floating buffers, as timm's ModelEma (integer buffers are kept)."""
    # a mean of per-sample losses; under gradient accumulation mixup pairs images within each
    # micro-batch, as MAE's accum_iter does (the engine still refuses a backbone with BatchNorm)
    BATCH_COUPLING = None

    def __init__(self, backbone: nn.Module, num_classes: int, mix: MixupCutmix, head_init_std: float = 0.02,
                 layer_decay: float = 1.0, ema_decay: Optional[float] = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)   # bounds +-2 (absolute), as timm's
        nn.init.zeros_(self.head.bias)
        self.mix, self.layer_decay = mix, layer_decay
        self.stages = stage_depths(backbone)
        self.depth = len(backbone.blocks) if hasattr(backbone, "blocks") else (
            sum(self.stages) if self.stages else None)
        if layer_decay != 1.0 and self.depth is None:
            raise ConfigError(f"eval.finetune.layer_decay={layer_decay} needs a ViT or Swin backbone, "
                              f"got {type(backbone).__name__}")
        self.ema_decay = ema_decay
        self.ema = momentum_copy(self._online()) if ema_decay is not None else None
        params = {n for n, _ in self._online().named_parameters()}
        self.ema_buffers = [] if self.ema is None else [
            k for k, v in self.ema.state_dict().items() if k not in params and v.is_floating_point()]

    def _online(self) -> nn.ModuleDict:
        """The trained modules under the names the EMA copy has (a view: nothing is copied)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.ema is None:
            return
        online, d = self._online(), self.ema_decay
        momentum_update(online, self.ema, d)
        for k in self.ema_buffers:      # e.g. BatchNorm running statistics (none in a ViT)
            self.ema.get_buffer(k).mul_(d).add_(online.get_buffer(k), alpha=1.0 - d)

    def ema_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.ema["head"](self.ema["backbone"](x))

    def lr_scale(self, name: str) -> float:
        """Layer-wise lr decay, read by `shared.optim.param_groups`."""
        if self.layer_decay == 1.0:
            return 1.0
        short = name[len("backbone."):] if name.startswith("backbone.") else name
        own = getattr(self.backbone, "lr_decay_layer_id", None)     # a backbone's own map (ConvViT)
        lid = own(short) if callable(own) else layer_id(short, self.depth, self.stages)
        return self.layer_decay ** (self.depth + 1 - lid)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward(self, batch, ctx=None) -> Dict[str, torch.Tensor]:
        x, y = batch
        x, target = self.mix(x, y)
        return {"loss": soft_target_cross_entropy(self.logits(x), target)}


def finetune_backbone(cfg: RunConfig, backbone: nn.Module) -> nn.Module:
    """A fresh `cfg.model.backbone` with the fine-tuning drop path, resolution and extra kwargs,
    holding `backbone`'s weights (fitted by `shared.eval.remap` where the shapes differ), every
    parameter trainable (MoCo v3's frozen patch projection / fixed position embedding included,
    as when its weights are loaded into a DeiT model). `backbone` itself is left untouched."""
    fc, bc = cfg.eval.finetune, cfg.model.backbone
    bb = build_backbone(replace(bc, drop_path=fc.drop_path, img_size=fc.img_size or bc.img_size,
                                kwargs={**bc.kwargs, **fc.backbone_kwargs}))
    try:
        sd, notes = adapt_state_dict(backbone.state_dict(), bb)
        bb.load_state_dict(sd, strict=False)      # adapt_state_dict checked every key but a new fc_norm
    except (RuntimeError, UserError) as exc:
        raise UserError(f"fine-tuning: the backbone does not match model.backbone.name={bc.name} "
                        f"({first_line(exc)})") from None
    for note in notes:
        dist.print0(f"fine-tuning: {note}")
    return bb.requires_grad_(True)


def no_weight_decay_rules(backbone: nn.Module, rules: Optional[Sequence[str]] = None) -> List[str]:
    """`rules` when given (the recipe's), else timm's create_optimizer filter: 1-D parameters,
    biases, and the model's `no_weight_decay()` names."""
    if rules is not None:
        return list(rules)
    skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    return ["ndim<=1", "bias", *sorted(f"backbone.{n}" for n in skip)]


# -------------------------------------------------------------------------------------- config
def finetune_config(cfg: RunConfig, out_dir: Path, no_decay: Sequence[str] = ("ndim<=1", "bias")) -> RunConfig:
    """The engine config of the fine-tune: optimizer, schedule, batch and epochs from `cfg.eval.finetune`."""
    fc = cfg.eval.finetune
    peak = scaled_lr(fc.lr, fc.batch_size, fc.lr_ref_batch)
    if peak <= 0 or fc.warmup_lr < 0 or fc.min_lr < 0:
        raise ConfigError(f"eval.finetune: lr={fc.lr} must be > 0, warmup_lr={fc.warmup_lr} and "
                          f"min_lr={fc.min_lr} >= 0")
    # warm-up start and floor as fractions of the peak: fixed ones when they scale with the batch as
    # the lr does (SimMIM), shrinking as the batch grows when they are absolute (DeiT)
    ref_lr = fc.lr if fc.scale_warmup_min_lr else peak
    return replace(
        cfg,
        optim=OptimConfig(name="adamw", lr=fc.lr, lr_ref_batch=fc.lr_ref_batch, weight_decay=fc.weight_decay,
                          no_decay=list(no_decay), betas=tuple(fc.betas), eps=fc.eps, clip_grad=fc.clip_grad),
        sched=ScheduleConfig(kind="cosine", warmup_epochs=fc.warmup_epochs, warmup_start=fc.warmup_lr / ref_lr,
                             final=fc.min_lr / ref_lr, per_epoch=fc.per_epoch, warmup_prefix=fc.warmup_prefix,
                             lag_epochs=fc.lag_epochs),
        train=replace(cfg.train, accum_steps=fc.accum_steps, repeated_aug=fc.repeated_aug, amp=fc.amp,
                      epochs=fc.epochs, batch_size=fc.batch_size, per_gpu_batch=0,
                      drop_last=True, out_dir=str(out_dir), sync_bn=False, compile=False, ckpt_every_epochs=1,
                      keep_every_epochs=0),
    )


# ---------------------------------------------------------------------------------- transforms
class SeededTimmTransform:
    """Runs a timm transform (which draws from Python's `random` and NumPy's global generator) with
    both seeded from torch's generator, which the loader seeds per (seed, epoch, image); the
    previous generator states are restored afterwards."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img):
        seed = int(torch.randint(0, 2 ** 32, (1,)).item())
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"SeededTimmTransform({self.transform})"


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op with the meaning Pillow gave 0 bits when DeiT ran (a black image): current
    Pillow rejects 0, which RandAugment's PosterizeIncreasing reaches whenever the noisy magnitude
    (m9, std 0.5) is clipped at 10."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(cfg: RunConfig) -> SeededTimmTransform:
    """DeiT's training transform: timm's `create_transform(is_training=True)` with the recipe's values."""
    fc, ec = cfg.eval.finetune, cfg.eval
    tf = create_transform(
        input_size=fc.img_size or ec.image_size, is_training=True, color_jitter=fc.color_jitter,
        auto_augment=fc.rand_augment or None, interpolation=fc.interpolation, re_prob=fc.reprob,
        re_mode=fc.remode, re_count=fc.recount, mean=tuple(ec.mean), std=tuple(ec.std))
    for t in tf.transforms:
        for op in getattr(t, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return SeededTimmTransform(tf)


# ----------------------------------------------------------------------------------------- run
def finetune(cfg: RunConfig, backbone: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int,
             out_dir: Path, desc: str = "finetune") -> Dict[str, float]:
    """Fine-tune a copy of `backbone` with a linear head on `train_set` (PIL images, labels) and
    evaluate on `val_set`. Returns top-1/top-5 of the last epoch and the best top-1 over evaluations
    (DeiT prints both), with `eval_ema` also the EMA's last top-1/top-5. A second call with the same
    backbone and folder resumes (or only evaluates)."""
    _, device = dist.init(cfg.train.device)
    fc, ec = cfg.eval.finetune, cfg.eval
    if fc.eval_ema and not fc.model_ema:
        raise ConfigError("eval.finetune.eval_ema=true needs eval.finetune.model_ema=true (no EMA is kept without it)")
    resume = cfg.train.resume and same_backbone_as_before(backbone, out_dir, "fine-tuning")
    torch.manual_seed(cfg.train.seed)
    mix = MixupCutmix(num_classes, fc.mixup, fc.cutmix, fc.mixup_prob, fc.mixup_switch_prob, fc.smoothing)
    model = Finetuner(finetune_backbone(cfg, backbone), num_classes, mix, fc.head_init_std, fc.layer_decay,
                      fc.model_ema_decay if fc.model_ema else None)
    dtype = autocast_dtype(fc.amp, device)
    val_tf = eval_transform(fc.img_size or ec.image_size, fc.resize or ec.resize, fc.interpolation, ec.mean, ec.std)
    best = BestTop1(out_dir)
    last: Dict[str, float] = {}

    def evaluate(net: nn.Module, epoch: int) -> Dict[str, float]:
        if (epoch + 1) % max(1, fc.eval_every_epochs) and epoch + 1 != fc.epochs:
            return {}
        net.eval()
        logits, labels = extract(net.logits, val_set, val_tf, ec.knn.batch_size, device, cfg.data.workers, dtype)
        top1, top5 = topk_accuracy(logits, labels, (1, 5))
        best.update(top1)
        last.update(top1=top1, top5=top5)
        if fc.eval_ema:
            logits, labels = extract(net.ema_logits, val_set, val_tf, ec.knn.batch_size, device, cfg.data.workers,
                                     dtype)
            last["ema_top1"], last["ema_top5"] = topk_accuracy(logits, labels, (1, 5))
        return {"top1": top1, "top5": top5, "best_top1": best.value,
                **{k: last[k] for k in ("ema_top1", "ema_top5") if k in last}}

    fcfg = finetune_config(cfg, out_dir, no_weight_decay_rules(model.backbone, fc.no_decay))
    fcfg.train.resume = resume
    result = fit(fcfg, model, train_set, train_transform(cfg), method="finetune", out_dir=out_dir,
                 on_epoch_end=evaluate, progress_desc=desc)
    if not last:  # resumed after the fine-tune had finished: evaluate the stored model once
        evaluate(result.model, fc.epochs - 1)
    return {"top1": last["top1"], "top5": last["top5"], "best_top1": best.value,
            **{k: last[k] for k in ("ema_top1", "ema_top5") if k in last}}
