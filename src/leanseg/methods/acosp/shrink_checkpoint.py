"""``leanseg shrink``: an ACoSP checkpoint in, a physically smaller checkpoint out.

The output keeps the source's model name, options, class names and config, adds
``"shrink"`` (the plain-data layer spec of :func:`~leanseg.methods.acosp.shrink_with_spec`) and
stores the shrunk state dict; :func:`leanseg.checkpoint.model_from_checkpoint` rebuilds
it, so ``leanseg eval`` / ``predict`` take it like any checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from leanseg.errors import CheckpointError, ConfigError
from leanseg.flops import flop_counter
from leanseg.methods.acosp.masks import harden, is_hard
from leanseg.methods.acosp.rebuild import strip_masks
from leanseg.methods.acosp.shrink import shrink_with_spec

KEPT_KEYS = ("model", "num_classes", "model_options", "class_names", "config")


@dataclass
class ShrinkReport:
    """What ``leanseg shrink`` did, with parameter and FLOP counts before and after."""

    source: str
    target: str
    model: str
    sparsity: float | None
    size: tuple[int, int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    dropped_params: int = 0
    hardened: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        """A one-screen summary."""
        s = self.stats
        rows = [
            ("parameters", _millions(self.params_before), _millions(self.params_after)),
            (
                f"GFLOPs (1x3x{self.size[0]}x{self.size[1]})",
                f"{self.flops_before / 1e9:.2f}",
                f"{self.flops_after / 1e9:.2f}",
            ),
        ]
        ratios = [
            self.params_before / max(self.params_after, 1),
            self.flops_before / max(self.flops_after, 1),
        ]
        lines = [f"acosp shrink: {self.model} (sparsity {self.sparsity}) from {self.source}"]
        lines.append(f"  {'':26}{'before':>10}{'after':>10}{'ratio':>9}")
        for (label, before, after), ratio in zip(rows, ratios, strict=True):
            lines.append(f"  {label:26}{before:>10}{after:>10}{ratio:>8.2f}x")
        lines.append(
            f"  {s.get('masked_convs', 0)} masked convs: {s.get('removed_channels', 0)} of "
            f"{s.get('pruned_channels', 0)} pruned channels removed, "
            f"{s.get('kept_pruned_channels', 0)} kept (coupled to unpruned channels)"
        )
        lines.append(
            f"  constants folded: {s.get('border_terms', 0)} convs with border terms, "
            f"{s.get('unpool_terms', 0)} with unpool terms"
        )
        if self.dropped_params:
            lines.append(f"  aux head dropped (training only, {_millions(self.dropped_params)})")
        lines.append(f"wrote {self.target}")
        return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` without the ACoSP scores."""
    return sum(p.numel() for n, p in model.named_parameters() if "acosp_" not in n)


def forward_flops(model: nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of one eval forward of a 1x3xHxW input, counted on the meta device (no compute).

    Mask multiplications are not FLOPs of a conv, so a masked model counts as dense.
    """
    meta = strip_masks(copy.deepcopy(model)).to("meta").eval()
    with torch.no_grad(), flop_counter() as counter:
        meta(torch.empty(1, 3, *size, device="meta"))
    return counter.get_total_flops()


def _check_target(source: Path, target: Path) -> None:
    if not target.parent.is_dir():
        raise ConfigError(
            f"output '{target}': directory '{target.parent}' does not exist; create it or pass "
            "another -o path"
        )
    if target.is_dir():
        raise ConfigError(f"output '{target}' is a directory; pass a file path such as small.pt")
    if target.resolve() == source.resolve():
        raise ConfigError(f"output '{target}' is the input checkpoint; pass another -o path")


def _input_size(config: dict[str, Any]) -> tuple[int, int]:
    data = config.get("data", {}) if isinstance(config, dict) else {}
    height = int(data.get("crop_size") or 512)
    return height, int(data.get("crop_width") or height)


def shrink_checkpoint(
    source: str | Path, target: str | Path, *, say: Callable[[str], None] = print
) -> ShrinkReport:
    """Shrink the ACoSP checkpoint ``source`` into ``target`` (written atomically).

    Soft masks are hardened first (with a note through ``say``), as training does at its end.
    """
    source, target = Path(source), Path(target)
    _check_target(source, target)
    payload = load_checkpoint(source)
    if "shrink" in payload:
        raise CheckpointError(f"checkpoint '{source}' is already shrunk; pass the ACoSP run's .pt")
    sparsity = payload.get("config", {}).get("acosp", {}).get("sparsity")
    if sparsity is None or not any(k.endswith("acosp_score") for k in payload["state_dict"]):
        raise CheckpointError(
            f"checkpoint '{source}' has no ACoSP masks: shrink needs a run trained with "
            "acosp.sparsity set (e.g. leanseg train acosp.sparsity=0.75)"
        )
    model = model_from_checkpoint(payload, str(source)).eval()
    hardened = 0
    if not is_hard(model):
        hardened = harden(model)
        say(
            f"note: {hardened} ACoSP masks in '{source}' were still soft; hardened them to the "
            "top-k scores, as training does at its end"
        )
    small, spec = shrink_with_spec(model)
    out = {key: payload[key] for key in KEPT_KEYS if key in payload}
    out.update(shrink=spec, state_dict=small.state_dict())
    save_checkpoint(target, out)
    size = _input_size(payload.get("config", {}))
    dropped = sum(count_params(model.get_submodule(name)) for name in spec["dropped"])
    return ShrinkReport(
        source=str(source),
        target=str(target),
        model=payload["model"],
        sparsity=sparsity,
        size=size,
        params_before=count_params(model) - dropped,
        params_after=count_params(small),
        flops_before=forward_flops(model, size),
        flops_after=forward_flops(small, size),
        dropped_params=dropped,
        hardened=hardened,
        stats=spec["stats"],
    )
