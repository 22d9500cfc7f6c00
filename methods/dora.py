"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353), as ``method: dora``.

The adapted weight is split into a magnitude and a direction, and LoRA updates the direction, eq. (5):

    W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c,      m initialised to ‖W0‖_c,  B = 0 at init

where ‖·‖_c is the norm of each output feature's weights (a row of the (d_out, d_in) matrix; "column" in the paper's
(d, k) layout) and s = alpha / r (alpha / sqrt(r) with rsLoRA). At init the direction is W0's and the magnitude its
norm, so the model is unchanged. As the paper suggests (sec. 4.3) and HF PEFT does, the norm is a constant for the
backward: no gradient flows through it, which saves its graph.

The forward never builds W0 + s B A. Its row norms follow from small products,

    ‖W0 + s B A‖²_i = ‖W0‖²_i + 2 s Σ_k B_ik (W0 Aᵀ)_ik + s² Σ_k (B (A Aᵀ))_ik B_ik,

that is one (d_out, r) product with the weight and (r, r) and (d_out, r) ones beside it, where HF PEFT materialises a
full (d_out, d_in) weight in every forward. The output is then ``f ⊙ (W0 x + s B A x) + b`` with f = m / ‖·‖_c: the
LoRA path as in plain LoRA, rescaled per output feature. With dropout in training, the rescaled base term uses the
dropped input, as HF PEFT's does (one more product with W0).

Merging writes W' into the weight (computed in float32 or wider, cast once) and keeps the host's weight while merged,
so that unmerging puts it back bit for bit: undoing W' by division (``W0 = W' ‖·‖_c / m - s B A``, as HF PEFT does)
loses float32 precision in proportion to ‖s B A‖ / ‖W0‖, and cannot undo a row whose magnitude is 0.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from peftkit_methods.lora import LoRA, LoRAAdapter, LoRAConfig
from pydantic import Field
from torch import nn

from peftkit import ParameterGroup
from peftkit.sites import WeightSite, widened


class DoRAConfig(LoRAConfig):
    method: Literal["dora"] = "dora"
    # the magnitude starts as the host weight's norm; PiSSA's or OLoRA's residual would make that a different model
    init: Literal["kaiming", "gaussian"] = Field(default="kaiming", description="initialisation of A; B is 0")


