"""BackRazor (leanseg.methods.backrazor): packing, masks, exactness, checkpoints, memory."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.methods import backrazor as br
from leanseg.models import build_model
from leanseg.models.layers import WSConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse(module: nn.Module, ratio: float) -> nn.Module:
    return br.apply(copy.deepcopy(module), ratio, scope="all")


def _out(y: Tensor | dict[str, Tensor]) -> Tensor:
    return y["out"] if isinstance(y, dict) else y


# ---------------------------------------------------------------------------- packing and masks


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (13, 17, 3)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed, numel = br.pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert numel == mask.numel() and packed.numel() == math.ceil(numel / 8)
    assert torch.equal(br.unpack_mask(packed, shape), mask)


def test_pack_is_msb_first_and_zero_padded() -> None:
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    packed, _ = br.pack_mask(mask)
    assert packed.tolist() == [0b10000011, 0b11000000]


def test_pack_unpack_every_byte_value_against_bitwise_reference() -> None:
    byte_values = torch.arange(256, dtype=torch.uint8)
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = ((byte_values[:, None] >> shifts) & 1).bool().flatten()
    assert torch.equal(br.pack_mask(bits)[0], byte_values)
    assert torch.equal(br.unpack_mask(byte_values, bits.shape), bits)


def test_pack_a_mask_view_at_an_odd_offset() -> None:
    mask = torch.rand(40, generator=torch.Generator().manual_seed(3)) > 0.5
    view = mask[3:20]  # storage offset 3: not aligned to a 64-bit word
    assert torch.equal(br.unpack_mask(br.pack_mask(view)[0], view.shape), view)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.9, 0.97])
def test_each_sample_keeps_ceil_of_kept_fraction(ratio: float) -> None:
    x = torch.randn(3, 5, 7, 2, generator=torch.Generator().manual_seed(1))  # distinct values
    n = x[0].numel()
    expected = math.ceil((1 - Fraction(str(ratio))) * n)
    mask = br.magnitude_mask(x, ratio)
    assert mask.flatten(1).sum(dim=1).tolist() == [expected] * 3
    for b in range(3):  # the kept entries are the largest magnitudes of that sample
        top = x[b].abs().flatten().topk(expected).indices
        assert mask[b].flatten()[top].all()


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_non_negative_input_gives_the_same_mask_as_its_negation(ratio: float) -> None:
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(4)).abs()
    # x >= 0 takes the no-abs path; -x takes the abs path: both must keep the same entries
    assert torch.equal(br.magnitude_mask(x, ratio), br.magnitude_mask(-x, ratio))
    assert (
        br.magnitude_mask(x, ratio).flatten(1).sum(1).tolist()
        == [math.ceil((1 - ratio) * 324 - 1e-9)] * 2
    )


def _reference_mask(x: Tensor, ratio: float) -> Tensor:
    """The spec's rule with a full per-sample selection (kthvalue over every entry)."""
    rows = x.reshape(x.shape[0], -1).abs()
    n = rows.shape[1]
    keep = br.keep_count(n, ratio)
    tau = rows.kthvalue(n - keep + 1, dim=1, keepdim=True).values
    return ((rows >= tau) & (rows != 0)).view(x.shape)


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.97])
def test_sampled_selection_on_large_samples_equals_the_full_selection(ratio: float) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 32, 40, 40, generator=gen)  # 51,200 entries a sample: the sampled path
    x[1] = x[1].relu()  # half zeros
    x[2, :4] *= 20  # a few loud channels
    assert torch.equal(br.magnitude_mask(x, ratio), _reference_mask(x, ratio))


def test_selection_falls_back_when_the_sampled_bound_misses() -> None:
    x = torch.rand(2, 61 * 1000) * 0.01
    x[:, ::61] += 1.0  # exactly the strided sample is loud: its bound overshoots
    assert torch.equal(br.magnitude_mask(x, 0.5), _reference_mask(x, 0.5))
    assert br.magnitude_mask(x, 0.5).sum(dim=1).tolist() == [30500, 30500]


def test_mask_threshold_is_per_sample() -> None:
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(2))
    x[1] *= 1000  # a batch-wide threshold would keep only sample 1
    assert br.magnitude_mask(x, 0.5).sum(dim=1).tolist() == [25, 25]


