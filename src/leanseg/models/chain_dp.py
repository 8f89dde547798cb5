"""Smoothed max-marginals of chains by dynamic programming: DDD's chain subproblem.

Chains are laid out position-first: ``unary`` (L, N, C) holds N chains of L nodes with C labels,
``pairwise`` (L - 1, N, C, C) the edge terms, ``[n, :, a, b]`` for label a at node n and b at
node n + 1. With temperature ``gamma`` (shared/methods/ddd.md section 3) and ``lse_g(x) =
gamma * logsumexp(x / gamma)``::

    fwd[0] = 0;     fwd[n+1](b) = lse_g over a of (u[n](a) + fwd[n](a) + t[n](a, b))
    bwd[L-1] = 0;   bwd[n](a)   = lse_g over b of (u[n+1](b) + bwd[n+1](b) + t[n](a, b))
    m[n] = u[n] + fwd[n] + bwd[n]     # smoothed max-marginals; lse_g(m[n]) is the chain value,
                                      # the same at every n (-> Viterbi as gamma -> 0)

Three implementations with equal values: :func:`chain_dp` (a custom autograd function that saves
only the messages and recomputes the softmax tables in backward; ``pairwise`` is saved as given,
so a tensor reused across DDD iterations is stored once), :func:`chain_dp_autograd` (plain
autograd through the loop: every step's tables are saved) and :func:`chain_dp_checkpoint` (the
plain loop under ``torch.utils.checkpoint``: only the inputs are saved, the loop runs twice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

ChainDP = Callable[[Tensor, Tensor, float], Tensor]


def _check(unary: Tensor, pairwise: Tensor, gamma: float) -> None:
    length, chains, labels = unary.shape
    expected = (max(length - 1, 0), chains, labels, labels)
    if tuple(pairwise.shape) != expected:
        raise ValueError(f"pairwise: expected shape {expected}, got {tuple(pairwise.shape)}")
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0, got {gamma}")


def _messages(unary: Tensor, pairwise: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Forward and backward messages (L, N, C), without autograd bookkeeping."""
    fwd, bwd = torch.zeros_like(unary), torch.zeros_like(unary)
    last = unary.shape[0] - 1
    for n in range(last):
        scores = (unary[n] + fwd[n]).unsqueeze(2) + pairwise[n]  # (N, a, b)
        fwd[n + 1] = torch.logsumexp(scores.div_(gamma), 1).mul_(gamma)
        k = last - 1 - n
        scores = (unary[k + 1] + bwd[k + 1]).unsqueeze(1) + pairwise[k]
        bwd[k] = torch.logsumexp(scores.div_(gamma), 2).mul_(gamma)
    return fwd, bwd


class _ChainDP(torch.autograd.Function):
    """Saves (unary, pairwise, messages); backward is the reverse mode of ddd.md section 5."""

    @staticmethod
    def forward(ctx, unary: Tensor, pairwise: Tensor, gamma: float) -> Tensor:
        fwd, bwd = _messages(unary, pairwise, gamma)
        ctx.save_for_backward(unary, pairwise, fwd, bwd)
        ctx.gamma = gamma
        return unary + fwd + bwd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        unary, pairwise, fwd, bwd = ctx.saved_tensors
        gamma = ctx.gamma
        alpha, beta = unary + fwd, unary + bwd
        # p_fw[n, :, a, b] = softmax_a((alpha[n](a) + t[n](a, b)) / gamma), a column-stochastic
        # table; p_bw[n, :, a, b] = softmax_b((beta[n+1](b) + t[n](a, b)) / gamma), row-stochastic
        p_fw = (alpha[:-1].unsqueeze(3) + pairwise).sub_(fwd[1:].unsqueeze(2)).div_(gamma).exp_()
        p_bw = (beta[1:].unsqueeze(2) + pairwise).sub_(bwd[:-1].unsqueeze(3)).div_(gamma).exp_()
        grad_alpha, grad_beta = grad.clone(), grad.clone()
        last = grad.shape[0] - 1
        for n in range(last - 1, -1, -1):
            grad_alpha[n] += torch.bmm(p_fw[n], grad_alpha[n + 1].unsqueeze(2)).squeeze(2)
        for n in range(last):
            grad_beta[n + 1] += torch.bmm(grad_beta[n].unsqueeze(1), p_bw[n]).squeeze(1)
        grad_pairwise = p_fw.mul_(grad_alpha[1:].unsqueeze(2))
        grad_pairwise += p_bw.mul_(grad_beta[:-1].unsqueeze(3))
        return grad_alpha + grad_beta - grad, grad_pairwise, None


def chain_dp(unary: Tensor, pairwise: Tensor, gamma: float) -> Tensor:
    """Smoothed max-marginals (L, N, C) of ``unary`` (L, N, C) and ``pairwise`` (L-1, N, C, C).

    Memory-lean backward: saves the inputs and the two message tensors (3 x L x N x C) and
    recomputes the C x C softmax tables in backward. Without gradients, and while tracing (ONNX
    export), it runs :func:`chain_dp_autograd`, which has the same values.
    """
    _check(unary, pairwise, gamma)
    needs_grad = torch.is_grad_enabled() and (unary.requires_grad or pairwise.requires_grad)
    if not needs_grad or torch.jit.is_tracing():
        return chain_dp_autograd(unary, pairwise, gamma)
    return _ChainDP.apply(unary, pairwise, gamma)


def chain_dp_autograd(unary: Tensor, pairwise: Tensor, gamma: float) -> Tensor:
    """:func:`chain_dp` as plain tensor code; autograd saves every step's (N, C, C) scores."""
    _check(unary, pairwise, gamma)
    last = unary.shape[0] - 1
    fwd = [torch.zeros_like(unary[0])]
    bwd = [torch.zeros_like(unary[0])]
    for n in range(last):
        scores = (unary[n] + fwd[-1]).unsqueeze(2) + pairwise[n]
        fwd.append(gamma * torch.logsumexp(scores / gamma, 1))
        k = last - 1 - n
        scores = (unary[k + 1] + bwd[-1]).unsqueeze(1) + pairwise[k]
        bwd.append(gamma * torch.logsumexp(scores / gamma, 2))
    return unary + torch.stack(fwd) + torch.stack(bwd[::-1])


def chain_dp_checkpoint(unary: Tensor, pairwise: Tensor, gamma: float) -> Tensor:
    """:func:`chain_dp_autograd` under activation checkpointing (recomputed in backward)."""
    if not torch.is_grad_enabled() or torch.jit.is_tracing():
        return chain_dp_autograd(unary, pairwise, gamma)
    return checkpoint(chain_dp_autograd, unary, pairwise, gamma, use_reentrant=False)


CHAIN_DP: dict[str, ChainDP] = {
    "function": chain_dp,
    "autograd": chain_dp_autograd,
    "checkpoint": chain_dp_checkpoint,
}


def chain_values(marginals: Tensor, gamma: float) -> Tensor:
    """Chain values (N,) from max-marginals (L, N, C): ``gamma * logsumexp(m[0] / gamma)``."""
    return gamma * torch.logsumexp(marginals[0] / gamma, -1)
