"""The FasterSeg network built from an :class:`~leanseg.models.fasterseg.spec.ArchSpec`.

``backbone``: the stem (section 2.2) and every branch's cells; a cell two branches share is one
module, run once. The rest is the head (section 6): per branch an :class:`Aggregation` back to
1/8, the 1x1 fusion conv over their concatenation, and the classifier head (3x3 conv-BN-ReLU,
1x1 conv with bias to K). With ``aux`` the model also holds the auxiliary heads of the 1/16 and
1/32 features, which run in training only.

``forward`` returns ``{"out": logits}`` at the input size (bilinear, ``align_corners=True``), and
in training with ``aux`` also ``"aux16"`` and ``"aux32"`` (the 1/16 and 1/32 heads' logits, at
the input size too; a key exists when the branches reach that scale). The original trains on
``out + 0.2 * aux16 + 0.2 * aux32`` (section 7).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leanseg.models.fasterseg.ops import ConvBNReLU, ConvX2, make_op, zoom
from leanseg.models.fasterseg.spec import ArchSpec, BranchSpec
from leanseg.models.layers import init_weights_

Features = dict[int, Tensor]  # scale -> a branch's last feature map at that scale


def _channels_last_inference(model: nn.Module, x: Tensor) -> bool:
    """Eval mode on the CPU: the convs are faster on channels-last (NHWC) feature maps."""
    return not isinstance(x, torch.fx.Proxy) and not model.training and x.device.type == "cpu"


class Stem(nn.Sequential):
    """3x3 s2 conv-BN-ReLU, then two stride-2 ConvX2: 3 -> widths[0] -> [1] -> [2] at 1/8."""

    def __init__(self, widths: tuple[int, int, int]) -> None:
        super().__init__(
            ConvBNReLU(3, widths[0], 3, stride=2),
            ConvX2(widths[0], widths[1], stride=2),
            ConvX2(widths[1], widths[2], stride=2),
        )


class Backbone(nn.Module):
    """Stem + cells. ``cells["b{i}l{k}"]`` is cell ``k`` of branch ``i`` (stored once if shared).

    ``forward`` returns, per branch, its last feature map at each scale it visits.
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.stem = Stem(spec.stem)
        self.cells = nn.ModuleDict()
        self.plans: list[list[tuple[str, int]]] = []  # per branch: (cell key, output scale)
        for i, branch in enumerate(spec.branches):
            source, shared = branch.shares if branch.shares is not None else (i, 0)
            plan = []
            for k, cell in enumerate(branch.cells):
                key = self.plans[source][k][0] if k < shared else f"b{i}l{k}"
                if k >= shared:
                    self.cells[key] = make_op(cell.op, cell.c_in, cell.c_out, cell.stride)
                plan.append((key, cell.out_scale))
            self.plans.append(plan)

    def forward(self, x: Tensor) -> list[Features]:
        stem = self.stem(x)
        computed: dict[str, Tensor] = {}
        branches = []
        for plan in self.plans:
            features, h = {8: stem}, stem
            for key, scale in plan:
                if key not in computed:  # a shared cell sees the same input in every branch
                    computed[key] = self.cells[key](h)
                h = features[scale] = computed[key]
            branches.append(features)
        return branches


class Aggregation(nn.Module):
    """From a branch's output back to 1/8: per halving of the stride, a 1x1 conv-BN-ReLU to the
    next aggregation width, bilinear up to the branch's feature there, concat, 3x3 conv-BN-ReLU.
    A 1/8 branch passes through."""

    def __init__(self, branch: BranchSpec, agg: dict[int, int], features: dict[int, int]) -> None:
        super().__init__()
        self.scale = branch.scale
        self.steps = [s for s in (16, 8) if s < branch.scale]
        self.arms = nn.ModuleList(ConvBNReLU(agg[2 * s], agg[s], 1) for s in self.steps)
        self.refines = nn.ModuleList(
            ConvBNReLU(agg[s] + features[s], agg[s], 3) for s in self.steps
        )

    def forward(self, features: Features) -> Tensor:
        out = features[self.scale]
        for scale, arm, refine in zip(self.steps, self.arms, self.refines, strict=True):
            skip = features[scale]
            out = refine(torch.cat([zoom(arm(out), skip.shape[-2:]), skip], dim=1))
        return out


class Head(nn.Sequential):
    """3x3 conv-BN-ReLU to ``mid`` -> 1x1 conv (with bias) to ``num_classes``."""

    def __init__(self, c_in: int, mid: int, num_classes: int) -> None:
        super().__init__(ConvBNReLU(c_in, mid, 3), nn.Conv2d(mid, num_classes, 1))


class FasterSeg(nn.Module):
    """A derived FasterSeg network; see the module docstring for its outputs.

    ``training_logits_upsampled = False`` (:func:`leanseg.models.base.
    set_training_logits_upsampled`) hands the training outputs over at 1/8 resolution."""

    align_corners = True  # zoom's
    training_logits_upsampled = True

    def __init__(self, spec: ArchSpec, num_classes: int, aux: bool = False) -> None:
        super().__init__()
        self.spec = spec
        head = spec.head
        self.backbone = Backbone(spec)
        self.aggregations = nn.ModuleDict(
            {
                str(b.scale): Aggregation(b, head.agg, b.feature_widths(spec.stem[-1]))
                for b in spec.branches
            }
        )
        self.fusion = ConvBNReLU(head.agg[8] * len(spec.branches), head.fusion, 1)
        self.classifier = Head(head.fusion, head.mid, num_classes)
        self.aux_heads: nn.ModuleDict | None = None
        if aux:
            self.aux_heads = nn.ModuleDict(
                {
                    str(scale): Head(width, head.aux_mid[scale], num_classes)
                    for scale, width in sorted(spec.aux_in_widths().items())
                }
            )
        init_weights_(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        nhwc = _channels_last_inference(self, x)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        branches = self.backbone(x)
        pairs = list(zip(self.spec.scales, branches, strict=True))
        fused = torch.cat([self.aggregations[str(s)](f) for s, f in pairs], dim=1)
        logits = self.classifier(self.fusion(fused))
        if nhwc:  # back before the final resize: its large output in the usual layout
            logits = logits.contiguous()
        upsample = not self.training or self.training_logits_upsampled
        result = {"out": zoom(logits, size) if upsample else logits}
        if self.training and self.aux_heads is not None:
            for key, head in self.aux_heads.items():
                scale = int(key)
                inputs = [f[scale] for s, f in pairs if s >= scale]
                aux = head(torch.cat(inputs, dim=1))
                result[f"aux{scale}"] = zoom(aux, size) if upsample else aux
        return result
