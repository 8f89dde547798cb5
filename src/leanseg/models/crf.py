"""DDD: a grid CRF layer trained end to end through differentiable dual decomposition.

Wang et al., arXiv 1912.02937; shared/methods/ddd.md. The energy (maximised) is the unary
logits plus learned, image-dependent C x C pairwise terms on the 4-connected edges of stride 1
(and of stride 2: the 4-connected edges of the sub-grids ``x[i::2, j::2]``). Every row and
column of each stride is a chain; each pixel has one copy of its unary per chain family (h and v
per stride), solved exactly by the smoothed chain DP of :mod:`leanseg.models.chain_dp`. Fixed-point
dual updates move the copies towards agreement; the output logits are the sum of the copies'
max-marginals. Everything is ordinary tensor code that autograd unrolls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.chain_dp import CHAIN_DP, chain_values

Edge = tuple[str, int]  # ("h" | "v", stride): edges (r, c)-(r, c + s) or (r, c)-(r + s, c)

EARLY_STOP_TOL = 1e-4  # stop when the dual value goes up by this much (ddd.md section 4)


def _to_chains(grid: Tensor, axis: str, stride: int, parity: int) -> Tensor:
    """(B, H, W, *labels) -> (L, B * H (rows) or B * W (columns), *labels): one family's chains."""
    dim = 2 if axis == "h" else 1
    part = grid[:, :, parity::stride] if axis == "h" else grid[:, parity::stride]
    return part.movedim(dim, 0).flatten(1, 2)


def _from_chains(parts: list[Tensor], axis: str, stride: int, size: tuple[int, int, int]) -> Tensor:
    """Inverse of :func:`_to_chains` for all parities of ``(axis, stride)`` -> (B, H, W, C)."""
    batch, height, width = size
    dim, full = (2, width) if axis == "h" else (1, height)
    other = height if axis == "h" else width
    # (L_p, B * other, C) -> (B, H, L_p, C) or (B, L_p, W, C), parity p = 0, 1, ...
    grids = [part.view(part.shape[0], batch, other, -1).movedim(0, dim) for part in parts]
    if stride == 1:
        return grids[0]
    longest = grids[0].shape[dim]
    padded = []
    for grid in grids:  # pad the shorter parities, interleave, crop
        missing = longest - grid.shape[dim]
        padded.append(F.pad(grid, (0, 0) * (3 - dim) + (0, missing)) if missing else grid)
    merged = torch.stack(padded, dim + 1).flatten(dim, dim + 1)
    return merged.narrow(dim, 0, full)


class _ChainSet:
    """All chains of a grid, grouped by length so that one DP call solves each group.

    The pairwise terms are laid out as chains once; every iteration reuses those tensors, so
    :func:`~leanseg.models.chain_dp.chain_dp` saves them for backward once in all.
    """

    def __init__(self, pairwise: dict[Edge, Tensor], size: tuple[int, int, int], dp: str) -> None:
        self.size, self.dp = size, CHAIN_DP[dp]
        _, height, width = size
        families = []  # (edge set, parity, chain length) of every non-empty family
        for axis, stride in pairwise:
            n = width if axis == "h" else height
            families += [
                ((axis, stride), p, len(range(p, n, stride))) for p in range(min(stride, n))
            ]
        lengths = sorted({f[2] for f in families})
        self.groups = {n: [f for f in families if f[2] == n] for n in lengths}
        self.thetas = {
            n: self._merge(pairwise, members, lambda t: t.permute(0, 3, 4, 1, 2))
            for n, members in self.groups.items()
        }

    @staticmethod
    def _merge(grids: dict[Edge, Tensor], members: list, layout=lambda t: t) -> Tensor:
        parts = [_to_chains(layout(grids[edge]), *edge, p) for edge, p, _ in members]
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def marginals(self, u: dict[Edge, Tensor], gamma: float) -> tuple[dict[Edge, Tensor], Tensor]:
        """Max-marginals (B, H, W, C) of each copy ``u`` (B, H, W, C), and the dual value (B,)."""
        batch = self.size[0]
        parts: dict[Edge, dict[int, Tensor]] = {edge: {} for edge in u}
        dual = torch.zeros(batch, dtype=torch.float64, device=next(iter(u.values())).device)
        for n, members in self.groups.items():
            chains = self._merge(u, members)
            # chains per family: B x rows (h) or B x columns (v)
            sizes = [batch * self.size[1 if edge[0] == "h" else 2] for edge, _, _ in members]
            solved = self.dp(chains, self.thetas[n], gamma).split(sizes, 1)
            for (edge, p, _), m in zip(members, solved, strict=True):
                parts[edge][p] = m
                with torch.no_grad():
                    dual += chain_values(m, gamma).double().view(batch, -1).sum(1)
        marg = {e: _from_chains([parts[e][p] for p in sorted(parts[e])], *e, self.size) for e in u}
        return marg, dual


