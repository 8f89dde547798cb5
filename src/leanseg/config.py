"""Typed config schema with defaults, YAML loading, dotted overrides and validation.

``load_config("configs/x.yaml", ["train.iterations=100"])`` merges, in order, the schema defaults,
the YAML file (or a packaged recipe's name, :mod:`leanseg.recipes`) and the overrides, then
validates every value. Any problem raises one :class:`~leanseg.errors.ConfigError` whose message
names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from leanseg.catalog import CAMVID_VOID, DATASET_CLASSES, model_names, model_option_names
from leanseg.errors import ConfigError
from leanseg.recipes import find_recipe, read_recipe


@dataclass
class DataConfig:
    """Dataset, augmentation and loader settings."""

    dataset: str = "synthetic"
    root: str | None = None  # dataset directory; for `synthetic`, the cache directory
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # None: the dataset's own class count
    ignore_index: int = 255
    crop_size: int = 112  # crop height (and width unless crop_width is set)
    crop_width: int | None = None
    scale_min: float = 0.75
    scale_max: float = 1.5
    rotate: float = 0.0
    blur: bool = False
    flip: bool = True
    crop_val: int | None = None  # VainF `--crop_val`: resize short side + centre crop
    batch_size: int = 16
    val_batch_size: int = 1
    workers: int = 2
    synthetic_seed: int = 0
    synthetic_train: int = 1000
    synthetic_val: int = 100
    list_file: str | None = None  # pair list per split, e.g. "list/{split}.txt" (semseg/chenxi)
    palette_file: str | None = None  # folder: one "R G B [name]" line per class (colour masks)
    class_names: list[str] | None = None  # None: the dataset's own names
    # folder without split subfolders: this fraction of its images (picked by a fixed hash of
    # the file names) is the val split, the rest train; None: a flat folder needs data.list_file
    val_fraction: float | None = None
    # input normalisation (x = (pixel / 255 - mean) / std, RGB in [0, 1] units), recorded in
    # checkpoints for eval / predict / export; null: the dataset's (ImageNet, CIFAR-10's)
    mean: list[float] | None = None
    std: list[float] | None = None
    # colour jitter of training images (ColorJitter semantics, random order); 0: off
    brightness: float = 0.0  # factor ~ U(max(0, 1 - b), 1 + b)
    contrast: float = 0.0  # factor ~ U(max(0, 1 - c), 1 + c)
    saturation: float = 0.0  # factor ~ U(max(0, 1 - s), 1 + s)
    hue: float = 0.0  # hue shift ~ U(-h, h) of a full turn, h <= 0.5


@dataclass
class ModelConfig:
    """Which registered model to build, and its options."""

    name: str = "deeplabv3plus_resnet18"
    output_stride: int = 16
    aux: bool = False
    aux_weight: float = 0.5
    pretrained: str | None = None  # weights file path, or imagenet / resnet50.IMAGENET1K_V2 ...
    # keyword options of the builder; the default is a half-width ResNet-18 with ASPP rates
    # scaled to 112 px crops, which learns the synthetic set in minutes on a CPU
    options: dict[str, Any] = field(
        default_factory=lambda: {"width_mult": 0.5, "channels": 64, "aspp_rates": [2, 4, 6]}
    )
    crf: str | None = None  # "ddd": DDD CRF layer on the logits (DeepLabV3 / V3+ models)
    crf_iters: int = 5  # DDD fixed-point iterations
    crf_gamma: float = 2.0  # DDD smoothing temperature


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"  # sgd | adam | adamw; the seeds' recipes use sgd (momentum 0.9)
    lr: float = 0.004  # the default recipe; its results before issue 15 used 0.002
    backbone_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"  # poly | cosine | constant | exponential
    power: float = 0.9  # poly
    # exponential: lr x gamma ** (iteration // decay_every), piecewise constant (FasterSeg:
    # lr x 0.992 after each 1000-iteration epoch)
    gamma: float = 0.992
    decay_every: int = 1000
    warmup_iters: int = 30
    min_lr: float = 1e-6
    # clip the total gradient norm (over all parameters, of the accumulated gradient; fp16:
    # of the unscaled one) to this before each optimizer step; null: no clipping
    clip_grad_norm: float | None = None


@dataclass
class LossConfig:
    """The segmentation loss: criterion and the weight of each model output."""

    # ce | ohem (online hard example mining, as FasterSeg trains) | dice (soft Dice) | focal |
    # ce+dice (docs/training_options.md, "Losses")
    name: str = "ce"
    ohem_thresh: float = 0.7  # ohem: keep pixels whose true-class probability is <= this ...
    # ... raised to the min_kept-th smallest probability: an absolute pixel count per batch (of
    # each process) as in the original (FasterSeg: batch * H * W // 16); 0: the threshold alone
    ohem_min_kept: int = 100000
    # output name -> weight; every output the model returns in training needs one (unused ones
    # are reported); null: {out: 1, aux: model.aux_weight}. A mapping merges key by key with
    # the YAML's: loss.weights=null goes back to the default
    weights: dict[str, float] | None = None
    # one weight per class (>= 0) for ce / ohem / focal (alpha) / dice (weighted class mean);
    # null: all 1. The length must be the class count (checked once the model is built)
    class_weights: list[float] | None = None
    focal_gamma: float = 2.0  # focal: -(1 - p_t) ** gamma * log(p_t); 0: cross-entropy
    dice_weight: float = 1.0  # ce+dice: ce + dice_weight * dice
    # the models hand over feature-resolution training logits and the loss upsamples them
    # (the same loss and gradients, without saving full-resolution tensors for backward);
    # false: the model upsamples, as before. Not with distill.teacher (KD is at input size)
    fused_upsampling: bool = True


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (KL on the final logits); off when
    ``teacher`` is None."""

    teacher: str | None = None  # a leanseg checkpoint (e.g. the teacher run's last.pt)
    # --dry-run only: when the teacher file does not exist yet, a randomly initialised model of
    # this registered name stands in for it (so that the KD path runs); ignored otherwise
    teacher_model: str | None = None
    weight: float = 1.0
    temperature: float = 1.0  # the KL is scaled by temperature**2
    reduction: str = "mean"  # mean: over B*C*H*W (the original's KLDivLoss) | pixel: C x mean


