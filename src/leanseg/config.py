"""Typed config schema with defaults, YAML loading, dotted overrides and validation.

``load_config("configs/x.yaml", ["train.iterations=100"])`` merges, in order, the schema defaults,
the YAML file and the overrides, then validates every value. Any problem raises one
:class:`~leanseg.errors.ConfigError` whose message names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from leanseg.errors import ConfigError


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


@dataclass
class ModelConfig:
    """Which registered model to build, and its options."""

    name: str = "deeplabv3plus_resnet18"
    output_stride: int = 16
    aux: bool = False
    aux_weight: float = 0.5
    pretrained: str | None = None  # ImageNet weights (torchvision / semseg / vgg16 format)
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
    lr: float = 0.002
    backbone_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    power: float = 0.9
    warmup_iters: int = 30
    min_lr: float = 1e-6


@dataclass
class TrainConfig:
    """Length, logging, checkpointing and devices of a training run."""

    iterations: int = 800
    val_interval: int = 400
    log_interval: int = 20
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "auto"
    work_dir: str = "runs"
    name: str | None = None
    tensorboard: bool = True
    sample_images: int = 4


@dataclass
class EvalConfig:
    """How validation images are predicted."""

    mode: str = "whole"
    crop_size: int | None = None
    stride: int | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    base_size: int | None = None


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
class Config:
    """The whole run: everything a run needs is in here and in the saved copy of it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backrazor: BackRazorConfig = field(default_factory=BackRazorConfig)
    acosp: AcospConfig = field(default_factory=AcospConfig)


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
    "optim.schedule": ("poly", "cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp_dtype": ("auto", "bf16", "fp16"),
    "eval.mode": ("whole", "slide"),
    "backrazor.scope": ("backbone", "head", "all"),
    "backrazor.value_dtype": (None, "float16", "bfloat16"),
    "backrazor.bn": ("sparse", "dense", "frozen"),
    "acosp.unit": ("iteration", "epoch"),
}
POSITIVE = (
    "data.crop_size",
    "data.val_batch_size",
    "data.synthetic_train",
    "data.synthetic_val",
    "model.crf_iters",
    "model.crf_gamma",
    "optim.lr",
    "train.iterations",
    "train.val_interval",
    "train.log_interval",
    "acosp.tau0",
    "acosp.tau_final",
    "acosp.min_keep",
)
NON_NEGATIVE = (
    "data.workers",
    "data.rotate",
    "optim.weight_decay",
    "optim.warmup_iters",
    "acosp.start",
)


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
        sources = [OmegaConf.create(base)] if base is not None else []
        if path is not None:
            sources.append(_read_yaml(Path(path)))
        if overrides:
            sources.append(OmegaConf.merge(*[_parse_override(item) for item in overrides]))
        for source in sources:
            if OmegaConf.select(source, "model.name") is not None:
                merged.model.options = {}
            merged = OmegaConf.merge(merged, source)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source=path)) from None
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: pass an existing YAML file to -c")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"config file '{path}'{line} is not valid YAML (or uses a tag that safe loading "
            "refuses): fix it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (data:, model:, ...)"
        )
    return OmegaConf.create(data)


def _parse_override(item: str) -> DictConfig:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    value = yaml.safe_load(raw) if raw else None
    return _nested(key.strip(), value)


def _nested(dotted: str, value: Any) -> DictConfig:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return OmegaConf.create(node)


def _describe(err: OmegaConfBaseException, source: str | Path | None) -> str:
    key = getattr(err, "full_key", None) or "?"
    where = f" (in '{source}' or the overrides)" if source else ""
    if isinstance(err, ConfigKeyError):
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
    for key in POSITIVE:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {get_key(cfg, key)}")
    for key in NON_NEGATIVE:
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {get_key(cfg, key)}")
    if cfg.data.batch_size < 2:
        raise ConfigError(
            f"config key 'data.batch_size': must be >= 2 (BatchNorm needs 2 samples), "
            f"got {cfg.data.batch_size}"
        )
    _check_crf(cfg.model)
    if cfg.data.scale_min > cfg.data.scale_max:
        raise ConfigError("config key 'data.scale_min': must be <= data.scale_max")
    if cfg.eval.mode == "slide" and not cfg.eval.crop_size:
        raise ConfigError("config key 'eval.crop_size': required when eval.mode=slide")
    if not cfg.eval.scales or min(cfg.eval.scales) <= 0:
        raise ConfigError("config key 'eval.scales': must be a non-empty list of positive numbers")
    sparsity = cfg.acosp.sparsity
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ConfigError(f"config key 'acosp.sparsity': must be in [0, 1), got {sparsity}")
    if cfg.acosp.end is not None and cfg.acosp.end < cfg.acosp.start:
        raise ConfigError(
            f"config key 'acosp.end': must be >= acosp.start ({cfg.acosp.start}), "
            f"got {cfg.acosp.end}"
        )


def _check_crf(cfg: ModelConfig) -> None:
    """``model.crf`` needs a model whose builder accepts ``crf`` (unknown names fail later)."""
    if cfg.crf is None:
        return
    from leanseg.models import list_models, model_options  # lazy: the models need torch

    if cfg.name in list_models() and "crf" not in model_options(cfg.name):
        supported = [name for name in list_models() if "crf" in model_options(name)]
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
