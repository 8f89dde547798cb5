"""onnxruntime inference of a torch model: export, one session, its timed ``run``.

``leanseg bench model --backend onnxruntime`` and benchmarks/fasterseg_latency.py time the
session built here. onnxruntime (and onnx) are the optional ``[deploy]`` extra; without them
:func:`require_onnxruntime` raises a one-line ConfigError.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from leanseg.errors import ConfigError
from leanseg.onnx_compat import exportable

INSTALL_HINT = "pip install 'leanseg[deploy]'"


def require_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or a one-line ConfigError naming the ``[deploy]`` extra."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            f"--backend onnxruntime needs the onnxruntime package (the [deploy] extra): "
            f"{INSTALL_HINT}"
        ) from None
    return onnxruntime


class _Logits(nn.Module):
    """The ``"out"`` tensor of a segmentation model (a tensor output passes through)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


def export_onnx(
    model: nn.Module,
    images: torch.Tensor,
    *,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int | None = None,
) -> bytes:
    """The eval-mode ``model`` (its ``"out"`` logits) as ONNX bytes, for ``images``' shape.

    TorchScript-based ``torch.onnx.export`` with static shapes (input ``"image"``, output
    ``"logits"``), as tests/test_models.py exports every model; its deprecation notes are muted.
    ``dynamic_axes`` (``{"image": {0: "batch", ...}, "logits": {...}}``) makes those axes
    symbolic; ``opset`` picks the ONNX opset (default: the exporter's). A fixed-size export
    slices adaptive average pools whose bins are uneven (:func:`leanseg.onnx_compat.exportable`).
    """
    was_training = model.training
    model.eval()
    exported = exportable(model)[0] if dynamic_axes is None else model
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                _Logits(exported),
                (images,),
                buffer,
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()


class OrtRun:
    """One onnxruntime session of a model on fixed input; calling it times one ``run``.

    ``threads`` intra-op threads (inter-op 1, sequential), thread spinning off so that idle
    pools do not take cores from whatever runs next (another session, a torch model).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, threads: int) -> None:
        if threads < 1:
            raise ConfigError(f"--threads: got {threads}; must be >= 1")
        self.ort = require_onnxruntime()
        self.providers = ["CPUExecutionProvider"]
        if images.device.type == "cuda":
            if "CUDAExecutionProvider" not in self.ort.get_available_providers():
                raise ConfigError(
                    "--backend onnxruntime on a CUDA device needs onnxruntime-gpu "
                    "(CUDAExecutionProvider); run on the CPU or install it"
                )
            self.providers = ["CUDAExecutionProvider"]
        self.threads = threads
        self.onnx = export_onnx(model, images)
        self.session = self._session()
        self.feed = {"image": images.detach().cpu().numpy()}

    def _session(self, profile_prefix: str | None = None) -> Any:
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return self.ort.InferenceSession(self.onnx, options, providers=self.providers)

    def profile(self, runs: int, warmup: int = 2, top: int = 10) -> dict[str, Any]:
        """Kernel time per run by op type and of the ``top`` nodes (ms, mean over ``runs``
        profiled runs after ``warmup``), from a separate profiling session of the same model."""
        if runs < 1 or warmup < 0:
            raise ValueError(f"profile: need runs >= 1 and warmup >= 0, got {runs} / {warmup}")
        with tempfile.TemporaryDirectory() as tmp:
            session = self._session(str(Path(tmp) / "ort"))
            for _ in range(warmup + runs):
                session.run(None, self.feed)
            events = json.loads(Path(session.end_profiling()).read_text())
        starts = sorted(
            (e["ts"], e["dur"])
            for e in events
            if e.get("cat") == "Session" and e.get("name") == "model_run"
        )[warmup:]
        since = starts[0][0]
        by_op: Counter[str] = Counter()
        by_node: Counter[str] = Counter()
        for event in events:
            if event.get("cat") != "Node" or event["ts"] < since:
                continue
            if not event["name"].endswith("_kernel_time"):
                continue
            op = event["args"]["op_name"]
            by_op[op] += event["dur"]
            by_node[f"{op} {event['name'].removesuffix('_kernel_time')}"] += event["dur"]
        per_run = 1 / (1000 * len(starts))  # microseconds in total -> ms per run
        return {
            "runs": runs,
            "model_run_ms_median": float(np.median([d for _, d in starts])) / 1000,
            "by_op_type_ms": {k: v * per_run for k, v in by_op.most_common()},
            "top_nodes_ms": {k: v * per_run for k, v in by_node.most_common(top)},
        }

    def run(self) -> np.ndarray:
        """One inference; the logits as a numpy array."""
        return self.session.run(None, self.feed)[0]

    def __call__(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - start

    def backend(self) -> dict[str, Any]:
        """What the figures were measured with."""
        provider = self.session.get_providers()[0]
        return {
            "name": "onnxruntime",
            "onnxruntime": self.ort.__version__,
            "execution_provider": provider,
            "graph_optimization": "ORT_ENABLE_ALL",
            "exported_with": f"torch {torch.__version__} (torch.onnx.export, dynamo=False)",
            "device": "cuda" if provider == "CUDAExecutionProvider" else "cpu",
            "threads": self.threads,
            "thread_spinning": False,
        }
