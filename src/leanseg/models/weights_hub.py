"""torchvision's published ImageNet files by name, and their verified, resumable download.

Names are ``<backbone>.<torchvision weights>``, e.g. ``resnet50.IMAGENET1K_V2``; ``imagenet``
(resolved in :mod:`leanseg.models.pretrained`) is :data:`DEFAULT_WEIGHTS` of the model's backbone.
Files are cached as ``$LEANSEG_CACHE/weights/<file name>`` (default ``~/.cache/leanseg``);
``$LEANSEG_WEIGHTS_URL`` replaces :data:`TORCHVISION_URL` (a mirror with the same file names).
torchvision embeds the first hex digits of each file's SHA-256 in its name; a download is kept
only when its SHA-256 starts with them (what ``torch.hub``'s ``check_hash`` checks).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from leanseg.cache import default_cache_dir
from leanseg.errors import CheckpointError

TORCHVISION_URL = "https://download.pytorch.org/models/"
URL_ENV = "LEANSEG_WEIGHTS_URL"
TIMEOUT_S = 30.0  # per connect / read
_CHUNK = 1 << 20


class WeightsFile(NamedTuple):
    """A published file: its name under the base URL and the SHA-256 prefix that name embeds."""

    file: str
    sha256: str


# From torchvision.models (resnet.py, mobilenetv2.py, vgg.py: the ``*_Weights`` enums' urls).
IMAGENET_WEIGHTS: dict[str, WeightsFile] = {
    "resnet18.IMAGENET1K_V1": WeightsFile("resnet18-f37072fd.pth", "f37072fd"),
    "resnet50.IMAGENET1K_V1": WeightsFile("resnet50-0676ba61.pth", "0676ba61"),
    "resnet50.IMAGENET1K_V2": WeightsFile("resnet50-11ad3fa6.pth", "11ad3fa6"),
    "resnet101.IMAGENET1K_V1": WeightsFile("resnet101-63fe2227.pth", "63fe2227"),
    "resnet101.IMAGENET1K_V2": WeightsFile("resnet101-cd907fc2.pth", "cd907fc2"),
    "mobilenet_v2.IMAGENET1K_V1": WeightsFile("mobilenet_v2-b0353104.pth", "b0353104"),
    "mobilenet_v2.IMAGENET1K_V2": WeightsFile("mobilenet_v2-7ebf99e0.pth", "7ebf99e0"),
    "vgg16.IMAGENET1K_V1": WeightsFile("vgg16-397923af.pth", "397923af"),
    "vgg16_bn.IMAGENET1K_V1": WeightsFile("vgg16_bn-6c64b313.pth", "6c64b313"),
}

# What ``imagenet`` means per backbone: torchvision's original recipe (V1), the weights its own
# DeepLabV3 / FCN models were trained from; the V2 files are there by name.
DEFAULT_WEIGHTS: dict[str, str] = {
    "resnet18": "resnet18.IMAGENET1K_V1",
    "resnet50": "resnet50.IMAGENET1K_V1",
    "resnet101": "resnet101.IMAGENET1K_V1",
    "mobilenet_v2": "mobilenet_v2.IMAGENET1K_V1",
    "vgg16_bn": "vgg16_bn.IMAGENET1K_V1",
}

# Backbones torchvision publishes no file for: what the user downloads by hand instead.
NOT_PUBLISHED: dict[str, str] = {
    "resnet50_deep_stem": "semseg's deep-stem ResNet-50 (resnet50_v2.pth)",
    "resnet101_deep_stem": "semseg's deep-stem ResNet-101 (resnet101_v2.pth)",
}

# Backbones a file fits besides its own (vgg16 loads into vgg16_bn via vgg16_to_vgg16_bn).
ALSO_FITS: dict[str, tuple[str, ...]] = {"vgg16": ("vgg16_bn",)}

# Per backbone: a state-dict key and its channels at full width, checked before a download.
FULL_WIDTH: dict[str, tuple[str, int]] = {
    "resnet18": ("bn1.weight", 64),
    "resnet50": ("bn1.weight", 64),
    "resnet101": ("bn1.weight", 64),
    "mobilenet_v2": ("features.0.1.weight", 32),
    "vgg16_bn": ("features.0.weight", 64),
}


def cache_dir() -> Path:
    """``$LEANSEG_CACHE/weights`` (default ``~/.cache/leanseg/weights``)."""
    return default_cache_dir() / "weights"


def weights_url(name: str) -> str:
    """The download URL of a named file (``$LEANSEG_WEIGHTS_URL`` replaces torchvision's)."""
    base = os.environ.get(URL_ENV) or TORCHVISION_URL
    return f"{base.rstrip('/')}/{IMAGENET_WEIGHTS[name].file}"


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, *, say: Callable[[str], None] = print) -> Path:
    """The verified local file of weights ``name``: the cached one, else downloaded.

    The download goes to ``<file>.part`` (resumed with an HTTP Range request when the server
    answers 206) and is moved into place only once its SHA-256 matches. Raises CheckpointError,
    one line naming the URL and where to place the file by hand, when it cannot.
    """
    entry = IMAGENET_WEIGHTS[name]
    target = cache_dir() / entry.file
    url = weights_url(name)
    if target.is_file():
        if sha256_of(target).startswith(entry.sha256):
            return target
        raise CheckpointError(
            f"cached weights '{target}' do not match the SHA-256 prefix {entry.sha256} of {url}: "
            "delete the file to download it again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    say(f"downloading {name} from {url} to {target}")
    _download(url, part, target)
    digest = sha256_of(part)
    if not digest.startswith(entry.sha256):
        part.unlink()
        raise CheckpointError(
            f"download of {url} has SHA-256 {digest[:16]}..., not the published prefix "
            f"{entry.sha256}: deleted; run again, or place the right file at '{target}'"
        )
    os.replace(part, target)
    return target


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", err)
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _download(url: str, part: Path, target: Path) -> None:
    """Append the rest of ``url`` to ``part`` (all of it when the server ignores the range)."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "leanseg", **({"Range": f"bytes={have}-"} if have else {})}
    by_hand = f"download it elsewhere and place it at '{target}'"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at the end: the .part is complete
            return
        raise CheckpointError(
            f"cannot download {url} (HTTP {err.code} {err.reason}); check ${URL_ENV} or {by_hand}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise CheckpointError(
            f"cannot download {url} ({_reason(err)}); offline? {by_hand}"
        ) from None
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and not _range_starts_at(response.headers.get("Content-Range"), have):
            part.unlink()
            raise CheckpointError(
                f"download of {url}: the server resumed at another offset than {have}; the "
                f"partial file was deleted: run again, or {by_hand}"
            )
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length and length.isdigit() else None
        size = start
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:  # the network, not the disk
                    raise CheckpointError(
                        f"download of {url} stopped after {size} bytes ({_reason(err)}); run "
                        f"again to resume from '{part}'"
                    ) from None
                if not chunk:
                    break
                out.write(chunk)
                size += len(chunk)
    if expected is not None and size < expected:
        raise CheckpointError(
            f"download of {url} stopped after {size} of {expected} bytes; run again to resume "
            f"from '{part}'"
        )


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return match is not None and int(match.group(1)) == offset
