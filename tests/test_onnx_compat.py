"""Sliced adaptive pools: the values of nn.AdaptiveAvgPool2d, exportable at uneven bins."""

import numpy as np
import pytest
import torch
from torch import nn

from leanseg.onnx_compat import SlicedAdaptiveAvgPool2d, exportable
from leanseg.ort_latency import export_onnx


@pytest.mark.parametrize("size", [(9, 9), (64, 64), (7, 13), (6, 12), (2, 5)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6, (3, 2), (None, 4)])
def test_sliced_pool_equals_adaptive_avg_pool(size, bins):
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(0))
    expected = nn.AdaptiveAvgPool2d(bins)(x)
    torch.testing.assert_close(SlicedAdaptiveAvgPool2d(bins)(x), expected, rtol=1e-6, atol=1e-6)


def test_exportable_swaps_pools_in_a_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.AdaptiveAvgPool2d(3)))
    model.train()
    copied, swapped = exportable(model)
    assert swapped == 1 and isinstance(copied[1][0], SlicedAdaptiveAvgPool2d)
    assert type(model[1][0]) is nn.AdaptiveAvgPool2d and model.training  # untouched
    assert exportable(nn.Conv2d(3, 4, 1))[1] == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_uneven_bins_export_and_run_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")

    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(b) for b in (1, 2, 3, 6))

        def forward(self, x):
            return torch.cat([p(x).flatten(1) for p in self.pools], 1)

    model = Pyramid().train()
    x = torch.randn(1, 8, 9, 9)
    data = export_onnx(model, x)
    assert model.training  # the caller's mode comes back
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got, model.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
