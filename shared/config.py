"""Typed configs: dataclasses are the schema, YAML recipes the data, `key=value` the overrides.

A paper subclasses `RunConfig` and replaces `model` with its own dataclass (a subclass of
`ModelConfig`). `load_config(PaperConfig, argv)` merges defaults <- recipe file(s) <- overrides,
checks every key and type, and fails with one line naming the key, the file and the nearest
valid keys. Every section below documents its keys; a recipe sets only what differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from shared.errors import ConfigError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def choice(default: Any, *choices: Any) -> Any:
    """A field restricted to `choices` (checked after loading, with the key in the message)."""
    return field(default=default, metadata={"choices": choices})


def num(default: Any, valid: str) -> Any:
    """A numeric field (or a tuple / list of numbers, each checked) with its valid range, checked after
    loading like `choice`: ">0", ">=0", ">=1", ">=-1", or an interval "[0,1]", "(0,1]", "[0,1)", "(0,1)";
    " ordered" adds that the values do not decrease (a (min, max) pair). NaN and inf are never valid;
    None (an optional field left unset) always is."""
    return field(default=default, metadata={"range": valid})


_BOUND = re.compile(r"^(>=?)(-?[\d.]+)$|^([\[(])(-?[\d.]+),(-?[\d.]+)([\])])$")


def in_range(value: float, valid: str) -> bool:
    """Whether one finite number satisfies a `num` range such as ">=0" or "(0,1]"."""
    m = _BOUND.match(valid.split()[0])
    if m is None:
        raise ValueError(f"bad range spec {valid!r}")
    if not math.isfinite(value):
        return False
    if m.group(1):
        bound = float(m.group(2))
        return value > bound if m.group(1) == ">" else value >= bound
    lo, hi = float(m.group(4)), float(m.group(5))
    return (value > lo if m.group(3) == "(" else value >= lo) and (value < hi if m.group(6) == ")" else value <= hi)


def describe_range(valid: str) -> str:
    first, *rest = valid.split()
    words = {">0": "a number > 0", ">=0": "a number >= 0", ">=1": "a number >= 1", ">=-1": "a number >= -1"}
    text = words.get(first, f"a number in {first}")
    return text + (", not decreasing" if "ordered" in rest else "") + " (finite)"


# ----------------------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    """The built-in procedural dataset (`shared.data.synthetic`)."""

    length: int = num(2048, ">=1")            # training images
    val_length: int = num(512, ">=1")         # validation images (a disjoint seed stream)
    image_size: int = num(64, ">=1")
    num_classes: int = num(8, ">=1")          # first N of the shape classes
    max_objects: int = num(3, ">=1")          # 1 labelled object + up to N-1 smaller distractors
    texture: float = num(1.0, ">=0")          # strength of the background structure (0: one flat colour)
    palette: int = num(0, ">=0")              # 0: any RGB colour; N: colours drawn from N fixed hues
    rotation: float = num(180.0, ">=0")       # shapes are rotated by U(-rotation, rotation) degrees
    placement: Tuple[float, float] = num((1.0, 1.0), "[0,1]")   # x, y spread of the labelled shape's centre: 1 anywhere, 0 centred
    radius_range: Tuple[float, float] = num((0.2, 0.36), "(0,1] ordered")   # labelled shape's radius, fraction of the image size
    shading: float = num(0.25, ">=0")         # strength of the linear brightness ramp across each shape (0: flat fill)
    seed: int = num(0, ">=0")
    cache: bool = True            # render once into memory (workers share it copy-on-write)


@dataclass
class DataConfig:
    source: str = choice("synthetic", "synthetic", "folder", "images")
    root: str = ""                # folder / images: the dataset root holding train_dir/ and val_dir/
    # folder: ImageNet layout (<split>/<class>/<image>); images: unlabelled images anywhere under
    # <split>/ (e.g. COCO: root=/data/coco train_dir=train2017), for pretraining only
    train_dir: str = "train"
    val_dir: str = "val"
    skip_bad_files: bool = False  # folder: replace unreadable images by the next one, and count them
    workers: int = num(-1, ">=-1")             # DataLoader workers per process; -1: from the machine, the CPUs this process may use
    #   (min of SLURM_CPUS_PER_TASK and its CPU affinity) / processes on this node (LOCAL_WORLD_SIZE), minus one
    pin_memory: bool = True       # page-locked batches (on CUDA only)
    persistent_workers: bool = True   # keep the workers (and their dataset state) from one epoch to the next
    prefetch_factor: int = num(2, ">=0")      # batches each worker prepares ahead (DataLoader's prefetch_factor); 0: DataLoader's own
    # Pretraining from image files (folder / images): decode each image once for all its views, at the
    # largest JPEG scale (1/2, 1/4, 1/8) that keeps every view's crop at least its output size, and
    # resize with torch's antialiased uint8 kernels; the other ops are PIL's; the views differ from the
    # PIL path by the reduced decode only (tests/test_input_pipeline.py). false: the PIL path, op for op.
    fast_path: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ViewConfig:
    """One augmented view. `order` lists the ops as applied; an op with probability 0 is skipped."""

    n: int = num(1, ">=1")                                      # number of crops drawn with this recipe
    size: int = num(224, ">=1")
    crop_scale: Tuple[float, float] = num((0.08, 1.0), "(0,1] ordered")
    crop_ratio: Tuple[float, float] = num((3.0 / 4.0, 4.0 / 3.0), ">0 ordered")
    interpolation: str = choice("bilinear", "bilinear", "bicubic")
    flip_p: float = num(0.5, "[0,1]")
    jitter_p: float = num(0.8, "[0,1]")
    jitter: Tuple[float, float, float, float] = num((0.4, 0.4, 0.2, 0.1), ">=0")  # brightness contrast saturation hue
    gray_p: float = num(0.2, "[0,1]")
    blur_p: float = num(0.0, "[0,1]")
    blur_sigma: Tuple[float, float] = num((0.1, 2.0), ">=0 ordered")    # PIL GaussianBlur radius ~ U(a, b)
    solarize_p: float = num(0.0, "[0,1]")
    solarize_threshold: int = num(128, "[0,256]")
    order: List[str] = field(default_factory=lambda: ["crop", "flip", "jitter", "gray", "blur", "solarize"])
    mean: Tuple[float, float, float] = num(IMAGENET_MEAN, "[0,1]")
    std: Tuple[float, float, float] = num(IMAGENET_STD, ">0")


@dataclass
class AugConfig:
    views: List[ViewConfig] = field(default_factory=lambda: [ViewConfig(), ViewConfig()])


# ---------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    name: str = "resnet50"        # torchvision resnet18/34/50/101/152, or any timm ViT/Swin name
    zero_init_residual: bool = False
    img_size: int = num(224, ">=1")           # timm models only
    drop_path: float = num(0.0, "[0,1)")        # timm models only
    conv_stem: bool = False       # timm ViTs: a convolutional stem instead of the patch projection (Xiao et al. 2021)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra constructor arguments


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


# ---------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    name: str = choice("sgd", "sgd", "lars", "adamw")
    lr: float = num(0.1, ">0")               # base lr at `lr_ref_batch`; peak lr = lr * global_batch / lr_ref_batch
    lr_ref_batch: int = num(256, ">=0")       # 0: no batch scaling
    weight_decay: float = num(0.0, ">=0")
    # Parameters matching any rule get no weight decay and (LARS) no trust-ratio adaptation.
    # Rules: "ndim<=1" (biases, norm weights), "bias" (names ending in .bias), or fnmatch patterns on names.
    no_decay: List[str] = field(default_factory=list)
    lr_no_decay: Optional[float] = num(None, ">=0")  # base lr of the no-decay group (null: same as lr)
    momentum: float = num(0.9, "[0,1)")         # sgd / lars
    nesterov: bool = False
    betas: Tuple[float, float] = num((0.9, 0.999), "[0,1)")
    eps: float = num(1e-8, ">0")
    lars_eta: float = num(0.001, ">0")
    clip_grad: float = num(0.0, ">=0")        # max global grad norm; 0 = off


@dataclass
class ScheduleConfig:
    """Per-iteration schedules of lr, weight decay and the momentum-encoder coefficient."""

    kind: str = choice("cosine", "cosine", "step", "constant")
    warmup_epochs: float = num(0.0, ">=0")
    warmup_start: float = num(0.0, ">=0")     # lr at step 0, as a fraction of peak
    final: float = num(0.0, ">=0")            # cosine floor, as a fraction of peak
    milestones: List[float] = field(default_factory=list, metadata={"range": ">=0"})  # step decay: epochs at which lr *= gamma
    gamma: float = num(0.1, ">0")
    per_epoch: bool = False       # hold lr constant within an epoch (torch's epoch-stepped schedulers)
    warmup_prefix: bool = True    # false: cosine over all steps from step 0, warmup included (timm's warmup_prefix=False)
    lag_epochs: int = num(0, ">=0")           # lr only: the schedule runs N epochs late, at its step-0 value until then (DeiT: 1)
    wd_final: Optional[float] = num(None, ">=0")  # cosine weight-decay schedule to this value (null: constant)
    ema_start: Optional[float] = num(None, "[0,1]")  # momentum-encoder coefficient at step 0 (null: no schedule)
    ema_final: float = num(1.0, "[0,1]")
    ema_kind: str = choice("cosine", "cosine", "constant")


# ---------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    epochs: int = num(100, ">=1")
    batch_size: int = num(256, ">=0")         # global batch: per-process batch = batch_size / world size
    per_gpu_batch: int = num(0, ">=0")        # >0: fix the per-process batch instead; global = per_gpu_batch x world size
    drop_last: bool = True
    seed: int = num(0, ">=0")
    device: str = choice("auto", "auto", "cpu", "cuda")
    amp: str = choice("auto", "auto", "bf16", "fp16", "fp32")  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True          # convert BatchNorm to a synchronised BatchNorm when distributed
    out_dir: str = ""             # default: runs/<method>/<recipe name>
    resume: bool = True           # continue from out_dir/last.pt (or prev.pt, if last.pt does not load) when it exists
    allow_config_change: bool = False  # resume even where the schedule or the data order changed (epochs, batch,
                                  # seed, optim.*, sched.*, the dataset); every difference is printed either way
    ckpt_every_epochs: int = num(1, ">=0")    # rewrite last.pt every N epochs (0: only at the end)
    ckpt_every_steps: int = num(0, ">=0")     # also every N steps (0: off)
    keep_every_epochs: int = num(0, ">=0")    # keep a numbered copy every N epochs (0: off)
    log_every: int = num(20, ">=1")           # steps between log lines
    accum_steps: int = num(1, ">=1")  # gradient accumulation: each step's batch in k micro-batches, one optimiser
                                  # step; only where exact (a per-sample loss, no BatchNorm: SimMIM), else refused
    repeated_aug: int = num(1, ">=1")  # repeated augmentation: each image this many times in a row per epoch, the
                                  # copies on different ranks (DeiT's RASampler; GlobalBatchSampler); 1 = off
    tensorboard: bool = True


# ----------------------------------------------------------------------------------------- eval
@dataclass
class KNNConfig:
    k: int = num(20, ">=1")
    temperature: float = num(0.07, ">0")
    batch_size: int = num(256, ">=1")
    block: int = num(0, ">=0")                # as eval.linear.block: 0 the pooled output, N the mean patch token after block N


@dataclass
class LinearConfig:
    """Linear probe on a frozen backbone (kept in eval mode). Defaults: the Barlow Twins protocol."""

    epochs: int = num(100, ">=1")
    batch_size: int = num(256, ">=1")
    lr: float = num(0.3, ">0")
    lr_ref_batch: int = num(0, ">=0")         # 0: lr is used as is
    weight_decay: float = num(1e-6, ">=0")
    momentum: float = num(0.9, "[0,1)")
    optimizer: str = choice("sgd", "sgd", "lars")
    schedule: str = choice("cosine_epoch", "cosine_epoch", "cosine_step")
    warmup_epochs: float = num(0.0, ">=0")
    bn: bool = False              # affine-free BatchNorm before the classifier (MAE-style option)
    crop_scale: Tuple[float, float] = num((0.08, 1.0), "(0,1] ordered")
    interpolation: str = choice("bilinear", "bilinear", "bicubic")
    cache_features: bool = False  # extract features once (no augmentation) and train on them: fast, not the protocol
    eval_every_epochs: int = num(1, ">=0")
    amp: str = choice("fp32", "auto", "bf16", "fp16", "fp32")   # the official probes run in fp32
    block: int = num(0, ">=0")                # 0: the backbone's pooled output; N: the mean of the patch tokens after
                                  # block N (1-based, timm ViTs), SimMIM's ViT probe: 8


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning of the whole backbone with a linear head (`shared.eval.finetune`).
    Defaults: the DeiT recipe (facebookresearch/deit main.py, 2021, timm 0.3.2) that MoCo v3 fine-tunes
    with (ViT-B: epochs=150). Learning rates are absolute at `lr_ref_batch`, as DeiT's arguments."""

    epochs: int = num(300, ">=1")             # DeiT's default; MoCo v3 fine-tunes ViT-B for 150
    batch_size: int = num(1024, ">=1")        # global batch
    lr: float = num(5e-4, ">0")              # peak lr = lr * global batch / lr_ref_batch
    lr_ref_batch: int = num(512, ">=0")
    weight_decay: float = num(0.05, ">=0")    # AdamW; none on 1-D parameters, biases and the backbone's no_weight_decay() set
    betas: Tuple[float, float] = num((0.9, 0.999), "[0,1)")
    eps: float = num(1e-8, ">0")
    warmup_epochs: int = num(5, ">=0")        # linear from warmup_lr, then cosine (per epoch) down to min_lr
    warmup_lr: float = num(1e-6, ">=0")
    min_lr: float = num(1e-5, ">=0")
    accum_steps: int = num(1, ">=1")  # gradient accumulation (train.accum_steps) for the fine-tuning run
    repeated_aug: int = num(3, ">=1")  # DeiT's repeated augmentation (train.repeated_aug): each image 3 times an
                                  # epoch on different ranks, an epoch as many steps as without it; 1 = off
                                  # (SimMIM's own fine-tuning has none)
    model_ema: bool = True        # keep an EMA of the weights (DeiT's default), updated after each optimiser step,
                                  # kept in the checkpoint; DeiT reports the trained model, not the EMA
    model_ema_decay: float = num(0.99996, "[0,1]")  # ema = decay * ema + (1 - decay) * weights (and float buffers)
    eval_ema: bool = False        # also evaluate the EMA (ema_top1 / ema_top5 beside top1 / top5); needs model_ema
    scale_warmup_min_lr: bool = False  # true: warmup_lr and min_lr x global batch / lr_ref_batch, like lr
                                  # (SimMIM's main_finetune.py); false: absolute (DeiT)
    layer_decay: float = num(1.0, "(0,1]")      # layer-wise lr decay (BEiT/MAE): block i gets decay^(depth - i); 1.0 = off
    clip_grad: float = num(0.0, ">=0")        # max global grad norm; 0 = off (DeiT's default)
    drop_path: float = num(0.1, "[0,1)")        # stochastic depth of the fine-tuned backbone (timm models)
    head_init_std: float = num(0.02, ">=0")   # classifier weight ~ trunc_normal(std), bias 0 (timm 0.3.2's ViT head; MAE: 2e-5)
    interpolation: str = choice("bicubic", "bicubic", "bilinear")  # train crop, RandAugment and eval resize
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec ("" = off)
    color_jitter: float = num(0.4, ">=0")     # used by timm only when rand_augment is off
    reprob: float = num(0.25, "[0,1]")          # timm RandomErasing probability
    remode: str = choice("pixel", "pixel", "rand", "const")
    recount: int = num(1, ">=1")
    mixup: float = num(0.8, ">=0")            # mixup alpha (0: off)
    cutmix: float = num(1.0, ">=0")           # cutmix alpha (0: off)
    mixup_prob: float = num(1.0, "[0,1]")       # probability of mixing a batch
    mixup_switch_prob: float = num(0.5, "[0,1]")  # probability of cutmix rather than mixup when both are on
    smoothing: float = num(0.1, "[0,1)")        # label smoothing
    eval_every_epochs: int = num(1, ">=0")
    amp: str = choice("auto", "auto", "bf16", "fp16", "fp32")  # DeiT: fp16 with a GradScaler
    per_epoch: bool = True        # lr held within an epoch (DeiT); false: per iteration (SimMIM)
    lag_epochs: int = num(1, ">=0")           # DeiT steps its scheduler after each epoch (SimMIM: 0)
    warmup_prefix: bool = False   # false: timm's cosine counted from step 0, warm-up included (DeiT, SimMIM);
                                  # true: the cosine starts after the warm-up (MAE / ConvMAE util/lr_sched.py)
    no_decay: Optional[List[str]] = None  # weight-decay exclusion rules (optim.no_decay syntax); null: 1-D,
                                  # biases and the backbone's no_weight_decay() set (timm's create_optimizer)
    img_size: int = num(0, ">=0")             # fine-tuning resolution (0: eval.image_size), e.g. Swin 192 -> 224
    resize: int = num(0, ">=0")               # its eval Resize (0: eval.resize)
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)  # merged into model.backbone.kwargs for the
                                  # fine-tuned model (SimMIM ViT: one position bias per block, fc_norm)


