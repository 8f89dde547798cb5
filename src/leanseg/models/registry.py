"""Name -> builder registry, in the style of timm/torchvision builders."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from leanseg.errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    if fn.__name__ in _BUILDERS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _BUILDERS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_BUILDERS)


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build a registered model: ``build_model("deeplabv3_resnet50", 21, output_stride=16)``."""
    if name not in _BUILDERS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {list_models()}")
    return _BUILDERS[name](num_classes=num_classes, **options)
