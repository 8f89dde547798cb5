"""Pieces the segmentation models share: the backbone -> classifier forward and the FCN head."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.layers import ConvLayer, NormLayer, init_weights_


def resize(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of ``x`` to ``size`` (H, W)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def fcn_head(
    in_channels: int,
    num_classes: int,
    norm_layer: NormLayer,
    conv_layer: ConvLayer = nn.Conv2d,
    *,
    inter_channels: int | None = None,
    dropout: float = 0.1,
    dropout_layer: Callable[[float], nn.Module] = nn.Dropout,
) -> nn.Sequential:
    """3x3 conv to ``inter_channels`` (in/4) -> norm -> ReLU -> dropout -> 1x1 conv to K.

    torchvision's FCN auxiliary head with the defaults; semseg's PSPNet heads use ``Dropout2d``.
    The final 1x1 classifier is always a plain ``nn.Conv2d`` (with bias).
    """
    inter = in_channels // 4 if inter_channels is None else inter_channels
    return nn.Sequential(
        conv_layer(in_channels, inter, 3, padding=1, bias=False),
        norm_layer(inter),
        nn.ReLU(inplace=True),
        dropout_layer(dropout),
        nn.Conv2d(inter, num_classes, 1),
    )


def aux_head(
    backbone: nn.Module,
    num_classes: int,
    norm_layer: NormLayer,
    conv_layer: ConvLayer,
    aux: bool,
    **head_options: object,
) -> nn.Module | None:
    """An initialised :func:`fcn_head` on the backbone's layer3 features when ``aux``.

    Raises ConfigError for backbones without layer3 features.
    """
    if not aux:
        return None
    if getattr(backbone, "aux_channels", None) is None:
        raise ConfigError(
            f"aux: {type(backbone).__name__} has no layer3 features for an auxiliary head; "
            "set aux=False or use a ResNet backbone"
        )
    head = fcn_head(backbone.aux_channels, num_classes, norm_layer, conv_layer, **head_options)
    init_weights_(head)
    return head


def model_outputs(output: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A model's output as leanseg reads it: a dict with ``"out"`` (and e.g. ``"aux"``) logits.

    A model that returns a plain tensor of logits (a user's own model) gives ``{"out": it}``.
    """
    if isinstance(output, Tensor):
        return {"out": output}
    if isinstance(output, Mapping) and isinstance(output.get("out"), Tensor):
        return dict(output)
    what = f"a dict with keys {sorted(output)}" if isinstance(output, Mapping) else type(output)
    raise ConfigError(
        f"the model returned {what}; a segmentation model returns its logits (B x K x H x W), "
        "or a dict of them with the key 'out'"
    )


def set_training_logits_upsampled(model: nn.Module, upsampled: bool) -> int:
    """Whether the models in ``model`` upsample their training logits to the input size
    (``True``, the default) or hand them over at feature resolution, for a loss that upsamples
    them itself (``leanseg.engine.upsampled_loss``). Eval outputs are always input-size.
    Returns how many modules have the switch (``training_logits_upsampled``)."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "training_logits_upsampled"):
            module.training_logits_upsampled = upsampled
            switched += 1
    return switched


class SegmentationModel(nn.Module):
    """Shared forward: ``backbone`` -> ``classifier`` (+ ``aux_classifier`` in training).

    Returns ``{"out": logits}`` (plus ``"aux"`` in training when there is an aux head), both
    bilinearly upsampled to the input size with ``align_corners``; in training at feature
    resolution instead when ``training_logits_upsampled`` is False
    (:func:`set_training_logits_upsampled`).
    """

    backbone: nn.Module
    aux_classifier: nn.Module | None
    align_corners = False
    training_logits_upsampled = True

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        upsample = not self.training or self.training_logits_upsampled
        features = self.backbone(x)
        logits = self._logits(features)
        result = {"out": resize(logits, size, self.align_corners) if upsample else logits}
        if self.aux_classifier is not None and self.training:
            aux = self.aux_classifier(features["aux"])
            result["aux"] = resize(aux, size, self.align_corners) if upsample else aux
        return result
