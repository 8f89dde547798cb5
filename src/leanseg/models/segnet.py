"""SegNet as in merantix/acosp (from meetps/pytorch-semseg), deeplab.md section 3.

Encoder (``backbone``): VGG16 with BN, five stages of 2, 2, 3, 3, 3 CBRs (3x3 conv *with bias*
-> norm -> ReLU), each ending in a 2x2 max-pool that keeps its indices. Its keys are those of
torchvision's ``vgg16_bn.features`` (``backbone.features.<i>``), so a vgg16_bn checkpoint loads
by name and a plain vgg16 one through :func:`leanseg.models.pretrained.vgg16_to_vgg16_bn`.

Decoder: per stage, in reverse, max-unpool with the stored indices to the pre-pool size, then a
mirrored CBR stack (3, 3, 3, 2, 2 layers) that keeps the width and maps in -> out in its last
CBR: 512->512, 512->256, 256->128, 128->64, 64->K. The 64->K layer is ``classifier``: a plain
3x3 conv by default, or with ``legacy_head=True`` a full CBR (norm + ReLU, so non-negative
logits), which is how the acosp numbers were produced.

Any input of at least 32x32 works: as in acosp, a pool drops an odd last row/column and the
unpool restores the pre-pool size with zeros there, so the output has the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.layers import ConvLayer, ConvNormAct, NormLayer, init_weights_, norm_layers
from leanseg.models.registry import register_builder

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, CBRs) per stage
PoolRecord = tuple[Tensor, tuple[int, int]]  # (indices, pre-pool size) of one max-pool


def max_unpool2d(x: Tensor, indices: Tensor, size: Sequence[int]) -> Tensor:
    """``F.max_unpool2d(x, indices, 2, output_size=size)``, written as a scatter.

    Same values and gradients, but exportable to ONNX (``ScatterElements``), which has no
    exporter for ``max_unpool2d``. ``indices`` index each (H*W) plane, as max-pool returns them.
    """
    n, c = x.shape[:2]
    out = x.new_zeros((n, c, size[0] * size[1]))
    return out.scatter(2, indices.flatten(2), x.flatten(2)).view(n, c, size[0], size[1])


def _cbr(
    in_channels: int, out_channels: int, norm_layer: NormLayer, conv_layer: ConvLayer
) -> ConvNormAct:
    return ConvNormAct(
        in_channels, out_channels, 3, norm_layer=norm_layer, conv_layer=conv_layer, bias=True
    )


class VGGEncoder(nn.Module):
    """VGG16-BN features returning ``(out, [(indices, pre-pool size) per stage])``."""

    def __init__(
        self,
        widths: Sequence[int],
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width, (_, depth) in zip(widths, VGG16_STAGES, strict=True):
            for _ in range(depth):  # flat conv / norm / ReLU children, as torchvision's vgg16_bn
                layers += list(_cbr(in_channels, width, norm_layer, conv_layer))
                in_channels = width
            layers.append(nn.MaxPool2d(2, 2, return_indices=True))
        self.features = nn.Sequential(*layers)
        self.stage_channels = tuple(widths)
        self.out_channels = in_channels
        self.output_stride = 32
        init_weights_(self, mode="fan_out")

    def forward(self, x: Tensor) -> tuple[Tensor, list[PoolRecord]]:
        pools: list[PoolRecord] = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = (x.shape[-2], x.shape[-1])
                x, indices = layer(x)
                pools.append((indices, size))
            else:
                x = layer(x)
        return x, pools


class SegNet(nn.Module):
    """SegNet: VGG16-BN encoder, unpooling decoder, ``{"out": logits at the input size}``."""

    def __init__(
        self,
        num_classes: int,
        legacy_head: bool = False,
        width_mult: float = 1.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ConfigError(f"width_mult: got {width_mult!r}; must be > 0 (1.0 = VGG16)")
        widths = [max(8, round(c * width_mult)) for c, _ in VGG16_STAGES]
        self.backbone = VGGEncoder(widths, norm_layer, conv_layer)
        stages = []
        for i in reversed(range(len(widths))):  # mirrored stacks: 512->512, ..., 128->64
            width, depth = widths[i], VGG16_STAGES[i][1]
            outs = [width] * (depth - 1) + ([widths[i - 1]] if i > 0 else [])
            cbrs = [_cbr(width, out, norm_layer, conv_layer) for out in outs]
            stages.append(nn.Sequential(*cbrs))
        self.decoder = nn.ModuleList(stages)
        if legacy_head:  # acosp: the 64->K layer is a full CBR (non-negative logits)
            self.classifier: nn.Module = _cbr(widths[0], num_classes, norm_layer, nn.Conv2d)
        else:
            self.classifier = nn.Conv2d(widths[0], num_classes, 3, padding=1)
        init_weights_(self.decoder)
        init_weights_(self.classifier)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x, pools = self.backbone(x)
        for stage, (indices, size) in zip(self.decoder, reversed(pools), strict=True):
            x = stage(max_unpool2d(x, indices, size))
        return {"out": self.classifier(x)}


def _build(*, num_classes: int, legacy_head: bool, norm: str, width_mult: float) -> SegNet:
    return SegNet(num_classes, legacy_head, width_mult, **norm_layers(norm))


_OPTIONS: dict[str, Any] = {
    "legacy_head": False,  # True: acosp's final CBR with norm + ReLU (non-negative logits)
    "norm": "bn",  # "bn" or "gn_ws"
    "width_mult": 1.0,  # every width; 1.0 keeps VGG16's shapes (ImageNet weights fit)
}
register_builder("segnet", _build, _OPTIONS, "SegNet with a VGG16-BN encoder (acosp).")