@dataclass
class TrainConfig:
    """Length, logging, checkpointing and devices of a training run."""

    iterations: int = 800
    val_interval: int = 400
    log_interval: int = 20
    seed: int = 0
    device: str = "auto"
    # autocast: auto = bf16 on CPUs with native bf16 (avx512_bf16 / AMX) and on CUDA devices
    # with bf16, fp16 (+ loss scaling) on older GPUs, fp32 elsewhere. Losses, metrics and BN
    # statistics stay fp32
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # auto: where precision auto picks bf16 / fp16 (and not on the CPU for GroupNorm models,
    # whose channels_last CPU kernel is inexact)
    channels_last: str = "auto"  # auto | true | false
    compile: bool = False  # torch.compile the training model (eager, with a warning, on failure)
    work_dir: str = "runs"
    name: str | None = None
    # what the run logs besides metrics.jsonl (always written): csv (metrics_train.csv /
    # metrics_val.csv) | tensorboard (the [tensorboard] extra)
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    # micro-batches of data.batch_size per optimizer step (gradient accumulation); the LR
    # schedule and train.iterations count optimizer steps
    accumulate: int = 1
    # decay of an exponential moving average of the weights, e.g. 0.999; validation, best.pt
    # and the checkpoints' state_dict use it (last.pt keeps the raw weights too); null: off
    ema: float | None = None
    sample_images: int = 4
    on_nonfinite: str = "stop"  # NaN / inf loss: stop (one-line error) | skip (drop the batch)


@dataclass
class EvalConfig:
    """How validation images are predicted."""

    mode: str = "whole"
    crop_size: int | None = None
    stride: int | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    base_size: int | None = None
    # eval / predict / Predictor of a checkpoint: BN folded into the convs (leanseg.fuse_bn),
    # channels_last; validation during training runs the model as it trains
    fuse_bn: bool = False


@dataclass
class BackRazorConfig:
    """Sparse, bit-packed saved activations (``leanseg.methods.backrazor``); off when None."""

    ratio: float | None = None  # fraction of each activation pruned for backward, e.g. 0.9
    scope: str = "backbone"  # backbone | head | all
    value_dtype: str | None = None  # kept values as float16 | bfloat16; null: activation dtype
    bn: str = "sparse"  # sparse (the original) | dense (stock BN) | frozen (running stats)