def ddd_inference(
    unary: Tensor,
    pairwise: dict[Edge, Tensor],
    *,
    gamma: float = 2.0,
    iters: int = 5,
    early_stop: bool = True,
    dp: str = "function",
    trace: list[dict[str, object]] | None = None,
) -> Tensor:
    """Logits (B, C, H, W) of DDD inference on ``unary`` (B, C, H, W).

    ``pairwise[("h", s)]`` is (B, C, C, H, W - s) and ``pairwise[("v", s)]`` (B, C, C, H - s, W),
    ``[:, a, b]`` for label a at the left/top node. Each key is one copy of the unaries. Step
    ``1 / max(H, W)``; early stop per image when its dual value rises (ddd.md section 4).
    ``trace`` (tests) receives per iteration the copies used, their marginals and the dual.
    """
    batch, _, height, width = unary.shape
    chains = _ChainSet(pairwise, (batch, height, width), dp)
    copies, step = len(pairwise), 1.0 / max(height, width)
    grid = unary.permute(0, 2, 3, 1)  # (B, H, W, C)
    u = {edge: grid / copies for edge in pairwise}
    out, best = grid, None  # accepted output and its dual value, per image
    stopped = torch.zeros(batch, dtype=torch.bool, device=unary.device)
    for it in range(iters):
        marg, dual = chains.marginals(u, gamma)
        total = torch.stack(list(marg.values())).sum(0)
        if trace is not None:
            trace.append({"copies": dict(u), "marginals": marg, "dual": dual})
        if best is None:
            out, best = total, dual
        else:
            accept = ~stopped
            if early_stop:
                accept = accept & (best - dual > -EARLY_STOP_TOL)
            stopped = ~accept
            out = torch.where(accept.view(-1, 1, 1, 1), total, out)
            best = torch.where(accept, dual, best)
            if not torch.jit.is_tracing() and bool(stopped.all()):
                break
        if it + 1 < iters:  # the update after the last iteration is never used
            mean = total / copies
            u = {edge: u[edge] - step * (marg[edge] - mean) for edge in u}
    return out.permute(0, 3, 1, 2)