class DoRAAdapter(LoRAAdapter):
    def __init__(self, config: DoRAConfig, site: WeightSite) -> None:
        super().__init__(config, site)
        self.lora_magnitude = nn.Parameter(torch.empty(site.out_features, device=site.device, dtype=site.dtype))
        # the host's weight while merged, for an exact unmerge; a buffer moves with the model and is never saved
        self.register_buffer("weight_at_merge", None, persistent=False)
        if not self.lora_magnitude.is_meta:
            with torch.no_grad():
                self.lora_magnitude.copy_(self.weight_norm())  # ‖W0‖_c: B = 0

    def parameter_group(self, name: str) -> ParameterGroup:
        """LoRA's, and no weight decay on the magnitude (decay would pull each feature's norm towards 0)."""
        return ParameterGroup(weight_decay=False) if name == "lora_magnitude" else super().parameter_group(name)

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output feature, in float32 or wider, without a gradient and without a full-size
        temporary (the expansion in the module docstring)."""
        with torch.no_grad():
            weight = self.site.weight_view()  # (d_out, d_in), a view in the weight's dtype
            wide = torch.promote_types(widened(self.lora_a).dtype, weight.dtype)  # float64 for merge_error's exact
            a, b = self.lora_a.to(wide), self.lora_b.to(wide)
            squared = torch.linalg.vector_norm(weight, dim=1, dtype=wide).square()
            # the adapter may be wider than its base (fp32 adapters over a bf16 base): A meets W in W's dtype
            squared += 2.0 * self.scaling * (b * widened(weight @ self.lora_a.to(weight.dtype).t())).sum(dim=1)
            squared += self.scaling**2 * ((b @ (a @ a.t())) * b).sum(dim=1)
            return squared.clamp_min(0.0).sqrt()

    def _factor(self, norm: torch.Tensor) -> torch.Tensor:
        """m / ‖·‖_c, shaped to the host's output; a zero norm (an all-zero row) gives 0, not NaN."""
        norm = norm.to(self.lora_magnitude.dtype).clamp_min(torch.finfo(self.lora_magnitude.dtype).tiny)
        return self.site.along_features(self.lora_magnitude / norm)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            factor = self._factor(self.weight_norm()).to(out.dtype)
            x = F.dropout(x, self.dropout, training=True)
            base = self.site.project_in(x, self.site.weight_view())  # W0 x on the dropped input, no bias
            h = self.site.project_in(x, self.lora_a)
            update = self.site.project_out_(torch.zeros_like(out), h, self.lora_b, self.scaling)
            return out + (factor - 1.0) * base + factor * update
        # W0 x + b + s B A x, in place, then rescaled
        return self._rescaled(
            self.site.project_out_(out, self.site.project_in(x, self.lora_a), self.lora_b, self.scaling)
        )

    def fused_forward(self, x: torch.Tensor, host: nn.Module) -> torch.Tensor:
        """W0 x + b + s B A x from the fused function (LoRA's ``fuses`` decides when), then rescaled."""
        return self._rescaled(self.site.fused_product(x, self.lora_a, self.lora_b, self.scaling, host))

    def _rescaled(self, mixed: torch.Tensor) -> torch.Tensor:
        """f ⊙ (mixed - b) + b in one pass, (1 - f) b + f ⊙ mixed, for mixed = W0 x + b + s B A x."""
        factor = self._factor(self.weight_norm()).to(mixed.dtype)
        bias = getattr(self.site.module, "bias", None)
        if bias is None:
            return mixed * factor
        return torch.addcmul(self.site.along_features(bias).to(mixed.dtype) * (1.0 - factor), mixed, factor)

    def merge_refusal(self) -> str | None:
        if not torch.isfinite(self.lora_magnitude.detach()).all():
            return "its magnitude holds a NaN or infinite entry, which would poison the merged weights; run it unmerged"
        return None

    def merge(self) -> None:
        norm = self.weight_norm()
        factor = widened(self.lora_magnitude.detach()) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        weight = self.site.weight_as_matrix()
        self.weight_at_merge = self.site.weight.detach().clone()
        self.site.write_weight_(factor[:, None] * (weight + self.delta_weight().detach()))

    def unmerge(self) -> None:
        if self.weight_at_merge is None:
            raise RuntimeError("this DoRA adapter was merged without keeping the host's weight; it cannot be unmerged")
        with torch.no_grad():
            self.site.weight.copy_(self.weight_at_merge)
        self.weight_at_merge = None


class DoRA(LoRA):
    name = "dora"
    config = DoRAConfig
    # LoRA's, but the update is not a low-rank delta (no peftkit.combine) and has no batched per-example route
    capabilities = dataclasses.replace(LoRA.capabilities, routable=False, combinable=False)

    @classmethod
    def parameter_count(cls, config: DoRAConfig, site: WeightSite) -> int:
        return config.r * ((0 if config.freeze_a else site.in_features) + site.out_features) + site.out_features

    @classmethod
    def create(cls, config: DoRAConfig, site: WeightSite) -> DoRAAdapter:
        return DoRAAdapter(config, site)

    # -- HF PEFT checkpoints: a LORA config with use_dora, and <path>.lora_magnitude_vector (d_out,) per module ------
    peft_type = "LORA"
    _PEFT_UNSUPPORTED = {k: v for k, v in LoRA._PEFT_UNSUPPORTED.items() if k != "use_dora"}
    _PEFT_MAGNITUDE = "lora_magnitude_vector"

    @classmethod
    def reads_peft(cls, peft_config: dict) -> bool:
        return peft_config.get("use_dora") is True

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peftkit_key, split_peft_key

        magnitudes = {k: t for k, t in tensors.items() if k.endswith("." + cls._PEFT_MAGNITUDE)}
        entries, state = super().from_peft(
            peft_config, {k: t for k, t in tensors.items() if k not in magnitudes}, model, adapter_name
        )
        factored = {path for entry in entries for path in entry["target"]}
        for key, tensor in magnitudes.items():
            path, _ = split_peft_key(key, (cls._PEFT_MAGNITUDE,))
            if path not in factored:
                raise CheckpointError(f"DoRA magnitude {key!r} has no lora_A/lora_B beside it")
            factored.discard(path)
            state[peftkit_key(path, adapter_name, "lora_magnitude")] = tensor.reshape(-1)
        if factored:
            raise CheckpointError(f"DoRA modules {sorted(factored)} have no lora_magnitude_vector in the file")
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.interop.peft import peft_key

        config, tensors = super().to_peft(attached, model)
        for a in attached:
            tensors[peft_key(a.path, cls._PEFT_MAGNITUDE)] = a.module.lora_magnitude
        return {**config, "use_dora": True}, tensors
