"""Published ImageNet weights by name: a local HTTP server stands in for download.pytorch.org.

The table entry of ``resnet18.IMAGENET1K_V1`` is pointed at a generated quarter-width ResNet-18
file (named like torchvision's, with its own SHA-256 prefix) and ``$LEANSEG_WEIGHTS_URL`` at the
server; everything else (cache, Range resume, hash check, errors) is the real code path.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from leanseg import CheckpointError, build_model, load_pretrained
from leanseg.errors import ConfigError
from leanseg.models import weights_hub
from leanseg.models.backbones import build_backbone
from leanseg.models.pretrained import backbone_arch, weights_name

NAME = "resnet18.IMAGENET1K_V1"


@dataclass
class FileServer:
    """What the handler serves and what it was asked for."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    ranges: bool = True  # answer Range requests with 206
    truncate: int | None = None  # send only this many body bytes, then close


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state: FileServer = self.server.state
        wanted = self.headers.get("Range")
        state.requests.append((self.path, wanted))
        body = state.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if wanted and state.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        data = body[start:]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data if state.truncate is None else data[: state.truncate])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FileServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = FileServer(url=f"http://127.0.0.1:{httpd.server_address[1]}/models")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"


@dataclass
class Published:
    file: str
    data: bytes
    state_dict: dict[str, torch.Tensor]
    cache: Path  # $LEANSEG_CACHE/weights


