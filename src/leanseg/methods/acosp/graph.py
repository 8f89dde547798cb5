"""Which channels of a hard-masked model can be removed exactly (acosp.md sections 11-12).

The eval-mode forward is traced with ``torch.fx``. Every channel of every tensor gets an id;
operations that tie channels together share or merge ids: element-wise layers (norm,
activation, dropout, pooling, resizing), residual additions, concatenation (by offset),
depthwise convs and SegNet's max-unpool with the indices of its encoder pool. Each id class is
a set of channels that are kept or removed together.

Every channel also carries what it is known to hold. A masked conv output holds 0; norm and
activation layers map that to a per-channel constant that pools, resizing and additions carry
along (``CONST``). Max-pool indices of a constant channel are a fixed tie pattern (``TIES``)
and unpooling a constant with them gives ``value * P`` with ``P = unpool(pool(ones))``
(``UNPOOLED``). A class is removed when every channel in it holds such a known value and every
layer reading it (a dense conv or a linear layer) can add the value back as a folded term;
anything else (a live channel anywhere in the class, the model output) keeps the whole class.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from leanseg.errors import ConfigError
from leanseg.models.base import resize
from leanseg.models.segnet import max_unpool2d

LIVE, CONST, UNPOOLED, TIES = 0, 1, 2, 3

# layers that act on each channel on its own, mapping a constant channel to a constant
ELEMENTWISE = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
# a constant stays the same constant (nn.Upsample: any mode interpolates with weights summing to 1)
POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
RESIZES = (resize, F.interpolate)
UNPOOLS = (max_unpool2d, F.max_unpool2d)
ADDS = (operator.add, operator.iadd, torch.add)
# functional activations: map each channel on its own (a constant to a constant)
ELEMENTWISE_FNS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.hardtanh, torch.sigmoid)


@dataclass
class Channels:
    """The channels (dim 1) of one traced tensor: class ids, what they hold, and its pool."""

    ids: np.ndarray  # int64 [C]
    kind: np.ndarray  # int8 [C]: LIVE, CONST, UNPOOLED or TIES
    value: Tensor  # float64 [C]: the constant (0 where not CONST / UNPOOLED)
    pool: tuple | None = None  # TIES / UNPOOLED: (kernel, stride, padding, dilation, ceil_mode)

    def with_kind(self, kind: np.ndarray, value: Tensor, pool: tuple | None = None) -> Channels:
        return Channels(self.ids, kind, value, pool if pool is not None else self.pool)


@dataclass
class LayerUse:
    """One call of a conv / norm / linear layer in the traced forward."""

    name: str
    module: nn.Module
    inp: Channels
    out: Channels


@dataclass
class ChannelPlan:
    """The analysis result: the layers in forward order and which channel classes go."""

    layers: list[LayerUse]
    removable: np.ndarray  # bool per channel id
    roots: np.ndarray  # int64 per channel id: its class (union-find root)
    used_modules: set[str] = field(default_factory=set)

    def removed(self, channels: Channels) -> np.ndarray:
        return self.removable[channels.ids]

    def kept_index(self, channels: Channels) -> Tensor:
        return torch.from_numpy(np.flatnonzero(~self.removed(channels)))


CONVS = (nn.Conv2d, nn.ConvTranspose2d)


class _Tracer(fx.Tracer):
    """Convs are leaves (also subclasses); resize and max-unpool stay calls. Remembers the
    modules being traced, so that a trace error can name the innermost one."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(resize, max_unpool2d))
        self.stack: list[tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_opaque(m):
            return True
        return isinstance(m, (*CONVS, nn.Linear)) or super().is_leaf_module(m, qualname)

    def call_module(
        self, m: nn.Module, forward: Callable[..., object], args: tuple, kwargs: dict
    ) -> object:
        self.stack.append((self.path_of_module(m), m))
        result = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # left in place on an error: the innermost module is the culprit
        return result


def is_opaque(module: nn.Module) -> bool:
    """A module marked ``acosp_leaf = True``: not traced into; its inputs and outputs keep all
    their channels and its own masked convs only get their pruned rows zeroed by shrink."""
    return getattr(module, "acosp_leaf", False) is True


def _trace(model: nn.Module) -> fx.Graph:
    """``model``'s fx graph; a forward fx cannot trace is a one-line ConfigError naming the
    (innermost) module whose forward failed and what to change."""
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... from inside user code
        name, module = tracer.stack[-1] if tracer.stack else ("", model)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if name:
            where = f"{type(module).__name__} '{name}'"
            opaque = f"mark that module opaque with `{name}.acosp_leaf = True`"
        else:
            where = f"the model {type(module).__name__} itself"
            opaque = "move that step into a submodule marked opaque with `acosp_leaf = True`"
        raise ConfigError(
            f"acosp: torch.fx cannot trace the eval forward of {where}: {reason}; make that "
            f"forward traceable (no Python if/for/while on tensor values: use torch.where), or "
            f"{opaque} (its input and output channels are then kept)"
        ) from err


class _Analysis:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.bad: list[np.ndarray] = []  # ids whose class must stay
        self.all: list[Channels] = []
        self.layers: list[LayerUse] = []

    # -- union-find over channel ids --------------------------------------------------------
    def fresh(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        if len(a) != len(b):
            raise ConfigError(
                f"acosp shrink: channel counts differ at {where}: {len(a)} vs {len(b)}"
            )
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[rx] = ry

    def new(self, count: int, kind: np.ndarray | None = None, value: Tensor | None = None):
        kind = np.zeros(count, np.int8) if kind is None else kind
        value = torch.zeros(count, dtype=torch.float64) if value is None else value
        return Channels(self.fresh(count), kind, value)

    def keep(self, channels: Channels) -> None:
        self.bad.append(channels.ids)

    def plan(self, used: set[str]) -> ChannelPlan:
        roots = np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
        bad = np.zeros(len(self.parent), bool)
        for ids in self.bad:
            bad[roots[ids]] = True
        for ch in self.all:
            bad[roots[ch.ids[ch.kind == LIVE]]] = True
        return ChannelPlan(self.layers, removable=~bad[roots], roots=roots, used_modules=used)


def _const(x: Channels) -> np.ndarray:
    return x.kind == CONST


def _elementwise(module: nn.Module, x: Channels) -> Channels:
    """Run the layer on the constants themselves: the same arithmetic as the model's."""
    value = x.value.view(1, -1, 1, 1).clone()
    like = next((t for t in module.state_dict().values() if t.is_floating_point()), None)
    if like is not None:  # on the layer's device and in its dtype
        value = value.to(like)
    with torch.no_grad():
        value = module(value).reshape(-1).double().cpu()
    kind = np.where(_const(x), CONST, LIVE).astype(np.int8)
    return x.with_kind(kind, torch.where(torch.from_numpy(_const(x)), value, 0.0))


def _conv_output(an: _Analysis, conv: nn.Module, ids: np.ndarray | None) -> Channels:
    """A (masked) conv's output: 0 where its hard mask is 0, live elsewhere."""
    kind = np.zeros(conv.out_channels, np.int8)
    if hasattr(conv, "acosp_mask"):
        kind[(conv.acosp_mask == 0).cpu().numpy()] = CONST
    if ids is None:
        return an.new(conv.out_channels, kind)
    return Channels(ids, kind, torch.zeros(conv.out_channels, dtype=torch.float64))


def _call_module(an: _Analysis, name: str, module: nn.Module, args: list) -> object:
    x = args[0]
    if not isinstance(x, Channels):
        raise ConfigError(f"acosp shrink: layer '{name}' gets no tensor input")
    if isinstance(module, CONVS):
        if type(module) not in CONVS:
            raise ConfigError(
                f"acosp shrink: layer '{name}' is a {type(module).__name__}; only plain "
                "nn.Conv2d and nn.ConvTranspose2d layers are supported (norm='bn' models)"
            )
        if module.groups == 1:
            an.bad.append(x.ids[x.kind == TIES])  # pool indices are no conv input
            out = _conv_output(an, module, None)
        elif module.groups == module.in_channels == module.out_channels:
            out = _conv_output(an, module, x.ids)  # depthwise: channel c reads channel c only
        else:
            raise ConfigError(
                f"acosp shrink: grouped conv '{name}' (groups={module.groups}) is not supported"
            )
        an.layers.append(LayerUse(name, module, x, out))
        return out
    if isinstance(module, nn.Linear):
        an.bad.append(x.ids[x.kind != CONST])
        out = an.new(module.out_features)
        an.layers.append(LayerUse(name, module, x, out))
        return out
    if isinstance(module, (nn.MaxPool2d, *POOLS)):
        values = x.with_kind(np.where(_const(x), CONST, LIVE).astype(np.int8), x.value)
        if not getattr(module, "return_indices", False):
            return values
        params = (module.kernel_size, module.stride, module.padding, module.dilation)
        pool = (*params, module.ceil_mode)
        ties = np.where(_const(x), TIES, LIVE).astype(np.int8)
        return values, Channels(x.ids, ties, torch.zeros(len(x.ids), dtype=torch.float64), pool)
    if isinstance(module, ELEMENTWISE):
        out = _elementwise(module, x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            an.layers.append(LayerUse(name, module, x, out))
        return out
    raise ConfigError(
        f"acosp shrink: layer '{name}' ({type(module).__name__}) is not supported; supported: "
        "Conv2d, ConvTranspose2d, BatchNorm2d, Linear, activations, dropout, pooling, Upsample"
    )


def _call_function(an: _Analysis, node: fx.Node, args: list, kwargs: dict) -> object:
    fn = node.target
    tensors = [a for a in args if isinstance(a, Channels)]
    if fn in ADDS and len(tensors) == 2 and len(args) == 2 and not kwargs:
        a, b = tensors
        an.union(a.ids, b.ids, node.name)
        both = _const(a) & _const(b)
        kind = np.where(both, CONST, LIVE).astype(np.int8)
        return a.with_kind(kind, torch.where(torch.from_numpy(both), a.value + b.value, 0.0))
    if fn is torch.cat:
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        rank = len(node.meta["tensor_meta"].shape)
        if dim % rank != 1 or not all(isinstance(p, Channels) for p in parts):
            raise ConfigError(f"acosp shrink: {node.name} concatenates along dim {dim}, not 1")
        return Channels(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([np.where(_const(p), CONST, LIVE) for p in parts]).astype(np.int8),
            torch.cat([p.value for p in parts]),
        )
    if fn in ELEMENTWISE_FNS and len(tensors) == 1 and args and args[0] is tensors[0]:
        x = tensors[0]
        with torch.no_grad():
            value = fn(x.value.clone(), *args[1:], **kwargs)
        kind = np.where(_const(x), CONST, LIVE).astype(np.int8)
        return x.with_kind(kind, torch.where(torch.from_numpy(_const(x)), value, 0.0))
    if fn in RESIZES and tensors and args[0] is tensors[0]:
        x = tensors[0]
        return x.with_kind(np.where(_const(x), CONST, LIVE).astype(np.int8), x.value)
    if fn in UNPOOLS and len(tensors) == 2:
        x, idx = tensors
        an.union(x.ids, idx.ids, node.name)
        pattern = _const(x) & (idx.kind == TIES)
        kind = np.where(pattern, UNPOOLED, LIVE).astype(np.int8)
        return Channels(x.ids, kind, torch.where(torch.from_numpy(pattern), x.value, 0.0), idx.pool)
    if fn is torch.flatten and tensors:
        shape = tuple(node.args[0].meta["tensor_meta"].shape)
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        if start == 1 and len(shape) == 4 and shape[2:] == (1, 1):
            x = tensors[0]
            return x.with_kind(np.where(_const(x), CONST, LIVE).astype(np.int8), x.value)
    if fn is operator.getitem and isinstance(args[0], tuple) and args[0]:
        if isinstance(args[0][0], Channels):
            return args[0][args[1]]
    if fn is builtins.getattr or not _has_tensor(args):
        return None  # shapes and other plain values
    raise ConfigError(
        f"acosp shrink: operation {getattr(fn, '__name__', fn)} ({node.name}) on a feature map is "
        "not supported; supported: add, cat, resize, max-unpool, flatten, relu / relu6 / sigmoid"
    )


def _opaque(an: _Analysis, node: fx.Node, args: list, kwargs: dict) -> Channels:
    """An ``acosp_leaf`` module: every input channel stays, its output is new and live."""
    fx.node.map_aggregate((args, kwargs), lambda a: an.keep(a) if isinstance(a, Channels) else a)
    meta = node.meta.get("tensor_meta")
    if not hasattr(meta, "shape") or len(meta.shape) < 2:
        raise ConfigError(
            f"acosp shrink: acosp_leaf module '{node.target}' must return one B x C x ... tensor"
        )
    return an.new(meta.shape[1])


def _has_tensor(args: object) -> bool:
    found = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, Channels) else a)
    return bool(found)


def analyse(model: nn.Module, example_size: tuple[int, int] = (32, 32)) -> ChannelPlan:
    """Trace ``model`` (in eval mode) and decide which channel classes can be removed."""
    training = model.training
    model.eval()
    try:
        graph = fx.GraphModule(model, _trace(model))
        first = next(m for m in model.modules() if isinstance(m, CONVS))
        example = first.weight.new_zeros((1, first.in_channels, *example_size))
        try:
            with torch.no_grad():
                ShapeProp(graph).propagate(example)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"acosp: the model fails on a {tuple(example.shape)} zero input (the channels "
                f"of its first registered conv; {reason}): pass an example_size the model "
                "accepts to shrink_with_spec, and register the input conv first"
            ) from err
        return _walk(graph, model)
    finally:
        model.train(training)


