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


# ----------------------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    """The built-in procedural dataset (`shared.data.synthetic`)."""

    length: int = 2048            # training images
    val_length: int = 512         # validation images (a disjoint seed stream)
    image_size: int = 64
    num_classes: int = 8          # first N of the shape classes
    max_objects: int = 3          # 1 labelled object + up to N-1 smaller distractors
    texture: float = 1.0          # strength of the background structure (0: one flat colour)
    palette: int = 0              # 0: any RGB colour; N: colours drawn from N fixed hues
    rotation: float = 180.0       # shapes are rotated by U(-rotation, rotation) degrees
    placement: Tuple[float, float] = (1.0, 1.0)   # x, y spread of the labelled shape's centre: 1 anywhere, 0 centred
    radius_range: Tuple[float, float] = (0.2, 0.36)   # labelled shape's radius, fraction of the image size
    shading: float = 0.25         # strength of the linear brightness ramp across each shape (0: flat fill)
    seed: int = 0
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
    workers: int = -1             # DataLoader workers per process; -1: from the machine, the CPUs this process may use
    #   (min of SLURM_CPUS_PER_TASK and its CPU affinity) / processes on this node (LOCAL_WORLD_SIZE), minus one
    pin_memory: bool = True       # page-locked batches (on CUDA only)
    persistent_workers: bool = True   # keep the workers (and their dataset state) from one epoch to the next
    prefetch_factor: int = 2      # batches each worker prepares ahead (DataLoader's prefetch_factor); 0: DataLoader's own
    # Pretraining from image files (folder / images): decode each image once for all its views, at the
    # largest JPEG scale (1/2, 1/4, 1/8) that keeps every view's crop at least its output size, and
    # resize with torch's antialiased uint8 kernels; the other ops are PIL's; the views differ from the
    # PIL path by the reduced decode only (tests/test_input_pipeline.py). false: the PIL path, op for op.
    fast_path: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ViewConfig:
    """One augmented view. `order` lists the ops as applied; an op with probability 0 is skipped."""

    n: int = 1                                      # number of crops drawn with this recipe
    size: int = 224
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = choice("bilinear", "bilinear", "bicubic")
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness contrast saturation hue
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)    # PIL GaussianBlur radius ~ U(a, b)
    solarize_p: float = 0.0
    solarize_threshold: int = 128
    order: List[str] = field(default_factory=lambda: ["crop", "flip", "jitter", "gray", "blur", "solarize"])
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD


@dataclass
class AugConfig:
    views: List[ViewConfig] = field(default_factory=lambda: [ViewConfig(), ViewConfig()])


# ---------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    name: str = "resnet50"        # torchvision resnet18/34/50/101/152, or any timm ViT/Swin name
    zero_init_residual: bool = False
    img_size: int = 224           # timm models only
    drop_path: float = 0.0        # timm models only
    conv_stem: bool = False       # timm ViTs: a convolutional stem instead of the patch projection (Xiao et al. 2021)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra constructor arguments


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


# ---------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    name: str = choice("sgd", "sgd", "lars", "adamw")
    lr: float = 0.1               # base lr at `lr_ref_batch`; peak lr = lr * global_batch / lr_ref_batch
    lr_ref_batch: int = 256       # 0: no batch scaling
    weight_decay: float = 0.0
    # Parameters matching any rule get no weight decay and (LARS) no trust-ratio adaptation.
    # Rules: "ndim<=1" (biases, norm weights), "bias" (names ending in .bias), or fnmatch patterns on names.
    no_decay: List[str] = field(default_factory=list)
    lr_no_decay: Optional[float] = None  # base lr of the no-decay group (null: same as lr)
    momentum: float = 0.9         # sgd / lars
    nesterov: bool = False
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lars_eta: float = 0.001
    clip_grad: float = 0.0        # max global grad norm; 0 = off


@dataclass
class ScheduleConfig:
    """Per-iteration schedules of lr, weight decay and the momentum-encoder coefficient."""

    kind: str = choice("cosine", "cosine", "step", "constant")
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0     # lr at step 0, as a fraction of peak
    final: float = 0.0            # cosine floor, as a fraction of peak
    milestones: List[float] = field(default_factory=list)  # step decay: epochs at which lr *= gamma
    gamma: float = 0.1
    per_epoch: bool = False       # hold lr constant within an epoch (torch's epoch-stepped schedulers)
    warmup_prefix: bool = True    # false: cosine over all steps from step 0, warmup included (timm's warmup_prefix=False)
    lag_epochs: int = 0           # lr only: the schedule runs N epochs late, at its step-0 value until then (DeiT: 1)
    wd_final: Optional[float] = None  # cosine weight-decay schedule to this value (null: constant)
    ema_start: Optional[float] = None  # momentum-encoder coefficient at step 0 (null: no schedule)
    ema_final: float = 1.0
    ema_kind: str = choice("cosine", "cosine", "constant")


# ---------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256         # global batch: per-process batch = batch_size / world size
    per_gpu_batch: int = 0        # >0: fix the per-process batch instead; global = per_gpu_batch x world size
    drop_last: bool = True
    seed: int = 0
    device: str = choice("auto", "auto", "cpu", "cuda")
    amp: str = choice("auto", "auto", "bf16", "fp16", "fp32")  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True          # convert BatchNorm to a synchronised BatchNorm when distributed
    out_dir: str = ""             # default: runs/<method>/<recipe name>
    resume: bool = True           # continue from out_dir/last.pt when it exists
    ckpt_every_epochs: int = 1    # rewrite last.pt every N epochs (0: only at the end)
    ckpt_every_steps: int = 0     # also every N steps (0: off)
    keep_every_epochs: int = 0    # keep a numbered copy every N epochs (0: off)
    log_every: int = 20           # steps between log lines
    tensorboard: bool = True


