"""The FasterSeg search supernet (shared/methods/fasterseg.md §2, corrected by §11).

Three rows of cells at 1/8, 1/16 and 1/32 over ``L`` layers; cell ``(l, j)`` (layer ``l``, scale
index ``j``) holds a stride-1 ``keep`` MixedOp and, but at 1/32 and in the last layer, a stride-2
``down`` MixedOp towards the next scale; both use the cell's one alpha row. A cell with two
inputs (the ``down`` of ``(l - 1, j - 1)`` and the ``keep`` of ``(l - 1, j)``) runs on each and
mixes the results with softmax(beta). Widths are slimmable (:mod:`.slimmable`) and chosen per
feature map by gamma with a hard straight-through Gumbel-softmax (tau 1, on log_softmax(gamma),
resampled every forward): the ops run at the sampled width and their outputs are multiplied by
the one-hot entries of their input and output widths, which are 1 and carry gamma's gradient.

Every architecture (teacher, student) has its own alpha/beta/gamma, stem and heads; the cells
are shared (§2.6). The teacher always runs at full width (gamma has one column) and may not use
``skip`` when derived. The heads fuse the last layer's three maps into five predictions at 1/8
(8, 16, 32, 8+32, 16+32), each scored with the criterion on labels downsampled (nearest) to 1/8.

Parameter layout (the reference files' names, K = architecture index, S = scale index):
``alpha_K_S`` ``(L - S) x 5``, ``beta_K_1`` ``(L - 2) x 2``, ``beta_K_2`` ``(L - 3) x 2``,
``ratio_K_S`` ``(L - 1, L - 1, L - 2) x W``; see :mod:`.derive` for what each row means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.derive import FCH, STUDENT_WIDTH, WIDTH_CHOICES, num_filters
from leanseg.methods.fasterseg.slimmable import OPS, MixedOp
from leanseg.models.fasterseg.network import Head, Stem
from leanseg.models.fasterseg.ops import ConvBNReLU, zoom

Criterion = Callable[[Tensor, Tensor], Tensor]
Width = tuple[int, Tensor | float]  # channels, and the one-hot entry that multiplies the output
WIDTH_MODES = ("sample", "argmax", "max", "min", "random")
INIT = 1e-3  # every architecture parameter starts here (§2.5)


@dataclass(frozen=True)
class ArchSetting:
    """One architecture of the co-search: its stem/head width multipliers and its rules."""

    name: str
    stem_width: float
    head_width: float
    search_widths: bool  # False: full width only (gamma with one column)
    allow_skip: bool  # may the derived network use skip


TEACHER = ArchSetting("teacher", 1.0, 1.0, search_widths=False, allow_skip=False)
STUDENT = ArchSetting("student", STUDENT_WIDTH, STUDENT_WIDTH, search_widths=True, allow_skip=True)


@dataclass(frozen=True)
class SearchSpace:
    """Layers, base width, width choices and the co-searched architectures."""

    layers: int = 16
    fch: int = FCH
    width_choices: tuple[float, ...] = WIDTH_CHOICES
    archs: tuple[ArchSetting, ...] = (TEACHER, STUDENT)

    def __post_init__(self) -> None:
        if self.layers < 6:
            raise ConfigError(f"search.layers: got {self.layers}; needs >= 6 (3 scales, 2 downs)")
        for j in range(3):
            for width in (*self.choices(j), *self.stem_heads(j)):
                if width < 2 or width % 2:
                    raise ConfigError(
                        f"search.fch: {self.fch} gives {width} channels at 1/{8 << j}; every "
                        "width must be even and >= 2 (use a multiple of 3, e.g. 3, 6 or 12)"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Layers, base width and width choices as JSON data (what run files record)."""
        return {"layers": self.layers, "fch": self.fch, "width_choices": list(self.width_choices)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        """The space :meth:`to_dict` recorded (teacher and student as in the original)."""
        return cls(data["layers"], data["fch"], tuple(data["width_choices"]))

    def arch_index(self, name: str) -> int:
        """Index K of architecture ``name``."""
        for k, arch in enumerate(self.archs):
            if arch.name == name:
                return k
        raise ConfigError(f"architecture {name!r}: not one of {[a.name for a in self.archs]}")

    def channels(self, j: int, width: float) -> int:
        """Channels of a map at scale index ``j`` and width multiplier ``width``."""
        return num_filters(8 << j, width, self.fch)

    def choices(self, j: int) -> tuple[int, ...]:
        """Channel counts gamma can pick at scale index ``j``, smallest first."""
        return tuple(self.channels(j, w) for w in self.width_choices)

    def stem_heads(self, j: int) -> tuple[int, ...]:
        """Stem outputs (1/8 only) and last-layer widths of the architectures at scale ``j``."""
        heads = [self.channels(j, a.head_width) for a in self.archs]
        stems = [self.channels(0, a.stem_width) for a in self.archs] if j == 0 else []
        return tuple(heads + stems)

    def stem_widths(self, arch: ArchSetting) -> tuple[int, int, int]:
        """The stem's three widths (§2.2)."""
        w = arch.stem_width
        return 2 * num_filters(2, w, self.fch), 2 * num_filters(4, w, self.fch), self.channels(0, w)

    def ratio_rows(self, j: int) -> int:
        """Rows of gamma at scale ``j``: the maps of layers 0..L-2 (1/32: 1..L-2)."""
        return self.layers - 1 - (j == 2)


def ratio_row(j: int, layer: int) -> int:
    """Row of gamma at scale ``j`` for the map output by ``layer``."""
    return layer - (j == 2)


def beta_row(j: int, layer: int) -> int:
    """Row of beta at scale ``j`` for the cell of ``layer`` (which has two inputs)."""
    return layer - j - 1


class Cell(nn.Module):
    """Cell ``(l, j)``: the keep MixedOp and, if ``down``, the stride-2 MixedOp."""

    def __init__(self, c_in: int, keep_widths: tuple[int, ...], down_widths: tuple[int, ...]):
        super().__init__()
        self.keep = MixedOp(c_in, keep_widths, stride=1)
        self.down = MixedOp(c_in, down_widths, stride=2) if down_widths else None


class SupernetHead(nn.Module):
    """The five predictions at 1/8 from the last layer's maps (§2.6), for one architecture."""

    def __init__(self, space: SearchSpace, arch: ArchSetting, num_classes: int) -> None:
        super().__init__()
        c8, c16, c32 = (space.channels(j, arch.head_width) for j in range(3))
        self.arm16 = ConvBNReLU(c16, c8, 1)
        self.refine16 = ConvBNReLU(2 * c8, c8, 3)
        self.arm32 = ConvBNReLU(c32, c16, 1)
        self.refine32 = ConvBNReLU(2 * c16, c16, 3)
        self.arm32_16 = ConvBNReLU(c16, c8, 1)
        self.refine32_16 = ConvBNReLU(2 * c8, c8, 3)
        mid = _head_mid
        self.heads = nn.ModuleList(
            [Head(c, mid(c), num_classes) for c in (c8, c8, c8, 2 * c8, 2 * c8)]
        )

    def forward(self, out8: Tensor, out16: Tensor, out32: Tensor) -> list[Tensor]:
        size8, size16 = out8.shape[-2:], out16.shape[-2:]
        f16 = self.refine16(torch.cat([zoom(self.arm16(out16), size8), out8], dim=1))
        f32 = self.refine32(torch.cat([zoom(self.arm32(out32), size16), out16], dim=1))
        f32 = self.refine32_16(torch.cat([zoom(self.arm32_16(f32), size8), out8], dim=1))
        features = (out8, f16, f32, torch.cat([out8, f32], 1), torch.cat([f16, f32], 1))
        return [head(f) for head, f in zip(self.heads, features, strict=True)]


def _head_mid(width: int) -> int:
    return width if width <= 256 else width // 2


class Supernet(nn.Module):
    """The supernet; ``forward(x, arch, widths)`` returns the five 1/8 logits."""

    def __init__(self, num_classes: int, space: SearchSpace | None = None) -> None:
        super().__init__()
        self.space = space = space or SearchSpace()
        self.num_classes = num_classes
        self.stems = nn.ModuleDict({a.name: Stem(space.stem_widths(a)) for a in space.archs})
        stem_c = tuple(space.channels(0, a.stem_width) for a in space.archs)
        self.cells = nn.ModuleList()
        for layer in range(space.layers):
            last = layer == space.layers - 1
            row = nn.ModuleList()
            for j in range(min(layer, 2) + 1):
                c_in = max((*space.choices(j), *(stem_c if layer == 0 else ())))
                heads = tuple(space.channels(j, a.head_width) for a in space.archs)
                keep = heads if last else space.choices(j)
                down = () if last or j == 2 else space.choices(j + 1)
                row.append(Cell(c_in, keep, down))
            self.cells.append(row)
        self.heads = nn.ModuleDict(
            {a.name: SupernetHead(space, a, num_classes) for a in space.archs}
        )
        for module in [*self.stems.values(), *self.heads.values()]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self.arch_params = nn.ParameterDict()
        for k, arch in enumerate(space.archs):
            columns = len(space.width_choices) if arch.search_widths else 1
            shapes = {
                **{f"alpha_{k}_{j}": (space.layers - j, len(OPS)) for j in range(3)},
                f"beta_{k}_1": (space.layers - 2, 2),
                f"beta_{k}_2": (space.layers - 3, 2),
                **{f"ratio_{k}_{j}": (space.ratio_rows(j), columns) for j in range(3)},
            }
            for name, shape in shapes.items():
                self.arch_params[name] = nn.Parameter(torch.full(shape, INIT))

    # ------------------------------------------------------------------ parameters

    def arch_parameters(self, arch: str | None = None) -> list[nn.Parameter]:
        """alpha/beta/gamma of architecture ``arch`` (all architectures when None)."""
        if arch is None:
            return list(self.arch_params.values())
        k = str(self.space.arch_index(arch))
        return [p for name, p in self.arch_params.items() if name.split("_")[1] == k]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture parameters."""
        arch = {id(p) for p in self.arch_params.values()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_tensors(self, arch: str) -> dict[str, list[list[float]]]:
        """The architecture's parameters as nested lists, in the reference files' names."""
        k = self.space.arch_index(arch)
        return {
            name: p.detach().cpu().tolist()
            for name, p in self.arch_params.items()
            if name.split("_")[1] == str(k)
        }

    def softmaxed(self, arch: str) -> tuple[list[Tensor], dict[int, Tensor]]:
        """softmax(alpha) per scale and softmax(beta) for scales 1 and 2."""
        k = self.space.arch_index(arch)
        alphas = [F.softmax(self.arch_params[f"alpha_{k}_{j}"], dim=-1) for j in range(3)]
        betas = {j: F.softmax(self.arch_params[f"beta_{k}_{j}"], dim=-1) for j in (1, 2)}
        return alphas, betas

    # ------------------------------------------------------------------ widths

    def widths(self, arch: str, mode: str) -> list[list[Width]]:
        """Per scale and gamma row: the map's channels and its output multiplier.

        ``sample``: Gumbel (hard, straight-through) from gamma; ``argmax``: gamma's most likely
        widths (validation); both are full width for an architecture that does not search
        widths. ``max`` / ``min``: every map at the largest / smallest
        choice; ``random``: uniform choices. Only ``sample`` carries gradient (to gamma).
        """
        if mode not in WIDTH_MODES:
            raise ValueError(f"width mode {mode!r}: not one of {WIDTH_MODES}")
        space = self.space
        k = space.arch_index(arch)
        setting = space.archs[k]
        rows: list[list[Width]] = []
        for j in range(3):
            choices, count = space.choices(j), space.ratio_rows(j)
            ratio = self.arch_params[f"ratio_{k}_{j}"]
            if mode == "max" or (mode in ("sample", "argmax") and not setting.search_widths):
                rows.append([(choices[-1], 1.0)] * count)
            elif mode == "min":
                rows.append([(choices[0], 1.0)] * count)
            elif mode == "random":
                picks = torch.randint(len(choices), (count,)).tolist()
                rows.append([(choices[i], 1.0) for i in picks])
            elif mode == "argmax":
                rows.append([(choices[i], 1.0) for i in ratio.argmax(dim=-1).tolist()])
            else:
                logits = F.log_softmax(ratio, dim=-1)
                hot = F.gumbel_softmax(logits, tau=1.0, hard=True)
                picks = hot.argmax(dim=-1).tolist()
                rows.append([(choices[i], hot[r, i]) for r, i in enumerate(picks)])
        return rows

    # ------------------------------------------------------------------ forward

    def features(self, x: Tensor, arch: str, mode: str = "sample") -> list[Tensor]:
        """The last layer's keep outputs at 1/8, 1/16 and 1/32."""
        space = self.space
        setting = space.archs[space.arch_index(arch)]
        alphas, betas = self.softmaxed(arch)
        widths = self.widths(arch, mode)
        last = space.layers - 1

        def map_width(j: int, layer: int) -> Width:
            if layer == last:
                return space.channels(j, setting.head_width), 1.0
            return widths[j][ratio_row(j, layer)]

        keep_prev: dict[int, Tensor] = {0: self.stems[arch](x)}
        down_prev: dict[int, Tensor] = {}
        for layer, row in enumerate(self.cells):
            keep: dict[int, Tensor] = {}
            down: dict[int, Tensor] = {}
            for j, cell in enumerate(row):
                alpha = alphas[j][layer - j]
                s_in = 1.0 if layer == 0 else map_width(j, layer - 1)[1]
                inputs = _inputs(j, layer, keep_prev, down_prev, betas)
                c_keep, s_keep = map_width(j, layer)
                keep[j] = sum(b * cell.keep(h, alpha, c_keep) * (s_in * s_keep) for b, h in inputs)
                if cell.down is not None:
                    c_down, s_down = map_width(j + 1, layer)
                    down[j] = sum(
                        b * cell.down(h, alpha, c_down) * (s_in * s_down) for b, h in inputs
                    )
            keep_prev, down_prev = keep, down
        return [keep_prev[0], keep_prev[1], keep_prev[2]]

    def forward(self, x: Tensor, arch: str = "student", widths: str = "sample") -> list[Tensor]:
        """Five logits at 1/8: 8, 16, 32, 8+32, 16+32 (in this order)."""
        return self.heads[arch](*self.features(x, arch, widths))

    def loss(
        self, images: Tensor, labels: Tensor, criterion: Criterion, arch: str, widths: str
    ) -> Tensor:
        """Sum of ``criterion`` over the five predictions, on labels downsampled to 1/8."""
        preds = self(images, arch, widths)
        target = F.interpolate(labels[:, None].float(), size=preds[0].shape[-2:], mode="nearest")
        target = target[:, 0].long()
        return sum(criterion(pred, target) for pred in preds)

    def search_loss(self, images: Tensor, labels: Tensor, criterion: Criterion) -> Tensor:
        """Each architecture at its sampled widths, plus one max- and one min-width pass of
        every width-searching architecture (the sandwich rule; 4 forwards for FasterSeg)."""
        total = sum(
            self.loss(images, labels, criterion, a.name, "sample") for a in self.space.archs
        )
        for arch in self._slimmable():
            for mode in ("max", "min"):
                total = total + self.loss(images, labels, criterion, arch, mode)
        return total

    def pretrain_loss(self, images: Tensor, labels: Tensor, criterion: Criterion) -> Tensor:
        """Weights only: every architecture at full width, and each width-searching one also
        at min and at random widths. Unlike the original, whose pretraining ran only the
        teacher's stem and heads (§11), every stem and head learns."""
        total = sum(self.loss(images, labels, criterion, a.name, "max") for a in self.space.archs)
        for arch in self._slimmable():
            for mode in ("min", "random"):
                total = total + self.loss(images, labels, criterion, arch, mode)
        return total

    def _slimmable(self) -> list[str]:
        if len(self.space.width_choices) < 2:
            return []
        return [a.name for a in self.space.archs if a.search_widths]

    @torch.no_grad()
    def predict(self, images: Tensor, arch: str) -> list[Tensor]:
        """The five predictions at the input size, at gamma's arg-max widths (validation)."""
        return [zoom(p, images.shape[-2:]) for p in self(images, arch, "argmax")]


def _inputs(
    j: int,
    layer: int,
    keep_prev: dict[int, Tensor],
    down_prev: dict[int, Tensor],
    betas: dict[int, Tensor],
) -> Sequence[tuple[Tensor | float, Tensor]]:
    """(weight, tensor) pairs feeding cell ``(layer, j)``: keep at 1/8, down for the first cell
    of a scale, else softmax(beta)-weighted down and keep."""
    if j == 0:
        return [(1.0, keep_prev[0])]
    if layer == j:
        return [(1.0, down_prev[j - 1])]
    beta = betas[j][beta_row(j, layer)]
    return [(beta[0], down_prev[j - 1]), (beta[1], keep_prev[j])]
