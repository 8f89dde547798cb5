"""DDD CRF (models.crf, models.chain_dp): exactness, dual descent, gradients, model switch."""

from __future__ import annotations

import io
import itertools
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanseg import ConfigError, build_model
from leanseg.cli import main
from leanseg.config import load_config
from leanseg.data.synthetic import ensure_synthetic
from leanseg.engine.trainer import model_options
from leanseg.models import crf as crf_module
from leanseg.models.chain_dp import CHAIN_DP, chain_dp, chain_dp_autograd, chain_values
from leanseg.models.crf import DualDecompositionCRF, ddd_inference, dense_crf
from tests.helpers import OutLogits

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _chain(length: int, chains: int, labels: int, seed: int = 0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    unary = torch.randn(length, chains, labels, generator=gen, dtype=dtype) * 2
    pairwise = torch.randn(max(length - 1, 0), chains, labels, labels, generator=gen, dtype=dtype)
    return unary, pairwise


def _labelings(unary, pairwise, chain):
    """Every labeling of one chain with its score, by enumeration."""
    length, _, labels = unary.shape
    for labeling in itertools.product(range(labels), repeat=length):
        score = sum(unary[n, chain, x] for n, x in enumerate(labeling))
        score = score + sum(
            pairwise[n, chain, labeling[n], labeling[n + 1]] for n in range(length - 1)
        )
        yield labeling, score


def _brute_force(unary, pairwise, gamma: float | None) -> torch.Tensor:
    """gamma * logsumexp (max when gamma is None) over the labelings with x_n = c."""
    length, chains, labels = unary.shape
    out = torch.empty_like(unary)
    for chain in range(chains):
        scored = list(_labelings(unary, pairwise, chain))
        for n, c in itertools.product(range(length), range(labels)):
            scores = torch.stack([s for lab, s in scored if lab[n] == c])
            best = scores.max() if gamma is None else gamma * torch.logsumexp(scores / gamma, 0)
            out[n, chain, c] = best
    return out


# ------------------------------------------------------------------------- chain DP


@pytest.mark.parametrize("dp", sorted(CHAIN_DP))
@pytest.mark.parametrize(
    ("length", "labels", "gamma"), [(4, 3, 2.0), (5, 2, 0.5), (3, 3, 1.0), (1, 3, 2.0)]
)
def test_chain_dp_equals_brute_force(dp, length, labels, gamma):
    unary, pairwise = _chain(length, 2, labels, seed=length)
    got = CHAIN_DP[dp](unary, pairwise, gamma)
    torch.testing.assert_close(got, _brute_force(unary, pairwise, gamma), atol=1e-5, rtol=0)


def test_small_gamma_approaches_viterbi_max_marginals():
    unary, pairwise = _chain(5, 2, 3, seed=1)
    exact = _brute_force(unary, pairwise, None)
    errors = []
    for gamma in (1.0, 0.1, 0.01, 0.001):
        error = (chain_dp(unary, pairwise, gamma) - exact).abs().max().item()
        assert error <= gamma * 5 * math.log(3) + 1e-9  # at most gamma * log(#labelings)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2


def test_chain_value_is_the_same_at_every_node():
    unary, pairwise = _chain(33, 6, 21, seed=2, dtype=torch.float32)
    marginals = chain_dp(unary * 5, pairwise, 2.0)
    values = 2.0 * torch.logsumexp(marginals / 2.0, -1)  # (L, N)
    torch.testing.assert_close(values, values[:1].expand_as(values), rtol=1e-5, atol=0)
    torch.testing.assert_close(chain_values(marginals, 2.0), values[0])


def test_chain_dp_gradcheck():
    unary, pairwise = _chain(4, 2, 3, seed=3)
    for length in (4, 1):
        inputs = (unary[:length].requires_grad_(), pairwise[: length - 1].requires_grad_())
        assert torch.autograd.gradcheck(lambda u, t: chain_dp(u, t, 0.7), inputs)


def test_implementations_agree_in_float32():
    unary, pairwise = _chain(17, 5, 7, seed=4, dtype=torch.float32)
    weights = torch.randn(17, 5, 7)
    results = []
    for dp in sorted(CHAIN_DP):
        u, t = unary.clone().requires_grad_(), pairwise.clone().requires_grad_()
        out = CHAIN_DP[dp](u, t, 2.0)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (u, t))))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# ----------------------------------------------------------------------- DDD inference


