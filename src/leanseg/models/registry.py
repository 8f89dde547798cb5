"""Name -> builder registry, in the style of timm/torchvision builders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from leanseg.errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    if fn.__name__ in _BUILDERS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _BUILDERS[fn.__name__] = fn
    return fn


def register_builder(
    name: str, build: Callable[..., nn.Module], options: dict[str, Any], doc: str
) -> None:
    """Register ``name`` as ``build(num_classes=K, **options)`` with ``options`` as defaults.

    The builder validates ``num_classes`` and turns unknown options into one-line ConfigErrors;
    its ``default_options`` attribute lists what it accepts.
    """

    def builder(*, num_classes: int, **given: Any) -> nn.Module:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes: got {num_classes!r}; must be a positive int")
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise ConfigError(
                f"{name}: unknown option(s) {unknown}; accepted options: {sorted(options)}"
            )
        return build(num_classes=num_classes, **{**options, **given})

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{doc}\n\nOptions (defaults): {options}"
    builder.default_options = dict(options)
    register_model(builder)


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_BUILDERS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {list_models()}")
    return _BUILDERS[name]


def model_options(name: str) -> dict[str, Any]:
    """The options (with defaults) that model ``name`` accepts; ``{}`` if it declares none."""
    return dict(getattr(_builder(name), "default_options", {}))


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model: ``build_model("deeplabv3_resnet50", 21, output_stride=16)``."""
    return _builder(name)(num_classes=num_classes, **options)
