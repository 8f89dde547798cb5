"""Measuring a FasterSeg latency LUT: key -> module, timing, the table file and its metadata."""

from __future__ import annotations

import json

import pytest
import torch

from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.latency import LatencyTable, load_lut
from leanseg.methods.fasterseg.lut_measure import (
    check_table_matches,
    lut_metadata,
    measure_entries,
    module_for_key,
    table_origin,
    write_lut,
)

CPU = torch.device("cpu")
QUICK = {"warmup": 1, "target_seconds": 0.005, "repeats": 3}

# key -> expected output shape of its module on its input shape
KEYS = {
    "BasicResidual1x_H8_W16_Cin4_Cout8_stride1_dilation1": (1, 8, 8, 16),
    "BasicResidual1x_H8_W16_Cin4_Cout8_stride2_dilation1": (1, 8, 4, 8),
    "BasicResidual_downup_1x_H8_W16_Cin4_Cout8_stride1_dilation1": (1, 8, 8, 16),
    "BasicResidual_downup_1x_H8_W16_Cin4_Cout8_stride2_dilation1": (1, 8, 4, 8),
    "BasicResidual2x_H8_W16_Cin8_Cout4_stride1_dilation1": (1, 4, 8, 16),
    "BasicResidual2x_H8_W16_Cin8_Cout4_stride2_dilation1": (1, 4, 4, 8),
    "BasicResidual_downup_2x_H8_W16_Cin8_Cout16_stride1_dilation1": (1, 16, 8, 16),
    "BasicResidual_downup_2x_H8_W16_Cin8_Cout16_stride2_dilation1": (1, 16, 4, 8),
    "FactorizedReduce_H8_W16_Cin4_Cout8_stride1": (1, 8, 8, 16),
    "FactorizedReduce_H8_W16_Cin4_Cout8_stride2": (1, 8, 4, 8),
    "ConvNorm_H8_W16_Cin3_Cout8_kernel3_stride2": (1, 8, 4, 8),
    "ConvNorm_H8_W16_Cin8_Cout4_kernel1_stride1": (1, 4, 8, 16),
    "ff_H8_W16_C12": (1, 12, 8, 16),
    "head_H8_W16_Cin16_Cout5": (1, 5, 8, 16),
}


@pytest.mark.parametrize("key", list(KEYS))
def test_every_key_kind_builds_and_runs_on_its_input(key):
    module, shape = module_for_key(key)
    assert not module.training
    assert shape[0] == 1 and shape[2:] == (8, 16)
    with torch.inference_mode():
        out = module(torch.randn(shape))
    assert tuple(out.shape) == KEYS[key]


def test_head_mid_width_halves_above_256():
    assert module_for_key("head_H8_W16_Cin256_Cout3")[0][0][0].out_channels == 256
    assert module_for_key("head_H8_W16_Cin320_Cout3")[0][0][0].out_channels == 160


@pytest.mark.parametrize(
    "key",
    [
        "BasicResidual1x_H8_W16_Cin4_Cout8_stride3_dilation1",
        "BasicResidual1x_H8_W16_Cin4_Cout8_stride1_dilation2",
        "BasicResidual1x_H8_W16_Cin4_Cout8_stride1",
        "FactorizedReduce_H8_W16_Cin4_Cout8_stride2_dilation1",
        "FactorizedReduce_H8_W16_Cin4_Cout7_stride2",  # odd width
        "ConvNorm_H8_W16_Cin3_Cout8_kernel2_stride1",
        "ConvNorm_H0_W16_Cin3_Cout8_kernel3_stride1",
        "ff_H8_W16_C012",
        "head_H8_W16_Cin16",
        "Unknown_H8_W16_Cin4_Cout8_stride1_dilation1",
        "",
    ],
)
def test_a_malformed_key_is_a_one_line_config_error(key):
    with pytest.raises(ConfigError) as info:
        module_for_key(key)
    assert "\n" not in str(info.value) and repr(key) in str(info.value)


def test_measure_entries_torch_cpu_times_every_key_once():
    keys = [*KEYS, next(iter(KEYS))]
    entries = measure_entries(keys, backend="torch", device=CPU, threads=1, **QUICK)
    assert list(entries) == list(KEYS)
    assert all(isinstance(ms, float) and ms > 0 for ms in entries.values())


def test_measure_entries_parses_every_key_before_timing_and_checks_settings():
    with pytest.raises(ConfigError, match="'bad'"):
        measure_entries(["ff_H8_W16_C4", "bad"], backend="torch", device=CPU, threads=1)
    with pytest.raises(ConfigError, match="--backend"):
        measure_entries(["ff_H8_W16_C4"], backend="tensorrt", device=CPU, threads=1)
    with pytest.raises(ConfigError, match="repeats"):
        measure_entries(["ff_H8_W16_C4"], backend="torch", device=CPU, threads=1, repeats=0)


