"""OFT: orthogonal fine-tuning (Qiu et al. 2023, arXiv:2306.07280), in HF PEFT's current form (0.14 and later).

The host's input features are rotated by a block-diagonal orthogonal matrix before the host runs:

    y = W (R x) + b,   R = diag(R_1, ..., R_D),   R_j = Cayley(Q_j),   Q_j = -Q_jᵀ (b x b),   D·b = d_in

so the merged weight is W Rᵀ: every angle between the input features the host saw is kept, which is the method's
argument against additive updates. Each Q_j is held as its b(b-1)/2 upper-triangle entries (zero at init: R = I),
shared by all blocks with ``block_share``. ``blocks`` or ``block_size`` fixes the other, and must divide d_in (refused
at plan, naming the divisors nearest). The Cayley map is PEFT's truncated Neumann series by default, exact with
``cayley: exact``. COFT (the paper's constrained variant) keeps each Q inside a ball of radius eps/sqrt(D),
projected before each use. ``module_dropout`` replaces a random share of the blocks by the identity while training.

A rotation of the input is not an output change that adds to others', so OFT composes by ``stack`` only; at a host
it acts first, and the adapters beside it see the rotated input. HF PEFT's OFT checkpoints (``oft_R.weight``, one row
of upper-triangle entries per block) load and export for linear hosts.
"""

from __future__ import annotations

from typing import Literal

import torch
from peftkit_methods.orthogonal import BlockLayoutConfig, Factor, OrthogonalAdapter, cayley
from pydantic import Field
from torch import nn

from peftkit import Capabilities, Method
from peftkit.sites import WeightSite
from peftkit.sites.weight import Conv1D


class OFTConfig(BlockLayoutConfig):
    method: Literal["oft"] = "oft"
    block_share: bool = Field(default=False, description="one rotation for every block of a host")
    cayley: Literal["neumann", "exact"] = Field(default="neumann", description="how Q becomes a rotation")
    neumann_terms: int = Field(default=5, ge=2, le=32, description="terms of the Neumann series")
    coft: bool = Field(default=False, description="constrained OFT: keep each Q within eps / sqrt(D)")
    eps: float = Field(default=6e-5, gt=0, description="COFT's radius")
    module_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="training: identity for this share of blocks"
    )


