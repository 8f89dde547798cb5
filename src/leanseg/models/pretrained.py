"""Load ImageNet checkpoints (torchvision / semseg layout) into a model's backbone.

Accepted files: plain state dicts read with ``torch.load(weights_only=True)``, optionally nested
under ``"state_dict"`` / ``"model"`` and with DataParallel's ``"module."`` prefix:

- torchvision ResNet-18/50/101 and MobileNetV2 -> ``model.backbone`` of the DeepLab models
  (and of ``resnet18_cifar``, whose 3x3 stem conv then reports a shape mismatch);
- semseg's deep-stem ResNet (``resnet50_v2.pth``) -> PSPNet's backbone;
- torchvision vgg16_bn -> SegNet's encoder by name, vgg16 (no BN) through
  :func:`vgg16_to_vgg16_bn`;
- a full model state dict with the same keys (``backbone.*``, ``classifier.*``) -> the model.

The keys are matched against both ``model.backbone`` and ``model``; the one with more matches is
loaded. Classifier keys the target lacks (``fc.*``, ``classifier.*``, ``features.18.*``) are
ignored; every other difference is reported in the returned :class:`LoadReport`.

Instead of a path, a name downloads torchvision's published file (:mod:`weights_hub`):
``imagenet`` (the default file of the model's backbone) or ``<backbone>.<weights>``, e.g.
``resnet50.IMAGENET1K_V2``. A value naming an existing file is always that file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from leanseg.errors import CheckpointError, ConfigError
from leanseg.models import weights_hub
from leanseg.models.backbones.mobilenetv2 import MobileNetV2
from leanseg.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from leanseg.models.segnet import VGG16_STAGES, SegNet

HEAD_PREFIXES = ("fc.", "classifier.", "features.18.")  # ImageNet classifiers we never load
_NESTING = ("state_dict", "model")
IMAGENET = "imagenet"  # the default published file of the model's backbone
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl", ".bin", ".ckpt", ".tar", ".safetensors")
_RESNET_DEPTHS = {
    (BasicBlock, (2, 2, 2, 2)): 18,
    (Bottleneck, (3, 4, 6, 3)): 50,
    (Bottleneck, (3, 4, 23, 3)): 101,
}


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys loaded into ``target`` and every difference."""

    path: str
    target: str  # "backbone" or "model"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the target, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the target
    ignored: list[str] = field(default_factory=list)  # ImageNet classifier keys
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"

    def summary(self) -> str:
        """One line: counts, with the first few keys of each kind of difference."""
        parts = [f"'{self.path}': loaded {len(self.loaded)} tensors into the {self.target}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("with another shape", self.mismatched),
            ("classifier keys ignored", self.ignored),
        ):
            if keys:
                more = ", ..." if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{more})")
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()


def _vgg_conv_indices(batch_norm: bool) -> list[int]:
    """Indices of the convs in torchvision's ``vgg16[_bn].features``."""
    indices, position = [], 0
    for _, depth in VGG16_STAGES:
        for _ in range(depth):
            indices.append(position)
            position += 3 if batch_norm else 2  # conv, [bn,] relu
        position += 1  # max-pool
    return indices


def vgg16_to_vgg16_bn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision vgg16 conv keys to the vgg16_bn layout of SegNet's encoder.

    ``features.<i>.weight/bias`` for i in 0 2 5 7 10 12 14 17 19 21 24 26 28 become
    ``features.<j>.*`` for j in 0 3 7 10 14 17 20 24 27 30 34 37 40 (a BN follows each conv
    there); every other key is kept as it is.
    """
    mapping = dict(zip(_vgg_conv_indices(False), _vgg_conv_indices(True), strict=True))
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and int(parts[1]) in mapping:
            key = f"features.{mapping[int(parts[1])]}.{parts[2]}"
        renamed[key] = value
    return renamed


def _is_plain_vgg16(state_dict: Mapping[str, Tensor]) -> bool:
    weight = state_dict.get("features.2.weight")  # a conv in vgg16, a ReLU in vgg16_bn
    return weight is not None and weight.dim() == 4


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, un-nested and without the ``module.`` prefix."""
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained checkpoint '{path}' not found: check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise CheckpointError(
            f"pretrained checkpoint '{path}' cannot be read ({reason}): it is corrupt or not "
            "a plain state dict"
        ) from None
    while isinstance(payload, Mapping):
        nested = [payload[k] for k in _NESTING if isinstance(payload.get(k), Mapping)]
        if not nested:
            break
        payload = nested[0]
    tensors = {}
    if isinstance(payload, Mapping):
        tensors = {
            str(k).removeprefix("module."): v for k, v in payload.items() if isinstance(v, Tensor)
        }
    if not tensors:
        raise CheckpointError(
            f"pretrained checkpoint '{path}' holds no state dict of tensors (also looked under "
            f"{list(_NESTING)})"
        )
    return tensors


def _match_count(module: nn.Module, state_dict: Mapping[str, Tensor]) -> int:
    return sum(key in state_dict for key in module.state_dict())


def backbone_arch(model: nn.Module) -> str | None:
    """The backbone of ``model`` in torchvision's names (``resnet50``, ``mobilenet_v2``,
    ``vgg16_bn``; ``resnet50_deep_stem`` for PSPNet); None when it is none of those."""
    if isinstance(model, SegNet):
        return "vgg16_bn"
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, MobileNetV2):
        return "mobilenet_v2"
    if isinstance(backbone, ResNet):
        blocks = tuple(len(getattr(backbone, f"layer{i}")) for i in range(1, 5))
        depth = _RESNET_DEPTHS.get((type(backbone.layer1[0]), blocks))
        if depth is not None:
            return f"resnet{depth}" + ("_deep_stem" if backbone._deep_stem else "")
    return None