def _random_grid(batch, labels, height, width, strides=(1, 2), seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    unary = torch.randn(batch, labels, height, width, generator=gen, dtype=dtype) * 2
    pairwise = {}
    for s in strides:
        shape_h = (batch, labels, labels, height, max(width - s, 0))
        shape_v = (batch, labels, labels, max(height - s, 0), width)
        pairwise[("h", s)] = torch.randn(shape_h, generator=gen, dtype=dtype)
        pairwise[("v", s)] = torch.randn(shape_v, generator=gen, dtype=dtype)
    return unary, pairwise


def _naive_ddd(unary, pairwise, gamma, iters):
    """ddd.md section 6 with one chain at a time and one copy tensor per (edge set, sub-grid)."""
    batch, labels, height, width = unary.shape
    strides = sorted({s for _, s in pairwise})
    grids = [(s, i, j) for s in strides for i in range(s) for j in range(s)]
    copies = 2 * len(strides)
    u = {(a, g): unary[:, :, g[1] :: g[0], g[2] :: g[0]] / copies for a in "hv" for g in grids}

    def solve(axis, g):
        s, i, j = g
        theta = pairwise[(axis, s)][..., i::s, j::s]  # edges that start in this sub-grid
        part = u[(axis, g)]
        if axis == "v":  # columns as rows
            part, theta = part.transpose(2, 3), theta.transpose(3, 4)
        m = torch.empty_like(part)
        for b, row in itertools.product(range(batch), range(part.shape[2])):
            nodes = part[b, :, row].T[:, None]  # (L, 1, C)
            edges = theta[b, :, :, row].permute(2, 0, 1)[: nodes.shape[0] - 1, None]
            m[b, :, row] = chain_dp_autograd(nodes, edges, gamma)[:, 0].T
        return m.transpose(2, 3) if axis == "v" else m

    for _ in range(iters):
        m = {key: solve(*key) for key in u}
        total = torch.zeros_like(unary)
        for (_, g), value in m.items():
            total[:, :, g[1] :: g[0], g[2] :: g[0]] += value
        for (a, g), value in m.items():
            u[(a, g)] = u[(a, g)] - (
                value - total[:, :, g[1] :: g[0], g[2] :: g[0]] / copies
            ) / max(height, width)
    return total


@pytest.mark.parametrize(
    ("height", "width", "strides"), [(5, 6, (1, 2)), (4, 3, (1,)), (3, 7, (1, 2, 3))]
)
def test_ddd_equals_naive_per_chain_reference(height, width, strides):
    unary, pairwise = _random_grid(2, 3, height, width, strides, seed=height)
    got = ddd_inference(unary, pairwise, gamma=1.5, iters=3, early_stop=False)
    torch.testing.assert_close(got, _naive_ddd(unary, pairwise, 1.5, 3), atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_never_increases_and_copies_agree_more(seed):
    unary, pairwise = _random_grid(2, 4, 9, 9, seed=seed)
    trace = []
    ddd_inference(unary, pairwise, gamma=2.0, iters=10, early_stop=False, trace=trace)
    duals = torch.stack([t["dual"] for t in trace])  # (iters, B)
    assert (duals[1:] <= duals[:-1] + 1e-9).all(), duals
    assert (duals[-1] < duals[0] - 1e-3).all()

    def disagreement(step):
        marginals = trace[step]["marginals"]
        return (marginals[("h", 1)].argmax(-1) != marginals[("v", 1)].argmax(-1)).double().mean()

    assert disagreement(-1) < disagreement(0)


def test_copies_sum_to_the_unary_after_every_update():
    unary, pairwise = _random_grid(2, 4, 9, 7, seed=5)
    trace = []
    ddd_inference(unary, pairwise, gamma=2.0, iters=6, early_stop=False, trace=trace)
    assert len(trace) == 6
    for step in trace:
        total = sum(step["copies"].values()).permute(0, 3, 1, 2)
        torch.testing.assert_close(total, unary, atol=1e-12, rtol=0)


def test_early_stop_keeps_the_last_accepted_output(monkeypatch):
    unary, pairwise = _random_grid(2, 3, 6, 6, seed=6)
    once = ddd_inference(unary, pairwise, iters=1)
    assert not torch.allclose(ddd_inference(unary, pairwise, iters=4), once)
    monkeypatch.setattr(crf_module, "EARLY_STOP_TOL", -1e9)  # every later iteration "rises"
    trace = []
    torch.testing.assert_close(ddd_inference(unary, pairwise, iters=4, trace=trace), once)
    assert len(trace) == 2  # stopped at the first rise


def test_zero_pairwise_keeps_the_unary_argmax():
    torch.manual_seed(0)
    crf = DualDecompositionCRF(8, 5)
    nn.init.zeros_(crf.pairwise.weight)
    features, unary = torch.randn(2, 8, 7, 9), torch.randn(2, 5, 7, 9)
    out = crf(features, unary)
    assert torch.equal(out.argmax(1), unary.argmax(1))
    nn.init.normal_(crf.pairwise.weight, 0, 1.0)  # and strong pairwise terms do change it
    assert not torch.equal(crf(features, unary).argmax(1), unary.argmax(1))


def _head(labels: int, dp: str = "function", iters: int = 3) -> DualDecompositionCRF:
    torch.manual_seed(0)
    crf = DualDecompositionCRF(4, labels, iters=iters, gamma=1.0, dp=dp)
    nn.init.normal_(crf.pairwise.weight, 0.0, 0.5)  # pairwise terms that matter
    nn.init.normal_(crf.pairwise.bias, 0.0, 0.5)
    return crf


def test_crf_head_gradcheck():
    crf = _head(3).double()
    params = dict(crf.named_parameters())
    x = torch.randn(2, 4, 3, 4, dtype=F64, requires_grad=True)
    unary = torch.randn(2, 3, 3, 4, dtype=F64, requires_grad=True)

    def head(x, unary, weight, bias):
        call = {"pairwise.weight": weight, "pairwise.bias": bias}
        return torch.func.functional_call(crf, call, (x, unary))

    inputs = (x, unary, params["pairwise.weight"], params["pairwise.bias"])
    assert torch.autograd.gradcheck(head, inputs)


@pytest.mark.parametrize("labels", [3, 7])
def test_memory_strategies_agree_for_any_class_count(labels):
    x, unary = torch.randn(2, 4, 6, 5), torch.randn(2, labels, 6, 5)
    target = torch.randint(labels, (2, 6, 5))
    results = []
    for dp in sorted(CHAIN_DP):
        crf = _head(labels, dp)
        xs, us = x.clone().requires_grad_(), unary.clone().requires_grad_()
        out = crf(xs, us)
        assert out.shape == (2, labels, 6, 5) and out.dtype == torch.float32
        F.cross_entropy(out, target).backward()
        results.append((out, xs.grad, us.grad, crf.pairwise.weight.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert results[0][3].abs().sum() > 0


def test_crf_runs_in_float32_under_autocast():
    crf = _head(3)
    x, unary = torch.randn(1, 4, 5, 5), torch.randn(1, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crf(x.bfloat16(), unary.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, crf(x.bfloat16().float(), unary.bfloat16().float()))


# ------------------------------------------------------------------ the model switch

TINY_OPTIONS = {"width_mult": 0.25, "channels": 16}


def _crf_cfg(name: str = "deeplabv3_resnet18", *extra: str):
    options = [f"model.options.{k}={v}" for k, v in TINY_OPTIONS.items()]
    return load_config(None, [f"model.name={name}", *options, "model.crf=ddd", *extra])


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "deeplabv3plus_mobilenetv2"])
def test_config_switch_trains_one_step_and_evaluates(name):
    cfg = _crf_cfg(name, "model.crf_iters=2", "model.crf_gamma=1.5")
    options = model_options(cfg)
    assert options["crf"] == "ddd" and options["crf_iters"] == 2 and options["crf_gamma"] == 1.5
    torch.manual_seed(0)
    model = build_model(name, 7, **options)
    assert model.crf.iters == 2 and model.crf.gamma == 1.5
    plain = build_model(name, 7, **{**options, "crf": None})
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {"crf.pairwise.weight", "crf.pairwise.bias"}
    assert set(plain.state_dict()) <= set(model.state_dict())
    images, masks = torch.randn(2, 3, 64, 80), torch.randint(7, (2, 64, 80))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.crf.pairwise.weight.detach().clone()
    loss = F.cross_entropy(model.train()(images)["out"], masks)
    loss.backward()
    assert model.crf.pairwise.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(model.crf.pairwise.weight, before)
    with torch.no_grad():
        out = model.eval()(images[:1])["out"]
    assert out.shape == (1, 7, 64, 80) and torch.isfinite(out).all()


def test_crf_none_leaves_the_deeplabv3_layout_unchanged():
    with torch.device("meta"):
        default = build_model("deeplabv3_resnet50", 21)
        explicit = build_model("deeplabv3_resnet50", 21, crf=None)
    assert default.crf is None
    assert [k for k in default.state_dict()] == [k for k in explicit.state_dict()]
    assert not any(k.startswith("crf") for k in default.state_dict())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.name=segnet", "model.crf=ddd"], "model.crf"),
        (["model.name=deeplabv3_resnet18", "model.crf=crfasrnn"], "model.crf"),
        (["model.name=deeplabv3_resnet18", "model.crf=ddd", "model.crf_iters=0"], "crf_iters"),
        (["model.name=deeplabv3_resnet18", "model.crf=ddd", "model.crf_gamma=0"], "crf_gamma"),
    ],
)
def test_bad_crf_settings_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_crf_on_an_unsupported_model_fails_when_building_too():
    cfg = load_config(None, ["model.name=segnet"])
    cfg.model.crf = "ddd"  # not re-validated
    with pytest.raises(ConfigError, match="no CRF head"):
        model_options(cfg)
    with pytest.raises(ConfigError, match="crf"):
        build_model("deeplabv3_resnet18", 3, crf="dense")
    with pytest.raises(ConfigError, match="crf_gamma"):
        build_model("deeplabv3_resnet18", 3, crf="ddd", crf_gamma=-1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")  # strided slices
def test_onnx_export_matches_pytorch():
    pytest.importorskip("onnx", reason="the ONNX export test needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export test needs onnxruntime")
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 3, crf="ddd", crf_iters=3, **TINY_OPTIONS)
    nn.init.normal_(model.crf.pairwise.weight, 0.0, 0.3)
    model = OutLogits(model).eval()
    x = torch.randn(1, 3, 80, 64)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()  # every op exports (the early stop is branch-free while tracing)
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["image"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"image": x.numpy()})
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(result), expected, atol=1e-4 * scale, rtol=1e-4)


