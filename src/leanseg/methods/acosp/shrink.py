"""Physical channel removal of a hard-masked ACoSP model (acosp.md section 12).

:func:`shrink` returns a new, smaller model whose eval-mode output equals the hard-masked
model's (up to float rounding, borders included):

1. :mod:`~leanseg.methods.acosp.graph` traces the eval forward and groups coupled channels
   (residual streams, concatenations, depthwise convs, SegNet's unpool indices); a group goes
   only when every channel in it is pruned to a known constant (intersection of the writers);
2. :mod:`~leanseg.methods.acosp.fold` slices every conv / BN / linear layer and folds the
   removed constants into their readers (a bias, or an exact per-pixel term at padded borders);
   a pruned channel that has to stay gets zeroed weights, which reproduces its mask;
3. :mod:`~leanseg.methods.acosp.rebuild` swaps the new layers in and drops the masks and the
   training-only aux head. :func:`shrink_with_spec` also returns the plain-data layer spec
   that a checkpoint stores to rebuild the model from its name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from leanseg.errors import ConfigError
from leanseg.methods.acosp.fold import (
    shrunk_conv,
    shrunk_conv_transpose,
    shrunk_linear,
    shrunk_norm,
)
from leanseg.methods.acosp.graph import ChannelPlan, LayerUse, analyse
from leanseg.methods.acosp.masks import is_hard, masked_convs
from leanseg.methods.acosp.rebuild import SHRINK_FORMAT, make_layer, set_module, strip_masks

TRAINING_ONLY = ("aux_classifier",)


def _check(model: nn.Module) -> None:
    if not any(True for _ in masked_convs(model)):
        raise ConfigError(
            f"acosp shrink: {type(model).__name__} has no ACoSP masks; train it with "
            "acosp.apply (config acosp.sparsity) first"
        )
    if not is_hard(model):
        raise ConfigError(
            "acosp shrink: the masks are still soft; call acosp.harden(model) first (training "
            "does that at acosp.end)"
        )
    for name, module in model.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
            raise ConfigError(
                f"acosp shrink: '{name}' is a {type(module).__name__}; shrink supports BatchNorm "
                "models only (norm='bn'): removing a channel would change its group statistics"
            )


def _layer(use: LayerUse, plan: ChannelPlan) -> tuple[dict, dict]:
    if isinstance(use.module, nn.ConvTranspose2d):
        return shrunk_conv_transpose(use, plan)
    if isinstance(use.module, nn.Conv2d):
        return shrunk_conv(use, plan)
    if isinstance(use.module, nn.Linear):
        return shrunk_linear(use, plan)
    return shrunk_norm(use, plan)


def shrink_with_spec(
    model: nn.Module, example_size: tuple[int, int] = (32, 32)
) -> tuple[nn.Module, dict[str, Any]]:
    """``(shrunk model, spec)`` for a hard-masked ``model`` (left unchanged).

    ``spec`` is plain data: ``{"format", "layers": {name: layer spec of every changed layer},
    "dropped": [training-only modules removed], "stats": {...}}``; :func:`rebuild` applies it to
    a freshly built model. ``example_size`` is the (H, W) of the input used to trace shapes.
    """
    _check(model)
    plan = analyse(model, example_size)
    small = copy.deepcopy(model)
    layers: dict[str, dict] = {}
    terms = {"border_terms": 0, "unpool_terms": 0}
    for use in plan.layers:
        spec, state = _layer(use, plan)
        terms["border_terms"] += bool(spec.get("fold_ones"))
        terms["unpool_terms"] += bool(spec.get("unpool"))
        if spec != _spec_of(use.module, spec):
            layers[use.name] = spec
        like = next(t for t in use.module.state_dict().values() if t.is_floating_point())
        new = make_layer(spec).to(device=like.device, dtype=like.dtype)
        new.load_state_dict(state)
        set_module(small, use.name, new)
    dropped = [
        name
        for name in TRAINING_ONLY
        if isinstance(getattr(model, name, None), nn.Module)
        and not any(used.startswith(f"{name}.") for used in plan.used_modules)
    ]
    for name in dropped:
        set_module(small, name, None)
    _zero_untraced(small, {use.name for use in plan.layers})
    strip_masks(small).eval()
    info = {"format": SHRINK_FORMAT, "layers": layers, "dropped": dropped}
    info["stats"] = {**_stats(plan), **terms}
    return small, info


def shrink(model: nn.Module) -> nn.Module:
    """A new model without the channels that ``model``'s hard masks prune (see module doc)."""
    return shrink_with_spec(model)[0]


@torch.no_grad()
def _zero_untraced(model: nn.Module, traced: set[str]) -> None:
    """Masked convs inside ``acosp_leaf`` modules keep their shape: zero their pruned output
    channels' weights and bias, which is what the mask did."""
    for name, conv in masked_convs(model):
        if name in traced:
            continue
        dead = conv.acosp_mask == 0
        if isinstance(conv, nn.ConvTranspose2d):  # [C_in, C_out / groups, ...] per group
            groups = conv.groups
            weight = conv.weight.view(groups, -1, *conv.weight.shape[1:]).transpose(1, 2)
            weight[dead.view(groups, -1)] = 0
        else:
            conv.weight[dead] = 0
        if conv.bias is not None:
            conv.bias[dead] = 0


def _spec_of(module: nn.Module, like: dict) -> dict:
    """``module``'s own spec in the format of ``like`` (to tell changed layers)."""
    spec = dict(like)
    if like["type"] in ("conv2d", "conv_transpose2d"):
        spec.update(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            groups=module.groups,
            bias=module.bias is not None,
            fold_ones=False,
            unpool=None,
        )
    elif like["type"] == "batchnorm2d":
        spec["num_features"] = module.num_features
    else:
        spec.update(in_features=module.in_features, bias=module.bias is not None)
    return spec


def _stats(plan: ChannelPlan) -> dict[str, int]:
    """Counts of the masked convs and their pruned / removed channels in the eval graph."""
    pruned = removed = convs = 0
    for use in plan.layers:
        if hasattr(use.module, "acosp_mask"):
            convs += 1
            dead = (use.module.acosp_mask == 0).cpu().numpy()
            pruned += int(dead.sum())
            removed += int((dead & plan.removed(use.out)).sum())
    return {
        "masked_convs": convs,
        "pruned_channels": pruned,
        "removed_channels": removed,
        "kept_pruned_channels": pruned - removed,
    }