def _looks_like_path(spec: str) -> bool:
    seps = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return any(sep in spec for sep in seps) or spec.lower().endswith(_CHECKPOINT_SUFFIXES)


def _fits(name: str, arch: str) -> bool:
    own = name.split(".", 1)[0]
    return arch == own or arch in weights_hub.ALSO_FITS.get(own, ())


def weights_name(
    model: nn.Module, spec: str | os.PathLike[str], *, model_name: str | None = None
) -> str | None:
    """The published file ``spec`` names for ``model`` (a key of ``IMAGENET_WEIGHTS``), or None
    when ``spec`` is a path. Raises ConfigError, before any download, for an unknown name, a
    model without a published file, or a backbone of another kind or width than the file's.
    """
    if not isinstance(spec, str) or os.path.isfile(spec):
        return None
    label = model_name or type(model).__name__
    arch = backbone_arch(model)
    if spec.lower() == IMAGENET:
        if arch in weights_hub.NOT_PUBLISHED:
            raise ConfigError(
                f"model.pretrained '{spec}': {label} has {weights_hub.NOT_PUBLISHED[arch]}, "
                "which torchvision does not publish: download that file and give its path "
                "(model.pretrained=/path/to/file.pth)"
            )
        if arch not in weights_hub.DEFAULT_WEIGHTS:
            raise ConfigError(
                f"model.pretrained '{spec}': no published ImageNet file is known for {label}: "
                "give a checkpoint file path (model.pretrained=/path/to/weights.pth)"
            )
        name = weights_hub.DEFAULT_WEIGHTS[arch]
    elif spec in weights_hub.IMAGENET_WEIGHTS:
        name = spec
        if arch is not None and not _fits(name, arch):
            fitting = [n for n in weights_hub.IMAGENET_WEIGHTS if _fits(n, arch)]
            raise ConfigError(
                f"model.pretrained '{spec}' is for a {name.split('.')[0]} backbone, {label} has "
                f"a {arch} one: use {' or '.join(fitting) if fitting else 'a file path'}"
            )
    elif _looks_like_path(spec):
        return None
    else:
        raise ConfigError(
            f"model.pretrained '{spec}': no such file, and not a weights name: give a file path "
            f"or one of {', '.join([IMAGENET, *weights_hub.IMAGENET_WEIGHTS])}"
        )
    _check_width(model, arch, name, spec, label)
    return name


def _check_width(model: nn.Module, arch: str | None, name: str, spec: str, label: str) -> None:
    """A backbone built with another ``width_mult`` matches none of the file's shapes."""
    backbone = getattr(model, "backbone", None)
    if arch not in weights_hub.FULL_WIDTH or not isinstance(backbone, nn.Module):
        return
    key, channels = weights_hub.FULL_WIDTH[arch]
    tensor = backbone.state_dict().get(key)
    if tensor is not None and tensor.shape[0] != channels:
        raise ConfigError(
            f"model.pretrained '{spec}': {label}'s backbone has another width than {name} "
            f"({key}: {tensor.shape[0]} channels, {channels} in the file): set "
            "model.options.width_mult=1.0, or give a file path"
        )


def resolve_pretrained(
    model: nn.Module, spec: str | os.PathLike[str], *, model_name: str | None = None
) -> str | os.PathLike[str]:
    """The local file of ``spec``: the path itself, or the cached (else downloaded) file a
    weights name stands for (see :func:`weights_name` and :func:`weights_hub.fetch`)."""
    name = weights_name(model, spec, model_name=model_name)
    return spec if name is None else weights_hub.fetch(name)


def load_pretrained(
    model: nn.Module, spec: str | os.PathLike[str], *, model_name: str | None = None
) -> LoadReport:
    """Load an ImageNet (or full-model) checkpoint into ``model.backbone`` or ``model``.

    ``spec`` is a file path or a weights name (``imagenet``, ``resnet50.IMAGENET1K_V2``, ...:
    downloaded once into the cache); ``model_name`` only words the errors. Tensors whose key
    and shape match are copied; the report lists the rest. Raises CheckpointError when the
    file is unreadable or no key matches, ConfigError for a name that does not fit the model.
    """
    path = resolve_pretrained(model, spec, model_name=model_name)
    state_dict = read_state_dict(path)
    if _is_plain_vgg16(state_dict):
        state_dict = vgg16_to_vgg16_bn(state_dict)
    candidates = [("model", model)]
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        candidates.insert(0, ("backbone", backbone))
    name, target = max(candidates, key=lambda c: _match_count(c[1], state_dict))
    own = target.state_dict()
    report = LoadReport(str(path), name)
    for key, value in state_dict.items():
        if key not in own:
            (report.ignored if key.startswith(HEAD_PREFIXES) else report.unexpected).append(key)
        elif own[key].shape != value.shape:
            shapes = f"{tuple(value.shape)} vs {tuple(own[key].shape)}"
            report.mismatched.append(f"{key}: file {shapes} in the model")
        else:
            report.loaded.append(key)
    report.missing = [
        k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")
    ]
    if not report.loaded:
        example = ", ".join(list(state_dict)[:3])
        raise CheckpointError(
            f"pretrained checkpoint '{path}' matches no key of {type(model).__name__} or its "
            f"backbone (file keys: {example}, ...): is it for another architecture?"
        )
    target.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    return report
