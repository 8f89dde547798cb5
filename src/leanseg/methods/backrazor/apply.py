"""``apply`` / ``remove`` and the memory accounting of backrazor.md section 7."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.methods.backrazor.modules import (
    BN_TYPES,
    SPARSE_TYPES,
    STOCK_TYPES,
    BackRazorMixin,
    FrozenStatsBatchNorm2d,
)

if TYPE_CHECKING:
    from leanseg.config import BackRazorConfig

SCOPES = ("backbone", "head", "all")
BN_MODES = tuple(BN_TYPES)
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"backrazor.ratio: got {ratio!r}; must be a number in [0, 1)")
    return float(ratio)


def _scoped_modules(model: nn.Module, scope: str) -> Iterator[nn.Module]:
    if scope not in SCOPES:
        raise ConfigError(f"backrazor.scope: got {scope!r}; choose one of {list(SCOPES)}")
    if scope == "all":
        yield from model.modules()
        return
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(
            f"backrazor.scope: {type(model).__name__} has no .backbone; use scope 'all'"
        )
    if scope == "backbone":
        yield from backbone.modules()
        return
    inside = {id(m) for m in backbone.modules()}
    yield from (m for m in model.modules() if id(m) not in inside)


def _check_value_dtype(value_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if value_dtype is None or value_dtype in VALUE_DTYPES.values():
        return value_dtype  # type: ignore[return-value]
    if isinstance(value_dtype, str) and value_dtype in VALUE_DTYPES:
        return VALUE_DTYPES[value_dtype]
    raise ConfigError(
        f"backrazor.value_dtype: got {value_dtype!r}; choose null (the activation's dtype) or "
        f"one of {list(VALUE_DTYPES)}"
    )


def _freeze_affine(module: nn.Module, frozen: bool) -> None:
    """Turn a BN's affine ``requires_grad`` off (remembering it), or back to what it was."""
    params = [p for p in (module.weight, module.bias) if p is not None]  # type: ignore[union-attr]
    if frozen and "backrazor_requires_grad" not in module.__dict__:
        module.backrazor_requires_grad = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
    elif not frozen and "backrazor_requires_grad" in module.__dict__:
        for p, flag in zip(params, module.__dict__.pop("backrazor_requires_grad"), strict=True):
            p.requires_grad_(flag)


def _set_class(module: nn.Module, cls: type[nn.Module]) -> None:
    if type(module) is not cls:
        module.__class__ = cls
    if isinstance(module, nn.BatchNorm2d):
        _freeze_affine(module, cls is FrozenStatsBatchNorm2d)
    if not isinstance(module, BackRazorMixin):
        for key in ("backrazor_ratio", "backrazor_value_dtype"):
            module.__dict__.pop(key, None)


def apply(
    model: nn.Module,
    ratio: float,
    scope: str = "backbone",
    value_dtype: str | torch.dtype | None = None,
    bn: str = "sparse",
) -> nn.Module:
    """Make the Conv2d (incl. WSConv2d), Linear, BatchNorm2d, ReLU and ReLU6 layers sparse.

    ``ratio`` is the fraction of each saved input pruned per sample (backrazor.md section 2);
    ``scope`` is ``"backbone"`` (the original's choice), ``"head"`` (all but the backbone) or
    ``"all"``. ``value_dtype`` stores the kept values as ``"float16"`` or ``"bfloat16"`` (None:
    the activation's dtype). ``bn`` is ``"sparse"`` (the original: a sparsified saved input),
    ``"dense"`` (stock BatchNorm2d) or ``"frozen"`` (running statistics and a frozen affine, for
    fine-tuning: nothing saved, exact dX). Layers are rewritten in place (same parameter and
    buffer tensors, same state-dict keys); applying again updates the settings. Returns
    ``model``.
    """
    ratio = _check_ratio(ratio)
    value_dtype = _check_value_dtype(value_dtype)
    if bn not in BN_TYPES:
        raise ConfigError(f"backrazor.bn: got {bn!r}; choose one of {list(BN_MODES)}")
    for module in list(_scoped_modules(model, scope)):
        stock = STOCK_TYPES.get(type(module), type(module))
        target = BN_TYPES[bn] if stock is nn.BatchNorm2d else SPARSE_TYPES.get(stock)
        if target is None:
            continue
        _set_class(module, target)
        if isinstance(module, BackRazorMixin):
            module.backrazor_ratio = ratio
            module.backrazor_value_dtype = value_dtype
    return model


def apply_config(model: nn.Module, cfg: BackRazorConfig) -> nn.Module:
    """:func:`apply` with the settings of the config's ``backrazor`` section (ratio not None)."""
    assert cfg.ratio is not None
    return apply(model, cfg.ratio, cfg.scope, cfg.value_dtype, cfg.bn)


def remove(model: nn.Module) -> nn.Module:
    """Turn every BackRazor layer of ``model`` back into its stock class; returns ``model``."""
    for module in model.modules():
        stock = STOCK_TYPES.get(type(module))
        if stock is not None:
            _set_class(module, stock)
    return model


def saved_tensor_bytes(fn: Callable[[], object], exclude_parameters: bool = False) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, each storage counted once.

    ``fn`` should run a forward pass and return its output: the output (and so the graph and its
    saved tensors) is kept alive until counting ends, so that no storage address is reused.
    Parameters saved by a layer count too (dense and sparse layers alike) unless
    ``exclude_parameters``.
    """
    storages: dict[tuple[torch.device, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.nbytes() and not (exclude_parameters and isinstance(t, nn.Parameter)):
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


_WEIGHTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def analytic_saved_bytes(
    model: nn.Module, input_shape: Sequence[int], ratio: float | None = None
) -> int:
    """The original's analytic estimate of the saved activation bytes for one forward pass.

    Forward hooks at the real ``input_shape`` (batch included) count, per layer input of
    ``numel`` entries: dense Conv2d / Linear / BatchNorm2d ``4 * numel``; BackRazor ones
    ``b * numel * (1 - R) + numel / 8`` with ``R = ratio`` (None: each layer's own ratio) and
    ``b`` the bytes of its value dtype (4, or 2 for float16 / bfloat16); frozen BatchNorm2d 0;
    ReLU / ReLU6 ``numel / 8``; other layers 0. The residual-buffer peak term is not included.
    """
    if ratio is not None:
        ratio = _check_ratio(ratio)
    total = 0.0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], _out: object) -> None:
        nonlocal total
        numel = inputs[0].numel()
        if isinstance(module, _ACTIVATIONS):
            total += numel / 8
        elif isinstance(module, FrozenStatsBatchNorm2d):
            pass
        elif isinstance(module, BackRazorMixin):
            r = module.backrazor_ratio if ratio is None else ratio
            dtype = module.backrazor_value_dtype
            value_bytes = 4 if dtype is None else dtype.itemsize
            total += value_bytes * numel * (1 - r) + numel / 8
        else:
            total += 4 * numel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _WEIGHTED)]
    handles += [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _ACTIVATIONS)
    ]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()  # same shapes, and no running-stat updates
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return round(total)