def test_a_bigger_module_measures_slower():
    small = "BasicResidual1x_H8_W8_Cin4_Cout4_stride1_dilation1"
    big = "BasicResidual1x_H64_W64_Cin64_Cout64_stride1_dilation1"  # ~ 2300x the multiply-adds
    timing = {"warmup": 2, "target_seconds": 0.02, "repeats": 3}
    entries = measure_entries([small, big], backend="torch", device=CPU, threads=1, **timing)
    assert entries[big] > 3 * entries[small]


def test_measure_entries_onnxruntime_cpu():
    pytest.importorskip("onnxruntime")
    keys = ["ff_H8_W16_C4", "BasicResidual_downup_1x_H8_W16_Cin4_Cout8_stride1_dilation1"]
    entries = measure_entries(keys, backend="onnxruntime", device=CPU, threads=1, **QUICK)
    assert list(entries) == keys and all(ms > 0 for ms in entries.values())


def _meta(backend: str = "torch") -> dict:
    return lut_metadata(
        backend=backend, device=CPU, threads=1, size=(64, 128), num_classes=19, **QUICK
    )


def test_metadata_records_what_it_was_measured_with():
    meta = _meta()
    assert meta["format"] == "leanseg.fasterseg.lut" and meta["version"] == 1
    assert (meta["backend"], meta["device"], meta["dtype"], meta["batch"]) == (
        "torch",
        "cpu",
        "float32",
        1,
    )
    assert meta["input_size"] == [64, 128] and meta["num_classes"] == 19 and meta["threads"] == 1
    assert meta["device_name"] and {"torch", "python", "platform"} <= set(meta["versions"])
    assert meta["timing"] == {**QUICK, "statistic": "median of repeats"}
    assert meta["created"].endswith("+00:00")
    assert lut_metadata(**{**_kwargs(), "extra": {"note": "x"}})["note"] == "x"


def _kwargs() -> dict:
    return {"backend": "torch", "device": "cpu", "threads": 2, "size": (8, 8), "num_classes": 3}


def test_metadata_of_onnxruntime_records_its_version():
    pytest.importorskip("onnxruntime")
    assert "onnxruntime" in _meta("onnxruntime")["versions"]


def test_write_lut_round_trips_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "lut.json"
    entries = {"ff_H8_W16_C4": 0.5, "BasicResidual1x_H8_W16_Cin4_Cout8_stride1_dilation1": 1.25}
    meta = _meta()
    write_lut(path, entries, meta)
    assert list(json.loads(path.read_text())["entries"]) == sorted(entries)
    table = load_lut(path)
    assert table.entries == entries and table.meta == meta
    with pytest.raises(ConfigError) as info:
        write_lut(path, {"ff_H8_W16_C4": 9.0}, meta)
    assert "\n" not in str(info.value) and "--force" in str(info.value)
    assert str(path) in str(info.value)
    write_lut(path, {"ff_H8_W16_C4": 9.0}, meta, overwrite=True)
    assert load_lut(path).entries == {"ff_H8_W16_C4": 9.0}
    assert [p.name for p in tmp_path.iterdir()] == ["lut.json"]  # no temp file left


def test_check_table_matches():
    table = LatencyTable({"ff_H8_W16_C4": 1.0}, {"backend": "onnxruntime", "device": "cpu"}, "t")
    check_table_matches(table, backend="onnxruntime", device="cpu")
    for backend, device in [("torch", "cpu"), ("onnxruntime", "cuda")]:
        with pytest.raises(ConfigError) as info:
            check_table_matches(table, backend=backend, device=device)
        message = str(info.value)
        assert "\n" not in message and "'t'" in message and "leanseg search lut" in message
    cuda = LatencyTable({"ff_H8_W16_C4": 1.0}, {"backend": "torch", "device": "cuda"}, "g")
    check_table_matches(cuda, backend="torch", device="cuda:0")


def test_the_original_table_counts_as_tensorrt_on_cuda():
    original = load_lut()
    assert table_origin(original) == ("tensorrt", "cuda")
    assert table_origin(LatencyTable({"ff_H8_W16_C4": 1.0}, {}, "bare")) == ("tensorrt", "cuda")
    check_table_matches(original, backend="tensorrt", device="cuda")
    with pytest.raises(ConfigError) as info:
        check_table_matches(original, backend="onnxruntime", device="cpu")
    message = str(info.value)
    assert "\n" not in message and "tensorrt on cuda" in message and "onnxruntime on cpu" in message
