"""A quantised layer type from another library, made a peftkit host in one file (docs/quantization.md).

``RowInt8Linear`` stands for a third-party quantised linear (torchao, HQQ, GPTQ kernels): it stores W as int8
rows with one float scale each and computes ``x (s * W)ᵀ + b``. peftkit has never seen it; the ``RowInt8Site``
below tells the core what it needs to know, and ``register`` is what a package would name in its
``peftkit.hosts`` entry point:

    [project.entry-points."peftkit.hosts"]
    rowint8 = "my_package.int8_host:register"

With it, every weight-site method (LoRA, DoRA, IA3, ...) runs beside the layer, ``merge`` is refused by name,
``merge_and_detach(model, dequantize=torch.float32)`` writes a floating-point model with the update merged, and
``merge_error`` says what re-quantising a merge would lose (tests/test_host_example.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.sites import WeightSite, register_weight_site


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scales): each row's absolute maximum maps to 127."""
    scales = weight.detach().abs().amax(dim=1).clamp(min=1e-12).float() / 127.0
    return torch.round(weight.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class RowInt8Linear(nn.Module):
    """The stand-in third-party layer: int8 weight and scales as buffers, float32 compute."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rows, scales = quantize_rows(linear.weight)
        self.register_buffer("weight", rows)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float() * self.scales[:, None], self.bias).to(x.dtype)


class RowInt8Site(WeightSite):
    """What the core needs of a host: its shape, compute dtype and device; how to read W (for methods that read it,
    and for a dequantised merge); why it cannot take a merge; and what a merge into it would keep."""

    def __init__(self, module: RowInt8Linear) -> None:
        super().__init__(module)
        self.in_features, self.out_features = module.in_features, module.out_features

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the compute dtype: adapters live here, never in int8

    def weight_view(self) -> torch.Tensor:
        return self.module.weight.float() * self.module.scales[:, None]  # a temporary, for one computation

    def merge_refusal(self) -> str | None:
        return (
            "its weight is stored as int8 rows (RowInt8Linear): a merge would re-quantise it. Run the adapter "
            "unmerged, or use peftkit.merge_and_detach(model, dequantize=torch.float32)"
        )

    def add_to_weight_(self, delta: torch.Tensor) -> None:
        raise RuntimeError(self.merge_refusal())

    def write_weight_(self, matrix: torch.Tensor) -> None:
        raise RuntimeError(self.merge_refusal())

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        bias = self.module.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=self.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight_view())
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def requantized(self, weight: torch.Tensor) -> torch.Tensor:
        rows, scales = quantize_rows(weight)
        return (rows.float() * scales[:, None]).to(weight.dtype)


def register() -> None:
    """The entry point: a real library would first check that it is installed, and do nothing otherwise."""
    register_weight_site(RowInt8Linear, RowInt8Site)


def quantize_linears(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Replace every ``nn.Linear`` whose name ends in one of ``names`` by a RowInt8Linear (what a library's own
    loading function would do)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rpartition(".")[2] in names:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, RowInt8Linear(module))
    return model
