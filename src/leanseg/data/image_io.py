"""Reading images and index masks with one-line :class:`DataError` messages for bad files."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from leanseg.data.palettes import mask_to_pil
from leanseg.errors import DataError

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL = 4096  # the end-of-image marker must lie this close to the end of a complete JPEG


class MissingFileError(DataError):
    """A file that a list or a layout names does not exist."""


class UnreadableFileError(DataError):
    """A file exists but cannot be read or decoded (corrupt, truncated, unsupported mode)."""


class ColourMaskError(DataError):
    """A colour (palette-RGB) mask where an index mask is expected."""


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(
            f"{path}: {what} not found; check the path or the list file"
        ) from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{path}: is a directory, expected an {what} file") from None
    except OSError as e:
        raise UnreadableFileError(
            f"{path}: cannot read {what} ({e.strerror}); check permissions"
        ) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an ``HxWx3`` uint8 RGB array (grey images are expanded to RGB)."""
    path = Path(path)
    data = _read_bytes(path, "image")
    bad = UnreadableFileError(
        f"{path}: cannot decode image (corrupt or not an image); "
        "re-export or remove it from the list file"
    )
    # libjpeg decodes a truncated JPEG into a partly grey image with only a warning: catch it here.
    if data.startswith(_JPEG_SOI) and _JPEG_EOI not in data[-_JPEG_TAIL:]:
        raise bad
    if data.startswith(_JPEG_SOI):
        image, damage = _decode_jpeg(data)
        if damage:
            raise UnreadableFileError(
                f"{path}: damaged JPEG ({damage}); re-export or remove it from the list file"
            )
        if image is None:
            raise bad
        return image
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None:
        raise bad
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_jpeg(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """(RGB image, None), or (None, libjpeg's message) for damaged entropy-coded data.

    libjpeg only *warns* about damaged data ("Corrupt JPEG data: ...", a stray marker) and still
    returns a partly garbled image; OpenCV does not pass the warning on. simplejpeg's strict mode
    turns these warnings into errors (the same libjpeg-turbo decode, identical pixels): a file
    that fails strictly but decodes leniently is damaged. One that fails both ways is left to
    OpenCV (a JPEG variant simplejpeg does not read).
    """
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True), None
    except ValueError as strict_error:
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
        except ValueError:
            pass
        else:
            return None, (str(strict_error).strip().splitlines() or ["damaged data"])[0]
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return (None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)), None


def read_mask(path: str | os.PathLike, *, allow_rgb: bool = False) -> np.ndarray:
    """Read an index mask (palette "P" or grey "L" PNG) as an ``HxW`` uint8 array of class ids.

    With ``allow_rgb`` a colour mask comes back as an ``HxWx3`` uint8 RGB array instead of
    raising :class:`ColourMaskError` (for datasets that convert colours with a palette).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise UnreadableFileError(f"{path}: is a directory, expected a mask file")
        raise MissingFileError(f"{path}: mask not found; check the path or the list file")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if allow_rgb and mode in ("RGB", "RGBA"):
                return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableFileError(
            f"{path}: cannot decode mask ({e}); re-export it or remove it from the list file"
        ) from None
    if mode in ("RGB", "RGBA"):
        raise ColourMaskError(
            f"{path}: is a colour (palette-RGB, mode {mode}) mask but an index mask is expected; "
            "convert it to a palette ('P') or greyscale PNG whose pixel values are class ids"
        )
    raise UnreadableFileError(
        f"{path}: mask has image mode {mode!r}; expected a palette ('P') or 8-bit greyscale ('L') "
        "PNG whose pixel values are class ids"
    )


def write_label_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an ``HxW`` uint8 mask as a single-channel ("L") PNG, atomically (temp + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(tmp, "PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_mask_png(
    path: str | os.PathLike, mask: np.ndarray, palette: np.ndarray | None = None
) -> None:
    """Write an ``HxW`` index mask as a palette PNG (VOC palette unless ``palette`` is given)."""
    mask_to_pil(mask, palette).save(Path(path), format="PNG")


def write_image(path: str | os.PathLike, image: np.ndarray, jpeg_quality: int = 90) -> None:
    """Write an ``HxWx3`` uint8 RGB image; the format follows the file suffix (.jpg, .png)."""
    path = Path(path)
    ext = path.suffix.lower() or ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode an image as {ext!r}")
    path.write_bytes(buf.tobytes())
