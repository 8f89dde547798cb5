"""Measure a FasterSeg latency lookup table (LUT) on this machine: key -> ms, batch 1, fp32.

Key grammar (``H``, ``W``: the module's *input* size; every number a positive integer written
without leading zeros, as :func:`~leanseg.methods.fasterseg.latency.spec_latency` writes them):

- ``{Name}_H{h}_W{w}_Cin{a}_Cout{b}_stride{s}_dilation1``, ``s`` 1 or 2, ``Name`` one of
  ``BasicResidual1x`` (conv), ``BasicResidual_downup_1x`` (zoomed conv), ``BasicResidual2x``
  (conv x2), ``BasicResidual_downup_2x`` (zoomed conv x2): ``make_op(op, a, b, s)``.
- ``FactorizedReduce_H{h}_W{w}_Cin{a}_Cout{b}_stride{s}``: stride 2 the ``skip`` op
  (FactorizedReduce, ``b`` even); stride 1 the search supernet's skip, a 1x1 conv-BN-ReLU.
- ``ConvNorm_H{h}_W{w}_Cin{a}_Cout{b}_kernel{k}_stride{s}``: a ``k`` x ``k`` conv-BN-ReLU (``k``
  odd, "same" padding), as the stem's first conv and the aggregation convs.
- ``ff_H{h}_W{w}_C{c}``: the 1x1 fusion conv-BN-ReLU, ``c`` -> ``c``.
- ``head_H{h}_W{w}_Cin{c}_Cout{k}``: the classifier head, 3x3 to ``c`` (``c // 2`` when
  ``c > 256``), then 1x1 to ``k`` classes.

Timing of one key (:func:`measure_entries`): the isolated eval-mode module (Kaiming-normal
weights, BN with its default running statistics) on N(0, 1) input of batch 1 (torch on the CPU:
channels-last, as :class:`~leanseg.models.fasterseg.network.FasterSeg` runs its eval forward
there; 2-3x faster than NCHW for the 3x3 convs); ``warmup``
untimed calls; then the number of calls ``n`` whose loop takes about ``target_seconds`` is
calibrated (doubling from 1, then scaled; at least 1); then ``repeats`` loops of ``n`` calls.
A loop's seconds are the sum of its calls' own timings (:class:`~leanseg.bench_model.
TimedForward`, which synchronises CUDA, or :class:`~leanseg.ort_latency.OrtRun`'s timed
``session.run``); the entry is the median over the repeats of loop seconds / ``n``, in ms.

A table records what it was measured with (:func:`lut_metadata`); a search must price on the
backend and device its table was measured on (:func:`check_table_matches`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanseg.bench_model import TimedForward, num_threads
from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.latency import LUT_FORMAT, OP_KEYS, LatencyTable
from leanseg.models.fasterseg.network import Head, _channels_last_inference
from leanseg.models.fasterseg.ops import ConvBNReLU, make_op
from leanseg.models.layers import init_weights_
from leanseg.ort_latency import OrtRun, require_onnxruntime

Shape = tuple[int, int, int, int]
_N = r"([1-9][0-9]*)"  # a positive integer, no leading zeros
_OPS = {name: op for op, name in OP_KEYS.items() if op != "skip"}
_OP_RE = re.compile(rf"({'|'.join(_OPS)})_H{_N}_W{_N}_Cin{_N}_Cout{_N}_stride([12])_dilation1")
_SKIP_RE = re.compile(rf"{OP_KEYS['skip']}_H{_N}_W{_N}_Cin{_N}_Cout{_N}_stride([12])")
_CONV_RE = re.compile(rf"ConvNorm_H{_N}_W{_N}_Cin{_N}_Cout{_N}_kernel{_N}_stride([12])")
_FF_RE = re.compile(rf"ff_H{_N}_W{_N}_C{_N}")
_HEAD_RE = re.compile(rf"head_H{_N}_W{_N}_Cin{_N}_Cout{_N}")

LUT_BACKENDS = ("torch", "onnxruntime")  # what a latency table can be measured on


def _bad_key(key: str, why: str) -> ConfigError:
    return ConfigError(f"latency table key {key!r}: {why}")


def _build(key: str) -> tuple[Callable[[], nn.Module], int, int, int]:
    """A constructor of ``key``'s module and its input channels, height and width."""
    if m := _OP_RE.fullmatch(key):
        name, h, w, a, b, s = m.group(1), *map(int, m.groups()[1:])
        return (lambda: make_op(_OPS[name], a, b, s)), a, h, w
    if m := _SKIP_RE.fullmatch(key):
        h, w, a, b, s = map(int, m.groups())
        if s == 2:
            return (lambda: make_op("skip", a, b, 2)), a, h, w
        return (lambda: ConvBNReLU(a, b, 1)), a, h, w
    if m := _CONV_RE.fullmatch(key):
        h, w, a, b, k, s = map(int, m.groups())
        if k % 2 == 0:
            raise _bad_key(key, f"kernel {k}: need an odd kernel ('same' padding)")
        return (lambda: ConvBNReLU(a, b, k, stride=s)), a, h, w
    if m := _FF_RE.fullmatch(key):
        h, w, c = map(int, m.groups())
        return (lambda: ConvBNReLU(c, c, 1)), c, h, w
    if m := _HEAD_RE.fullmatch(key):
        h, w, c, k = map(int, m.groups())
        return (lambda: Head(c, c if c <= 256 else c // 2, k)), c, h, w
    raise _bad_key(
        key,
        "not a FasterSeg LUT key ({op}_H_W_Cin_Cout_stride{1|2}_dilation1, "
        "FactorizedReduce_H_W_Cin_Cout_stride, ConvNorm_H_W_Cin_Cout_kernel_stride, ff_H_W_C, "
        "head_H_W_Cin_Cout)",
    )


def module_for_key(key: str) -> tuple[nn.Module, Shape]:
    """The isolated eval-mode module ``key`` prices and its input shape ``(1, C, H, W)``.

    See the module docstring for the key grammar; anything else is a one-line ConfigError.
    """
    make, c, h, w = _build(key)
    try:
        module = make()
    except ValueError as error:  # e.g. a FactorizedReduce to an odd width
        raise _bad_key(key, str(error)) from None
    return module.eval(), (1, c, h, w)


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with Kaiming-normal conv weights (seeded; the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights_(module)
    return module


def _loop_seconds(call: Callable[[], float], n: int) -> float:
    """Seconds of ``n`` timed calls (the sum of their own timings)."""
    return sum(call() for _ in range(n))


def _calibrate(call: Callable[[], float], target_seconds: float) -> int:
    """The number of calls whose loop takes about ``target_seconds`` (at least 1)."""
    n = 1
    while True:
        seconds = _loop_seconds(call, n)
        if seconds >= target_seconds / 4 or n >= 2**20:
            break
        n *= 2
    return max(1, round(n * target_seconds / seconds)) if seconds > 0 else n


def time_call(
    call: Callable[[], float], *, warmup: int, target_seconds: float, repeats: int
) -> float:
    """Milliseconds per call of ``call`` (it returns its own seconds); see the module docstring."""
    for _ in range(warmup):
        call()
    n = _calibrate(call, target_seconds)
    return 1000.0 * statistics.median(_loop_seconds(call, n) / n for _ in range(repeats))


def _timed_call(key: str, backend: str, device: torch.device, threads: int) -> Callable[[], float]:
    """``key``'s module on ``backend`` as a call that returns its own seconds."""
    module, shape = module_for_key(key)
    module = _randomized(module).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=generator).to(device)
    if backend == "onnxruntime":
        with warnings.catch_warnings():  # FactorizedReduce's shifted slice at export
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            return OrtRun(module, images, threads)
    if _channels_last_inference(module, images):  # as FasterSeg.forward runs on the CPU
        images = images.contiguous(memory_format=torch.channels_last)
    return TimedForward(module, images)


def _check_settings(backend: str, threads: int, warmup: int, target: float, repeats: int) -> None:
    if backend not in LUT_BACKENDS:
        raise ConfigError(f"--backend: got {backend!r}; choose one of {list(LUT_BACKENDS)}")
    if threads < 1:
        raise ConfigError(f"--threads: got {threads}; must be >= 1")
    if warmup < 0 or repeats < 1 or not target > 0:
        raise ConfigError(
            f"LUT timing: warmup {warmup}, target_seconds {target}, repeats {repeats}: "
            "need warmup >= 0, target_seconds > 0 and repeats >= 1"
        )


def measure_entries(
    keys: Iterable[str],
    *,
    backend: str,
    device: torch.device,
    threads: int,
    warmup: int = 10,
    target_seconds: float = 0.2,
    repeats: int = 5,
    progress: bool = False,
) -> dict[str, float]:
    """Measure ``keys`` (in order, a duplicate once) on ``backend`` ("torch" | "onnxruntime").

    Every key is parsed before anything is timed. ``threads``: torch's intra-op threads, or the
    onnxruntime session's. Returns key -> ms; timing as in the module docstring.
    """
    _check_settings(backend, threads, warmup, target_seconds, repeats)
    if backend == "onnxruntime":
        require_onnxruntime()
    unique = list(dict.fromkeys(keys))
    for key in unique:
        _build(key)
    from tqdm import tqdm

    timing = {"warmup": warmup, "target_seconds": target_seconds, "repeats": repeats}
    entries: dict[str, float] = {}
    with num_threads(threads):
        for key in tqdm(unique, desc="lut", unit="key", disable=not progress):
            call = _timed_call(key, backend, torch.device(device), threads)
            with torch.inference_mode(backend == "torch"):
                entries[key] = time_call(call, **timing)
    return entries


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def lut_metadata(
    *,
    backend: str,
    device: torch.device | str,
    threads: int,
    size: tuple[int, int],
    num_classes: int,
    warmup: int = 10,
    target_seconds: float = 0.2,
    repeats: int = 5,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a measured table was measured with: backend, device, versions, timing, time.

    The timing arguments are :func:`measure_entries`' (pass the same); ``extra`` is merged in
    last (it may override any field).
    """
    device = torch.device(device)
    versions = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if backend == "onnxruntime":
        versions["onnxruntime"] = require_onnxruntime().__version__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    meta: dict[str, Any] = {
        "format": LUT_FORMAT,
        "version": 1,
        "backend": backend,
        "device": device.type,
        "device_name": name,
        "dtype": "float32",
        "batch": 1,
        "unit": "ms",
        "threads": threads,
        "input_size": [int(n) for n in size],
        "num_classes": num_classes,
        "versions": versions,
        "timing": {
            "warmup": warmup,
            "target_seconds": target_seconds,
            "repeats": repeats,
            "statistic": "median of repeats",
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {**meta, **(extra or {})}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_lut(
    path: str | Path, entries: dict[str, float], meta: dict[str, Any], *, overwrite: bool = False
) -> None:
    """Write ``{**meta, "entries": {sorted key: ms}}`` as JSON, atomically.

    An existing ``path`` is a one-line ConfigError unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(
            f"latency table {str(path)!r} exists; pass --force to overwrite it or choose "
            "another path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**meta, "entries": {k: float(entries[k]) for k in sorted(entries)}}
    _write_atomic(path, json.dumps(data, indent=1) + "\n")


def table_origin(table: LatencyTable) -> tuple[str, str]:
    """The (backend, device) a table was measured with, from its metadata.

    A table leanseg measured records ``backend`` ("torch" | "onnxruntime") and ``device``
    ("cpu" | "cuda"). The shipped original records both as free text ("tensorrt (ONNX -> ...)",
    "unrecorded; a GTX 1080 Ti is inferred"), and its bare reference copy has no metadata at
    all: a ``backend`` counts by its first word, a missing one as "tensorrt"; a ``device`` other
    than "cpu" / "cuda[:i]" (unrecorded) counts as "cuda", the GPU the authors timed on.
    """
    backend = table.meta.get("backend")
    words = re.findall(r"[a-z0-9_-]+", backend.lower()) if isinstance(backend, str) else []
    device = str(table.meta.get("device", "")).split(":")[0].strip().lower()
    return (words[0] if words else "tensorrt"), (device if device in ("cpu", "cuda") else "cuda")


def check_table_matches(table: LatencyTable, *, backend: str, device: str) -> None:
    """One-line ConfigError unless ``table`` was measured on ``backend`` and ``device``.

    ``device``: "cpu", "cuda" or "cuda:i" (or a ``torch.device``); see :func:`table_origin`.
    """
    measured_backend, measured_device = table_origin(table)
    wanted_device = str(device).split(":")[0]
    if (measured_backend, measured_device) != (backend, wanted_device):
        raise ConfigError(
            f"latency table {table.source!r} was measured with {measured_backend} on "
            f"{measured_device}, the search prices {backend} on {wanted_device}: measure one "
            f"with `leanseg search lut` on this backend and device, or price with a matching "
            "backend and device"
        )


__all__ = [
    "check_table_matches",
    "lut_metadata",
    "measure_entries",
    "module_for_key",
    "table_origin",
    "time_call",
    "write_lut",
]
