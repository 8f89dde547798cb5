"""Inference-only BatchNorm folding: :func:`fuse_bn` returns a faster model with the same outputs.

An eval ``BatchNorm2d`` is an affine map per channel, ``y * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When it reads the
output of a convolution and nothing else does, it folds into that convolution: ``W' = W * s``
(per output filter) and ``b' = b * s + t``. The BN becomes ``nn.Identity``.

Which pairs fold is decided from the dataflow of one recorded eval forward (module hooks plus a
:class:`~torch.overrides.TorchFunctionMode` that sees every torch call), not from the code, so it
works for models that ``torch.fx`` cannot trace (``h, w = x.shape[-2:]``, Python control flow,
dict outputs, the DDD CRF) and it never folds a conv whose output has a second reader.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["ChannelsLast", "fuse_bn"]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# Tensor methods and properties that read metadata only: they are not readers of the values.
_METADATA_METHODS = frozenset(
    {
        "dim",
        "size",
        "numel",
        "nelement",
        "stride",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "element_size",
        "get_device",
        "__len__",
    }
)
_METADATA_PROPERTIES = frozenset(
    {"shape", "ndim", "device", "dtype", "layout", "is_cuda", "is_meta", "requires_grad"}
)


def _tensors(tree: Any) -> Iterator[Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _is_metadata(func: Any) -> bool:
    name = getattr(func, "__name__", None)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA_PROPERTIES
    return name in _METADATA_METHODS


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, h, None) for h in _HOOKS)


class _Recorder(TorchFunctionMode):
    """Records one forward: who produced each tensor, who read it, and stray parameter reads.

    ``producer[id(out)]`` is the conv that returned ``out``; ``uses[id(t)]`` counts the torch calls
    (metadata reads aside) that took ``t``; ``bn_inputs[bn]`` lists the tensors each BN call read.
    A conv or BN whose parameters or buffers are read outside its own call (tied weights, a
    forward that reads ``bn.weight`` itself) is marked ``stray``. Tensors are kept alive so that
    their ids stay unique.
    """

    def __init__(self, convs: list[nn.Conv2d], bns: list[nn.BatchNorm2d]) -> None:
        super().__init__()
        self.keep: list[Tensor] = []
        self.uses: dict[int, int] = defaultdict(int)
        self.producer: dict[int, nn.Module] = {}
        self.conv_outputs: dict[nn.Module, list[int]] = defaultdict(list)
        self.bn_inputs: dict[nn.Module, list[int]] = defaultdict(list)
        self.active: list[nn.Module] = []
        self.stray: set[nn.Module] = set()
        self.owner: dict[int, nn.Module] = {}
        for module in [*convs, *bns]:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                self.owner[id(tensor)] = module
        self.handles = []
        for module in convs:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._conv_exit))
        for module in bns:
            self.handles.append(module.register_forward_pre_hook(self._bn_enter))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.active.append(module)

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.active.pop()

    def _bn_enter(self, module: nn.Module, args: tuple) -> None:
        self.active.append(module)
        self.keep.extend(args[:1])
        self.bn_inputs[module].append(id(args[0]) if args else -1)

    def _conv_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.active.pop()
        if isinstance(output, Tensor):
            self.keep.append(output)
            self.producer[id(output)] = module
            self.conv_outputs[module].append(id(output))
        else:
            self.stray.add(module)

    def read(self, tree: Any) -> None:
        """Count a read of every tensor in ``tree`` (e.g. the model's outputs)."""
        for tensor in _tensors(tree):
            self.keep.append(tensor)
            self.uses[id(tensor)] += 1
            owner = self.owner.get(id(tensor))
            if owner is not None and (not self.active or self.active[-1] is not owner):
                self.stray.add(owner)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_metadata(func):
            self.read((args, kwargs))
        return func(*args, **kwargs)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()


def _shared(model: nn.Module) -> set[int]:
    """Ids of the parameters and buffers registered more than once (tied weights)."""
    seen: dict[int, int] = defaultdict(int)
    for _, tensor in model.named_parameters(remove_duplicate=False):
        seen[id(tensor)] += 1
    for _, tensor in model.named_buffers(remove_duplicate=False):
        seen[id(tensor)] += 1
    return {key for key, count in seen.items() if count > 1}


def _candidates(model: nn.Module) -> tuple[list[nn.Conv2d], list[nn.BatchNorm2d]]:
    """Plain, un-hooked convs and eval-foldable BNs (subclasses such as WSConv2d are left alone)."""
    shared = _shared(model)
    convs, bns, seen = [], [], set()
    for module in model.modules():
        if id(module) in seen or _hooked(module):
            continue
        seen.add(id(module))
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(id(t) in shared for t in own):
            continue
        if type(module) is nn.Conv2d and module.weight.is_floating_point():
            convs.append(module)
        elif type(module) is nn.BatchNorm2d and module.running_mean is not None:
            bns.append(module)
    return convs, bns


def _pairs(rec: _Recorder) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn): every call of the BN read a fresh output of the conv that nothing else read,
    and every output of the conv went to that BN."""
    pairs = []
    for bn, inputs in rec.bn_inputs.items():
        convs = {rec.producer.get(i) for i in inputs}
        if len(convs) != 1 or bn in rec.stray:
            continue
        (conv,) = convs
        if conv is None or conv in rec.stray:
            continue
        outputs = rec.conv_outputs[conv]
        if sorted(outputs) == sorted(inputs) and all(rec.uses[i] == 1 for i in outputs):
            pairs.append((conv, bn))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval ``bn`` into ``conv`` in place, computed in float64 and rounded once."""
    weight = conv.weight.double()
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(
        (weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad
    )
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered."""
    for module in model.modules():
        for name, child in module._modules.items():
            if child is old:
                module._modules[name] = new


def _default_input(model: nn.Module) -> Tensor:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    tensor = next(iter([*model.parameters(), *model.buffers()]), None)
    channels = 3 if conv is None else conv.in_channels * conv.groups
    device = "cpu" if tensor is None else tensor.device
    dtype = torch.float32 if tensor is None or not tensor.is_floating_point() else tensor.dtype
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, 64, 64, generator=gen).to(device, dtype)


def _to_contiguous(tree: Any) -> Any:
    """``tree`` with every tensor in the default contiguous layout (lists, tuples, dicts)."""
    if isinstance(tree, Tensor):
        return tree.contiguous()
    if isinstance(tree, list):
        return [_to_contiguous(item) for item in tree]
    if isinstance(tree, tuple):
        items = [_to_contiguous(item) for item in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if isinstance(tree, dict):
        return type(tree)((key, _to_contiguous(value)) for key, value in tree.items())
    return tree


class ChannelsLast(nn.Module):
    """Runs ``module`` (already converted to channels_last) on channels_last inputs.

    A 4-D floating input on CPU or CUDA is made ``channels_last``; anything else passes as is.
    Tensor outputs (also inside lists, tuples and dicts) come back in the default contiguous
    layout, so the output format and values are those of ``module``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            isinstance(x, Tensor)
            and x.dim() == 4
            and x.is_floating_point()
            and x.device.type in ("cpu", "cuda")
        ):
            x = x.contiguous(memory_format=torch.channels_last)
        return _to_contiguous(self.module(x, *args, **kwargs))


