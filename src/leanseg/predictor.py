"""One-image (and list) inference: ``Predictor.from_checkpoint(path)(image) -> label map``.

The Predictor is the one object that turns a leanseg checkpoint into predictions: it rebuilds
the model (every kind of checkpoint :func:`~leanseg.checkpoint.model_from_checkpoint`
rebuilds), keeps the checkpoint's class names, palette and ``eval`` settings (whole image,
sliding window, multi-scale + flip; overridable), normalises images the way training did and
returns label maps at the input size. ``leanseg predict`` goes through it.

::

    from leanseg import Predictor
    predictor = Predictor.from_checkpoint("runs/x/best.pt")
    labels = predictor("street.jpg")              # HxW int64 array
    probs = predictor.predict_proba(image_array)  # KxHxW float32, image: HxWx3 uint8 RGB
    many = predictor(["a.png", "b.png"])          # a list of label maps (batched by size)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint
from leanseg.config import Config, inference_options, load_config
from leanseg.data.image_io import read_image
from leanseg.data.normalization import (
    Stats,
    data_normalization,
    dataset_normalization,
    recorded_normalization,
)
from leanseg.data.transforms import ToTensorNormalize
from leanseg.engine.inference import predict_probs
from leanseg.engine.precision import resolve_compute
from leanseg.engine.predict import checkpoint_palette
from leanseg.engine.runtime import select_device
from leanseg.errors import DataError
from leanseg.fuse import fuse_bn

Image = np.ndarray | str | os.PathLike


class Predictor:
    """A model with its class names, palette, device and inference settings."""

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: Sequence[str],
        palette: np.ndarray,
        device: torch.device,
        inference: dict[str, Any] | None = None,
        batch_size: int = 8,
        config: Config | None = None,
        precision: str = "fp32",
        channels_last: str = "false",
        normalization: Stats | None = None,
    ) -> None:
        """``inference``: :func:`~leanseg.engine.inference.predict_probs` options (mode,
        scales, flip, crop_size, stride, base_size); ``batch_size``: images of the same size
        run together, this many at a time; ``config``: the settings it was made from (kept as
        :attr:`config`, e.g. for ``leanseg eval``'s data); ``precision`` / ``channels_last``:
        as ``train.precision`` / ``train.channels_last``, resolved for the device
        (:attr:`compute`); ``normalization``: the ``(mean, std)`` the model was trained on
        (None: ImageNet's)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
        self.class_names = list(class_names)
        self.palette = palette
        self._compute_settings = (precision, channels_last)
        self.model = model.eval()
        self.to(device)
        self.inference = dict(inference or {})
        self.batch_size = batch_size
        self.config = config
        self.normalization = normalization or dataset_normalization(None)
        self._to_tensor = ToTensorNormalize(*self.normalization)

    @property
    def num_classes(self) -> int:
        """How many classes the model predicts."""
        return len(self.class_names)

    def to(self, device: torch.device | str) -> Predictor:
        """Move the model to ``device``, in the precision and layout chosen for it (returns
        self)."""
        self.device = torch.device(device)
        self.compute = resolve_compute(*self._compute_settings, self.device, self.model)
        self.model = self.compute.prepare(self.model.to(self.device))
        return self

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        config: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        batch_size: int = 8,
    ) -> Predictor:
        """A Predictor from a ``best.pt`` / ``last.pt`` (or a shrunk checkpoint) or a
        ``leanseg export`` ``.onnx`` file (run in onnxruntime). Its settings come from the
        checkpoint's config (an ONNX file has none: the defaults), or from the YAML ``config``
        instead, then ``overrides`` (dotted keys, e.g. ``["eval.flip=true"]``).
        ``eval.fuse_bn=true`` runs a checkpoint's model with BatchNorm folded into its convs
        (:func:`leanseg.fuse_bn`, channels_last), the same predictions up to float rounding."""
        source = str(path)
        if source.endswith(".onnx"):
            return cls._from_onnx(Path(path), device, config, overrides, batch_size)
        payload = load_checkpoint(path)
        base = None if config is not None else payload["config"]
        cfg = load_config(config, list(overrides), base=base)
        normalization = recorded_normalization(payload)  # the model's, whatever the config says
        cfg.data.mean, cfg.data.std = (list(v) for v in normalization)  # e.g. leanseg eval's data
        model = model_from_checkpoint(payload, source).eval()
        if cfg.eval.fuse_bn:
            height = cfg.data.crop_size
            example = torch.randn(1, 3, height, cfg.data.crop_width or height)
            model = fuse_bn(model, example_input=example)
        names = payload.get("class_names") or [str(i) for i in range(payload["num_classes"])]
        return cls(
            model,
            class_names=names,
            palette=checkpoint_palette(payload, source),
            device=select_device(device if device != "auto" else cfg.train.device),
            inference=inference_options(cfg.eval),
            batch_size=batch_size,
            config=cfg,
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
            normalization=normalization,
        )

    @classmethod
    def _from_onnx(
        cls,
        path: Path,
        device: str,
        config: str | os.PathLike | None,
        overrides: Sequence[str],
        batch_size: int,
    ) -> Predictor:
        """An ONNX export: class names and palette from its metadata; a fixed-size export
        predicts by sliding windows of its size (any image size), a dynamic one whole."""
        from leanseg.export import read_metadata
        from leanseg.onnx_model import OnnxSegmenter

        if not path.is_file():
            raise DataError(f"'{path}' not found: pass a leanseg export .onnx file")
        try:
            metadata = read_metadata(path)
        except Exception as err:  # onnx raises its own decode errors
            raise DataError(
                f"'{path}' is not a readable ONNX file ({type(err).__name__})"
            ) from None
        if "num_classes" not in metadata:
            raise DataError(f"'{path}' has no leanseg metadata; export it with `leanseg export`")
        cfg = load_config(config, list(overrides))
        recorded = metadata.get("input_normalization") or {}
        normalization = data_normalization(cfg.data)  # exports older than the metadata: config
        if recorded.get("mean") is not None and recorded.get("std") is not None:
            normalization = tuple(map(float, recorded["mean"])), tuple(map(float, recorded["std"]))
        cfg.data.mean, cfg.data.std = (list(v) for v in normalization)
        inference = inference_options(cfg.eval)
        size = metadata.get("input_size", "dynamic")
        if size != "dynamic" and not any(o.startswith("eval.mode=") for o in overrides):
            h, w = int(size[0]), int(size[1])  # windows of the export size, 2/3 overlap
            inference.update(
                mode="slide", crop_size=(h, w), stride=(-(-2 * h // 3), -(-2 * w // 3))
            )
        torch_device = select_device(device if device != "auto" else cfg.train.device)
        return cls(
            OnnxSegmenter(path, metadata, torch_device),
            class_names=metadata.get("class_names")
            or [str(i) for i in range(int(metadata["num_classes"]))],
            palette=np.asarray(metadata["palette"], np.uint8).reshape(-1, 3),
            device=torch_device,
            inference=inference,
            batch_size=batch_size,
            config=cfg,
            normalization=normalization,
        )

    # ------------------------------------------------------------------ prediction

    def __call__(self, images: Image | Sequence[Image]) -> np.ndarray | list[np.ndarray]:
        """Label maps (``HxW`` int64, at each image's size) of one image or a list."""
        probs = self.predict_proba(images)
        if isinstance(probs, list):
            return [p.argmax(0) for p in probs]
        return probs.argmax(0)

    def predict_proba(self, images: Image | Sequence[Image]) -> np.ndarray | list[np.ndarray]:
        """Class probabilities (``KxHxW`` float32) of one image or a list of them."""
        if _is_single(images):
            return self._batch([self._array(images)])[0]
        arrays = [self._array(image) for image in images]
        result: list[np.ndarray | None] = [None] * len(arrays)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, array in enumerate(arrays):
            by_size.setdefault(array.shape[:2], []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, probs in zip(chunk, self._batch([arrays[i] for i in chunk]), strict=True):
                    result[i] = probs
        return result  # type: ignore[return-value]

    @torch.no_grad()
    def _batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [self._to_tensor(a, np.zeros(a.shape[:2], np.uint8))[0] for a in arrays]
        batch = self.compute.images(torch.stack(tensors).to(self.device))
        with self.compute.autocast(self.device):
            probs = predict_probs(self.model, batch, **self.inference)
        return list(probs.float().cpu().numpy())

    def _array(self, image: Image) -> np.ndarray:
        """An ``HxWx3`` uint8 RGB array from an array or an image file."""
        if isinstance(image, (str, os.PathLike)):
            return read_image(Path(image))
        if not isinstance(image, np.ndarray):
            raise DataError(
                f"image: got {type(image).__name__}; pass an HxWx3 uint8 RGB array or a path"
            )
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"image: got a {image.dtype} array of shape {image.shape}; pass HxWx3 uint8 RGB"
            )
        return image


def _is_single(images: Any) -> bool:
    """Anything but a list or tuple is one image (checked by ``Predictor._array``)."""
    return not isinstance(images, (list, tuple))