@dataclass
class SegProbeConfig:
    """Segmentation linear probe (`shared.eval.segprobe`): [BN] -> 1x1 convolution on one frozen
    feature map, logits upsampled to the mask, pixel cross-entropy. Features are extracted once with
    the eval transform (no augmentation); needs per-pixel masks (data.source=synthetic).
    The optimizer is AdamW rather than SGD: its per-parameter step lets one lr serve feature maps of
    very different scales (random init vs pretrained, C2 vs C5, bn=false); the problem (per-pixel
    logistic regression on fixed features) is convex. Measured on synthetic masks: lr 0.03 converges
    within 30 epochs of 8 to 32 steps, 0.01 visibly does not; fewer steps (larger batches) converge worse."""

    stage: int = num(-1, ">=-1")               # feature map: forward_intermediates index (ResNet 0..3 = C2..C5); -1 = last
    epochs: int = num(30, ">=1")
    batch_size: int = num(64, ">=1")          # images per step (all their pixels): 32 steps an epoch on 2048 images
    lr: float = num(3e-2, ">0")              # AdamW peak lr: linear warm-up, then cosine to 0 (per step)
    warmup_epochs: float = num(2.0, ">=0")    # Adam's first steps overshoot on wide (2048-d) maps without it
    weight_decay: float = num(1e-4, ">=0")    # decoupled, on the classifier weight only
    bn: bool = True               # affine-free BatchNorm2d on the features before the classifier