class OFTAdapter(OrthogonalAdapter):
    def __init__(self, config: OFTConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.count, self.size = config.block_layout(site.in_features)
        self.neumann_terms = config.neumann_terms if config.cayley == "neumann" else None
        self.coft, self.eps, self.dropout = config.coft, config.eps, config.module_dropout
        rows = 1 if config.block_share else self.count
        entries = self.size * (self.size - 1) // 2
        self.skew = nn.Parameter(torch.zeros(rows, entries, device=site.device, dtype=site.dtype))  # R = I
        upper = torch.triu_indices(self.size, self.size, 1, device=site.device)
        self.register_buffer("upper", upper, persistent=False)

    def _project(self) -> None:
        """COFT: scale each block's Q back onto the ball of radius eps / sqrt(rows) when it left it."""
        with torch.no_grad():
            radius = self.eps / self.skew.shape[0] ** 0.5
            norm = self.skew.norm(dim=1, keepdim=True) * 2**0.5  # the Frobenius norm of Q - Qᵀ
            self.skew.mul_(torch.where(norm > radius, radius / norm.clamp(min=1e-30), torch.ones_like(norm)))

    def factors(self) -> list[Factor]:
        if self.coft:
            self._project()
        entries = self.skew.to(torch.promote_types(self.skew.dtype, torch.float32))
        generator = entries.new_zeros(entries.shape[0], self.size, self.size)
        generator[:, self.upper[0], self.upper[1]] = entries
        rotation = cayley(generator - generator.transpose(-1, -2), self.neumann_terms)
        return [(None, rotation.expand(self.count, -1, -1) if rotation.shape[0] != self.count else rotation)]


class OFT(Method):
    name = "oft"
    config = OFTConfig
    capabilities = Capabilities(
        site="weight",
        module_types=(nn.Linear, Conv1D),
        mergeable=True,
        identity_at_init=True,
        commutes=False,
        compose_rules=frozenset({"stack"}),
    )

    @classmethod
    def site_refusal(cls, config: OFTConfig, site: WeightSite) -> str | None:
        return config.layout_refusal("OFT", site.in_features)

    @classmethod
    def parameter_count(cls, config: OFTConfig, site: WeightSite) -> int:
        count, size = config.block_layout(site.in_features)
        return (1 if config.block_share else count) * (size * (size - 1) // 2)

    @classmethod
    def create(cls, config: OFTConfig, site: WeightSite) -> OFTAdapter:
        return OFTAdapter(config, site)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # PEFT key base_model.model.<path>.oft_R.weight: (D or 1, b(b-1)/2), the upper triangle of each Q row by row;
    # the block size each module ended with (PEFT adjusts a size that does not divide) is read from that shape.
    peft_type = "OFT"
    _PEFT_UNSUPPORTED = {"layers_to_transform": None, "modules_to_save": None, "bias": "none", "fan_in_fan_out": False}

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, refuse_features, split_peft_key

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        share = peft_field(peft_config, "block_share", "flag", False)
        neumann = peft_field(peft_config, "use_cayley_neumann", "flag", False)
        fields = {
            "block_share": share,
            "cayley": "neumann" if neumann else "exact",
            "neumann_terms": peft_field(peft_config, "num_cayley_neumann_terms", "count", 5),
            "coft": peft_field(peft_config, "coft", "flag", False),
            "eps": float(peft_field(peft_config, "eps", "number", 6e-5)),
            "module_dropout": float(peft_field(peft_config, "module_dropout", "number", 0.0)),
        }
        groups: dict[int, list[str]] = {}
        state: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            path, _ = split_peft_key(key, ("oft_R.weight",))
            size = _block_side(tensor.shape[-1]) if tensor.dim() == 2 else None
            if size is None or (share and tensor.shape[0] != 1):
                raise CheckpointError(f"OFT on {path!r}: a tensor of shape {list(tensor.shape)} is no OFT generator")
            groups.setdefault(size, []).append(path)
            state[peftkit_key(path, adapter_name, "skew")] = tensor
        if not groups:
            raise CheckpointError("the PEFT OFT checkpoint holds no OFT tensors")
        entries = [
            {"method": cls.name, "target": paths, "block_size": size, **fields} for size, paths in groups.items()
        ]
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key, refuse_unless_linear_hosts

        refuse_unless_linear_hosts(attached, "OFT")
        fields = ("block_share", "cayley", "neumann_terms", "coft", "eps", "module_dropout")
        for field in fields:
            if len({getattr(a.config, field) for a in attached}) > 1:
                raise CheckpointError(f"a PEFT OFT adapter has one {field}; this adapter's entries differ in it")
        if len({a.module.size for a in attached}) > 1:
            raise CheckpointError("a PEFT OFT adapter has one oft_block_size; this adapter's hosts differ in it")
        first = attached[0].config
        config = {
            # PEFT 0.18 changed the Neumann series to the one used here, and warns on a checkpoint without this mark
            "peft_version": "0.18.0",
            "r": 0,
            "oft_block_size": attached[0].module.size,
            "target_modules": sorted(a.path for a in attached),
            "block_share": first.block_share,
            "use_cayley_neumann": first.cayley == "neumann",
            "num_cayley_neumann_terms": first.neumann_terms,
            "coft": first.coft,
            "eps": first.eps,
            "module_dropout": first.module_dropout,
            "bias": "none",
            "init_weights": True,
        }
        return config, {peft_key(a.path, "oft_R.weight"): a.module.skew for a in attached}


def _block_side(entries: int) -> int | None:
    """b with b(b-1)/2 = entries, or None when there is none."""
    side = round((1 + (1 + 8 * entries) ** 0.5) / 2)
    return side if side * (side - 1) // 2 == entries and side >= 2 else None
