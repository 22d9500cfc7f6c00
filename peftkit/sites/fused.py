"""A linear host's product and a low-rank update to it, ``x Wᵀ + b + s (x Aᵀ) Bᵀ``, as one autograd function.

Run as the host's forward plus an adapter beside it (the hook path), autograd sees five or six nodes per host and
sums two full-size gradients of the input, ``g W`` from the host and ``s (g B) A`` from the update, in a separate
pass over a (tokens, in_features) tensor. Here the backward writes ``g W`` and adds ``s (g B) A`` into it in place
(one ``addmm_``), lays out the factors' gradients r rows tall (the layout CPU BLAS runs fastest for a product this
thin), and keeps exactly what they need: the input for A's gradient, the r-wide product ``x Aᵀ`` for B's. The frozen
weight gets no gradient: a host whose weight or bias trains is not fused (see :meth:`WeightSite.fuses`).

Measured on one CPU thread (``benchmarks/versus_peft.py``; docs/performance.md "3. Against HF PEFT"), and equal to
the hook path's outputs and gradients to float rounding (``tests/test_fused.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_ENABLED = [True]  # read by WeightSite.fuses at each call; changed only by unfused()


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Within this block every adapter runs on the hook path (the host's forward, then the adapter beside it), as
    if no host could fuse: for comparing the two paths, and for a debugger that wants to step through the adapter's
    own forward. Not thread-safe: it switches the path for the whole process."""
    previous = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = previous


def fusion_enabled() -> bool:
    return _ENABLED[0]


def fusable_autograd() -> bool:
    """False under torch.func's transforms (grad, vmap, jacrev...) and forward-mode AD, which need a function to
    define ``setup_context``, a vmap rule and a ``jvp``; those calls take the hook path, made of plain torch ops."""
    return torch._C._functorch.peek_interpreter_stack() is None and torch.autograd.forward_ad._current_level < 0


class LowRankLinear(torch.autograd.Function):
    """``x Wᵀ + bias + scale * (x Aᵀ) Bᵀ`` with W (out, in) frozen, A (r, in), B (out, r)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # "... i -> (...) i"
        # the output is allocated in its final shape, not returned as a view: an adapter after this one adds into
        # it in place, which autograd forbids on a view made inside a custom function
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        flat = out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(rows, weight.t(), out=flat)  # "t i, o i -> t o"
        else:
            torch.addmm(bias, rows, weight.t(), out=flat)
        h = torch.mm(a, rows.t()).t()  # "r i, t i -> t r", computed r rows tall
        flat.addmm_(h, b.t(), alpha=scale)  # "t r, o r -> t o", added in place
        # x itself (not its reshaped view), so that a backward with create_graph=True can differentiate through it
        ctx.save_for_backward(
            x if ctx.needs_input_grad[3] else None, h if ctx.needs_input_grad[4] else None, weight, a, b
        )
        ctx.scale, ctx.input_shape = scale, x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, weight, a, b = ctx.saved_tensors
        rows = None if x is None else x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():  # create_graph=True: a second derivative will follow
            return LowRankLinear._differentiable_backward(ctx, grad, rows, h, weight, a, b)
        grad_rows = grad.reshape(-1, grad.shape[-1])  # "... o -> t o"
        grad_h = torch.mm(b.t(), grad_rows.t()).t()  # "o r, t o -> t r" without the scale: it goes on the thin side
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_rows, weight).addmm_(grad_h, a, alpha=ctx.scale).view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(grad_h.t(), rows).mul_(ctx.scale)  # "t r, t i -> r i"
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(h.t(), grad_rows).mul_(ctx.scale).t()  # "t r, t o -> r o", B's gradient transposed
        return grad_x, None, None, grad_a, grad_b, None

    @staticmethod
    def _differentiable_backward(
        ctx: Any, grad: torch.Tensor, rows: torch.Tensor | None, h: torch.Tensor | None, weight, a, b
    ) -> tuple[torch.Tensor | None, ...]:
        """The same gradients from out-of-place ops that autograd records, with ``x Aᵀ`` recomputed from the saved
        input, so that MAML or a Hessian-vector product gets its second derivative."""
        if rows is None and h is not None and ctx.needs_input_grad[0]:
            raise RuntimeError(
                "a second derivative through peftkit's fused low-rank path with a frozen first factor needs the host's "
                "input, which that path does not keep; run that forward inside `with peftkit.unfused():`"
            )
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_rows @ b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight + ctx.scale * (grad_h @ a)).view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = ctx.scale * (grad_h.t() @ rows)
        if ctx.needs_input_grad[4]:
            grad_b = ctx.scale * (grad_rows.t() @ (rows @ a.t() if rows is not None else h))
        return grad_x, None, None, grad_a, grad_b, None


def low_rank_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``x Wᵀ + bias + scale * (x Aᵀ) Bᵀ`` over the last axis of ``x``, W given as (out_features, in_features)."""
    return LowRankLinear.apply(x, weight, bias, a, b, scale)