@dataclass
class SemiSupConfig:
    """Semi-supervised fine-tuning (`shared.eval.semisup`), Barlow Twins' `evaluate.py --weights finetune`:
    the whole backbone and a linear classifier (weight ~ N(0, 0.01), bias 0) trained in train mode
    (BatchNorm on batch statistics) with SGD on two parameter groups, cosine per epoch to 0, on a subset
    of the training split. Defaults: the official README's 1 % command (evaluate.py's own defaults are
    100 epochs, lr_backbone 0, weight decay 1e-6). Learning rates are absolute (no batch scaling)."""

    epochs: int = num(20, ">=1")
    batch_size: int = num(256, ">=1")         # global batch
    lr_backbone: float = num(0.005, ">=0")    # every backbone parameter (the README said 0.002 before 2022-02)
    lr_classifier: float = num(0.5, ">0")    # the linear classifier
    weight_decay: float = num(0.0, ">=0")     # SGD's, on every parameter (evaluate.py's default: 1e-6)
    momentum: float = num(0.9, "[0,1)")
    subset_file: str = ""         # the training images to use, one file name a line (SimCLR's 1percent.txt /
                                  # 10percent.txt: n01440764_10026.JPEG); data.source=synthetic: the names that
                                  # `shared.data.synthetic.export` gives them (train_000012.png); "": all images
    train_percent: float = num(1.0, "(0,100]")  # the share of the training split subset_file holds (SimCLR: 1 or 10);
                                  # documentation, printed next to the measured share
    crop_scale: Tuple[float, float] = num((0.08, 1.0), "(0,1] ordered")   # RandomResizedCrop(eval.image_size) + flip
    eval_every_epochs: int = num(1, ">=1")    # top-1 on the val split (official: every epoch)
    amp: str = choice("fp32", "auto", "bf16", "fp16", "fp32")   # the official run is fp32


