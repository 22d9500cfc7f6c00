"""Generated linear-like hosts of every kind a weight site knows, and what they compute written out in plain torch:
the independent side of tests that check peftkit's sites and weight-site methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D


@st.composite
def hosts(draw: st.DrawFn, dtypes: st.SearchStrategy[torch.dtype]) -> tuple[nn.Module, torch.Tensor, torch.dtype]:
    """A host (nn.Linear, Conv1D, nn.Embedding or nn.Conv2d) in a drawn dtype, and an input for it."""
    dtype = draw(dtypes)
    d_in, d_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["linear", "conv1d", "embedding", "conv2d"]))
    torch.manual_seed(draw(st.integers(0, 1000)))
    if kind == "linear":
        module, x = nn.Linear(d_in, d_out, bias=draw(st.booleans())), torch.randn(2, 3, d_in)
    elif kind == "conv1d":
        module, x = Conv1D(d_out, d_in), torch.randn(2, 3, d_in)
    elif kind == "embedding":
        module, x = nn.Embedding(d_in + 1, d_out), torch.randint(0, d_in + 1, (2, 3))
    else:
        kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        module, x = nn.Conv2d(d_in, d_out, kernel, stride, padding=draw(st.integers(0, 1))), torch.randn(2, d_in, 5, 4)
    module = module.to(dtype)
    return module, (x if kind == "embedding" else x.to(dtype)), dtype


def weight_in_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An (out_features, in_features) matrix laid out as ``module.weight``."""
    if isinstance(module, Conv1D | nn.Embedding):
        return matrix.t()
    return matrix.reshape(module.weight.shape)


def weight_as_matrix(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as an (out_features, in_features) matrix."""
    if isinstance(module, Conv1D | nn.Embedding):
        return module.weight.t()
    return module.weight.reshape(module.weight.shape[0], -1)


def host_function(host: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the host computes with an (out, in) ``weight`` in place of its own (a host carrying peftkit's hook
    cannot be called for this)."""
    bias = getattr(host, "bias", None)
    if isinstance(host, nn.Embedding):
        return F.embedding(x, weight.t())
    if isinstance(host, nn.Conv2d):
        return F.conv2d(x, weight.reshape(host.weight.shape), bias, host.stride, host.padding, host.dilation)
    return F.linear(x, weight, bias)  # nn.Linear, and Conv1D's x @ W + b with W = weight.T
