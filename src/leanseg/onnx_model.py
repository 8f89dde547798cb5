"""An exported ``.onnx`` file as a segmentation model: ``forward(x) -> {"out": logits}``.

So that the Predictor (and with it ``leanseg predict``) runs an ONNX export with the same pre-
and post-processing as a checkpoint: whole image, sliding window, multi-scale + flip. A
fixed-size export runs one image at a time; an input of another size is a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanseg.errors import CheckpointError, DataError
from leanseg.ort_latency import require_onnxruntime


class OnnxSegmenter(nn.Module):
    """onnxruntime session of a ``leanseg export`` file, with its metadata."""

    def __init__(self, path: str | Path, metadata: dict[str, Any], device: torch.device) -> None:
        super().__init__()
        ort = require_onnxruntime()
        self.path, self.metadata = str(path), metadata
        size = metadata.get("input_size", "dynamic")
        self.size = None if size == "dynamic" else (int(size[0]), int(size[1]))
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors are reported as one line by the caller
        try:
            self.session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else "unknown"
            raise CheckpointError(
                f"'{self.path}' cannot be loaded by onnxruntime ({reason}); export it again "
                "with `leanseg export`"
            ) from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            h, w = self.size
            raise DataError(
                f"'{self.path}' was exported for {h}x{w} input, got {x.shape[-2]}x{x.shape[-1]}: "
                f"predict with eval.mode=slide eval.crop_size=[{h},{w}] (the default for a "
                "fixed-size export), or export with --dynamic"
            )
        images = [x] if self.size is None else list(x.split(1))
        outs = [self.session.run(None, {self.input_name: i.cpu().numpy()})[0] for i in images]
        return {"out": torch.cat([torch.from_numpy(o) for o in outs]).to(x.device)}
