"""BackRazor (Jiang et al., NeurIPS 2022): sparse, bit-packed saved activations.

``apply(model, ratio=0.7)`` rewrites the backbone's Conv2d, BatchNorm2d, Linear, ReLU and ReLU6
layers in place: forward outputs are unchanged, the backward sees a per-sample magnitude-pruned
copy of each layer input. Spec: shared/methods/backrazor.md.
"""

from leanseg.methods.backrazor.apply import (
    BN_MODES,
    SCOPES,
    VALUE_DTYPES,
    analytic_saved_bytes,
    apply,
    apply_config,
    remove,
    saved_tensor_bytes,
)
from leanseg.methods.backrazor.functions import (
    PackedReLUFn,
    SparseBatchNorm2dFn,
    SparseConv2dFn,
    SparseLinearFn,
)
from leanseg.methods.backrazor.modules import (
    BackRazorMixin,
    FrozenStatsBatchNorm2d,
    PackedReLU,
    PackedReLU6,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLinear,
    SparseWSConv2d,
)
from leanseg.methods.backrazor.packing import pack_mask, sparsify, unpack_mask, unsparsify
from leanseg.methods.backrazor.selection import keep_count, kept_indices, magnitude_mask

__all__ = [
    "BN_MODES",
    "SCOPES",
    "VALUE_DTYPES",
    "BackRazorMixin",
    "FrozenStatsBatchNorm2d",
    "PackedReLU",
    "PackedReLU6",
    "PackedReLUFn",
    "SparseBatchNorm2d",
    "SparseBatchNorm2dFn",
    "SparseConv2d",
    "SparseConv2dFn",
    "SparseLinear",
    "SparseLinearFn",
    "SparseWSConv2d",
    "analytic_saved_bytes",
    "apply",
    "apply_config",
    "keep_count",
    "kept_indices",
    "magnitude_mask",
    "pack_mask",
    "remove",
    "saved_tensor_bytes",
    "sparsify",
    "unpack_mask",
    "unsparsify",
]