def _walk(graph: fx.GraphModule, model: nn.Module) -> ChannelPlan:
    an = _Analysis()
    env: dict[fx.Node, object] = {}
    used: set[str] = set()
    for node in graph.graph.nodes:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            result: object = an.new(meta.shape[1]) if meta is not None else None
            if isinstance(result, Channels):
                an.keep(result)
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            if node.target in used and module.state_dict():
                raise ConfigError(f"acosp shrink: layer '{node.target}' is called twice")
            used.add(node.target)
            if is_opaque(module):
                result = _opaque(an, node, list(args), dict(kwargs))
            else:
                result = _call_module(an, node.target, module, list(args))
        elif node.op == "call_function":
            result = _call_function(an, node, list(args), dict(kwargs))
        elif node.op == "call_method":
            if _has_tensor(args) and node.target not in ("size", "dim"):
                raise ConfigError(f"acosp shrink: tensor method .{node.target}() is not supported")
            result = None
        elif node.op == "output":
            fx.node.map_aggregate(args, lambda a: an.keep(a) if isinstance(a, Channels) else a)
            result = None
        else:
            raise ConfigError(f"acosp shrink: graph node {node.op} {node.target} is not supported")
        for item in result if isinstance(result, tuple) else (result,):
            if isinstance(item, Channels):
                an.all.append(item)
        env[node] = result
    return an.plan(used)