@dataclass
class AcospConfig:
    """Learned channel masks during training (``leanseg.methods.acosp``); off when None.

    The temperature falls from ``tau0`` to ``tau_final`` between ``start`` and ``end`` (in
    ``unit``s: iterations, or epochs of the training set as in the original); at ``end`` the
    masks become hard top-k and training goes on with them. ``end`` None: ``train.iterations``
    (or the last epoch).
    """

    sparsity: float | None = None  # fraction of each conv's output channels pruned, e.g. 0.75
    start: int = 0
    end: int | None = None
    unit: str = "iteration"  # iteration | epoch
    tau0: float = 1.0
    tau_final: float = 1e-3
    min_keep: int = 8  # channels kept at least per conv
    coupled_residual: bool = False  # one score vector per residual group (not the published)


@dataclass
class SearchConfig:
    """FasterSeg architecture search (``leanseg search``; shared/methods/fasterseg.md §2-5).

    The defaults are a small space that searches the synthetic dataset in minutes on a CPU
    (configs/fasterseg_search_synthetic.yaml); configs/fasterseg_search_cityscapes.yaml has the
    original's values. Training data, crop and batch are ``data.*``, the segmentation loss
    ``loss.*`` (OHEM in the recipes), the seed ``train.seed``.
    """

    layers: int = 8  # cells per row (scales 1/8, 1/16, 1/32); the original: 16
    fch: int = 6  # base width: a map at scale s has up to s * fch channels; the original: 12
    width_choices: list[float] = field(
        default_factory=lambda: [4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0]
    )
    pretrain_epochs: int = 2  # weights only; the original: 20
    epochs: int = 4  # search: architecture and weight steps alternate; the original: 30
    iterations_per_epoch: int | None = 25  # null: one pass over split A per epoch
    pretrained: str | None = None  # a search run's pretrain.pt: skip pretraining, start there
    pretrain_lr: float = 0.02
    lr: float = 0.01  # weight SGD in the search phase
    lr_gamma: float = 0.978  # weight lr x this after each epoch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0  # norm of the weight gradients (architecture parameters excluded)
    arch_lr: float = 3e-4  # Adam, betas (0.5, 0.999), no weight decay
    split_seed: int = 12345  # the seeded shuffle that splits train into A (weights), B (arch)
    latency_table: str | None = None  # LUT JSON (`leanseg search lut`); required if weight > 0
    latency_backend: str = "onnxruntime"  # what the table must have been measured with
    latency_device: str = "cpu"
    latency_size: list[int] = field(default_factory=lambda: [512, 1024])  # H, W priced
    latency_weight: float = 0.01  # lambda0 on the student's latency (ms); 0: no latency loss
    latency_terms: list[float] = field(default_factory=lambda: [1.0, 497.0, 2.0])  # / sum
    latency_legacy: bool = False  # the original's pricing (fasterseg.md §10 #1, §11)
    adapt_lambda: bool = True  # halve / double lambda by the derived students' LUT FPS
    fps_low: float = 155.0  # double lambda when a derived student is at or below this FPS
    fps_high: float = 175.0  # halve it when one reaches this
    target_latency_ms: float = 8.3  # branch selection: mIoU * (latency / target) ** -0.07