def test_zeros_after_relu_are_pruned() -> None:
    x = torch.relu(torch.randn(2, 100, generator=torch.Generator().manual_seed(3)))
    x[:, :80] = 0  # >= ratio of the entries are 0: tau = 0 must not keep them all
    mask = br.magnitude_mask(x, 0.7)
    assert (mask.sum(dim=1) <= 20).all()
    packed, values = br.sparsify(x, 0.0)
    assert torch.equal(br.unsparsify(packed, values, x.shape), x)


def test_sparsify_round_trip_equals_masked_input() -> None:
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(4))
    packed, values = br.sparsify(x, 0.6)
    mask = br.magnitude_mask(x, 0.6)
    assert values.numel() == int(mask.sum())
    assert torch.equal(br.unsparsify(packed, values, x.shape), x * mask)


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("name", "norm"),
    [
        ("deeplabv3_mobilenetv2", "bn"),
        ("deeplabv3_resnet18", "bn"),
        ("deeplabv3_resnet18", "gn_ws"),
    ],
)
def test_model_forward_identical_and_exact_gradients_at_ratio_zero(name: str, norm: str) -> None:
    torch.manual_seed(0)
    dense = build_model(name, 3, width_mult=0.25, norm=norm).train()
    sparse0 = br.apply(copy.deepcopy(dense), 0.0)
    sparse7 = br.apply(copy.deepcopy(dense), 0.7)
    assert any(isinstance(m, br.BackRazorMixin) for m in sparse7.backbone.modules())
    x = torch.randn(2, 3, 33, 33)
    outs = []
    for model in (dense, sparse0, sparse7):
        torch.manual_seed(1)  # the same dropout masks
        outs.append(_out(model(x)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for key, value in dense.state_dict().items():  # running statistics too
        assert torch.equal(value, sparse7.state_dict()[key]), key
    outs[0].square().mean().backward()
    outs[1].square().mean().backward()
    for (key, p), q in zip(dense.named_parameters(), sparse0.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), key


def test_state_dict_round_trip_with_plain_model() -> None:
    torch.manual_seed(0)
    plain = build_model("deeplabv3_mobilenetv2", 3, width_mult=0.25)
    params = {k: v.data_ptr() for k, v in plain.state_dict().items()}
    sparse = br.apply(plain, 0.7, scope="all")
    assert sparse is plain and isinstance(sparse.backbone.features[0][0], nn.Conv2d)
    assert {k: v.data_ptr() for k, v in sparse.state_dict().items()} == params  # same tensors
    with torch.no_grad():  # change the weights and the running stats
        for p in sparse.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        sparse.train()(torch.randn(2, 3, 33, 33))
    other = build_model("deeplabv3_mobilenetv2", 3, width_mult=0.25)
    assert list(other.state_dict()) == list(sparse.state_dict())
    other.load_state_dict(sparse.state_dict(), strict=True)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(_out(other.eval()(x)), _out(sparse.eval()(x)))
    fresh = br.apply(build_model("deeplabv3_mobilenetv2", 3, width_mult=0.25), 0.5)
    fresh.load_state_dict(other.state_dict(), strict=True)  # and plain -> BackRazor


def test_apply_scope_and_validation() -> None:
    model = build_model("deeplabv3_resnet18", 3, width_mult=0.25)
    br.apply(model, 0.7)
    assert all(
        type(m) is not nn.Conv2d and type(m) is not nn.BatchNorm2d for m in model.backbone.modules()
    )
    assert not any(isinstance(m, br.BackRazorMixin) for m in model.classifier.modules())
    br.apply(model, 0.5)
    assert {m.backrazor_ratio for m in model.modules() if isinstance(m, br.BackRazorMixin)} == {0.5}
    br.remove(model)
    assert not any(isinstance(m, br.BackRazorMixin) for m in model.modules())
    for ratio in (-0.1, 1.0, True, "0.5"):
        with pytest.raises(ConfigError, match="backrazor.ratio"):
            br.apply(model, ratio)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="backrazor.scope"):
        br.apply(model, 0.5, scope="neck")
    with pytest.raises(ConfigError, match="backbone"):
        br.apply(nn.Sequential(nn.Conv2d(1, 1, 1)), 0.5)


# ---------------------------------------------------------------------------- single layers, R > 0

RATIO = 0.8


def _grads(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    x = x.clone().requires_grad_(True)
    module(x).backward(grad)
    return x.grad, {k: p.grad for k, p in module.named_parameters()}


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1, bias=True),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
        nn.Conv2d(4, 6, 2, padding="same", padding_mode="reflect", dilation=2),
        WSConv2d(4, 6, 3, stride=2, padding=1, bias=True),
    ],
    ids=["bias", "strided_dilated_grouped", "depthwise", "same_reflect", "ws"],
)
def test_conv_weight_grad_uses_masked_input_and_input_grad_is_exact(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    conv.train()
    x = torch.randn(2, 4, 9, 9)
    sparse = _sparse(conv, RATIO)
    out = sparse(x.clone().requires_grad_(True))
    assert out.grad_fn is not None and "SparseConv2dFn" in type(out.grad_fn).__name__
    grad = torch.randn_like(out)
    dx_dense, g_dense = _grads(copy.deepcopy(conv), x, grad)
    padded = x if conv.padding_mode == "zeros" else nn.functional.pad(x, (1, 1, 1, 1), "reflect")
    masked_input = padded * br.magnitude_mask(padded, RATIO)
    if conv.padding_mode != "zeros":  # the padded tensor is what the conv saves
        reference = nn.Conv2d(4, 6, 2, dilation=2)
        reference.load_state_dict(conv.state_dict())
    else:
        reference = copy.deepcopy(conv)
    _, g_masked = _grads(reference, masked_input, grad)
    dx_sparse, g_sparse = _grads(sparse, x, grad)
    assert torch.equal(dx_sparse, dx_dense)
    assert torch.allclose(g_sparse["weight"], g_masked["weight"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(g_sparse["weight"], g_dense["weight"], rtol=1e-3, atol=1e-4)
    if conv.bias is not None:
        assert torch.allclose(g_sparse["bias"], g_dense["bias"], rtol=1e-6, atol=1e-7)


def test_linear_on_3d_input() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 5).train()
    x = torch.randn(3, 4, 6)
    grad = torch.randn(3, 4, 5)
    dx_dense, g_dense = _grads(copy.deepcopy(linear), x, grad)
    _, g_masked = _grads(copy.deepcopy(linear), x * br.magnitude_mask(x, RATIO), grad)
    dx_sparse, g_sparse = _grads(_sparse(linear, RATIO), x, grad)
    assert torch.allclose(dx_sparse, dx_dense, rtol=1e-6, atol=1e-7)
    assert g_sparse["weight"].shape == linear.weight.shape
    assert torch.allclose(g_sparse["weight"], g_masked["weight"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(g_sparse["weight"], g_dense["weight"], rtol=1e-3, atol=1e-4)
    assert torch.allclose(g_sparse["bias"], g_dense["bias"], rtol=1e-6, atol=1e-7)


def test_batchnorm_backward_uses_masked_input_with_forward_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 5, 5) * 2 + 1
    grad = torch.randn(2, 3, 5, 5)
    sparse = _sparse(bn, RATIO)
    dx_sparse, g_sparse = _grads(sparse, x, grad)
    reference = copy.deepcopy(bn)
    reference(x)
    assert torch.equal(sparse.running_mean, reference.running_mean)
    assert torch.equal(sparse.running_var, reference.running_var)
    # reference in float64: the BN backward with x~ and the dense input's mean / invstd
    x64, g64 = x.double(), grad.double()
    mean = x64.mean(dim=(0, 2, 3), keepdim=True)
    invstd = (x64.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn.eps).rsqrt()
    x_hat = (x64 * br.magnitude_mask(x, RATIO) - mean) * invstd
    count = x.numel() / x.shape[1]
    gamma = bn.weight.detach().double().view(1, -1, 1, 1)
    sum_g = g64.sum(dim=(0, 2, 3), keepdim=True)
    sum_gx = (g64 * x_hat).sum(dim=(0, 2, 3), keepdim=True)
    dx_ref = gamma * invstd / count * (count * g64 - sum_g - x_hat * sum_gx)
    assert torch.allclose(g_sparse["weight"].double(), sum_gx.flatten(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_sparse["bias"].double(), sum_g.flatten(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(dx_sparse.double(), dx_ref, rtol=1e-4, atol=1e-5)
    dx_dense, _ = _grads(copy.deepcopy(bn), x, grad)
    assert not torch.allclose(dx_sparse, dx_dense, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.ReLU6(inplace=True)])
def test_packed_relu_is_exact_and_out_of_place(act: nn.Module) -> None:
    x = torch.tensor([[-1.0, 0.0, 0.5, 6.0, 7.0, 3.0, -0.0, 2.0, 9.0]])
    grad = torch.arange(1.0, 10.0).view(1, -1)
    sparse = _sparse(act, 0.5)
    x_in = x.clone().requires_grad_(True)
    inp = x_in * 1.0  # a non-leaf that an in-place op could overwrite
    out = sparse.train()(inp)
    assert torch.equal(inp, x) and "PackedReLUFn" in type(out.grad_fn).__name__
    out.backward(grad)
    dx_dense, _ = _grads(type(act)(), x, grad)
    assert torch.equal(out, type(act)()(x))
    assert torch.equal(x_in.grad, dx_dense)


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, 2, 1),  # ResNet's stem: overlapping windows
        nn.MaxPool2d(2),
        nn.MaxPool2d((3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
        nn.MaxPool2d(3, 2, ceil_mode=True),
    ],
)
def test_packed_max_pool_is_exact_and_saves_one_byte_per_output(pool: nn.MaxPool2d) -> None:
    x = torch.randn(2, 3, 11, 13, generator=torch.Generator().manual_seed(5))
    x[0, 0, :4, :4] = 1.0  # ties inside windows
    sparse = _sparse(pool, RATIO).train()
    grad = torch.randn_like(pool(x), memory_format=torch.contiguous_format)
    dx_sparse, _ = _grads(sparse, x, grad)
    dx_dense, _ = _grads(pool, x, grad)
    assert torch.equal(sparse(x), pool(x))
    assert torch.allclose(dx_sparse, dx_dense, rtol=0, atol=1e-6)
    leaf = x.clone().requires_grad_(True)
    saved = br.saved_tensor_bytes(lambda: sparse(leaf))
    assert saved == pool(x).numel()  # one uint8 per output


def test_layers_reading_one_tensor_share_its_sparse_copy() -> None:
    torch.manual_seed(7)
    a, b = _sparse(nn.Conv2d(4, 4, 3, padding=1), RATIO), _sparse(nn.Conv2d(4, 4, 1), RATIO)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)

    def both() -> Tensor:
        h = x * 1.0
        return a(h) + b(h)

    def one() -> Tensor:
        return a(x * 1.0)

    assert br.saved_tensor_bytes(both, exclude_parameters=True) == br.saved_tensor_bytes(
        one, exclude_parameters=True
    )
    h = x * 1.0
    out_a = a(h)
    h.mul_(2.0)  # a changed tensor is sparsified afresh
    out_b = b(h)
    (out_a.sum() + out_b.sum()).backward()
    h2 = (x.detach() * 2.0).requires_grad_(True)
    masked = h2.detach() * br.magnitude_mask(h2.detach(), RATIO)
    ref = torch.autograd.grad(F.conv2d(masked, b.weight).sum(), b.weight)[0]
    assert torch.allclose(b.weight.grad, ref, atol=1e-5)


def test_eval_mode_uses_the_stock_forward() -> None:
    conv = _sparse(nn.Conv2d(2, 2, 3), RATIO).eval()
    out = conv(torch.randn(1, 2, 5, 5, requires_grad=True))
    assert "SparseConv2dFn" not in type(out.grad_fn).__name__


def test_weight_grad_error_grows_with_ratio() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).train()
    x, grad = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, dense = _grads(copy.deepcopy(conv), x, grad)
    errors = []
    for ratio in (0.0, 0.3, 0.6, 0.9):
        _, g = _grads(_sparse(conv, ratio), x, grad)
        errors.append((g["weight"] - dense["weight"]).norm().item())
    assert errors[0] < 1e-5 and errors == sorted(errors) and errors[-1] > errors[1]


# ---------------------------------------------------------------------------- memory


def test_saved_bytes_of_a_conv_stack_shrink_at_ratio_0_9() -> None:
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(4)]).train()
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    dense = br.saved_tensor_bytes(lambda: stack(x))
    sparse_stack = _sparse(stack, 0.9)
    sparse = br.saved_tensor_bytes(lambda: sparse_stack(x))
    assert dense >= 4 * x.numel() * 4  # four dense fp32 inputs
    assert sparse < dense / 4
    activations = br.saved_tensor_bytes(lambda: sparse_stack(x), exclude_parameters=True)
    n = x.numel()
    assert activations <= 4 * (math.ceil(0.1 * n / 2) * 2 * 4 + math.ceil(n / 8))
    # the analytic estimate: 4 inputs of n entries
    assert br.analytic_saved_bytes(stack, tuple(x.shape)) == 4 * 4 * n
    assert br.analytic_saved_bytes(sparse_stack, tuple(x.shape)) == round(4 * (0.4 * n + n / 8))
    relu_net = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
    assert br.analytic_saved_bytes(relu_net, tuple(x.shape)) == 4 * n + n // 8