@dataclass
class EvalConfig:
    after_train: List[str] = field(default_factory=lambda: ["knn"])  # any of knn, linear, finetune, seg, semisup
    compare_random_init: bool = False  # also evaluate a random-init backbone of the same architecture
    image_size: int = num(224, ">=1")
    resize: int = num(256, ">=1")             # eval transform: Resize(resize) -> CenterCrop(image_size)
    interpolation: str = choice("bilinear", "bilinear", "bicubic")
    mean: Tuple[float, float, float] = num(IMAGENET_MEAN, "[0,1]")
    std: Tuple[float, float, float] = num(IMAGENET_STD, ">0")
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seg: SegProbeConfig = field(default_factory=SegProbeConfig)
    semisup: SemiSupConfig = field(default_factory=SemiSupConfig)


@dataclass
class RunConfig:
    name: str = ""                # recipe name; defaults to the recipe file's stem
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# -------------------------------------------------------------------------------------- loading
def _valid_keys(instance: Any, prefix: str = "") -> List[str]:
    """Every key of a config instance, list items written as `N` (e.g. `aug.views.N.size`)."""
    keys = []
    for f in dataclasses.fields(instance):
        full = f"{prefix}{f.name}"
        keys.append(full)
        sub = getattr(instance, f.name)
        if dataclasses.is_dataclass(sub):
            keys += _valid_keys(sub, full + ".")
        elif isinstance(sub, list) and sub and dataclasses.is_dataclass(sub[0]):
            keys += _valid_keys(sub[0], full + ".N.")
    return keys