@dataclass
class Config:
    """The whole run: everything a run needs is in here and in the saved copy of it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backrazor: BackRazorConfig = field(default_factory=BackRazorConfig)
    acosp: AcospConfig = field(default_factory=AcospConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "data.dataset": (
        "synthetic",
        "voc",
        "voc_aug",
        "cityscapes",
        "ade20k",
        "camvid",
        "folder",
        "cifar10",
    ),
    "model.output_stride": (8, 16),
    "model.crf": (None, "ddd"),
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("poly", "cosine", "constant", "exponential"),
    "loss.name": ("ce", "ohem", "dice", "focal", "ce+dice"),
    "distill.reduction": ("mean", "pixel"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.channels_last": ("auto", "true", "false"),
    "train.on_nonfinite": ("stop", "skip"),
    "eval.mode": ("whole", "slide"),
    "backrazor.scope": ("backbone", "head", "all"),
    "backrazor.value_dtype": (None, "float16", "bfloat16"),
    "backrazor.bn": ("sparse", "dense", "frozen"),
    "acosp.unit": ("iteration", "epoch"),
    "search.latency_backend": ("onnxruntime", "torch", "tensorrt"),
    "search.latency_device": ("cpu", "cuda"),
}


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: ``low``/``high`` bounds, None for unbounded.

    ``low_open``/``high_open`` exclude the bound itself; ``note`` says why, or what null means.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def describe(self) -> str:
        """E.g. ``> 0``, ``>= 2`` or ``in [0, 1)``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return "any number"

    def with_note(self, note: str) -> Range:
        """The same range with a note (appended to the error message)."""
        return dataclasses.replace(self, note=note)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SEED = Range(0, 2**32 - 1)

