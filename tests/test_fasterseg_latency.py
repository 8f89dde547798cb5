"""FasterSeg LUT latency: the original's recorded figures (legacy pricing) and the fixed pricing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.derive import derive_reference, read_arch_params
from leanseg.methods.fasterseg.latency import ORIGINAL_LUT, LatencyTable, load_lut, spec_latency
from leanseg.models.fasterseg import packaged_spec
from tests.test_fasterseg_spec import reference_dir


@pytest.fixture(scope="module")
def lut() -> LatencyTable:
    return load_lut()


def test_shipped_lut_is_the_reference_table():
    shipped = json.loads(ORIGINAL_LUT.read_text())
    reference = json.loads((reference_dir() / "fasterseg_lut_original.json").read_text())
    assert shipped["entries"] == reference["entries"]
    assert len(shipped["entries"]) == 667
    assert {"device", "backend", "dtype", "batch", "unit"} <= set(shipped)
    assert load_lut(reference_dir() / "fasterseg_lut_original.json").entries == load_lut().entries


def test_legacy_pricing_reproduces_the_recorded_student_latency(lut):
    params = read_arch_params(reference_dir() / "fasterseg_arch_student.json")
    recorded = params.recorded
    with_8 = spec_latency(derive_reference(params, branches=(32, 8)), lut, legacy=True)
    with_16 = spec_latency(derive_reference(params, branches=(32, 16)), lut, legacy=True)
    assert with_8.total == pytest.approx(recorded["latency02"], rel=0.005)  # 6.260 ms
    assert with_16.total == pytest.approx(recorded["latency12"], rel=0.02)  # 6.414 ms


def test_fixed_pricing_uses_the_zoomed_conv_x2_entries(lut):
    spec = packaged_spec("student")
    fixed, legacy = spec_latency(spec, lut), spec_latency(spec, lut, legacy=True)
    # 16 cells priced (19, 3 shared), 11 of them zoomed conv x2 (section 6 table)
    assert sum("BasicResidual_downup_2x" in k for k in fixed.keys) == 11
    assert not any("BasicResidual_downup_2x" in k for k in legacy.keys)
    assert (fixed.stem, fixed.aggregation, fixed.fusion, fixed.head) == (
        legacy.stem,
        legacy.aggregation,
        legacy.fusion,
        legacy.head,
    )
    assert fixed.cells < legacy.cells
    # measured once (docs/fasterseg.md): student 5.702 ms, teacher 17.943 ms
    assert fixed.total == pytest.approx(5.7018, abs=1e-3)
    assert spec_latency(packaged_spec("teacher"), lut).total == pytest.approx(17.943, abs=1e-3)
    assert fixed.fps == pytest.approx(1000 / fixed.total)


def test_parts_and_keys(lut):
    spec = packaged_spec("student")
    latency = spec_latency(spec, lut)
    assert latency.keys[:3] == (
        "ConvNorm_H1024_W2048_Cin3_Cout32_kernel3_stride2",
        "BasicResidual2x_H512_W1024_Cin32_Cout64_stride2_dilation1",
        "BasicResidual2x_H256_W512_Cin64_Cout64_stride2_dilation1",
    )
    assert "ConvNorm_H64_W128_Cin192_Cout128_kernel3_stride1" in latency.keys  # 128 up + 64
    assert latency.keys[-2:] == ("ff_H128_W256_C128", "head_H128_W256_Cin128_Cout19")
    assert len(latency.keys) == 3 + 16 + 6 + 2
    total = sum(lut.entries[k] for k in latency.keys)
    assert latency.total == pytest.approx(total)


def test_missing_entries_fail_loudly(lut):
    with pytest.raises(ConfigError, match="no entry 'head_H128_W256_Cin128_Cout21'"):
        spec_latency(packaged_spec("student"), lut, num_classes=21)
    with pytest.raises(ConfigError, match="no entry"):
        spec_latency(packaged_spec("student"), lut, size=(512, 1024))
    head = replace(packaged_spec("student").head, fusion=64)
    with pytest.raises(ConfigError, match="fusion"):
        spec_latency(replace(packaged_spec("student"), head=head), lut)


def test_bad_lut_files(tmp_path):
    path = tmp_path / "lut.json"
    path.write_text(json.dumps({"entries": {"ff_H1_W1_C1": -1.0}}))
    with pytest.raises(ConfigError, match=r"entries\.ff_H1_W1_C1"):
        load_lut(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        load_lut(path)
