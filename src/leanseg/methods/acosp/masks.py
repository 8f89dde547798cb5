"""Learned channel masks on a model's convolutions (acosp.md sections 2-4 and 7).

:func:`apply` gives every prunable convolution (every ``Conv2d`` and ``ConvTranspose2d`` except
the output classifiers and convs marked ``unprunable = True``) a score vector and a forward hook
that multiplies the conv output per channel by the mask: conv -> mask -> norm -> activation, as
in the original. All state lives in the conv's state
dict, next to its weight:

- ``acosp_score`` (parameter, ``[C]``, N(0, 1) init): trained by the task loss only;
- ``acosp_tau`` (buffer, scalar): the current temperature;
- ``acosp_hard`` (buffer, bool scalar): True once the mask is hardened;
- ``acosp_mask`` (buffer, ``[C]``): the hard 0/1 mask once hardened (ones before).

Parameter names, module classes and the forward of the conv itself are unchanged, so the
other methods (BackRazor) compose with it, and a checkpoint of a masked model holds everything
needed to rebuild it (``apply`` with the same sparsity, then ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.methods.acosp.soft_topk import hard_mask, kept_channels, soft_mask


class ChannelMaskHook:
    """Forward hook: ``out * mask[None, :, None, None]`` with the conv's current mask."""

    def __call__(self, conv: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return out * channel_mask(conv).to(out.dtype).view(1, -1, 1, 1)


def channel_mask(conv: nn.Module) -> Tensor:
    """The mask a masked conv applies now: hard once hardened, soft top-k before."""
    if bool(conv.acosp_hard):
        # + 0 * score keeps the scores in the graph: DDP expects a gradient for every parameter
        return conv.acosp_mask + 0.0 * conv.acosp_score
    return soft_mask(conv.acosp_score, conv.acosp_k, float(conv.acosp_tau))


PRUNABLE = (nn.Conv2d, nn.ConvTranspose2d)  # the layer types apply() masks


def output_convs(model: nn.Module) -> set[nn.Module]:
    """The convs that are never masked: the last conv of ``model.classifier`` and of
    ``model.aux_classifier`` (DeepLab, PSPNet, SegNet's 64 -> K layer), and every conv with an
    attribute ``unprunable = True`` (e.g. a user model's output layer)."""
    found = {
        m for m in model.modules() if isinstance(m, PRUNABLE) and getattr(m, "unprunable", False)
    }
    for name in ("classifier", "aux_classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            convs = [m for m in head.modules() if isinstance(m, PRUNABLE)]
            if convs:
                found.add(convs[-1])
    return found


def masked_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d | nn.ConvTranspose2d]]:
    """``(name, conv)`` of every conv (or transposed conv) :func:`apply` has given a mask."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE) and hasattr(module, "acosp_score"):
            yield name, module


def apply(
    model: nn.Module, sparsity: float, min_keep: int = 8, coupled_residual: bool = False
) -> nn.Module:
    """Give every prunable conv of ``model`` a soft top-k output-channel mask; returns ``model``.

    Each conv keeps ``k = max(ceil((1 - sparsity) * C), min_keep)`` channels (clamped to C).
    ``coupled_residual`` shares one score vector among the convs whose outputs meet channel by
    channel (see :func:`couple_scores`; a deviation from the published method, acosp.md
    pitfall 4). Call before building the optimizer: the scores are new parameters.
    """
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0 <= sparsity < 1
    ):
        raise ConfigError(f"acosp.sparsity: got {sparsity!r}; must be a number in [0, 1)")
    if getattr(model, "crf", None) is not None:
        raise ConfigError(
            "acosp: models with a CRF head (model.crf) are not supported; set model.crf=null"
        )
    skip = output_convs(model)
    convs = [m for m in model.modules() if isinstance(m, PRUNABLE) and m not in skip]
    if not convs:
        raise ConfigError(f"acosp: {type(model).__name__} has no prunable convolutions")
    for conv in convs:
        if hasattr(conv, "acosp_score"):
            raise ConfigError("acosp: the model already has ACoSP masks; apply it once")
        channels = conv.out_channels
        device = conv.weight.device
        conv.acosp_k = kept_channels(channels, sparsity, min_keep)
        conv.register_parameter("acosp_score", nn.Parameter(torch.randn(channels, device=device)))
        conv.register_buffer("acosp_tau", torch.tensor(1.0, device=device))
        conv.register_buffer("acosp_hard", torch.tensor(False, device=device))
        conv.register_buffer("acosp_mask", torch.ones(channels, device=device))
        conv.register_forward_hook(ChannelMaskHook())
    if coupled_residual:
        couple_scores(model)
    return model


def couple_scores(model: nn.Module) -> int:
    """Make masked convs whose output channels are tied one to one share one score vector.

    Residual additions (and depthwise convs, and SegNet's unpooling with its encoder's indices)
    tie the channels of several convs' outputs; with independent masks a channel can only be
    removed where all of them prune it, so residual streams barely shrink. Convs whose outputs
    fall in the same channel classes of the shrink analysis, in the same order, get the first
    one's ``acosp_score`` parameter, so their masks always agree. Returns the number of convs
    that now share another conv's scores.
    """
    from leanseg.methods.acosp.graph import analyse  # the fx analysis is only needed here

    try:
        plan = analyse(model)
    except ConfigError as err:
        raise ConfigError(f"acosp.coupled_residual: cannot trace the model ({err})") from err
    owner: dict[tuple[int, ...], nn.Module] = {}
    shared = 0
    for use in plan.layers:
        conv = use.module
        if not (isinstance(conv, PRUNABLE) and hasattr(conv, "acosp_score")):
            continue
        first = owner.setdefault(tuple(plan.roots[use.out.ids].tolist()), conv)
        if first is not conv and conv.acosp_score is not first.acosp_score:
            conv.acosp_score = first.acosp_score  # registers the same Parameter
            shared += 1
    return shared


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the soft masks' temperature (hardened masks ignore it)."""
    for _, conv in masked_convs(model):
        conv.acosp_tau.fill_(tau)


@torch.no_grad()
def harden(model: nn.Module) -> int:
    """Fix every soft mask to the top-k of its scores (stored in ``acosp_mask``).

    Returns the number of masks hardened now (0 if all were hard already). The hard mask
    depends only on the scores, so every DDP rank gets the same one.
    """
    hardened = 0
    for _, conv in masked_convs(model):
        if not bool(conv.acosp_hard):
            conv.acosp_mask.copy_(hard_mask(conv.acosp_score, conv.acosp_k))
            conv.acosp_hard.fill_(True)
            hardened += 1
    return hardened


def is_hard(model: nn.Module) -> bool:
    """True when the model has masks and all of them are hard."""
    flags = [bool(conv.acosp_hard) for _, conv in masked_convs(model)]
    return bool(flags) and all(flags)