# The rule of every numeric key of the schema (ints, floats, their Optional forms, lists of
# floats: each element), except those listed in CHOICES. None is accepted only where the type
# is Optional; 0 or a negative value is never a silent "default". Cross-key rules are in
# validate(). tests/test_config_validation.py fails when a numeric field has no rule here.
RANGES: dict[str, Range] = {
    "data.num_classes": POSITIVE.with_note("null: the dataset's own class count"),
    "data.ignore_index": Range(0, 255, note="masks are 8-bit"),
    "data.crop_size": POSITIVE,
    "data.crop_width": POSITIVE.with_note("null: data.crop_size"),
    "data.scale_min": POSITIVE,
    "data.scale_max": POSITIVE,
    "data.rotate": Range(0, 180, note="degrees"),
    "data.crop_val": POSITIVE.with_note("null: whole images"),
    "data.batch_size": Range(2, note="BatchNorm needs 2 samples"),
    "data.val_batch_size": POSITIVE,
    "data.workers": NON_NEGATIVE,
    "data.synthetic_seed": SEED,
    "data.synthetic_train": POSITIVE,
    "data.synthetic_val": POSITIVE,
    "data.val_fraction": Range(0, 1, low_open=True, high_open=True),
    "data.mean": Range(0, 1, note="RGB in [0, 1] units; null: the dataset's"),
    "data.std": POSITIVE.with_note("RGB in [0, 1] units; null: the dataset's"),
    "data.brightness": NON_NEGATIVE.with_note("0: off"),
    "data.contrast": NON_NEGATIVE.with_note("0: off"),
    "data.saturation": NON_NEGATIVE.with_note("0: off"),
    "data.hue": Range(0, 0.5, note="a fraction of a full hue turn; 0: off"),
    "model.aux_weight": NON_NEGATIVE,
    "model.crf_iters": POSITIVE,
    "model.crf_gamma": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.backbone_lr_mult": NON_NEGATIVE.with_note("0 freezes the backbone"),
    "optim.momentum": FRACTION,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.power": POSITIVE,
    "optim.gamma": Range(0, 1, low_open=True, note="exponential: the LR factor per decay_every"),
    "optim.decay_every": POSITIVE.with_note("iterations per LR step"),
    "optim.warmup_iters": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.clip_grad_norm": POSITIVE.with_note("null: no clipping"),
    "loss.ohem_thresh": Range(0, 1, note="a probability"),
    "loss.ohem_min_kept": NON_NEGATIVE.with_note("pixels per batch; 0: loss.ohem_thresh alone"),
    "loss.class_weights": NON_NEGATIVE.with_note("one per class; null: all 1"),
    "loss.focal_gamma": NON_NEGATIVE.with_note("0: cross-entropy"),
    "loss.dice_weight": NON_NEGATIVE,
    "distill.weight": POSITIVE.with_note("set distill.teacher=null to train without KD"),
    "distill.temperature": POSITIVE,
    "train.iterations": POSITIVE,
    "train.val_interval": POSITIVE,
    "train.log_interval": POSITIVE,
    "train.seed": SEED,
    "train.sample_images": NON_NEGATIVE,
    "train.accumulate": POSITIVE.with_note("micro-batches per optimizer step; 1: off"),
    "train.ema": Range(0, 1, low_open=True, high_open=True, note="EMA decay; null: off"),
    "eval.crop_size": POSITIVE.with_note("null only with eval.mode=whole"),
    "eval.stride": POSITIVE.with_note("null: 2/3 of eval.crop_size"),
    "eval.scales": POSITIVE,
    "eval.base_size": POSITIVE.with_note("null: scale the image's own size"),
    "backrazor.ratio": FRACTION.with_note("null: BackRazor off"),
    "acosp.sparsity": FRACTION.with_note("null: ACoSP off"),
    "acosp.start": NON_NEGATIVE,
    "acosp.end": NON_NEGATIVE.with_note("null: the end of training"),
    "acosp.tau0": POSITIVE,
    "acosp.tau_final": POSITIVE,
    "acosp.min_keep": POSITIVE,
    "search.layers": Range(6, note="3 scales and 2 downsamples need 6 layers"),
    "search.fch": Range(1),
    "search.width_choices": Range(0, 1, low_open=True, note="fractions of the full width"),
    "search.pretrain_epochs": NON_NEGATIVE,
    "search.epochs": NON_NEGATIVE,
    "search.iterations_per_epoch": POSITIVE.with_note("null: one pass over split A"),
    "search.pretrain_lr": POSITIVE,
    "search.lr": POSITIVE,
    "search.lr_gamma": Range(0, 1, low_open=True),
    "search.momentum": FRACTION,
    "search.weight_decay": NON_NEGATIVE,
    "search.grad_clip": POSITIVE,
    "search.arch_lr": POSITIVE,
    "search.split_seed": SEED,
    "search.latency_size": POSITIVE,
    "search.latency_weight": NON_NEGATIVE.with_note("0: search without the latency loss"),
    "search.latency_terms": NON_NEGATIVE,
    "search.fps_low": POSITIVE,
    "search.fps_high": POSITIVE,
    "search.target_latency_ms": POSITIVE,
}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults <- ``base`` (e.g. a checkpoint's config) <- YAML file <- ``key.sub=value``.

    ``model.options`` belong to ``model.name``: a source that names a model starts from no
    options, so the default model's options never leak into another model.
    """
    merged = OmegaConf.structured(Config)
    try:
        sources = [OmegaConf.create(_upgrade(base))] if base is not None else []
        if path is not None:
            sources.append(_read_yaml(path))
        if overrides:
            sources.append(OmegaConf.merge(*[_parse_override(item) for item in overrides]))
        for source in sources:
            if OmegaConf.select(source, "model.name") is not None:
                merged.model.options = {}
            merged = OmegaConf.merge(merged, source)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source=path)) from None
    cfg.train.channels_last = str(cfg.train.channels_last).lower()  # YAML true -> "True"
    validate(cfg)
    return cfg


def _upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A config from an older leanseg (a checkpoint's, or a run's config.yaml) in today's keys:
    ``train.amp`` / ``train.amp_dtype`` became ``train.precision`` (an fp32 run stays fp32),
    ``train.tensorboard`` became ``train.loggers`` (a run that logged to tensorboard goes on)."""
    train = saved.get("train")
    if not isinstance(train, dict) or not ({"amp", "amp_dtype", "tensorboard"} & set(train)):
        return saved
    train = dict(train)
    if {"amp", "amp_dtype"} & set(train):
        amp, dtype = train.pop("amp", False), train.pop("amp_dtype", "auto")
        train.setdefault("precision", (dtype if dtype != "auto" else "auto") if amp else "fp32")
    if "tensorboard" in train:
        train.setdefault("loggers", ["csv", "tensorboard"] if train.pop("tensorboard") else [])
    return {**saved, "train": train}


def _read_yaml(value: str | Path) -> DictConfig:
    """A YAML file or packaged recipe name, with its ``_base_`` chain (leanseg.recipes)."""
    return OmegaConf.create(_upgrade(read_recipe(find_recipe(value))))


def _parse_override(item: str) -> DictConfig:
    """``key.sub=value`` with a YAML value; a text key keeps the text of a number or date."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", None) or "a syntax error").split())
        quoted = raw.replace("'", "''")
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote a text value, "
            f"e.g. {key}=\"'{quoted}'\", or fix the list / mapping brackets"
        ) from None
    scalar = value is not None and not isinstance(value, (str, list, dict))
    if scalar and (_is_text_field(key) or isinstance(value, datetime.date)):
        value = raw.strip()  # train.name=2024 or =0x10 or a date: the text as written
    return _nested(key, value)


def _is_text_field(dotted: str) -> bool:
    """Whether the schema declares ``dotted`` as ``str`` or ``str | None``."""
    parent, _, name = dotted.rpartition(".")
    try:
        section = _section(parent)
    except (KeyError, TypeError):
        return False
    if not dataclasses.is_dataclass(section):
        return False
    hint = get_type_hints(section).get(name)
    return hint is str or (isinstance(hint, UnionType) and set(get_args(hint)) == {str, NoneType})


def _nested(dotted: str, value: Any) -> DictConfig:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return OmegaConf.create(node)


RENAMED = {
    "train.amp": "train.precision (auto | fp32 | bf16 | fp16)",
    "train.amp_dtype": "train.precision (auto | fp32 | bf16 | fp16)",
    "train.tensorboard": "train.loggers, a list of csv | tensorboard (e.g. train.loggers=[])",
}
LOGGERS = ("csv", "tensorboard")  # train.loggers: what a run logs besides metrics.jsonl


def _describe(err: OmegaConfBaseException, source: str | Path | None) -> str:
    key = getattr(err, "full_key", None) or "?"
    where = f" (in '{source}' or the overrides)" if source else ""
    if isinstance(err, ConfigKeyError):
        if key in RENAMED:
            return f"config key '{key}'{where} is now {RENAMED[key]}"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"unknown config key '{key}'{where}; valid keys: {_valid_keys(parent)}"
    if isinstance(err, ValidationError):
        expected = _field_type(key)
        value = getattr(err, "msg", str(err)).split("'")[1] if "'" in str(err) else "?"
        return f"config key '{key}'{where}: expected {expected}, got {value!r}"
    return f"config key '{key}'{where}: {str(err).splitlines()[0]}"


def _section(dotted: str) -> Any:
    node: Any = Config
    for part in filter(None, dotted.split(".")):
        node = {f.name: f.type for f in dataclasses.fields(node)}[part]
        node = _resolve_type(node)
    return node


def _resolve_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return globals().get(annotation, annotation)
    return annotation


def _valid_keys(parent: str) -> list[str]:
    try:
        section = _section(parent)
        return [f.name for f in dataclasses.fields(section)]
    except (KeyError, TypeError):
        return [f.name for f in dataclasses.fields(Config)]


def _field_type(dotted: str) -> str:
    parent, _, name = dotted.rpartition(".")
    try:
        types = {f.name: f.type for f in dataclasses.fields(_section(parent))}
        return str(types[name])
    except (KeyError, TypeError):
        return "a value of the schema's type"


def inference_options(cfg: EvalConfig) -> dict[str, Any]:
    """The ``eval`` section as keyword arguments of ``predict_probs`` / ``evaluate``."""
    return {
        "mode": cfg.mode,
        "scales": tuple(cfg.scales),
        "flip": cfg.flip,
        "crop_size": cfg.crop_size,
        "stride": cfg.stride,
        "base_size": cfg.base_size,
    }


def get_key(cfg: Config, dotted: str) -> Any:
    """The value at ``a.b`` of a config."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """Check value ranges and choices that types alone cannot express."""
    for key, choices in CHOICES.items():
        if get_key(cfg, key) not in choices:
            raise ConfigError(
                f"config key '{key}': {get_key(cfg, key)!r} is not one of {list(choices)}"
            )
    _check_finite(cfg)
    _check_normalization(cfg.data)
    for key, rule in RANGES.items():
        _check_range(key, get_key(cfg, key), rule)
    if cfg.data.scale_min > cfg.data.scale_max:
        raise ConfigError("config key 'data.scale_min': must be <= data.scale_max")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"config key 'optim.min_lr': must be <= optim.lr ({cfg.optim.lr}), "
            f"got {cfg.optim.min_lr}"
        )
    if cfg.eval.mode == "slide" and not cfg.eval.crop_size:
        raise ConfigError("config key 'eval.crop_size': required when eval.mode=slide")
    if cfg.eval.crop_size is not None and (cfg.eval.stride or 0) > cfg.eval.crop_size:
        raise ConfigError(
            f"config key 'eval.stride': must be <= eval.crop_size ({cfg.eval.crop_size}) so "
            f"that windows cover the image, got {cfg.eval.stride}"
        )
    if not cfg.eval.scales:
        raise ConfigError("config key 'eval.scales': must be a non-empty list of positive numbers")
    if cfg.acosp.end is not None and cfg.acosp.end < cfg.acosp.start:
        raise ConfigError(
            f"config key 'acosp.end': must be >= acosp.start ({cfg.acosp.start}), "
            f"got {cfg.acosp.end}"
        )
    _check_loss_weights(cfg.loss.weights)
    _check_loggers(cfg.train.loggers)
    _check_dataset(cfg.data)
    _check_model(cfg.model)
    _check_teacher_model(cfg.distill)
    _check_search(cfg.search)


def _check_search(cfg: SearchConfig) -> None:
    if len(cfg.latency_size) != 2:
        raise ConfigError(
            f"config key 'search.latency_size': got {cfg.latency_size}; give [height, width]"
        )
    if not cfg.width_choices or sorted(set(cfg.width_choices)) != list(cfg.width_choices):
        raise ConfigError(
            f"config key 'search.width_choices': got {cfg.width_choices}; give distinct "
            "fractions in increasing order, e.g. [0.5, 1.0]"
        )
    if len(cfg.latency_terms) != 3 or not sum(cfg.latency_terms) > 0:
        raise ConfigError(
            f"config key 'search.latency_terms': got {cfg.latency_terms}; give three weights "
            "(operators, paths, widths) with a positive sum, e.g. [1, 497, 2]"
        )
    if cfg.fps_low >= cfg.fps_high:
        raise ConfigError(
            f"config key 'search.fps_low': must be < search.fps_high ({cfg.fps_high}), "
            f"got {cfg.fps_low}"
        )


def _check_range(key: str, value: Any, rule: Range) -> None:
    """``value`` (each element of a list) lies in ``rule``; None only for an Optional key."""
    if value is None:
        return  # the schema's types already refuse None for a non-Optional key
    values = value if isinstance(value, list) else [value]
    for index, item in enumerate(values):
        if item not in rule:
            where = f"{key}[{index}]" if isinstance(value, list) else key
            null = " or null" if _is_optional(key) else ""
            note = f" ({rule.note})" if rule.note else ""
            raise ConfigError(
                f"config key '{where}': must be {rule.describe()}{null}{note}, got {item!r}"
            )


def _is_optional(dotted: str) -> bool:
    """Whether the schema type of ``dotted`` accepts None."""
    parent, _, name = dotted.rpartition(".")
    hint = get_type_hints(_section(parent))[name]
    return isinstance(hint, UnionType) and NoneType in get_args(hint)


def _check_finite(cfg: Config) -> None:
    """Every float of the config (lists and ``model.options`` too) is finite: no nan / inf."""

    def walk(key: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{key}.{f.name}" if key else f.name, getattr(value, f.name))
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(f"{key}.{name}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{key}[{index}]", item)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': must be a finite number, got {value}")

    walk("", cfg)


def _check_normalization(cfg: DataConfig) -> None:
    """``data.mean`` / ``data.std`` are null or three values (R, G, B)."""
    for key in ("mean", "std"):
        value = getattr(cfg, key)
        if value is not None and len(value) != 3:
            raise ConfigError(
                f"config key 'data.{key}': got {len(value)} values {list(value)}; give 3 "
                f"(R, G, B in [0, 1] units), e.g. data.{key}=[0.5, 0.5, 0.5], or null"
            )


def _check_loggers(loggers: list[str]) -> None:
    """``train.loggers`` names known loggers."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"config key 'train.loggers': {unknown[0]!r} is not one of {list(LOGGERS)} "
            "(metrics.jsonl is always written), e.g. train.loggers=[csv]"
        )


