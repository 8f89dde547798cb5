"""What a run directory records besides metrics and checkpoints, for ``leanseg report``.

- ``environment.json`` (at start): leanseg, torch and Python versions, leanseg's git commit when
  it runs from a checkout, the device and the CPU threads;
- ``efficiency.json`` (at the end): parameters, MACs of one forward at the crop size,
  the BackRazor ratio, ACoSP's sparsity and kept channels per layer;
- ``train_stats.json`` (at the end): wall-clock seconds, images/s and peak memory of the
  training process;
- ``samples/NN.png`` (at each validation): image | truth | prediction | overlay strips.
"""

from __future__ import annotations

import copy
import io
import json
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import leanseg
from leanseg.config import Config
from leanseg.engine.run_dir import write_bytes_atomic, write_text_atomic
from leanseg.methods import acosp
from leanseg.methods.acosp.shrink_checkpoint import count_params, forward_flops

SAMPLES_DIR = "samples"


def write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def git_commit(start: Path) -> str | None:
    """The commit checked out in the git work tree holding ``start``, read from ``.git``
    (no git process); None outside a checkout."""
    for folder in (start, *start.parents):
        git = folder / ".git"
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head
            ref = head.removeprefix("ref: ")
            if (git / ref).is_file():
                return (git / ref).read_text().strip()
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(f" {ref}"):
                    return line.split()[0]
        except OSError:
            return None
        return None
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, commit, device and threads of this process."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "leanseg": leanseg.__version__,
        "git_commit": git_commit(Path(leanseg.__file__).resolve().parent),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def efficiency(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Size and cost of ``model`` as trained by ``cfg`` (MACs None where counting fails)."""
    size = (cfg.data.crop_size, cfg.data.crop_width or cfg.data.crop_size)
    try:
        macs: int | None = forward_flops(model, size) // 2
    except Exception:  # a model the meta-device count cannot run; the report says so
        macs = None
    record: dict[str, Any] = {
        "parameters": count_params(model),
        "macs": macs,
        "macs_input_size": list(size),
        "backrazor_ratio": cfg.backrazor.ratio,
        "backrazor_scope": cfg.backrazor.scope if cfg.backrazor.ratio is not None else None,
    }
    convs = acosp.masked_convs(model)
    layers = {name: [int(conv.acosp_k), conv.out_channels] for name, conv in convs}
    if layers:
        record["acosp"] = {"sparsity": cfg.acosp.sparsity, "kept_channels": layers}
        if acosp.is_hard(model):  # what `leanseg shrink` makes of it
            try:
                small = acosp.shrink(copy.deepcopy(model))
                record["acosp"]["shrunk_parameters"] = count_params(small)
                record["acosp"]["shrunk_macs"] = forward_flops(small, size) // 2
            except Exception:  # a model shrink refuses: the report shows the masked figures
                pass
    return record


def train_stats(seconds: float, images: int, device: torch.device) -> dict[str, Any]:
    """Wall clock, throughput and peak memory of this training process."""
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_rss = peak if sys.platform == "darwin" else peak * 1024
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "seconds": seconds,
        "images": images,
        "images_per_second": images / seconds if seconds > 0 else None,
        "peak_rss_bytes": peak_rss,
        "cuda_max_memory_allocated_bytes": cuda,
    }


def write_samples(run_dir: Path, panels: list[np.ndarray]) -> None:
    """Each HxWx3 panel as ``samples/NN.png`` (atomically; older extra ones removed)."""
    folder = run_dir / SAMPLES_DIR
    folder.mkdir(exist_ok=True)
    names = {f"{i:02d}.png" for i in range(len(panels))}
    for i, panel in enumerate(panels):
        buffer = io.BytesIO()
        Image.fromarray(panel).save(buffer, format="PNG")
        write_bytes_atomic(folder / f"{i:02d}.png", buffer.getvalue())
    for stale in folder.glob("*.png"):
        if stale.name not in names:
            stale.unlink()
