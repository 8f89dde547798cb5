"""Predict never loses user files; damaged JPEGs are refused; predict uses the dataset palette;
a flat folder dataset needs an explicit split (issue 11: items 4, 5, 14, 15)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from leanseg.checkpoint import save_checkpoint
from leanseg.cli import main
from leanseg.config import Config, to_dict
from leanseg.data.image_io import UnreadableFileError, read_image, write_label_png
from leanseg.data.palettes import voc_palette
from leanseg.engine import predict as predict_module
from leanseg.engine.predict import collect_images, output_stems, prepare_outputs
from leanseg.errors import DataError
from leanseg.models import build_model
from leanseg.viz import overlay

NUM_CLASSES = 3
OPTIONS = {"channels": 16, "width_mult": 0.25}
PALETTE = np.array([[10, 20, 30], [200, 0, 50], [0, 180, 90]], np.uint8)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "leanseg", *args], capture_output=True, text=True, env=env
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def digests(folder: Path) -> dict[str, str]:
    """Name -> SHA-256 of every file under ``folder`` (to prove nothing changed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def textured(h: int, w: int, seed: int = 0, grey: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (5, 5), 0)
    return image[..., 0] if grey else image


def scrambled_jpeg(seed: int = 0) -> bytes:
    """A JPEG with 200 random bytes in the middle of its entropy-coded data; SOI/EOI intact."""
    ok, buf = cv2.imencode(".jpg", textured(128, 160, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    data = bytearray(buf.tobytes())
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    middle = (start + len(data) - 2) // 2
    data[middle : middle + 200] = np.random.default_rng(seed).bytes(200)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    return bytes(data)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint whose payload carries a custom 3-colour palette."""
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_resnet18", NUM_CLASSES, **OPTIONS)
    cfg = Config()
    cfg.model.options = dict(OPTIONS)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(
        path,
        {
            "model": cfg.model.name,
            "num_classes": NUM_CLASSES,
            "model_options": dict(OPTIONS),
            "class_names": ["a", "b", "c"],
            "config": to_dict(cfg),
            "state_dict": model.state_dict(),
            "palette": torch.from_numpy(PALETTE),
        },
    )
    return path


@pytest.fixture()
def inputs(tmp_path) -> Path:
    """``cat.jpg`` and ``cat.png`` (one stem), ``scene.png`` and ``dog.jpg``."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    cv2.imwrite(str(folder / "cat.jpg"), textured(24, 32, 1))
    cv2.imwrite(str(folder / "cat.png"), textured(24, 32, 2))
    cv2.imwrite(str(folder / "scene.png"), textured(20, 28, 3))
    cv2.imwrite(str(folder / "dog.jpg"), textured(16, 16, 4))
    return folder


def predict(checkpoint: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("predict", "--checkpoint", str(checkpoint), "--no-progress", *args)


# -- item 4: never overwrite an input, never two outputs under one name -------------------------


def test_colliding_stems_keep_their_extension(checkpoint, inputs, tmp_path):
    before = digests(inputs)
    out = tmp_path / "new" / "pred"  # missing parents are created
    result = predict(checkpoint, str(inputs), "-o", str(out))
    assert result.returncode == 0, result.stderr
    stems = ["cat_jpg", "cat_png", "dog", "scene"]
    expected = {f"{s}{x}" for s in stems for x in ("", "_color", "_overlay")}
    assert {p.stem for p in out.iterdir()} == expected
    assert digests(inputs) == before
    # a second run into the same output directory replaces its own earlier outputs
    first = digests(out)
    assert predict(checkpoint, str(inputs), "-o", str(out)).returncode == 0
    assert digests(out) == first and digests(inputs) == before
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


def test_output_stems_rule():
    paths = [Path("a/cat.jpg"), Path("a/Cat.png"), Path("a/dog.jpg"), Path("b/dog.jpg")]
    assert output_stems(paths) == ["cat_jpg", "Cat_png", "dog_jpg", "dog_jpg_2"]
    # another input's derived name is not reused: a.jpg writes a_color.png
    assert output_stems([Path("a.jpg"), Path("a_color.png")]) == ["a", "a_color_png"]
    assert output_stems([Path("x.jpg"), Path("y.png")]) == ["x", "y"]


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "file_parent"])
def test_output_dir_that_is_an_input_dir_is_refused(checkpoint, inputs, tmp_path, how):
    before = digests(inputs)
    args = [str(inputs)]
    out = inputs
    if how == "dotdot":
        out = inputs / ".." / inputs.name
    elif how == "symlink":
        out = tmp_path / "link"
        out.symlink_to(inputs, target_is_directory=True)
    elif how == "file_parent":  # single files given: their directory is an input directory
        args = [str(inputs / "scene.png")]
    result = predict(checkpoint, *args, "-o", str(out))
    assert_one_line_error(result, "is the input directory", str(inputs.name), "pass another -o")
    assert digests(inputs) == before


def test_output_that_is_an_input_file_is_refused(checkpoint, inputs, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "dog.png").symlink_to(inputs / "dog.jpg")  # dog.jpg's index PNG would be this
    before = digests(inputs)
    result = predict(checkpoint, str(inputs / "dog.jpg"), "-o", str(out))
    assert_one_line_error(result, "dog.png' is the input file", "dog.jpg")
    assert digests(inputs) == before and (out / "dog.png").is_symlink()


def test_output_dir_that_is_a_file_is_refused(checkpoint, inputs, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    result = predict(checkpoint, str(inputs), "-o", str(target))
    assert_one_line_error(result, "notes.txt' is a file", "-o")
    assert target.read_text() == "keep me"
    result = predict(checkpoint, str(inputs), "-o", str(target / "sub"))  # parent is a file
    assert_one_line_error(result, "cannot write to output directory", "notes.txt")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_output_dir_without_permission_is_refused(checkpoint, inputs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = predict(checkpoint, str(inputs), "-o", str(locked))
    finally:
        locked.chmod(0o700)
    assert_one_line_error(result, "cannot write to output directory", "locked")


def test_unwritable_output_dir_names_it(inputs, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(predict_module.tempfile, "TemporaryFile", denied)  # as for non-root
    with pytest.raises(DataError, match=r"cannot write to output directory '.*ro' \(Permission"):
        prepare_outputs(collect_images([inputs]), tmp_path / "ro")


def test_full_disk_is_one_line(checkpoint, inputs, tmp_path, monkeypatch, capsys):
    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict_module, "write_image", full)
    out = tmp_path / "pred"
    code = main(
        ["predict", "--checkpoint", str(checkpoint), str(inputs / "dog.jpg"), "-o", str(out)],
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "dog_color.png" in err and os.strerror(errno.ENOSPC) in err
    assert not list(out.glob(".*tmp*")), "a partial temporary file was left behind"


# -- item 15: the checkpoint's palette colours the outputs ---------------------------------------


def test_predict_uses_the_checkpoint_palette(checkpoint, inputs, tmp_path):
    out = tmp_path / "pred"
    assert predict(checkpoint, str(inputs / "dog.jpg"), "-o", str(out)).returncode == 0
    index_img = Image.open(out / "dog.png")
    assert index_img.mode == "P"
    assert index_img.getpalette()[: 3 * NUM_CLASSES] == PALETTE.reshape(-1).tolist()
    index = np.asarray(index_img)
    color = np.asarray(Image.open(out / "dog_color.png").convert("RGB"))
    assert np.array_equal(color, PALETTE[index])
    image = read_image(inputs / "dog.jpg")
    got = np.asarray(Image.open(out / "dog_overlay.png").convert("RGB"))
    assert np.array_equal(got, overlay(image, PALETTE[index]))


def test_old_checkpoint_falls_back_to_voc(checkpoint, inputs, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    del payload["palette"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, payload)
    out = tmp_path / "pred"
    assert predict(old, str(inputs / "dog.jpg"), "-o", str(out)).returncode == 0
    palette = np.array(Image.open(out / "dog.png").getpalette()[:768], np.uint8).reshape(-1, 3)
    assert np.array_equal(palette, voc_palette(256))
    payload["palette"] = torch.zeros(4, 2, dtype=torch.uint8)
    save_checkpoint(old, payload)
    result = predict(old, str(inputs / "dog.jpg"), "-o", str(tmp_path / "again"))
    assert_one_line_error(result, "old.pt': palette has shape (4, 2)")


# -- item 5: damaged JPEGs are errors everywhere read_image is used -------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_scrambled_jpeg_is_refused(tmp_path, seed, capfd):
    path = tmp_path / "bad.jpg"
    path.write_bytes(scrambled_jpeg(seed))
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is not None  # plain cv2
    capfd.readouterr()
    with pytest.raises(UnreadableFileError, match=r"bad\.jpg: damaged JPEG \("):
        read_image(path)
    assert "Corrupt JPEG" not in capfd.readouterr().err  # the error says it, not libjpeg
    os.write(2, b"after\n")  # stderr is back where it was
    assert capfd.readouterr().err == "after\n"


def _pil_jpeg(image: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", **options)
    return buf.getvalue()


def valid_jpegs() -> list[tuple[str, bytes]]:
    """JPEGs of many kinds: sizes, grey, progressive, 4:4:4 / 4:2:0, restart markers."""
    out = []
    for i, (h, w) in enumerate([(1, 1), (7, 9), (64, 64), (127, 255), (300, 200), (512, 512)]):
        rgb, grey = textured(h, w, i), textured(h, w, i, grey=True)
        for q in (50, 95):
            out.append(
                (
                    f"cv2-{h}x{w}-q{q}",
                    cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes(),
                )
            )
        out.append((f"cv2-grey-{h}x{w}", cv2.imencode(".jpg", grey)[1].tobytes()))
        rst = [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]
        out.append((f"cv2-rst-{h}x{w}", cv2.imencode(".jpg", rgb, rst)[1].tobytes()))
        out.append((f"pil-grey-{h}x{w}", _pil_jpeg(grey, quality=85)))
        for sub in (0, 2):  # 4:4:4, 4:2:0
            out.append((f"pil-{sub}-{h}x{w}", _pil_jpeg(rgb, subsampling=sub, quality=90)))
            prog = _pil_jpeg(rgb, subsampling=sub, progressive=True, optimize=True)
            out.append((f"pil-prog-{sub}-{h}x{w}", prog))
    return out


def test_valid_jpegs_decode_as_before(tmp_path, capfd):
    for name, data in valid_jpegs():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        plain = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(read_image(path), cv2.cvtColor(plain, cv2.COLOR_BGR2RGB)), name
    assert capfd.readouterr().err == ""


def _voc_like(root: Path, n: int = 3) -> None:
    """A folder dataset with train/ and val/ folders of n samples each (all class 1)."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / f"images/{split}/{i}.jpg"), textured(128, 160, i))
            write_label_png(root / f"masks/{split}/{i}.png", np.ones((128, 160), np.uint8))


def test_scrambled_jpeg_in_training_data_and_data_check(tmp_path, checkpoint):
    root = tmp_path / "data"
    _voc_like(root)
    bad = root / "images/train/1.jpg"
    bad.write_bytes(scrambled_jpeg(3))
    keys = [f"data.root={root}", "data.dataset=folder", "data.num_classes=2"]
    check = run_cli("data", "check", *keys, "--no-progress")
    assert check.returncode == 1 and "NOT OK" in check.stdout, check.stdout + check.stderr
    assert f"{bad}: damaged JPEG" in check.stdout and "Corrupt JPEG" not in check.stderr

    from leanseg.config import load_config
    from leanseg.data.build import build_dataset

    dataset = build_dataset(load_config(None, keys).data, "train", train=True)
    with pytest.raises(UnreadableFileError, match=r"1\.jpg: damaged JPEG"):
        dataset[1]

    before = digests(root)
    result = predict(checkpoint, str(bad), "-o", str(tmp_path / "pred"))
    assert_one_line_error(result, f"{bad}: damaged JPEG")
    assert digests(root) == before


# -- item 14: a flat folder needs an explicit split ---------------------------------------------


def test_flat_folder_training_is_refused_then_split(tmp_path):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(5):
        cv2.imwrite(str(root / f"images/{i}.png"), textured(12, 12, i))
        write_label_png(root / f"masks/{i}.png", np.zeros((12, 12), np.uint8))
    keys = [f"data.root={root}", "data.dataset=folder", "data.num_classes=2"]
    result = run_cli("data", "check", *keys, "--no-progress")
    assert result.returncode == 1 and "flat folder" in result.stdout
    assert "data.val_fraction" in result.stdout and "data.list_file" in result.stdout
    train = run_cli("train", *keys, "train.iterations=1", f"train.work_dir={tmp_path / 'runs'}")
    assert_one_line_error(train, f"'{root}' is a flat folder", "data.val_fraction")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
    split = [*keys, "data.val_fraction=0.4"]
    for name, count in (("train", 3), ("val", 2)):
        result = run_cli("data", "check", *split, "--split", name, "--no-progress")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{count} samples" in result.stdout
