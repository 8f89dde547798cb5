"""``leanseg export``: a checkpoint as a self-describing ONNX file, checked against torch.

:func:`export_checkpoint` rebuilds the checkpoint's model (every kind that
:func:`~leanseg.checkpoint.model_from_checkpoint` reads), exports its eval-mode main
logits with the TorchScript exporter (:func:`leanseg.ort_latency.export_onnx`), records what a
consumer needs in the model's ``metadata_props`` (:func:`read_metadata` reads them back), runs
the file in onnxruntime next to torch and keeps it only when the logits agree within
``tolerance``. The file is written through a temporary file and a rename in its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from leanseg import __version__, ort_latency
from leanseg.errors import ConfigError, LeansegError

DEFAULT_TOLERANCE = 1e-4
METADATA_KEYS = (
    "leanseg_version",
    "model",
    "num_classes",
    "class_names",
    "palette",
    "input_normalization",
    "input_size",
    "dynamic_axes",
    "source_checkpoint_sha256",
    "opset",
)
_JSON_KEYS = ("num_classes", "class_names", "palette", "input_normalization", "input_size")
_JSON_KEYS += ("dynamic_axes", "opset")


class ExportError(LeansegError):
    """An export whose ONNX model does not reproduce the torch model's logits."""


@dataclass
class ParityCheck:
    """ONNX vs torch logits on one input."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    argmax_agreement: float
    logit_scale: float = 0.0  # max |torch logit|
    error: str | None = None  # why onnxruntime could not run this input

    def within(self, tolerance: float) -> bool:
        """``max_abs_diff <= tolerance * max(1, logit_scale)`` (float32 error grows with the
        logits' magnitude, which untrained or deep models make anything up to 1e4)."""
        return self.max_abs_diff <= tolerance * max(1.0, self.logit_scale)


@dataclass
class ExportReport:
    """What :func:`export_checkpoint` wrote and how closely onnxruntime matched torch."""

    output: Path
    model: str
    opset: int
    input_shape: tuple[int, ...]
    dynamic: bool
    tolerance: float
    checks: list[ParityCheck] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float:
        """The largest absolute logit difference over all checks."""
        return max(check.max_abs_diff for check in self.checks)

    @property
    def logit_scale(self) -> float:
        """The largest absolute torch logit over all checks."""
        return max(check.logit_scale for check in self.checks)

    @property
    def argmax_agreement(self) -> float:
        """The smallest fraction of equal argmax labels over all checks."""
        return min(check.argmax_agreement for check in self.checks)

    def format(self) -> str:
        """One line for the terminal."""
        shape = "x".join(map(str, self.input_shape))
        if self.dynamic:
            sizes = sorted({"x".join(map(str, c.shape)) for c in self.checks})
            shape = f"dynamic Nx3xHxW, checked at {' and '.join(sizes)}"
        return (
            f"wrote {self.output} (opset {self.opset}, {shape}): max |logit diff| "
            f"{self.max_abs_diff:.1e} (logits up to {self.logit_scale:.3g}), argmax agreement "
            f"{100 * self.argmax_agreement:.2f}%"
        )


def require_onnx() -> ModuleType:
    """The ``onnx`` module, or a one-line ConfigError naming the ``[deploy]`` extra."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            f"leanseg export needs the onnx package (the [deploy] extra): "
            f"{ort_latency.INSTALL_HINT}"
        ) from None
    return onnx


def _require_onnxruntime() -> ModuleType:
    try:
        return ort_latency.require_onnxruntime()
    except ConfigError:
        raise ConfigError(
            f"leanseg export needs the onnxruntime package (the [deploy] extra) to check the "
            f"exported model: {ort_latency.INSTALL_HINT}"
        ) from None


def input_normalization(payload: dict[str, Any]) -> dict[str, Any]:
    """How leanseg turns an image into the model's input, for the checkpoint's dataset.

    As :class:`leanseg.data.transforms.ToTensorNormalize`: an RGB uint8 image (0-255), per
    channel ``(pixel - 255 * mean) / (255 * std)``, i.e. ``(pixel / 255 - mean) / std``, as a
    float32 ``N x 3 x H x W`` tensor. The recorded ``data.mean`` / ``data.std``, else the
    dataset's (ImageNet statistics, CIFAR-10's for ``cifar10`` runs).
    """
    from leanseg.data.normalization import data_normalization

    mean, std = data_normalization(_config(payload).get("data", {}))
    return {
        "color_order": "RGB",
        "pixel_range": "0-255 (uint8)",
        "formula": "x = (pixel / 255 - mean) / std",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "layout": "NCHW",
        "dtype": "float32",
    }


def _config(payload: dict[str, Any]) -> dict[str, Any]:
    config = payload.get("config")
    return config if isinstance(config, dict) else {}


def checkpoint_size(payload: dict[str, Any], source: str) -> tuple[int, int]:
    """The training crop ``(H, W)`` a checkpoint's config records (``data.crop_size`` /
    ``data.crop_width``); a one-line ConfigError when it records none."""
    data = _config(payload).get("data", {})
    height = data.get("crop_size") if isinstance(data, dict) else None
    if not isinstance(height, int) or height < 1:
        raise ConfigError(
            f"checkpoint '{source}' records no data.crop_size: pass --size H W (or --dynamic)"
        )
    width = data.get("crop_width") or height
    return height, int(width)


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The leanseg metadata of an ONNX file written by :func:`export_checkpoint`, decoded
    (JSON values parsed); other ``metadata_props`` entries are returned as strings."""
    onnx = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    metadata: dict[str, Any] = {}
    for prop in model.metadata_props:
        metadata[prop.key] = json.loads(prop.value) if prop.key in _JSON_KEYS else prop.value
    return metadata