def test_train_eval_predict_through_the_cli(tmp_path, capsys):
    cache = tmp_path / "cache"
    ensure_synthetic(cache, num_train=8, num_val=2)
    work = tmp_path / "runs"
    options = [f"model.options.{k}={v}" for k, v in TINY_OPTIONS.items()]
    args = ["model.name=deeplabv3_resnet18", *options, "model.crf=ddd", "model.crf_iters=2"]
    args += [f"data.root={cache}", f"train.work_dir={work}", "data.crop_size=64"]
    args += ["data.batch_size=2", "data.synthetic_train=8", "data.synthetic_val=2"]
    args += ["data.workers=0", "train.loggers=[]", "train.iterations=1"]
    args += ["train.val_interval=1", "train.sample_images=0"]
    assert main(["train", *args]) == 0
    (run,) = [p for p in work.iterdir() if p.is_dir()]
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["model_options"]["crf"] == "ddd" and payload["model_options"]["crf_iters"] == 2
    assert "crf.pairwise.weight" in payload["state_dict"]
    assert main(["eval", "--checkpoint", str(run / "last.pt")]) == 0
    assert "mIoU" in capsys.readouterr().out
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(sorted(Path(cache).glob("*/JPEGImages/*.jpg"))[0], inputs / "a.jpg")
    predict = ["predict", "--checkpoint", str(run / "last.pt"), str(inputs), "-o"]
    assert main([*predict, str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "a.png").is_file()


# ---------------------------------------------------------------- DenseCRF baseline


def test_dense_crf_cleans_label_noise_along_image_edges():
    pytest.importorskip("pydensecrf.densecrf", reason="DenseCRF needs leanseg[crf]")
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 48), dtype=np.int64)
    truth[:, 20:] = 1
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=2)
    logits = 2.0 * np.eye(3)[truth].transpose(2, 0, 1) + rng.normal(0, 1.5, (3, 40, 48))
    probs = torch.from_numpy(logits).softmax(0)
    refined = dense_crf(image, probs)
    assert refined.shape == (3, 40, 48) and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    before = (probs.argmax(0).numpy() == truth).mean()
    after = (refined.argmax(0) == truth).mean()
    assert before < 0.95 and after > 0.99


def test_dense_crf_without_the_extra_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ConfigError, match=r"leanseg\[crf\]"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5))
