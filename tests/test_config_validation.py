"""Config validation (issue 11): every numeric key has a range, floats are finite, YAML
override mistakes and unknown models are one-line ConfigErrors raised before any work."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from leanseg.config import CHOICES, RANGES, Config, Range, load_config
from leanseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _schema_fields() -> dict[str, Any]:
    """Dotted key -> type hint of every leaf field of the schema."""
    leaves: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        cls = get_type_hints(Config)[section.name]
        for key, hint in get_type_hints(cls).items():
            leaves[f"{section.name}.{key}"] = hint
    return leaves


def _base_type(hint: Any) -> tuple[Any, bool, bool]:
    """``(element type, optional, is a list)`` of a hint such as ``list[float] | None``."""
    optional = isinstance(hint, UnionType) and NoneType in get_args(hint)
    if optional:
        (hint,) = [arg for arg in get_args(hint) if arg is not NoneType]
    is_list = get_origin(hint) is list
    if is_list:
        (hint,) = get_args(hint)
    return hint, optional, is_list


def _keys_of(*types: type, optional: bool | None = None) -> list[str]:
    keys = []
    for key, hint in _schema_fields().items():
        base, is_optional, _ = _base_type(hint)
        if base in types and (optional is None or is_optional == optional):
            keys.append(key)
    return keys


NUMERIC_KEYS = _keys_of(int, float)  # bool is its own type in hints, so it is not included
FLOAT_KEYS = _keys_of(float)
# Optional ints whose None means "a default": 0 and negatives must not sneak in as that default
NULL_OR_POSITIVE_INTS = [
    "data.num_classes",
    "data.crop_width",
    "data.crop_val",
    "eval.crop_size",
    "eval.stride",
    "eval.base_size",
    "search.iterations_per_epoch",
]
OTHER_OPTIONAL_INTS = {"acosp.end"}  # None or >= acosp.start (so 0 is valid)


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------ every field has a rule


def test_every_numeric_field_has_a_rule():
    missing = [key for key in NUMERIC_KEYS if key not in RANGES and key not in CHOICES]
    assert not missing, f"numeric config keys without a rule in RANGES / CHOICES: {missing}"


def test_every_rule_names_a_numeric_field():
    stale = sorted(set(RANGES) - set(NUMERIC_KEYS))
    assert not stale, f"RANGES keys that are not numeric schema fields: {stale}"


def test_the_optional_int_lists_cover_the_schema():
    assert set(_keys_of(int, optional=True)) == set(NULL_OR_POSITIVE_INTS) | OTHER_OPTIONAL_INTS


def test_range_membership_and_description():
    assert 0 not in Range(0, low_open=True) and 1e-9 in Range(0, low_open=True)
    assert 1 not in Range(0, 1, high_open=True) and 0 in Range(0, 1, high_open=True)
    assert Range(0, low_open=True).describe() == "> 0"
    assert Range(2).describe() == ">= 2"
    assert Range(0, 1, high_open=True).describe() == "in [0, 1)"
    assert Range(high=3, high_open=True).describe() == "< 3"


# ------------------------------------------------------------------ bad values


def _override(key: str, text: str) -> str:
    base, _, is_list = _base_type(_schema_fields()[key])
    return f"{key}=[{text}]" if is_list else f"{key}={text}"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_rejected(key, value):
    message = _error([_override(key, value)])
    assert f"config key '{key}" in message and "finite" in message


def test_non_finite_model_option_is_rejected():
    message = _error(["model.options.width_mult=.nan"])
    assert "'model.options.width_mult'" in message and "finite" in message


@pytest.mark.parametrize("value", [0, -1, -5])
@pytest.mark.parametrize("key", NULL_OR_POSITIVE_INTS)
def test_zero_or_negative_is_not_a_silent_default(key, value):
    message = _error([f"{key}={value}"])
    assert f"config key '{key}': must be > 0 or null" in message and f"got {value}" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.crop_size=0"], "'data.crop_size': must be > 0"),
        (["data.scale_min=-1"], "'data.scale_min': must be > 0"),
        (["data.scale_max=0"], "'data.scale_max': must be > 0"),
        (["data.scale_min=1.5", "data.scale_max=1.2"], "'data.scale_min': must be <="),
        (["data.rotate=-1"], "'data.rotate': must be in [0, 180]"),
        (["data.ignore_index=256"], "'data.ignore_index': must be in [0, 255]"),
        (["data.ignore_index=-1"], "'data.ignore_index': must be in [0, 255]"),
        (["data.ignore_index=3"], "'data.ignore_index': must be >= 7"),
        (["data.batch_size=1"], "'data.batch_size': must be >= 2"),
        (["data.val_batch_size=0"], "'data.val_batch_size': must be > 0"),
        (["data.workers=-1"], "'data.workers': must be >= 0"),
        (["data.synthetic_seed=-1"], "'data.synthetic_seed': must be in [0, "),
        (["data.synthetic_train=0"], "'data.synthetic_train': must be > 0"),
        (["data.class_names=[a,b]"], "'data.class_names': 2 names for 7 classes"),
        (["data.list_file=list.txt"], "'data.list_file'"),
        (["data.dataset=folder"], "'data.num_classes': required for dataset folder"),
        (["data.dataset=camvid"], "set data.ignore_index=11"),
        (["model.aux_weight=-0.5"], "'model.aux_weight': must be >= 0"),
        (["model.crf_iters=0"], "'model.crf_iters': must be > 0"),
        (["optim.lr=0"], "'optim.lr': must be > 0"),
        (["optim.lr=-1"], "'optim.lr': must be > 0"),
        (["optim.momentum=1"], "'optim.momentum': must be in [0, 1)"),
        (["optim.momentum=-0.1"], "'optim.momentum': must be in [0, 1)"),
        (["optim.power=0"], "'optim.power': must be > 0"),
        (["optim.min_lr=-1"], "'optim.min_lr': must be >= 0"),
        (["optim.min_lr=0.5"], "'optim.min_lr': must be <= optim.lr"),
        (["optim.backbone_lr_mult=-1"], "'optim.backbone_lr_mult': must be >= 0"),
        (["optim.weight_decay=-1e-4"], "'optim.weight_decay': must be >= 0"),
        (["optim.warmup_iters=-1"], "'optim.warmup_iters': must be >= 0"),
        (["train.iterations=0"], "'train.iterations': must be > 0"),
        (["train.val_interval=0"], "'train.val_interval': must be > 0"),
        (["train.log_interval=-1"], "'train.log_interval': must be > 0"),
        (["train.seed=-1"], "'train.seed': must be in [0, "),
        (["train.sample_images=-1"], "'train.sample_images': must be >= 0"),
        (["eval.scales=[]"], "'eval.scales': must be a non-empty list"),
        (["eval.scales=[1.0,0]"], "'eval.scales[1]': must be > 0"),
        (["eval.mode=slide", "eval.crop_size=64", "eval.stride=65"], "'eval.stride': must be <="),
        (["backrazor.ratio=1.0"], "'backrazor.ratio': must be in [0, 1) or null"),
        (["backrazor.ratio=-0.1"], "'backrazor.ratio': must be in [0, 1) or null"),
        (["acosp.sparsity=1.0"], "'acosp.sparsity': must be in [0, 1) or null"),
        (["acosp.start=-1"], "'acosp.start': must be >= 0"),
        (["acosp.end=-1"], "'acosp.end': must be >= 0 or null"),
        (["acosp.start=5", "acosp.end=2"], "'acosp.end': must be >= acosp.start"),
        (["acosp.tau0=0"], "'acosp.tau0': must be > 0"),
        (["acosp.tau_final=-1"], "'acosp.tau_final': must be > 0"),
        (["acosp.min_keep=0"], "'acosp.min_keep': must be > 0"),
    ],
)
def test_out_of_range_values_name_the_key(overrides, expected):
    assert expected in _error(overrides)


# ------------------------------------------------------------------ YAML overrides


@pytest.mark.parametrize(
    "override", ["train.name=@run1", "eval.scales=[x", "data.root={a: 1", "model.options.norm=`gn"]
)
def test_unparsable_override_is_one_config_error(override):
    message = _error([override])
    key = override.partition("=")[0]
    assert f"override {override!r}" in message and "not valid YAML" in message
    assert f"{key}=\"'" in message  # the fix: quote the value


def test_the_suggested_quoting_works():
    assert load_config(None, ["train.name='@run1'"]).train.name == "@run1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run1", "run1"),
        ("2024", "2024"),
        ("0x10", "0x10"),
        ("1.50", "1.50"),
        ("true", "true"),
        ("2024-01-01", "2024-01-01"),
        ("'quoted'", "quoted"),
        ("null", None),
    ],
)
def test_text_keys_keep_the_text_as_written(text, expected):
    assert load_config(None, [f"train.name={text}"]).train.name == expected


def test_a_date_for_a_number_is_a_type_error():
    assert "config key 'train.iterations': expected int" in _error(["train.iterations=2024-01-01"])


# ------------------------------------------------------------------ models


def test_unknown_model_lists_the_models():
    message = _error(["model.name=unet"])
    assert "config key 'model.name': unknown model 'unet'" in message
    assert "deeplabv3plus_resnet18" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.options.chanels=16"], "chanels"),
        (["model.name=pspnet50", "model.options.channels=16"], "channels"),  # a deeplab option
        (["model.name=segnet", "model.options.crf=ddd"], "crf"),
    ],
)
def test_unknown_model_option_names_the_option(overrides, key):
    message = _error(overrides)
    assert f"config key 'model.options.{key}'" in message and "accepted options: [" in message


# ------------------------------------------------------------------ good values


def test_defaults_pass():
    load_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    load_config(path)


def test_boundary_values_are_accepted():
    cfg = load_config(
        None,
        [
            "data.num_classes=1",
            "data.ignore_index=255",
            "data.crop_width=64",
            "data.crop_val=null",
            "data.rotate=0",
            "data.workers=0",
            "train.sample_images=0",
            "optim.momentum=0",
            "optim.backbone_lr_mult=0",
            "optim.min_lr=0",
            "optim.warmup_iters=0",
            "model.aux_weight=0",
            "backrazor.ratio=0",
            "acosp.sparsity=0",
            "acosp.end=0",
            "eval.mode=slide",
            "eval.crop_size=64",
            "eval.stride=64",
            "eval.scales=[0.5,1.0,1.75]",
        ],
    )
    assert (cfg.data.num_classes, cfg.data.crop_width, cfg.eval.stride) == (1, 64, 64)
    assert cfg.eval.scales == [0.5, 1.0, 1.75] and cfg.acosp.end == 0
    other = load_config(None, ["data.dataset=folder", "data.num_classes=3", "data.ignore_index=3"])
    assert other.data.num_classes == 3
    camvid = load_config(None, ["data.dataset=camvid", "data.ignore_index=11"])
    assert camvid.data.ignore_index == 11


# ------------------------------------------------------------------ CLI


def test_cli_rejects_an_unknown_model_before_any_work(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    args = ["model.name=unet", f"train.work_dir={work}", f"data.root={cache}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "leanseg", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.name" in lines[0], result.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s: did it generate data first?"
    assert not cache.exists() or not any(cache.iterdir())  # no synthetic images written
    assert not work.exists() or not any(p.is_dir() for p in work.iterdir())  # no run directory