class DualDecompositionCRF(nn.Module):
    """DDD CRF head: features (B, F, H, W) and unary logits (B, C, H, W) -> logits (B, C, H, W).

        Pairwise terms of an edge (p, q) are ``pairwise(cat[x_p, x_q])`` reshaped to (C, C): one
        1x1 conv (2F -> C^2, N(0, 0.001) weights, zero bias) shared by all edge sets. Computed as
        two F -> C^2 halves on the whole map, then shifted and added (equal, 4x fewer FLOPs at
    strides (1, 2)).
        Runs in float32, also under autocast.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        iters: int = 5,
        gamma: float = 2.0,
        strides: Sequence[int] = (1, 2),
        dp: str = "function",
    ) -> None:
        super().__init__()
        if iters < 1 or not gamma > 0 or not strides or min(strides) < 1:
            raise ValueError(
                f"DDD: need iters >= 1, gamma > 0 and strides >= 1; got {iters}, {gamma}, {strides}"
            )
        if dp not in CHAIN_DP:
            raise ValueError(f"dp: got {dp!r}; choose one of {sorted(CHAIN_DP)}")
        self.num_classes, self.iters, self.gamma = num_classes, iters, gamma
        self.strides, self.dp = tuple(sorted(set(strides))), dp
        self.pairwise = nn.Conv2d(2 * in_channels, num_classes * num_classes, 1)
        nn.init.normal_(self.pairwise.weight, 0.0, 0.001)
        nn.init.zeros_(self.pairwise.bias)

    def pairwise_terms(self, x: Tensor) -> dict[Edge, Tensor]:
        """``{("h", s): (B, C, C, H, W - s), ("v", s): (B, C, C, H - s, W)}`` for each stride."""
        batch, channels, height, width = x.shape
        weight, k = self.pairwise.weight, self.num_classes
        halves = F.conv2d(x, torch.cat([weight[:, :channels], weight[:, channels:]]))
        first, second = halves.split(k * k, 1)
        first = first + self.pairwise.bias.view(1, -1, 1, 1)
        terms = {}
        for s in self.strides:  # edges per row (h) and per column (v) at stride s
            per_row, per_col = max(width - s, 0), max(height - s, 0)
            horizontal = first[..., :per_row] + second[..., width - per_row :]
            vertical = first[..., :per_col, :] + second[..., height - per_col :, :]
            terms[("h", s)] = horizontal.view(batch, k, k, height, per_row)
            terms[("v", s)] = vertical.view(batch, k, k, per_col, width)
        return terms

    def forward(self, features: Tensor, unary: Tensor) -> Tensor:
        dtype = torch.promote_types(features.dtype, torch.float32)  # float32 under autocast
        with torch.autocast(features.device.type, enabled=False):
            features, unary = features.to(dtype), unary.to(dtype)
            return ddd_inference(
                unary,
                self.pairwise_terms(features),
                gamma=self.gamma,
                iters=self.iters,
                dp=self.dp,
            )

    def extra_repr(self) -> str:
        return f"iters={self.iters}, gamma={self.gamma}, strides={self.strides}, dp={self.dp!r}"


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray | Tensor,
    *,
    iters: int = 10,
    sxy_gaussian: float = 3.0,
    compat_gaussian: float = 3.0,
    sxy_bilateral: float = 64.0,
    srgb: float = 5.0,
    compat_bilateral: float = 4.0,
) -> np.ndarray:
    """Post-hoc DenseCRF (Kraehenbuehl & Koltun 2011): probabilities (C, H, W) -> refined ones.

    ``image`` is the uint8 (H, W, 3) RGB image and ``probs`` the softmax output at its size.
    Mean field with a smoothness and an appearance kernel (defaults of ddd.md section 10); an
    eval-time baseline, not trainable. Needs ``pip install 'leanseg[crf]'`` (pydensecrf2).
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise ConfigError(
            "DenseCRF needs the optional dependency pydensecrf2: pip install 'leanseg[crf]'"
        ) from None
    if isinstance(probs, Tensor):
        probs = probs.detach().float().cpu().numpy()
    labels, height, width = probs.shape
    if image.shape != (height, width, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"image: expected uint8 {(height, width, 3)}, got {image.dtype} {image.shape}"
        )
    crf = dcrf.DenseCRF2D(width, height, labels)
    unary = -np.log(np.clip(probs, 1e-8, None)).reshape(labels, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=sxy_gaussian, compat=compat_gaussian)
    rgb = np.ascontiguousarray(image)
    crf.addPairwiseBilateral(sxy=sxy_bilateral, srgb=srgb, rgbim=rgb, compat=compat_bilateral)
    return np.asarray(crf.inference(iters), dtype=np.float32).reshape(labels, height, width)