@pytest.fixture
def published(server, tmp_path, monkeypatch) -> Published:
    """A quarter-width resnet18 file served as ``resnet18.IMAGENET1K_V1``."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width_mult=0.25)
    state_dict = {
        k: torch.randn(v.shape) if v.is_floating_point() else v
        for k, v in backbone.state_dict().items()
    }
    state_dict |= {"fc.weight": torch.randn(10, 128), "fc.bias": torch.randn(10)}
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    data = buffer.getvalue()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    file = f"resnet18-{prefix}.pth"
    server.files[f"models/{file}"] = data
    monkeypatch.setitem(weights_hub.IMAGENET_WEIGHTS, NAME, weights_hub.WeightsFile(file, prefix))
    monkeypatch.setitem(weights_hub.FULL_WIDTH, "resnet18", ("bn1.weight", 16))
    monkeypatch.setenv("LEANSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(weights_hub.URL_ENV, server.url)
    return Published(file, data, state_dict, tmp_path / "cache" / "weights")


def tiny_model() -> torch.nn.Module:
    return build_model("deeplabv3plus_resnet18", 3, width_mult=0.25, channels=16)


def assert_loaded(model: torch.nn.Module, published: Published) -> None:
    own = model.backbone.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(own[key], published.state_dict[key]), key


def test_imagenet_downloads_checks_caches_and_loads(published, server, monkeypatch, capsys):
    model = tiny_model()
    report = load_pretrained(model, "imagenet", model_name="deeplabv3plus_resnet18")
    cached = published.cache / published.file
    assert cached.read_bytes() == published.data
    assert sorted(p.name for p in published.cache.iterdir()) == [published.file]  # no .part
    assert server.requests == [(f"/models/{published.file}", None)]
    assert report.target == "backbone" and report.path == str(cached)
    assert len(report.loaded) == len(model.backbone.state_dict()) and not report.missing
    assert report.ignored == ["fc.weight", "fc.bias"]
    assert_loaded(model, published)
    assert f"{server.url}/{published.file}" in capsys.readouterr().out

    monkeypatch.setenv(weights_hub.URL_ENV, closed_port_url())  # the cache needs no network
    again = tiny_model()
    assert load_pretrained(again, NAME).path == str(cached)
    assert_loaded(again, published)
    assert len(server.requests) == 1 and "downloading" not in capsys.readouterr().out


def test_hash_mismatch_leaves_nothing_in_the_cache(published, monkeypatch):
    wrong = "0" * 8 if not published.file.startswith("resnet18-0") else "f" * 8
    monkeypatch.setitem(
        weights_hub.IMAGENET_WEIGHTS, NAME, weights_hub.WeightsFile(published.file, wrong)
    )
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tiny_model(), "imagenet")
    message = str(info.value)
    assert "\n" not in message and "SHA-256" in message and wrong in message
    assert published.file in message and str(published.cache / published.file) in message
    assert list(published.cache.iterdir()) == []


def test_truncated_transfer_keeps_the_part_and_resumes(published, server):
    half = len(published.data) // 2
    server.truncate = half
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tiny_model(), "imagenet")
    message = str(info.value)
    part = published.cache / f"{published.file}.part"
    assert "\n" not in message and f"{half} of {len(published.data)} bytes" in message
    assert str(part) in message and part.stat().st_size == half
    assert not (published.cache / published.file).exists()

    server.truncate = None
    model = tiny_model()
    load_pretrained(model, "imagenet")
    assert server.requests[-1] == (f"/models/{published.file}", f"bytes={half}-")
    assert (published.cache / published.file).read_bytes() == published.data
    assert not part.exists()
    assert_loaded(model, published)


def test_a_server_ignoring_the_range_starts_over(published, server):
    published.cache.mkdir(parents=True)
    (published.cache / f"{published.file}.part").write_bytes(b"stale bytes")
    server.ranges = False  # answers 200 with the whole file
    model = tiny_model()
    load_pretrained(model, "imagenet")
    assert server.requests == [(f"/models/{published.file}", "bytes=11-")]
    assert (published.cache / published.file).read_bytes() == published.data
    assert_loaded(model, published)


def test_a_complete_part_is_checked_and_kept(published, server):
    published.cache.mkdir(parents=True)
    (published.cache / f"{published.file}.part").write_bytes(published.data)  # killed before
    load_pretrained(tiny_model(), "imagenet")  # the move: the server answers 416
    assert server.requests == [(f"/models/{published.file}", f"bytes={len(published.data)}-")]
    assert (published.cache / published.file).read_bytes() == published.data


def test_offline_names_the_url_and_where_to_place_the_file(published, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(weights_hub.URL_ENV, url)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tiny_model(), "imagenet")
    message = str(info.value)
    assert "\n" not in message and f"{url}/{published.file}" in message
    assert f"place it at '{published.cache / published.file}'" in message


def test_a_cached_file_with_another_hash_is_an_error(published):
    published.cache.mkdir(parents=True)
    (published.cache / published.file).write_bytes(b"not the published file")
    with pytest.raises(CheckpointError, match="delete the file") as info:
        load_pretrained(tiny_model(), "imagenet")
    assert str(published.cache / published.file) in str(info.value)


def test_names_paths_and_models_without_a_file(published, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(published.state_dict, tmp_path / "imagenet")  # an existing file wins
    model = tiny_model()
    assert load_pretrained(model, "imagenet").path == "imagenet"
    assert_loaded(model, published)
    with pytest.raises(CheckpointError, match="'weights/missing.pth' not found"):
        load_pretrained(model, "weights/missing.pth")  # paths behave as before
    (tmp_path / "imagenet").unlink()
    cases = [  # model, its options, the spec, a part of the message
        ("deeplabv3plus_resnet18", {"width_mult": 0.25}, "resnet50.IMAGENET1K_V9", "V2, mob"),
        ("pspnet50", {"width_mult": 0.125}, "imagenet", "pspnet50 has semseg's deep-stem"),
        ("fasterseg", {}, "imagenet", "known for fasterseg: give a checkpoint file path"),
        ("segnet", {"width_mult": 0.125}, NAME, "vgg16.IMAGENET1K_V1 or vgg16_bn.IMAGENET1K_V1"),
        ("deeplabv3_resnet18", {"width_mult": 0.5}, NAME, "32 channels, 16 in the file"),
    ]
    for model_name, options, spec, expected in cases:
        with pytest.raises(ConfigError) as info:
            load_pretrained(build_model(model_name, 3, **options), spec, model_name=model_name)
        message = str(info.value)
        assert expected in message and spec in message and "\n" not in message, message
    assert server.requests == []  # all of it decided before any download


@pytest.mark.parametrize(
    ("model_name", "arch"),
    [
        ("deeplabv3_resnet18", "resnet18"),
        ("deeplabv3plus_resnet50", "resnet50"),
        ("deeplabv3_resnet101", "resnet101"),
        ("deeplabv3plus_mobilenetv2", "mobilenet_v2"),
        ("segnet", "vgg16_bn"),
        ("resnet18_cifar", "resnet18"),
        ("pspnet50", "resnet50_deep_stem"),
        ("fasterseg", None),
    ],
)
def test_backbone_of_each_model(model_name, arch):
    options = {} if model_name == "fasterseg" else {"width_mult": 0.125}
    assert backbone_arch(build_model(model_name, 3, **options)) == arch


def test_the_published_table(monkeypatch):
    monkeypatch.delenv(weights_hub.URL_ENV, raising=False)
    for name, entry in weights_hub.IMAGENET_WEIGHTS.items():
        embedded = re.search(r"-([a-f0-9]+)\.", entry.file)  # torch.hub's HASH_REGEX
        assert embedded and embedded.group(1) == entry.sha256 and len(entry.sha256) >= 8, name
        url = weights_hub.weights_url(name)
        assert url == f"https://download.pytorch.org/models/{entry.file}"
        assert name.split(".")[0] in weights_hub.FULL_WIDTH or name.startswith("vgg16.")
    assert set(weights_hub.DEFAULT_WEIGHTS.values()) <= set(weights_hub.IMAGENET_WEIGHTS)
    full = build_model("deeplabv3plus_resnet50", 3, channels=16)  # full width passes the check
    assert weights_name(full, "imagenet") == "resnet50.IMAGENET1K_V1"
    assert weights_name(full, "resnet50.IMAGENET1K_V2") == "resnet50.IMAGENET1K_V2"


def test_cli_offline_is_one_line_and_exit_2_before_any_data(tmp_path):
    url = closed_port_url()
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "LEANSEG_CACHE": str(tmp_path / "cache"),
        weights_hub.URL_ENV: url,
    }
    args = [
        "model.pretrained=imagenet",
        "model.options.width_mult=1.0",
        f"data.root={tmp_path / 'data'}",
        f"train.work_dir={tmp_path / 'runs'}",
        "train.loggers=[]",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "leanseg", "train", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    target = tmp_path / "cache" / "weights" / "resnet18-f37072fd.pth"
    assert lines[0].startswith("leanseg: error: cannot download ")
    assert f"{url}/resnet18-f37072fd.pth" in lines[0] and f"'{target}'" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