def test_autocast_forward_identical_and_gradients_match_at_ratio_zero() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 4),
    ).train()
    sparse = _sparse(net, 0.0)
    x = torch.randn(2, 3, 5, 5)
    outs = []
    for model in (net, sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x))
        outs[-1].float().square().sum().backward()
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    assert "SparseLinearFn" in type(outs[1].grad_fn).__name__
    for (key, p), q in zip(net.named_parameters(), sparse.parameters(), strict=True):
        assert q.grad.dtype == torch.float32 and torch.allclose(p.grad, q.grad), key


def _with_acosp_masks(model: nn.Module) -> nn.Module:
    from leanseg.methods import acosp

    acosp.apply(model, 0.5, min_keep=2)
    acosp.set_temperature(model, 0.1)
    return model


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda: _with_acosp_masks(build_model("deeplabv3_resnet18", 3, width_mult=0.25)),
            id="acosp",
        ),
        pytest.param(
            lambda: build_model("deeplabv3_resnet18", 3, width_mult=0.25, crf="ddd", crf_iters=2),
            id="ddd",
        ),
    ],
)
def test_composes_with_acosp_masks_and_the_ddd_crf(build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    dense = build().train()
    sparse0 = _sparse(dense, 0.0)
    sparse9 = _sparse(dense, 0.9)
    x = torch.randn(2, 3, 33, 33)
    outs = []
    for model in (dense, sparse0, sparse9):
        torch.manual_seed(1)
        outs.append(_out(model(x)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for out in outs:
        out.square().mean().backward()
    named = dict(sparse9.named_parameters())
    for (key, p), q in zip(dense.named_parameters(), sparse0.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), key
        assert named[key].grad is not None, key  # every parameter (ACoSP scores too) still learns


# ---------------------------------------------------------------------------- value dtype, BN modes


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
def test_narrow_value_dtype_stores_narrow_values_and_weight_grad_uses_them(
    value_dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).train()
    x = torch.randn(2, 4, 16, 16)
    grad = torch.randn(2, 6, 16, 16)
    narrow = br.apply(copy.deepcopy(conv), RATIO, scope="all", value_dtype=str(value_dtype)[6:])
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = narrow(x.clone().requires_grad_(True))
    assert value_dtype in {t.dtype for t in saved}
    out.backward(grad)
    rounded = (x * br.magnitude_mask(x, RATIO)).to(value_dtype).float()
    _, g_rounded = _grads(copy.deepcopy(conv), rounded, grad)
    assert torch.allclose(narrow.weight.grad, g_rounded["weight"], rtol=1e-5, atol=1e-5)
    wide = _sparse(conv, RATIO)
    n = x.numel()
    x_grad = x.clone().requires_grad_(True)
    wide_bytes = br.saved_tensor_bytes(lambda: wide(x_grad), exclude_parameters=True)
    narrow_bytes = br.saved_tensor_bytes(lambda: narrow(x_grad), exclude_parameters=True)
    assert wide_bytes - narrow_bytes == math.ceil((1 - RATIO) * n / 2) * 2 * 2  # 2 bytes a value
    shape = tuple(x.shape)
    assert br.analytic_saved_bytes(narrow, shape) == round(2 * 0.2 * n + n / 8)


def test_frozen_bn_uses_running_statistics_saves_nothing_and_is_exact() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    frozen = br.apply(copy.deepcopy(bn).train(), 0.9, scope="all", bn="frozen")
    assert type(frozen) is br.FrozenStatsBatchNorm2d
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    grad = torch.randn_like(x)
    dx_frozen, g_frozen = _grads(frozen, x, grad)
    dx_eval, _ = _grads(copy.deepcopy(bn).eval(), x, grad)
    with torch.no_grad():
        assert torch.allclose(frozen(x), bn.eval()(x), rtol=1e-6, atol=1e-6)
    assert torch.allclose(dx_frozen, dx_eval, rtol=1e-6, atol=1e-7)
    assert g_frozen == {"weight": None, "bias": None}
    assert torch.equal(frozen.running_mean, stats[0]) and torch.equal(frozen.running_var, stats[1])
    x_grad = x.clone().requires_grad_(True)
    assert br.saved_tensor_bytes(lambda: frozen(x_grad), exclude_parameters=True) < x.numel()
    assert br.analytic_saved_bytes(nn.Sequential(frozen), tuple(x.shape)) == 0
    br.apply(frozen, 0.9, scope="all", bn="sparse")  # leaving frozen gives the affine back
    assert type(frozen) is br.SparseBatchNorm2d and frozen.weight.requires_grad
    br.apply(frozen, 0.9, scope="all", bn="frozen")
    br.remove(frozen)
    assert type(frozen) is nn.BatchNorm2d and frozen.bias.requires_grad


def test_dense_bn_mode_keeps_stock_batchnorm_and_the_model_saves_less_with_each_option() -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 3, width_mult=0.25).train()
    x = torch.randn(2, 3, 33, 33)
    saved = {}
    for bn, value_dtype in [
        ("dense", None),
        ("sparse", None),
        ("sparse", "bfloat16"),
        ("frozen", None),
    ]:
        br.apply(model, 0.9, scope="all", value_dtype=value_dtype, bn=bn)
        norms = {type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
        assert norms == {br.modules.BN_TYPES[bn]}
        saved[bn, value_dtype] = br.saved_tensor_bytes(lambda: model(x), exclude_parameters=True)
    assert saved["dense", None] > saved["sparse", None] > saved["sparse", "bfloat16"]
    assert saved["sparse", None] > saved["frozen", None]


def test_value_dtype_and_bn_mode_validation() -> None:
    model = build_model("deeplabv3_resnet18", 3, width_mult=0.25)
    for value_dtype in ("float64", torch.float32, "fp16"):
        with pytest.raises(ConfigError, match="backrazor.value_dtype"):
            br.apply(model, 0.5, value_dtype=value_dtype)
    with pytest.raises(ConfigError, match="backrazor.bn"):
        br.apply(model, 0.5, bn="sync")


# ---------------------------------------------------------------------------- bf16, channels_last


def _bf16_channels_last_step(
    model: nn.Module, x: Tensor, target: Tensor, lr: float = 0.1
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One SGD step under bf16 autocast, channels_last model and input: (out, loss, grads)."""
    model = model.train().to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _out(model(x))
    loss = F.cross_entropy(out.float(), target)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return out, loss, grads


@pytest.mark.parametrize("name", ["deeplabv3_mobilenetv2", "deeplabv3_resnet50"])
def test_bf16_channels_last_step_is_stock_at_ratio_zero_and_finite_at_0_9(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    stock = build_model(name, 5, width_mult=0.25)
    x = torch.randn(2, 3, 48, 48)
    target = torch.randint(5, (2, 48, 48))
    out, loss, grads = _bf16_channels_last_step(copy.deepcopy(stock), x, target)
    out0, loss0, grads0 = _bf16_channels_last_step(_sparse(stock, 0.0), x, target)
    # ratio 0 keeps every nonzero entry: the same computation as the stock layers, bit for bit
    assert out.dtype == torch.bfloat16 and torch.equal(out, out0) and torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys()
    for key, grad in grads.items():
        assert torch.equal(grad, grads0[key]), key
    sparse9 = _sparse(stock, 0.9)
    stored: list[tuple[torch.dtype, torch.dtype]] = []  # (input dtype, kept values dtype)
    sparsify = br.functions.sparsify_stored

    def spy(x: Tensor, *args: object) -> tuple[Tensor, Tensor, br.packing.Layout]:
        packed, values, layout = sparsify(x, *args)  # type: ignore[arg-type]
        stored.append((x.dtype, values.dtype))
        return packed, values, layout

    monkeypatch.setattr(br.functions, "sparsify_stored", spy)
    before = {k: p.detach().clone() for k, p in sparse9.named_parameters()}
    out9, loss9, grads9 = _bf16_channels_last_step(sparse9, x, target)
    # every sparse layer ran in bf16 and stored its kept values in that dtype
    assert len(stored) > 20 and set(stored) == {(torch.bfloat16, torch.bfloat16)}
    assert torch.equal(out9, out) and torch.isfinite(loss9)
    assert grads9.keys() == grads.keys()
    assert all(torch.isfinite(g).all() for g in grads9.values())
    changed = [k for k, p in sparse9.named_parameters() if not torch.equal(p, before[k])]
    assert changed and all(torch.isfinite(p).all() for p in sparse9.parameters())
    assert any(not torch.equal(grads9[k], grads[k]) for k in grads)  # R = 0.9 does prune


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_channels_last_layers_keep_the_same_entries_as_contiguous(autocast: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).train()
    x = torch.randn(2, 6, 12, 12)
    grad = torch.randn(2, 8, 12, 12)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = _sparse(net, RATIO).to(memory_format=memory_format)
        leaf = x.clone(memory_format=memory_format).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(leaf)
        assert out.is_contiguous(memory_format=memory_format)
        out.backward(grad.to(out.dtype).contiguous(memory_format=memory_format))
        results.append((out, leaf.grad, [p.grad for p in model.parameters()]))
    (out_a, dx_a, g_a), (out_b, dx_b, g_b) = results
    # the convolutions differ by rounding between the formats (so do the stock ones)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    assert torch.allclose(out_a.float(), out_b.float(), **tol)
    assert torch.allclose(dx_a.float(), dx_b.float(), **tol)
    for a, b in zip(g_a, g_b, strict=True):
        assert torch.allclose(a, b, **tol)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_channels_last_conv_weight_grad_uses_the_masked_input(autocast: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 12, 12).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    sparse = _sparse(conv, RATIO)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sparse(x.clone().requires_grad_(True))
    out.backward(grad.to(out.dtype))
    cast = x.to(torch.bfloat16) if autocast else x  # what the layer sees under autocast
    masked = cast * br.magnitude_mask(cast, RATIO)
    reference = copy.deepcopy(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref_out = reference(masked.contiguous(memory_format=torch.channels_last))
    ref_out.backward(grad.to(ref_out.dtype))
    assert torch.equal(sparse.weight.grad, reference.weight.grad)
    assert torch.equal(sparse.bias.grad, reference.bias.grad)


def test_sparse_copy_of_a_channels_last_tensor_is_not_a_copy_and_keeps_its_strides() -> None:
    x = torch.randn(2, 8, 6, 5, generator=torch.Generator().manual_seed(8))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    rows, layout = br.packing.storage_rows(x_cl)
    assert rows.data_ptr() == x_cl.data_ptr() and rows.shape == (2, 240)  # a view
    packed, values, layout = br.packing.sparsify_stored(x_cl, 0.7)
    back = br.packing.unsparsify_stored(packed, values, layout)
    assert back.stride() == x_cl.stride()  # what the stock backward would have seen
    assert torch.equal(back, x * br.magnitude_mask(x, 0.7))
    # the same kept set as the row-major sparsifier, whatever the order of the entries
    assert torch.equal(br.magnitude_mask(x_cl, 0.7), br.magnitude_mask(x, 0.7))
    odd = torch.randn(3, 4, 5).transpose(0, 2)  # no sample-major layout: copied, still exact
    packed, values, layout = br.packing.sparsify_stored(odd, 0.5)
    assert torch.equal(
        br.packing.unsparsify_stored(packed, values, layout), odd * br.magnitude_mask(odd, 0.5)
    )


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_packed_max_pool_backward_is_the_stock_one_in_bf16(
    memory_format: torch.memory_format,
) -> None:
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 4, 17, 17, generator=torch.Generator().manual_seed(9)).bfloat16()
    x = x.contiguous(memory_format=memory_format)
    grad = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(10)).bfloat16()
    dx_sparse, _ = _grads(_sparse(pool, RATIO).train(), x, grad)
    dx_stock, _ = _grads(pool, x, grad)
    # overlapping windows add up to 4 gradients: bf16 sums must be rounded as the stock op does
    assert torch.equal(dx_sparse, dx_stock) and dx_sparse.stride() == dx_stock.stride()


def test_backward_reuses_dense_buffers_and_drops_them_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)], nn.ReLU())
    sparse = _sparse(stack.train(), RATIO)
    x = torch.randn(2, 8, 16, 16)
    grad = torch.randn(2, 8, 16, 16)
    scratch = br.packing.scratch
    with monkeypatch.context() as patch:  # nothing given back: every buffer fresh
        patch.setattr(scratch, "give", lambda tensor: None)
        dx_fresh, g_fresh = _grads(sparse, x, grad)
    g_fresh = {key: value.clone() for key, value in g_fresh.items()}
    sparse.zero_grad(set_to_none=True)
    reused: list[bool] = []
    take = scratch.take

    def spy(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        buffer = take(numel, dtype, device)
        reused.append(buffer is not None)
        return buffer

    monkeypatch.setattr(scratch, "take", spy)
    dx, g = _grads(sparse, x, grad)
    assert sum(reused) >= 3  # later layers got the buffers earlier ones were done with
    assert not scratch.free and not scratch.armed  # all dropped when the backward ended
    assert torch.equal(dx, dx_fresh)
    for key, value in g.items():
        assert torch.equal(value, g_fresh[key]), key


def test_a_relu_output_changed_in_place_is_checked_for_signs_again() -> None:
    torch.manual_seed(0)
    relu, conv = _sparse(nn.ReLU(), RATIO).train(), _sparse(nn.Conv2d(4, 4, 1), RATIO).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    h = relu(x)
    with torch.no_grad():
        h.sub_(0.5)  # now has negative entries: |h| must rank them, not h
    out = conv(h)
    grad = torch.randn_like(out)
    out.backward(grad)
    plain = h.detach()
    masked = plain * br.magnitude_mask(plain, RATIO)
    (expected,) = torch.autograd.grad(F.conv2d(masked, conv.weight, conv.bias), conv.weight, grad)
    assert torch.allclose(conv.weight.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "ties", "heavy_tail", "sorted", "nan"])
def test_banded_threshold_selection_equals_the_full_selection(kind: str) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(3, 200_000, generator=gen)  # many candidates a row: the banded selection
    if kind == "ties":
        x = (x * 40).round() / 40
    elif kind == "heavy_tail":
        x = torch.randn(3, 200_000, generator=gen) ** 3
    elif kind == "sorted":
        x = x.sort(dim=1).values
    elif kind == "nan":
        x[0, ::997] = float("nan")
    for ratio in (0.5, 0.9, 0.99):
        assert torch.equal(br.magnitude_mask(x, ratio), _reference_mask(x, ratio)), ratio
    values = x.abs()[0].contiguous()
    for keep in (1, 1000, 100_000, 199_000):  # direct calls, whatever the bounds
        expected = values.topk(values.numel() - keep + 1, largest=False).values.amax()
        got = br.selection._thresholds(values, [values.numel()], keep)[0]
        assert torch.equal(got, expected) or (got.isnan() and expected.isnan()), keep


def test_autocast_saves_no_low_precision_copy_of_the_weights() -> None:
    """Under bf16 autocast the sparse conv / linear save the fp32 parameter, not a bf16 cast
    of it (the stock layers keep such a copy alive for backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4)
    )
    sparse = _sparse(model, 0.5)
    params = {p.data_ptr() for p in sparse.parameters()}
    copies: list[tuple[int, ...]] = []

    def pack(t: Tensor) -> Tensor:
        # a parameter-shaped bf16 tensor that is not the parameter: autocast's weight copy
        if t.dtype == torch.bfloat16 and t.data_ptr() not in params and t.grad_fn is not None:
            copies.append(tuple(t.shape))
        return t

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse(x)
    assert copies == []
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sparse.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all()