def fuse_bn(
    model: nn.Module, *, channels_last: bool = True, example_input: Tensor | None = None
) -> nn.Module:
    """A new eval-mode copy of ``model`` with BatchNorm folded into the preceding convolutions.

    For inference only: ``model`` is deep-copied and left unchanged (its mode too), and the copy
    is returned in eval mode whatever mode ``model`` is in, because the fold uses the running
    statistics; the folded BNs are gone, so the result is not for training.

    What is folded: every plain ``nn.Conv2d`` (exactly that type: ``WSConv2d``, ACoSP's
    ``FoldedConv2d`` and other subclasses are left alone, as are hooked or weight-tied modules)
    whose output, in every call, is read by one ``nn.BatchNorm2d`` with running statistics and by
    nothing else (no residual branch, no second head, not a model output). The conv gets
    ``W * s`` and ``b * s + t`` (a bias if it had none) and the BN becomes ``nn.Identity``. The
    dataflow is recorded on one eval forward of ``example_input`` (default: a random
    ``1 x C x 64 x 64`` tensor, ``C`` the first conv's input channels, on the model's device and
    dtype); pass an input of the size you use if the model's control flow depends on it. Modules
    not called in eval (a training-only aux head) keep their BNs. GroupNorm models have nothing
    to fold and come back equal to the original. FasterSeg's on-the-fly eval fold sees an
    ``nn.Identity`` and runs the folded conv as is.

    Exactness: the same function up to float rounding. The folded weights are computed in
    float64 and rounded once; float32 outputs agree with the unfused eval model to about 1e-5
    relative to the logits' scale.

    ``channels_last=True`` converts the copy to ``torch.channels_last`` and wraps it in
    :class:`ChannelsLast` (the model is then ``result.module``; state-dict keys gain the
    ``module.`` prefix), which converts 4-D float CPU/CUDA inputs and returns contiguous outputs
    in the model's format (e.g. ``{"out": logits}``). It is skipped (the fused model is returned
    unwrapped) for models with ``nn.GroupNorm``: PyTorch's channels_last GroupNorm on CPU computes
    the variance in a cancelling way (measured 2e-4 relative error on a ``gn_ws`` model).
    """
    fused = copy.deepcopy(model).eval()
    convs, bns = _candidates(fused)
    if convs and bns:
        x = _default_input(fused) if example_input is None else example_input
        rec = _Recorder(convs, bns)
        try:
            with torch.no_grad(), rec:
                rec.read(fused(x))
        finally:
            rec.remove_hooks()
        for conv, bn in _pairs(rec):
            _fold(conv, bn)
            _replace(fused, bn, nn.Identity())
        del rec
        fused.eval()
    if not channels_last or any(isinstance(m, nn.GroupNorm) for m in fused.modules()):
        return fused
    return ChannelsLast(fused.to(memory_format=torch.channels_last)).eval()