def _nearest(bad: str, valid: Sequence[str]) -> List[str]:
    """Keys at the same depth that look alike, then keys anywhere whose last part looks alike."""
    depth = bad.count(".")
    same_depth = [v for v in valid if v.count(".") == depth]
    near = difflib.get_close_matches(bad, same_depth, n=3, cutoff=0.6)
    leaf = bad.rsplit(".", 1)[-1]
    for k in difflib.get_close_matches(leaf, sorted({v.rsplit(".", 1)[-1] for v in valid}), n=2, cutoff=0.7):
        near += [v for v in valid if v.rsplit(".", 1)[-1] == k and v not in near]
    return near[:4]


def _unknown_key(full_key: str, source: str, instance: Any) -> ConfigError:
    valid = _valid_keys(instance)
    full_key = full_key.replace("[", ".").replace("]", "")
    generic = ".".join("N" if part.isdigit() else part for part in full_key.split("."))
    near = _nearest(generic, valid)
    hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
    return ConfigError(f"unknown config key '{full_key}' in {source}{hint}")


def _rephrase(exc: OmegaConfBaseException, source: str, instance: Any) -> ConfigError:
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(exc, "full_key", None) or "?")   # views[0].n -> views.0.n
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return _unknown_key(key, source, instance)
    first = first_line(exc)
    return ConfigError(f"bad value for config key '{key}' in {source}: {first}")


