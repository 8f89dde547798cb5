"""FasterSeg's inference path (BN folded, channels-last on the CPU) against a plain reference,
and ``leanseg bench model --backend onnxruntime``."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from leanseg import build_model
from leanseg.bench_model import round_robin_times
from leanseg.cli import main
from leanseg.models.fasterseg import FasterSeg, spec_from_dict
from leanseg.models.fasterseg.ops import (
    ConvBNReLU,
    ConvX2,
    FactorizedReduce,
    ZoomedConv,
    ZoomedConvX2,
    make_op,
)
from leanseg.models.layers import ConvNormAct
from tests.test_fasterseg_models import _custom_spec

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(32, 48), (33, 47), (15, 9)]  # even, odd, small odd


# ------------------------------------------------------------ plain reference formulation


def ref_zoom(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def ref_op(m: nn.Module, x: Tensor) -> Tensor:
    """Section 2.3 module by module: conv -> BN -> ReLU, resizes with ``align_corners=True``."""
    half = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2)
    size = tuple(x.shape[-2:])
    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, ConvNormAct):
        return F.relu(m[1](m[0](x)))
    if isinstance(m, ConvX2):
        return F.relu(m.bn2(m.conv2(F.relu(m.bn1(m.conv1(x))))))
    if isinstance(m, ZoomedConv):
        out = m.bn1(m.conv1(ref_zoom(x, half)))
        return F.relu(ref_zoom(out, size) if m.stride == 1 else out)
    if isinstance(m, ZoomedConvX2):
        out = m.bn2(m.conv2(F.relu(m.bn1(m.conv1(ref_zoom(x, half))))))
        return F.relu(ref_zoom(out, size) if m.stride == 1 else out)
    if isinstance(m, FactorizedReduce):
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return F.relu(m.bn(torch.cat([m.conv1(x), m.conv2(shifted)], dim=1)))
    raise TypeError(type(m))


def ref_network(model: FasterSeg, x: Tensor) -> Tensor:
    """The eval-mode logits of ``model``, every module through :func:`ref_op`."""
    stem = x
    for layer in model.backbone.stem:
        stem = ref_op(layer, stem)
    computed: dict[str, Tensor] = {}
    branches = []
    for plan in model.backbone.plans:
        features, h = {8: stem}, stem
        for key, scale in plan:
            if key not in computed:
                computed[key] = ref_op(model.backbone.cells[key], h)
            h = features[scale] = computed[key]
        branches.append(features)
    aggregated = []
    for scale, features in zip(model.spec.scales, branches, strict=True):
        agg = model.aggregations[str(scale)]
        out = features[scale]
        for step, arm, refine in zip(agg.steps, agg.arms, agg.refines, strict=True):
            skip = features[step]
            up = ref_zoom(ref_op(arm, out), tuple(skip.shape[-2:]))
            out = ref_op(refine, torch.cat([up, skip], dim=1))
        aggregated.append(out)
    fused = ref_op(model.fusion, torch.cat(aggregated, dim=1))
    logits = model.classifier[1](ref_op(model.classifier[0], fused))
    return ref_zoom(logits, tuple(x.shape[-2:]))


def randomise_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() < 1e-4 * scale


# ------------------------------------------------------------------------------ ops


@pytest.mark.parametrize("op", ["conv", "conv_x2", "zoomed_conv", "zoomed_conv_x2", "skip"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", SIZES)
def test_ops_match_the_reference(op, stride, size):
    torch.manual_seed(0)
    c_in, c_out = (6, 6) if op == "skip" and stride == 1 else (6, 10)
    module = randomise_bn_(make_op(op, c_in, c_out, stride)).eval()
    x = torch.randn(2, c_in, *size)
    with torch.no_grad():
        _assert_close(module(x), ref_op(module, x))
        _assert_close(module(x.contiguous(memory_format=torch.channels_last)), ref_op(module, x))


def test_conv_bn_relu_keeps_conv_norm_act_state():
    ours, theirs = ConvBNReLU(4, 8, 3, stride=2), ConvNormAct(4, 8, 3, stride=2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    randomise_bn_(ours.eval())
    x = torch.randn(1, 4, 11, 10)
    with torch.no_grad():
        _assert_close(ours(x), ref_op(ours, x))


def test_training_mode_is_the_module_path():
    torch.manual_seed(0)
    module = randomise_bn_(make_op("zoomed_conv_x2", 4, 6, 1)).train()
    twin = copy.deepcopy(module)
    x = torch.randn(2, 4, 13, 18)
    assert torch.equal(module(x), ref_op(twin, x))  # bit for bit, batch statistics
    assert torch.equal(module.bn1.running_mean, twin.bn1.running_mean)


def test_hooks_and_fx_tracing_see_every_module():
    torch.manual_seed(0)
    module = randomise_bn_(make_op("conv_x2", 4, 6, 1)).eval()
    x = torch.randn(1, 4, 9, 9)
    module.conv2.register_forward_hook(lambda m, i, o: torch.zeros_like(o))  # like a mask
    with torch.no_grad():
        out = module(x)
    assert torch.equal(out, F.relu(module.bn2(torch.zeros(1, 6, 9, 9))))
    zoomed = randomise_bn_(make_op("zoomed_conv", 4, 6, 2)).eval()
    seen = []
    zoomed.bn1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = zoomed(x)
    assert (seen[0] < 0).any() and torch.equal(out, F.relu(seen[0]))  # not ReLU'd in place
    conv = randomise_bn_(make_op("conv", 4, 6, 1)).eval()
    grads, calls = [], []
    conv[0].register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    conv(torch.randn(1, 4, 9, 9, requires_grad=True)).sum().backward()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            conv(torch.randn(1, 4, 9, 9))
    finally:
        handle.remove()
    assert len(grads) == 1 and len(calls) == 4  # the ConvBNReLU, its conv, BN and ReLU
    graph = fx.symbolic_trace(make_op("conv_x2", 4, 6, 1).eval())
    called = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert called == ["conv1", "bn1", "conv2", "bn2"]


# -------------------------------------------------------------------------- networks


@pytest.mark.parametrize("size", [(64, 96), (67, 45)])
def test_student_matches_the_reference(size):
    torch.manual_seed(0)
    model = randomise_bn_(build_model("fasterseg_student", 19, width_mult=0.25)).eval()
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        out = model(x)["out"]
        expected = ref_network(model, x)
    assert out.is_contiguous()  # channels-last stays inside
    _assert_close(out, expected)


def test_custom_spec_with_every_op_matches_the_reference():
    torch.manual_seed(0)
    model = randomise_bn_(FasterSeg(spec_from_dict(_custom_spec()), 5)).eval()
    x = torch.randn(2, 3, 65, 47)
    with torch.no_grad():
        _assert_close(model(x)["out"], ref_network(model, x))


def test_state_dict_unchanged():
    with torch.device("meta"):
        model = build_model("fasterseg_student", 19, aux=True)
    keys = list(model.state_dict())
    # the layout the tests of test_fasterseg_models.py and saved checkpoints rely on
    assert keys[:3] == [
        "backbone.stem.0.0.weight",
        "backbone.stem.0.1.weight",
        "backbone.stem.0.1.bias",
    ]
    assert "aggregations.32.arms.0.1.running_var" in keys and "classifier.1.bias" in keys
    assert len(keys) == 282


# ------------------------------------------------------------------------ benchmarking


def test_round_robin_times_drops_warmup_and_sorts():
    calls = iter([9.0, 1.0, 3.0, 2.0, 5.0, 4.0])
    steps = [lambda: next(calls), lambda: next(calls)]
    assert round_robin_times(steps, rounds=2, warmup=1) == [[3.0, 5.0], [2.0, 4.0]]


TINY = ["model.name=fasterseg_student", "model.options.width_mult=0.25", "data.crop_size=32"]
FAST = ["--runs", "2", "--warmup", "1", "--threads", "1"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bench_model_onnxruntime_records_the_backend(capsys):
    ort = pytest.importorskip("onnxruntime")
    assert main(["bench", "model", *TINY, *FAST, "--backend", "onnxruntime"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["backends"]["onnxruntime"]
    backend = entry["backend"]
    assert backend["name"] == "onnxruntime" and backend["onnxruntime"] == ort.__version__
    assert backend["execution_provider"] == "CPUExecutionProvider"
    assert backend["threads"] == 1 and backend["device"] == "cpu"
    assert torch.__version__ in backend["exported_with"]
    assert 0 < entry["latency_seconds_p10"] <= entry["latency_seconds_p90"]
    assert main(["bench", "model", *TINY, "train.precision=fp32", *FAST]) == 0
    backend = json.loads(capsys.readouterr().out)["backends"]["torch"]["backend"]
    assert backend == {
        "name": "torch eager",
        "torch": torch.__version__,
        "device": "cpu",
        "threads": 1,
        "precision": "fp32",
        "channels_last": False,
    }


def test_missing_onnxruntime_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert main(["bench", "model", *TINY, *FAST, "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "onnxruntime" in err and "leanseg[deploy]" in err
