"""FasterSeg spec format (round trip, one-line errors) and derivation of the shipped parameters."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.derive import (
    ArchParams,
    branch_path,
    derive,
    derive_reference,
    read_arch_params,
    select_branches,
)
from leanseg.models.fasterseg import packaged_spec
from leanseg.models.fasterseg.spec import (
    ArchSpec,
    dumps_spec,
    load_spec,
    save_spec,
    spec_from_dict,
    spec_to_dict,
)


def reference_dir() -> Path:
    """shared/reference beside the clone (or $LEANSEG_REFERENCE_DIR); skip when absent."""
    env = os.environ.get("LEANSEG_REFERENCE_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"
    if not (path / "fasterseg_arch_student.json").is_file():
        pytest.skip(f"FasterSeg reference files not found in {path}")
    return path


@pytest.fixture(scope="module")
def student_params() -> ArchParams:
    return read_arch_params(reference_dir() / "fasterseg_arch_student.json")


@pytest.fixture(scope="module")
def teacher_params() -> ArchParams:
    return read_arch_params(reference_dir() / "fasterseg_arch_teacher.json")


# Section 6 of shared/methods/fasterseg.md: (op, input scale, stride, in, out) per layer.
SHARED = [
    ("conv_x2", 8, 1, 64, 32),
    ("conv_x2", 8, 1, 32, 32),
    ("zoomed_conv_x2", 8, 1, 32, 32),
]
BRANCH32 = SHARED + [
    ("zoomed_conv", 8, 2, 32, 128),
    ("zoomed_conv_x2", 16, 1, 128, 64),
    ("zoomed_conv_x2", 16, 1, 64, 64),
    ("zoomed_conv_x2", 16, 1, 64, 64),
    ("zoomed_conv_x2", 16, 2, 64, 128),
    ("zoomed_conv_x2", 32, 1, 128, 128),
    ("zoomed_conv_x2", 32, 1, 128, 256),
]
BRANCH16 = SHARED + [
    ("zoomed_conv_x2", 8, 1, 32, 32),
    ("conv_x2", 8, 1, 32, 32),
    ("conv_x2", 8, 2, 32, 64),
    ("zoomed_conv_x2", 16, 1, 64, 64),
    ("zoomed_conv_x2", 16, 1, 64, 192),
    ("zoomed_conv_x2", 16, 1, 192, 128),
]


def _table(spec: ArchSpec, index: int) -> list[tuple]:
    return [(c.op, c.scale, c.stride, c.c_in, c.c_out) for c in spec.branches[index].cells]


# ----------------------------------------------------------------------------- derivation


def test_student_derivation_is_section_6_layer_by_layer(student_params):
    spec = derive_reference(student_params)
    assert spec.scales == (32, 16)  # chosen from the recorded mIoU/latency, as the original
    assert spec.stem == (32, 64, 64)
    for layer, (got, expected) in enumerate(zip(_table(spec, 0), BRANCH32, strict=True)):
        assert got == expected, f"1/32 branch L{layer}"
    for layer, (got, expected) in enumerate(zip(_table(spec, 1), BRANCH16, strict=True)):
        assert got == expected, f"1/16 branch L{layer}"
    assert spec.branches[0].shares is None and spec.branches[1].shares == (0, 3)
    head = spec.head
    assert head.agg == {8: 64, 16: 128, 32: 256}
    assert (head.fusion, head.mid) == (128, 128)
    assert spec.aux_in_widths() == {16: 192, 32: 256}  # cat(64-ch 1/16 feature, 128-ch output)
    assert head.aux_mid == {16: 192, 32: 256}


def test_teacher_derivation(teacher_params):
    spec = derive_reference(teacher_params)
    assert spec.scales == (32, 16)  # section 11
    assert spec.stem == (48, 96, 96)
    for branch in spec.branches:
        cells = branch.cells
        assert all(c.op != "skip" for c in cells)  # skip forbidden
        assert len(cells) == 16  # no skip, nothing removed
        assert all(c.c_out == c.out_scale * 12 for c in cells)  # full width everywhere
        assert cells[0].c_in == 96
    assert [c.stride for c in spec.branches[0].cells].count(2) == 2
    assert spec.branches[1].shares == (0, 4)
    assert spec.head.agg == {8: 96, 16: 192, 32: 384}
    assert (spec.head.fusion, spec.head.mid, spec.head.aux_mid) == (192, 192, {16: 192, 32: 192})


def test_student_other_pairing_keeps_the_rules(student_params):
    spec = derive_reference(student_params, branches=(32, 8))
    assert _table(spec, 0) == BRANCH32
    eight = _table(spec, 1)
    assert eight[:3] == SHARED and all(stride == 1 and scale == 8 for _, scale, stride, *_ in eight)
    assert len(eight) >= 5  # min_len = round(16 / 3)
    assert eight[-1][-1] == 64  # head width at 1/8


def test_packaged_archs_are_the_derived_ones(student_params, teacher_params):
    for name, params in (("student", student_params), ("teacher", teacher_params)):
        derived, shipped = derive_reference(params), packaged_spec(name)
        assert (derived.stem, derived.branches, derived.head) == (
            shipped.stem,
            shipped.branches,
            shipped.head,
        )
        assert shipped.meta["name"] == f"fasterseg_{name}"


def test_derive_is_pure(student_params):
    before = copy.deepcopy(student_params)
    first = derive(
        student_params.alphas,
        student_params.betas,
        student_params.ratios,
        branches=(8, 16, 32),
        stem_width=8 / 12,
        head_width=8 / 12,
    )
    assert student_params == before  # nothing mutated
    again = derive(
        student_params.alphas,
        student_params.betas,
        student_params.ratios,
        branches=(8, 16, 32),
        stem_width=8 / 12,
        head_width=8 / 12,
    )
    assert first == again
    # 1/8 and 1/16 agree up to L4 (section 6: L3 zoomed x2, L4 conv x2); 1/32 leaves at L3
    assert [b.shares for b in first.branches] == [None, (0, 5), (0, 3)]


def test_supernet_layers_moves_the_16_branch_down_by_one(student_params):
    betas = student_params.betas
    original = branch_path(betas, 1, 16)
    moved = branch_path(betas, 1, 16, supernet_layers=True)
    assert original.index(1) == 13  # cell 12 downsamples: L5 once the 7 skips before it go
    assert moved == (0, *original[:-1])
    assert branch_path(betas, 2, 16, supernet_layers=True) == branch_path(betas, 2, 16)


def test_select_branches_by_objective(student_params):
    assert select_branches(student_params.recorded) == (32, 16)
    assert select_branches({"mIoU02": 0.7, "latency02": 6.0, "mIoU12": 0.6, "latency12": 5.0}) == (
        32,
        8,
    )


def test_derive_rejects_bad_shapes(student_params):
    alphas = [student_params.alphas[0][:-1], *student_params.alphas[1:]]
    with pytest.raises(ConfigError, match=r"alphas\[1\]"):
        derive(alphas, student_params.betas, student_params.ratios)
    with pytest.raises(ConfigError, match="branches"):
        derive(*_params(student_params), branches=(32, 64))


def _params(params: ArchParams) -> tuple:
    return params.alphas, params.betas, params.ratios


# ---------------------------------------------------------------------------- spec format


def test_round_trip_through_dict_and_file(tmp_path):
    spec = packaged_spec("student")
    assert spec_from_dict(spec_to_dict(spec)) == spec
    path = tmp_path / "student.json"
    save_spec(spec, path)
    assert load_spec(path) == spec
    assert json.loads(path.read_text()) == spec_to_dict(spec)
    assert path.read_text() == dumps_spec(spec) + "\n"


def test_scaled_spec_stays_valid():
    spec = packaged_spec("teacher").scaled(0.25)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec.stem == (12, 24, 24)
    assert packaged_spec("student").scaled(1.0) == packaged_spec("student")


def _student_dict() -> dict:
    return spec_to_dict(packaged_spec("student"))


def _set(path: str, value: object) -> dict:
    data = _student_dict()
    *parents, last = path.split("/")
    target = data
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[int(last) if isinstance(target, list) else last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("version", 2, "version", "2 is not supported"),
        ("format", "x", "format", "expected 'leanseg.fasterseg.arch'"),
        ("branches/1/cells/3/op", "conv5", "branches[1].cells[3].op", "'conv5' is not one of"),
        ("branches/0/cells/4/out", -1, "branches[0].cells[4].out", "positive int"),
        ("branches/0/cells/4/out", 32.5, "branches[0].cells[4].out", "positive int"),
        ("branches/0/cells/5/in", 63, "branches[0].cells[5].in", "previous output has 64"),
        ("branches/0/cells/4/scale", 8, "branches[0].cells[4].scale", "previous output is at 16"),
        ("branches/0/cells/9/out", 255, "branches[0].cells[9].out", "head.agg.32 = 256"),
        ("branches/0/cells/8/stride", 2, "branches[0].cells[8].stride", "no 1/64"),
        ("branches/0/cells/0/stride", 3, "branches[0].cells[0].stride", "3 is not one of"),
        ("branches/1/scale", 32, "branches[1].scale", "already branches[0]'s"),
        ("branches/1/shares/cells", 4, "branches[1].cells[3]", "differs from branches[0]"),
        ("branches/1/shares/branch", 1, "branches[1].shares.branch", "earlier branch"),
        ("branches/0/cells/2/op", _DELETE, "branches[0].cells[2].op", "missing field"),
        ("head/fusion", _DELETE, "head.fusion", "missing field"),
        ("head/aux_mid", {"32": 256}, "head.aux_mid.16", "missing field"),
        ("head/agg/64", 512, "head.agg.64", "unknown field"),
        ("stem", [32, 64], "stem", "list of 3 widths"),
        ("stem/2", 0, "stem[2]", "positive int"),
        ("colour", "red", "colour", "unknown field"),
        ("branches", [], "branches", "1 to 3 branches"),
    ],
)
def test_bad_spec_values_give_one_line_config_errors(tmp_path, path, value, field, words):
    file = tmp_path / "x.json"
    file.write_text(json.dumps(_set(path, value)))
    with pytest.raises(ConfigError) as info:
        load_spec(file)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"spec {str(file)!r}: {field}: "), message
    assert words in message, message


def test_skip_width_rules():
    data = _student_dict()
    for branch in data["branches"]:  # a shared cell: the same in both branches
        branch["cells"][1]["op"] = "skip"  # stride 1, 32 -> 32: identity, fine
    assert spec_from_dict(data).branches[1].cells[1].op == "skip"
    data["branches"][0]["cells"][0]["op"] = "skip"  # stride 1, 64 -> 32
    with pytest.raises(ConfigError, match=r"cells\[0\]\.out: .*keeps in = 64"):
        spec_from_dict(data, source="s")


@pytest.mark.parametrize(
    ("text", "words"),
    [("{not json", "not valid JSON"), ("[1, 2]", "top level: expected a JSON object")],
)
def test_unreadable_spec_files(tmp_path, text, words):
    file = tmp_path / "bad.json"
    file.write_text(text)
    with pytest.raises(ConfigError, match=words) as info:
        load_spec(file)
    assert "\n" not in str(info.value) and "bad.json" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(tmp_path / "missing.json")