def _check_loss_weights(weights: dict[str, float] | None) -> None:
    """``loss.weights`` is null or a non-empty mapping of non-negative weights."""
    if weights is None:
        return
    if not weights:
        raise ConfigError(
            "config key 'loss.weights': empty; give a weight per model output, e.g. "
            "{out: 1.0, aux: 0.4}, or null for {out: 1, aux: model.aux_weight}"
        )
    for name, weight in weights.items():
        if weight < 0:
            raise ConfigError(f"config key 'loss.weights.{name}': must be >= 0, got {weight}")


def check_data_keys(cfg: DataConfig) -> None:
    """What ``data.dataset`` requires of the other data keys (CamVid's void label, a folder's
    class count, a ``{split}`` list pattern, no colour jitter for CIFAR-10); ``build_dataset``
    checks it too, for configs made without :func:`load_config`."""
    if cfg.dataset == "camvid" and cfg.ignore_index != CAMVID_VOID:
        raise ConfigError(
            f"config key 'data.ignore_index': CamVid marks void with {CAMVID_VOID}; set "
            f"data.ignore_index={CAMVID_VOID} (got {cfg.ignore_index})"
        )
    if cfg.dataset == "folder" and not cfg.num_classes and not cfg.palette_file:
        raise ConfigError(
            "config key 'data.num_classes': required for dataset folder (or set "
            "data.palette_file, one 'R G B name' line per class)"
        )
    jitter = {"brightness": cfg.brightness, "contrast": cfg.contrast}
    jitter |= {"saturation": cfg.saturation, "hue": cfg.hue}
    on = [key for key, value in jitter.items() if value > 0]
    if cfg.dataset == "cifar10" and on:
        raise ConfigError(
            f"config key 'data.{on[0]}': colour jitter is not part of the CIFAR-10 pipeline "
            f"(pad, crop, flip); set data.{on[0]}=0 for dataset cifar10"
        )
    if cfg.list_file is not None and "{split}" not in cfg.list_file:
        raise ConfigError(
            f"config key 'data.list_file': {cfg.list_file!r} must contain '{{split}}' "
            "(e.g. list/{split}.txt), so that train and val read different lists"
        )