def _read_yaml(path: Path, seen: Tuple[Path, ...] = ()) -> List[Tuple[str, Any]]:
    """The recipe and its `_base_` chain, base first, as (source name, dict) pairs."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: `_base_` chain loops back to itself")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of config keys at the top level")
    chain: List[Tuple[str, Any]] = []
    base = data.pop("_base_", None)
    if base is not None:
        chain += _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    chain.append((str(path), data))
    return chain


def _fields(obj: Any, prefix: str = ""):
    """(key, dataclass field, value) of every field of a config instance, sections and lists of
    sections included (list items as `key.N.`)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        yield key, f, value
        if dataclasses.is_dataclass(value):
            yield from _fields(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _fields(item, f"{key}.{i}.")


def _check_choices(obj: Any, prefix: str, origin: Dict[str, str]) -> None:
    for key, f, value in _fields(obj, prefix):
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            src = origin.get(key, "the defaults")
            raise ConfigError(
                f"bad value for config key '{key}' in {src}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


def _check_ranges(obj: Any, prefix: str, origin: Dict[str, str]) -> None:
    """Every `num` field within its declared range, and the few rules that join two fields."""
    for key, f, value in _fields(obj, prefix):
        valid = f.metadata.get("range")
        if valid and value is not None:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not in_range(v, valid)]
            if not bad and "ordered" in valid.split():
                bad = [values[i + 1] for i in range(len(values) - 1) if values[i + 1] < values[i]]
            if bad:
                src = origin.get(key) or next((origin[k] for k in origin if k.startswith(key + ".")), "the defaults")
                raise ConfigError(f"bad value for config key '{key}' in {src}: expected "
                                  f"{'each value ' if len(values) > 1 else ''}{describe_range(valid)}, got {value!r}")
    train = getattr(obj, "train", None)
    if prefix == "" and isinstance(train, TrainConfig) and train.batch_size == 0 and train.per_gpu_batch == 0:
        src = origin.get("train.batch_size", "the defaults")
        raise ConfigError(f"bad value for config key 'train.batch_size' in {src}: the global batch must be >= 1 "
                          f"(0 only with train.per_gpu_batch >= 1, which then fixes it)")


def check_values(obj: Any, origin: Optional[Dict[str, str]] = None) -> None:
    """The checks `build_config` makes after merging: choices and numeric ranges (one line naming the key)."""
    _check_choices(obj, "", origin or {})
    _check_ranges(obj, "", origin or {})


def _leaf_keys(node: Any, prefix: str = "") -> List[str]:
    if isinstance(node, DictConfig):
        out = []
        for k in node.keys():
            out += _leaf_keys(node._get_node(k), f"{prefix}{k}.")
        return out
    if isinstance(node, ListConfig):
        out = [prefix[:-1]]
        for i in range(len(node)):
            out += _leaf_keys(node._get_node(i), f"{prefix}{i}.")
        return out
    return [prefix[:-1]]


def parse_override(text: str) -> Tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad command-line override '{text}': expected key=value, e.g. optim.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(schema: type, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Any:
    """Merge schema defaults <- YAML files (each with its `_base_` chain) <- `key=value` overrides."""
    base_instance = schema()
    cfg = OmegaConf.structured(base_instance)
    origin: Dict[str, str] = {}
    for file in files:
        for source, data in _read_yaml(Path(file)):
            try:
                cfg = OmegaConf.merge(cfg, data)
            except OmegaConfBaseException as exc:
                raise _rephrase(exc, source, base_instance) from None
            for k in _leaf_keys(data):
                origin[k] = source
    for text in overrides:
        key, value = parse_override(text)
        source = f"command-line override '{text}'"
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise _rephrase(exc, source, base_instance) from None
        origin[key] = source
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _rephrase(exc, "the merged config", base_instance) from None
    check_values(obj, origin)
    if files and not obj.name:
        obj.name = Path(files[-1]).stem
    return obj


def parse_command_line(argv: Optional[Sequence[str]] = None, description: str = "") -> argparse.Namespace:
    """A paper's command line: `--config recipe.yaml [--config more.yaml] [--print-config] key=value ...`
    -> namespace with `config` (list of files), `print_config`, `overrides`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="recipe file (repeatable; later files override earlier ones)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def load_config(schema: type, argv: Optional[Sequence[str]] = None, description: str = "") -> Any:
    """Command line: `--config recipe.yaml [--config more.yaml] key=value ...`."""
    args = parse_command_line(argv, description)
    cfg = build_config(schema, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict of builtins (lists for tuples), safe for `torch.load(weights_only=True)`."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def read_recipe(files: Sequence[str | Path]) -> Dict[str, Any]:
    """The merged plain dict of recipe files (each with its `_base_` chain), without a schema."""
    merged = OmegaConf.create({})
    for file in files:
        for _, data in _read_yaml(Path(file)):
            merged = OmegaConf.merge(merged, data)
    return OmegaConf.to_container(merged, resolve=True)


def from_dict(schema: type, data: Dict[str, Any], overrides: Sequence[str] = (), source: str = "the stored config") -> Any:
    """Rebuild a generic config from a paper's config dict (a checkpoint's, or a recipe's): keys of the
    paper's own `model` section that `schema` does not know are dropped, any other unknown key is an error."""
    inst = schema()
    model_fields = {f.name for f in dataclasses.fields(inst.model)}
    data = dict(data)
    if isinstance(data.get("model"), dict):
        data["model"] = {k: v for k, v in data["model"].items() if k in model_fields}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(inst), data)
    except OmegaConfBaseException as exc:
        raise _rephrase(exc, source, inst) from None
    for text in overrides:
        key, value = parse_override(text)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise _rephrase(exc, f"command-line override '{text}'", inst) from None
    obj = OmegaConf.to_object(cfg)
    check_values(obj, {})
    return obj