# ----------------------------------------------------------------------------------------- eval
@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    block: int = 0                # as eval.linear.block: 0 the pooled output, N the mean patch token after block N


@dataclass
class LinearConfig:
    """Linear probe on a frozen backbone (kept in eval mode). Defaults: the Barlow Twins protocol."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.3
    lr_ref_batch: int = 0         # 0: lr is used as is
    weight_decay: float = 1e-6
    momentum: float = 0.9
    optimizer: str = choice("sgd", "sgd", "lars")
    schedule: str = choice("cosine_epoch", "cosine_epoch", "cosine_step")
    warmup_epochs: float = 0.0
    bn: bool = False              # affine-free BatchNorm before the classifier (MAE-style option)
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    interpolation: str = choice("bilinear", "bilinear", "bicubic")
    cache_features: bool = False  # extract features once (no augmentation) and train on them: fast, not the protocol
    eval_every_epochs: int = 1
    amp: str = choice("fp32", "auto", "bf16", "fp16", "fp32")   # the official probes run in fp32
    block: int = 0                # 0: the backbone's pooled output; N: the mean of the patch tokens after
                                  # block N (1-based, timm ViTs), SimMIM's ViT probe: 8


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning of the whole backbone with a linear head (`shared.eval.finetune`).
    Defaults: the DeiT recipe (facebookresearch/deit main.py, 2021, timm 0.3.2) that MoCo v3 fine-tunes
    with (ViT-B: epochs=150). Learning rates are absolute at `lr_ref_batch`, as DeiT's arguments."""

    epochs: int = 300             # DeiT's default; MoCo v3 fine-tunes ViT-B for 150
    batch_size: int = 1024        # global batch
    lr: float = 5e-4              # peak lr = lr * global batch / lr_ref_batch
    lr_ref_batch: int = 512
    weight_decay: float = 0.05    # AdamW; none on 1-D parameters, biases and the backbone's no_weight_decay() set
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: int = 5        # linear from warmup_lr, then cosine (per epoch) down to min_lr
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    layer_decay: float = 1.0      # layer-wise lr decay (BEiT/MAE): block i gets decay^(depth - i); 1.0 = off
    clip_grad: float = 0.0        # max global grad norm; 0 = off (DeiT's default)
    drop_path: float = 0.1        # stochastic depth of the fine-tuned backbone (timm models)
    head_init_std: float = 0.02   # classifier weight ~ trunc_normal(std), bias 0 (timm 0.3.2's ViT head; MAE: 2e-5)
    interpolation: str = choice("bicubic", "bicubic", "bilinear")  # train crop, RandAugment and eval resize
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec ("" = off)
    color_jitter: float = 0.4     # used by timm only when rand_augment is off
    reprob: float = 0.25          # timm RandomErasing probability
    remode: str = choice("pixel", "pixel", "rand", "const")
    recount: int = 1
    mixup: float = 0.8            # mixup alpha (0: off)
    cutmix: float = 1.0           # cutmix alpha (0: off)
    mixup_prob: float = 1.0       # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on
    smoothing: float = 0.1        # label smoothing
    eval_every_epochs: int = 1
    amp: str = choice("auto", "auto", "bf16", "fp16", "fp32")  # DeiT: fp16 with a GradScaler
    per_epoch: bool = True        # lr held within an epoch (DeiT); false: per iteration (SimMIM)
    lag_epochs: int = 1           # DeiT steps its scheduler after each epoch (SimMIM: 0)
    no_decay: Optional[List[str]] = None  # weight-decay exclusion rules (optim.no_decay syntax); null: 1-D,
                                  # biases and the backbone's no_weight_decay() set (timm's create_optimizer)
    img_size: int = 0             # fine-tuning resolution (0: eval.image_size), e.g. Swin 192 -> 224
    resize: int = 0               # its eval Resize (0: eval.resize)
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

    stage: int = -1               # feature map: forward_intermediates index (ResNet 0..3 = C2..C5); -1 = last
    epochs: int = 30
    batch_size: int = 64          # images per step (all their pixels): 32 steps an epoch on 2048 images
    lr: float = 3e-2              # AdamW peak lr: linear warm-up, then cosine to 0 (per step)
    warmup_epochs: float = 2.0    # Adam's first steps overshoot on wide (2048-d) maps without it
    weight_decay: float = 1e-4    # decoupled, on the classifier weight only
    bn: bool = True               # affine-free BatchNorm2d on the features before the classifier


@dataclass
class EvalConfig:
    after_train: List[str] = field(default_factory=lambda: ["knn"])  # any of knn, linear, finetune, seg
    compare_random_init: bool = False  # also evaluate a random-init backbone of the same architecture
    image_size: int = 224
    resize: int = 256             # eval transform: Resize(resize) -> CenterCrop(image_size)
    interpolation: str = choice("bilinear", "bilinear", "bicubic")
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seg: SegProbeConfig = field(default_factory=SegProbeConfig)


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
    key = getattr(exc, "full_key", None) or "?"
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


def _check_choices(obj: Any, prefix: str, origin: Dict[str, str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            src = origin.get(key, "the defaults")
            raise ConfigError(
                f"bad value for config key '{key}' in {src}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".", origin)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{key}.{i}.", origin)


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
    _check_choices(obj, "", origin)
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
    _check_choices(obj, "", {})
    return obj