def _check_dataset(cfg: DataConfig) -> None:
    """What ``data.dataset`` implies about the other data keys, without reading any file."""
    check_data_keys(cfg)
    classes = cfg.num_classes or DATASET_CLASSES[cfg.dataset]
    if classes is None:
        return  # folder + palette file: the class count is in the file
    if cfg.ignore_index < classes:
        raise ConfigError(
            f"config key 'data.ignore_index': must be >= {classes}, the class count of "
            f"dataset {cfg.dataset} (0..{classes - 1} are class ids), got {cfg.ignore_index}"
        )
    if cfg.class_names is not None and len(cfg.class_names) != classes:
        raise ConfigError(
            f"config key 'data.class_names': {len(cfg.class_names)} names for {classes} "
            "classes; give one name per class (or set data.num_classes)"
        )


def _check_model(cfg: ModelConfig) -> None:
    """``model.name`` is registered and ``model.options`` are options of that model."""
    accepted = model_option_names(cfg.name)
    if accepted is None:
        raise ConfigError(
            f"config key 'model.name': unknown model {cfg.name!r}; choose one of {model_names()}"
        )
    unknown = sorted(set(cfg.options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"config key 'model.options.{unknown[0]}': not an option of model {cfg.name!r}; "
            f"accepted options: {sorted(accepted)}"
        )
    _check_crf(cfg)


def _check_teacher_model(cfg: DistillConfig) -> None:
    """``distill.teacher_model`` (the dry run's stand-in teacher) is a registered model."""
    if cfg.teacher_model is not None and model_option_names(cfg.teacher_model) is None:
        raise ConfigError(
            f"config key 'distill.teacher_model': unknown model {cfg.teacher_model!r}; choose "
            f"one of {model_names()}"
        )


def _check_crf(cfg: ModelConfig) -> None:
    """``model.crf`` needs a model whose builder accepts ``crf`` (``model.name`` is known)."""
    if cfg.crf is None:
        return
    if "crf" not in (model_option_names(cfg.name) or ()):
        supported = [name for name in model_names() if "crf" in model_option_names(name)]
        raise ConfigError(
            f"config key 'model.crf': model {cfg.name!r} has no CRF head; use one of "
            f"{supported} or set model.crf=null"
        )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML; :func:`load_config` reads it back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain Python data (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
