"""Plain-data layer specs of a shrunk model, and rebuilding it from them.

A shrunk checkpoint stores ``{"layers": {module name: spec}, "dropped": [module names]}`` next to
its state dict: :func:`rebuild` takes the full model built by name, replaces each listed layer
by an empty one of the recorded shape and removes the dropped (training-only) modules, after
which the state dict loads strictly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from leanseg.errors import CheckpointError
from leanseg.methods.acosp.fold import FoldedConv2d, FoldedConvTranspose2d
from leanseg.methods.acosp.masks import ChannelMaskHook, apply

SHRINK_FORMAT = 1
MASK_STATE = ("acosp_score", "acosp_tau", "acosp_hard", "acosp_mask")


def make_layer(spec: dict[str, Any]) -> nn.Module:
    """An (uninitialised) layer of the shape ``spec`` records."""
    kind = spec.get("type")
    if kind == "conv2d":
        options = {
            key: tuple(spec[key]) if isinstance(spec[key], list) else spec[key]
            for key in ("kernel_size", "stride", "padding", "dilation")
        }
        args = (spec["in_channels"], spec["out_channels"])
        common = {"groups": spec["groups"], "bias": spec["bias"], **options}
        common["padding_mode"] = spec.get("padding_mode", "zeros")
        if spec.get("fold_ones") or spec.get("unpool"):
            return FoldedConv2d(*args, fold_ones=spec["fold_ones"], unpool=spec["unpool"], **common)
        return nn.Conv2d(*args, **common)
    if kind == "conv_transpose2d":
        options = {
            key: tuple(spec[key])
            for key in ("kernel_size", "stride", "padding", "output_padding", "dilation")
        }
        args = (spec["in_channels"], spec["out_channels"])
        common = {"groups": spec["groups"], "bias": spec["bias"], **options}
        if spec.get("fold_ones") or spec.get("unpool"):
            return FoldedConvTranspose2d(
                *args, fold_ones=spec["fold_ones"], unpool=spec["unpool"], **common
            )
        return nn.ConvTranspose2d(*args, **common)
    if kind == "batchnorm2d":
        return nn.BatchNorm2d(
            spec["num_features"],
            eps=spec["eps"],
            momentum=spec["momentum"],
            affine=spec["affine"],
            track_running_stats=spec["track_running_stats"],
        )
    if kind == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    raise CheckpointError(f"shrunk layer of unknown type {kind!r}: upgrade leanseg")


def set_module(model: nn.Module, name: str, module: nn.Module | None) -> None:
    """Replace (or with None remove) the submodule ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, leaf):
        raise AttributeError(name)
    setattr(parent, leaf, module)


def strip_masks(model: nn.Module) -> nn.Module:
    """Remove the ACoSP scores, mask buffers and mask hooks from every conv of ``model``."""
    for module in model.modules():
        if not hasattr(module, "acosp_score"):
            continue
        for key in MASK_STATE:
            delattr(module, key)
        del module.acosp_k
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, ChannelMaskHook):
                del module._forward_hooks[key]
    return model


def rebuild(model: nn.Module, shrink: dict[str, Any]) -> nn.Module:
    """Turn a freshly built full model into the empty shrunk model ``shrink`` describes."""
    if not isinstance(shrink, dict) or shrink.get("format", 0) > SHRINK_FORMAT:
        raise CheckpointError(
            f"shrunk checkpoint format {shrink.get('format') if isinstance(shrink, dict) else '?'} "
            f"is newer than this leanseg reads ({SHRINK_FORMAT}): upgrade leanseg"
        )
    strip_masks(model)
    for name in shrink.get("dropped", []):
        _replace(model, name, None)
    for name, spec in shrink.get("layers", {}).items():
        _replace(model, name, make_layer(spec))
    return model


def _replace(model: nn.Module, name: str, module: nn.Module | None) -> None:
    try:
        set_module(model, name, module)
    except AttributeError:
        raise CheckpointError(
            f"shrunk checkpoint names layer '{name}', which {type(model).__name__} does not "
            "have: check model.name and model.options"
        ) from None


def rebuild_from_checkpoint(model: nn.Module, payload: dict[str, Any]) -> None:
    """The checkpoint hook (:func:`leanseg.checkpoint.register_rebuild`): a shrunk checkpoint
    (key ``shrink``) gets its recorded smaller layers, a model trained with ACoSP masks
    (``acosp.sparsity`` in its config) gets the masks back; other checkpoints are untouched."""
    masks = payload.get("config", {}).get("acosp", {})
    if payload.get("shrink") is not None:
        rebuild(model, payload["shrink"])
    elif masks.get("sparsity") is not None:
        apply(
            model,
            masks["sparsity"],
            masks.get("min_keep", 8),
            masks.get("coupled_residual", False),
        )