def _check_paths(checkpoint: Path, output: Path, force: bool) -> None:
    from leanseg.engine.run_dir import check_output_file

    if output.resolve() == checkpoint.resolve() or (
        output.exists() and checkpoint.exists() and os.path.samefile(output, checkpoint)
    ):
        raise ConfigError(
            f"-o '{output}' is the checkpoint itself: pass another path for the ONNX file"
        )
    check_output_file(output, "-o")
    if output.exists() and not force:
        raise ConfigError(f"-o '{output}' exists: pass --force to replace it, or another path")


def _size(size: Any, what: str = "--size") -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: got {size!r}; give two positive integers H W") from None
    if height < 1 or width < 1:
        raise ConfigError(f"{what} {height} {width}: H and W must be positive")
    return height, width


def sample_inputs(
    payload: dict[str, Any], height: int, width: int, batch: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Check inputs ``batch x 3 x height x width``: N(0, 1) noise, and synthetic-dataset
    images (:func:`leanseg.data.synthetic.render_sample`) resized and normalised like leanseg's
    data."""
    import cv2

    from leanseg.data.synthetic import render_sample

    norm = input_normalization(payload)
    mean = np.asarray(norm["mean"], np.float32) * 255.0
    scale = 1.0 / (np.asarray(norm["std"], np.float32) * 255.0)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(batch):
        image, _ = render_sample(rng)
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        images.append(((image.astype(np.float32) - mean) * scale).transpose(2, 0, 1))
    return {
        "noise": torch.randn(batch, 3, height, width, generator=generator),
        "synthetic": torch.from_numpy(np.ascontiguousarray(np.stack(images))),
    }


def _session(ort: ModuleType, path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # fatal only: a failed run is reported as one line
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(name: str, session: Any, model: nn.Module, x: torch.Tensor) -> ParityCheck:
    with torch.no_grad():
        expected = ort_latency._Logits(model)(x).float().numpy()
    (got,) = session.run(["logits"], {"image": x.numpy()})
    if got.shape != expected.shape:
        return ParityCheck(name, tuple(x.shape), float("inf"), 0.0)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(got).all():
        max_diff = float("inf")
    agree = float((got.argmax(1) == expected.argmax(1)).mean()) if expected.ndim >= 2 else 1.0
    return ParityCheck(name, tuple(x.shape), max_diff, agree, scale)


def _unit(check: ParityCheck) -> str:
    return f"max(1, max |logit| {check.logit_scale:.3g})"


def _difference(check: ParityCheck) -> str:
    """How ``check`` failed, for an error message."""
    shape = "x".join(map(str, check.shape))
    if check.error is not None:
        return f"onnxruntime cannot run it at {shape} ({check.error})"
    diff = f"{check.max_abs_diff:.3g}"
    return f"at {shape} ({check.name} input) the ONNX logits differ from torch by {diff}"


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence file descriptors 1 and 2 (C++ writes): the TorchScript exporter's ONNX log,
    which torch leaves on, dumps the whole graph to stdout when an export fails."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = []
    try:
        with open(os.devnull, "w") as devnull:
            for fd in (1, 2):
                try:
                    copy = os.dup(fd)
                except OSError:  # not open: nothing to silence
                    continue
                saved.append((fd, copy))
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:160]


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    size: tuple[int, int] | None = None,
    dynamic: bool = False,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> ExportReport:
    """Export a leanseg checkpoint's model (its main logits, eval mode) to ``output`` (ONNX).

    ``size`` ``(H, W)``: the fixed input size (default: the config's training crop). With
    ``dynamic`` the batch, height and width axes are symbolic (``size``, if given, is the
    traced and first checked size); a model that does not export, or whose ONNX logits differ,
    at a second size is a one-line ConfigError telling to pass a fixed size instead.

    onnxruntime (CPU) and torch then run on N(0, 1) noise and on synthetic images normalised
    like leanseg's data; when the largest absolute logit difference exceeds ``tolerance``
    times ``max(1, max |torch logit|)`` nothing is kept (:class:`ExportError`). An existing
    ``output`` is replaced only with ``force``, atomically; it may never be the checkpoint.
    """
    from leanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from leanseg.engine.predict import checkpoint_palette

    checkpoint, output = Path(checkpoint), Path(output)
    if not tolerance >= 0:
        raise ConfigError(f"--tolerance: got {tolerance}; must be >= 0")
    if opset is not None and opset < 7:
        raise ConfigError(f"--opset: got {opset}; must be >= 7")
    _check_paths(checkpoint, output, force)
    onnx = require_onnx()
    ort = _require_onnxruntime()
    payload = load_checkpoint(checkpoint)
    source = str(checkpoint)
    height, width = _size(size) if size is not None else checkpoint_size(payload, source)
    model = model_from_checkpoint(payload, source).eval()
    num_classes = int(payload["num_classes"])
    example = sample_inputs(payload, height, width)
    with torch.no_grad():
        out_ndim = ort_latency._Logits(model)(example["noise"]).ndim
    axes = None
    if dynamic:
        spatial = {0: "batch", 2: "height", 3: "width"}
        axes = {"image": spatial, "logits": spatial if out_ndim == 4 else {0: "batch"}}
    how = "with dynamic sizes" if dynamic else f"at {height}x{width}"
    try:
        with warnings.catch_warnings(), _quiet_native_output():
            warnings.simplefilter("ignore")
            data = ort_latency.export_onnx(model, example["noise"], dynamic_axes=axes, opset=opset)
    except Exception as err:  # the exporter raises many types for unsupported graphs
        hint = "; pass --size H W for a fixed-size export instead" if dynamic else ""
        hint = hint or "; another --size may fit the model (e.g. PSPNet's pooling bins)"
        raise ConfigError(
            f"model {payload['model']!r} cannot be exported to ONNX {how} ({_reason(err)}){hint}"
        ) from None
    proto = onnx.load_from_string(data)
    used_opset = next(
        (int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset or 0
    )
    palette = checkpoint_palette(payload, source)
    if palette.shape[0] > num_classes:
        palette = palette[:num_classes]
    class_names = payload.get("class_names") or [str(i) for i in range(num_classes)]
    metadata = {
        "leanseg_version": __version__,
        "model": str(payload["model"]),
        "num_classes": num_classes,
        "class_names": [str(name) for name in class_names],
        "palette": palette.tolist(),
        "input_normalization": input_normalization(payload),
        "input_size": "dynamic" if dynamic else [height, width],
        "dynamic_axes": axes or {},
        "source_checkpoint_sha256": sha256_file(checkpoint),
        "opset": used_opset,
    }
    del proto.metadata_props[:]
    for key in METADATA_KEYS:
        value = metadata[key]
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value) if key in _JSON_KEYS else str(value)
    proto.producer_name, proto.producer_version = "leanseg", __version__

    report = ExportReport(
        output=output,
        model=str(payload["model"]),
        opset=used_opset,
        input_shape=(1, 3, height, width),
        dynamic=dynamic,
        tolerance=tolerance,
        metadata=metadata,
    )
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(proto.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        report.checks = _parity(ort, Path(tmp), model, payload, height, width, dynamic, how)
        failed = [c for c in report.checks if not c.within(tolerance)]
        if failed:
            worst = max(failed, key=lambda c: c.max_abs_diff)
            bound = f"tolerance {tolerance:g} x {_unit(worst)}"
            if dynamic and worst.shape[2:] != (height, width):
                raise ConfigError(
                    f"model {payload['model']!r} does not export with dynamic sizes: "
                    f"{_difference(worst)}{'' if worst.error else f' ({bound})'}; pass --size "
                    "H W for a fixed-size export "
                    "instead; nothing was written"
                )
            if worst.error is not None:
                raise ExportError(
                    f"ONNX export of {payload['model']!r} is unusable: {_difference(worst)}; "
                    "nothing was written"
                )
            shape = "x".join(map(str, worst.shape))
            raise ExportError(
                f"ONNX export of {payload['model']!r} does not match torch: max |logit diff| "
                f"{worst.max_abs_diff:.3g} > {bound} at {shape} ({worst.name} input); nothing "
                "was written (raise --tolerance to keep it anyway)"
            )
        os.replace(tmp, output)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return report


def _parity(
    ort: ModuleType,
    path: Path,
    model: nn.Module,
    payload: dict[str, Any],
    height: int,
    width: int,
    dynamic: bool,
    how: str,
) -> list[ParityCheck]:
    """Torch vs onnxruntime on the check inputs (for ``dynamic`` also batch 2 at a second
    size); an input onnxruntime cannot run counts as an infinite difference."""
    try:
        session = _session(ort, path)
    except Exception as err:
        raise ExportError(
            f"onnxruntime cannot load the exported model {how} ({_reason(err)}); nothing was "
            "written"
        ) from None
    runs = [(1, height, width)]
    if dynamic:
        runs.append((2, height + 32, width + 16))
    checks = []
    for batch, h, w in runs:
        for name, x in sample_inputs(payload, h, w, batch=batch, seed=batch).items():
            try:
                checks.append(_compare(name, session, model, x))
            except Exception as err:  # onnxruntime's shape errors: not size-independent
                shape = tuple(x.shape)
                checks.append(ParityCheck(name, shape, float("inf"), 0.0, error=_reason(err)))
    return checks
