"""FasterSeg operators, networks and builders (the shared model test covers export and I/O)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leanseg import ConfigError, build_model
from leanseg.models.fasterseg import FasterSeg, packaged_spec
from leanseg.models.fasterseg.ops import FactorizedReduce, make_op
from leanseg.models.fasterseg.spec import OPS, spec_from_dict, spec_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")

# Original parameter counts (section 11: every module the original holds, 19 classes, training
# build) minus the FFM channel attention it builds but never runs (two bias-free 1x1 convs,
# C x C each, C = fusion width; quirk 9: dropped).
ORIGINAL_PARAMS = {"student": 4_385_689, "teacher": 23_524_137}
FUSION = {"student": 128, "teacher": 192}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(16, 24), (15, 9)])
def test_operator_shapes_and_strides(op, stride, size):
    c_in, c_out = (6, 6) if op == "skip" and stride == 1 else (6, 10)
    module = make_op(op, c_in, c_out, stride).eval()
    with torch.no_grad():
        out = module(torch.randn(2, c_in, *size))
    expected = size if stride == 1 else tuple((s + 1) // 2 for s in size)
    assert out.shape == (2, c_out, *expected)
    assert (out >= 0).all() or isinstance(module, nn.Identity)  # every op ends in ReLU


def test_operator_modules():
    assert isinstance(make_op("skip", 8, 8, 1), nn.Identity)
    assert isinstance(make_op("skip", 8, 16, 2), FactorizedReduce)
    with pytest.raises(ValueError, match="keeps its width"):
        make_op("skip", 8, 16, 1)
    with pytest.raises(ValueError, match="unknown"):
        make_op("conv5", 8, 8, 1)
    convs = [m for m in make_op("zoomed_conv_x2", 4, 8, 2).modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1), (1, 1)]  # zoomed: the resize downsamples
    convs = [m for m in make_op("conv_x2", 4, 8, 2).modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1)] and all(c.bias is None for c in convs)


def test_zoomed_conv_runs_at_half_resolution():
    module = make_op("zoomed_conv", 3, 4, 1)
    seen = []
    module.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-2:]))
    module(torch.randn(1, 3, 20, 13))
    assert seen == [torch.Size([10, 7])]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_parameter_counts(name):
    with torch.device("meta"):
        model = build_model(f"fasterseg_{name}", 19, aux=True)
        plain = build_model(f"fasterseg_{name}", 19)
    count = _params(model)
    assert count == ORIGINAL_PARAMS[name] - 2 * FUSION[name] ** 2
    if name == "student":
        assert count == pytest.approx(4.39e6, rel=0.01)  # section 6's third-party count
    aux = sum(_params(head) for head in model.aux_heads.values())
    assert _params(plain) == count - aux


def test_shared_cells_are_one_module_run_once():
    torch.manual_seed(0)
    model = build_model("fasterseg_student", 3, width_mult=0.25).eval()
    keys = list(model.backbone.cells.keys())
    assert keys[:3] == ["b0l0", "b0l1", "b0l2"] and "b1l2" not in keys and "b1l3" in keys
    assert len(keys) == 10 + 6
    calls = []
    model.backbone.cells["b0l1"].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == [1]


def test_training_outputs_with_aux_heads():
    torch.manual_seed(0)
    model = build_model("fasterseg_student", 4, aux=True, width_mult=0.25).train()
    x = torch.randn(2, 3, 67, 45)
    out = model(x)
    assert set(out) == {"out", "aux16", "aux32"}
    assert all(v.shape == (2, 4, 67, 45) for v in out.values())
    (out["out"].mean() + 0.2 * out["aux16"].mean() + 0.2 * out["aux32"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert set(model(x[:1])) == {"out"}


def _custom_spec() -> dict:
    """Three branches with both skips, every op and stride-2 variants (aux at 16 and 32)."""
    cell = {"op": "conv", "scale": 8, "stride": 1, "in": 8, "out": 8}
    shared = [
        dict(cell, op="skip"),
        dict(cell, op="zoomed_conv", out=6),
    ]
    b8 = shared + [dict(cell, op="conv_x2", **{"in": 6}, out=4)]
    b16 = shared + [
        dict(cell, op="skip", stride=2, **{"in": 6}, out=10),
        dict(cell, op="zoomed_conv_x2", scale=16, **{"in": 10}, out=8),
    ]
    b32 = shared + [
        dict(cell, op="conv", stride=2, **{"in": 6}, out=12),
        dict(cell, op="zoomed_conv_x2", scale=16, stride=2, **{"in": 12}, out=14),
        dict(cell, op="conv_x2", scale=32, **{"in": 14}, out=16),
    ]
    return {
        "format": "leanseg.fasterseg.arch",
        "version": 1,
        "stem": [4, 6, 8],
        "branches": [
            {"scale": 8, "cells": b8},
            {"scale": 16, "shares": {"branch": 0, "cells": 2}, "cells": b16},
            {"scale": 32, "shares": {"branch": 1, "cells": 2}, "cells": b32},
        ],
        "head": {
            "agg": {"8": 4, "16": 8, "32": 16},
            "fusion": 12,
            "mid": 6,
            "aux_mid": {"16": 10, "32": 16},
        },
    }


@pytest.mark.parametrize("size", [(33, 47), (64, 32)])
def test_custom_spec_network(size):
    torch.manual_seed(0)
    spec = spec_from_dict(_custom_spec())
    assert spec.aux_in_widths() == {16: 8 + 12, 32: 16}  # 1/16: the 16 branch, then the 32's
    model = FasterSeg(spec, 3, aux=True).train()
    out = model(torch.randn(2, 3, *size))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, 3, *size) for k in ("out", "aux16", "aux32")
    }
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(model.backbone.cells) == 3 + 2 + 3  # shared cells once


def test_fasterseg_builder_reads_spec_files(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(_custom_spec()))
    with torch.device("meta"):
        model = build_model("fasterseg", 5, arch=str(path))
        student = build_model("fasterseg", 5)
        teacher = build_model("fasterseg", 5, arch="teacher")
    assert model.spec.scales == (8, 16, 32)
    assert student.spec == packaged_spec("student")
    assert teacher.spec == packaged_spec("teacher")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"arch": "pupil"}, "arch: got 'pupil'"),
        ({"arch": "missing.json"}, "cannot read"),
        ({"aux": "yes"}, "aux: got 'yes'"),
        ({"width_mult": 0}, "width_mult: got 0"),
        ({"colour": "red"}, "unknown option"),
    ],
)
def test_bad_builder_options(options, words):
    with torch.device("meta"), pytest.raises(ConfigError, match=words) as info:
        build_model("fasterseg", 3, **options)
    assert "\n" not in str(info.value)


def test_width_mult_scales_every_width():
    with torch.device("meta"):
        model = build_model("fasterseg_student", 3, width_mult=0.5)
    spec = spec_to_dict(model.spec)
    assert spec["stem"] == [16, 32, 32]
    assert spec["head"]["fusion"] == 64
    assert model.backbone.stem[0][0].out_channels == 16
