"""BOFT: butterfly orthogonal fine-tuning (Liu et al. 2024, arXiv:2311.06243), in HF PEFT's form.

OFT's one block-diagonal rotation couples features only inside a block. BOFT chains m of them, each conjugated by a
butterfly permutation, so that m = log2(D) + 1 factors of b x b blocks reach every feature, as the FFT does:

    y = s ⊙ (W Mᵀ x) + b,   M = B_m ··· B_1,   B_i = P_i diag(R_i1, ..., R_iD) P_iᵀ,   R = Cayley(½(A - Aᵀ))

P_1 is the identity; P_i groups the features in runs of b·2^(i-1) and, inside each run, puts the half-blocks of even
index before the odd ones. Each A is a full b x b matrix (as in PEFT: half of it is the skew part's mirror), zero at
init; s is a trainable per-output-feature scale starting at 1. ``blocks`` or ``block_size`` fixes the other; with
m > 1 both must be even and D a multiple of 2^(m-1), refused at plan otherwise, naming the field.

peftkit applies the chain factor by factor (m·d_in·b multiplications a token; never the dense d_in x d_in M). HF PEFT's
BOFT checkpoints (``boft_R`` of shape (m, D, b, b), ``boft_s`` of shape (d_out, 1)) load and export for linear hosts.
PEFT runs m > 1 only with its CUDA extension and falls back to m = 1 without it, whatever its config says; peftkit
reads m from the tensor's shape, so a checkpoint made on a GPU loads as trained.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from peftkit_methods.orthogonal import BlockLayoutConfig, Factor, HalfBlockShuffle, OrthogonalAdapter, cayley
from pydantic import Field
from torch import nn

from peftkit import Capabilities, Method
from peftkit.sites import WeightSite
from peftkit.sites.weight import Conv1D


class BOFTConfig(BlockLayoutConfig):
    default_block_size: ClassVar[int] = 4
    method: Literal["boft"] = "boft"
    butterfly_factors: int = Field(default=1, ge=1, le=16, description="m, the rotations chained (1: OFT's one)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="training: identity for this share of blocks")


def butterfly_shuffle(size: int, factor: int) -> HalfBlockShuffle:
    """P_(factor+1): in each run of ``size·2^factor`` features, the half-blocks (``size/2`` wide) of even index
    first, then the odd ones."""
    return HalfBlockShuffle(run=size * 2**factor, half=max(size // 2, 1))


def butterfly_permutation(features: int, size: int, factor: int) -> torch.Tensor:
    """P_(factor+1) as indices (``P[i, perm[i]] = 1``), as PEFT writes it: what the tests compare with PEFT's."""
    return butterfly_shuffle(size, factor).apply(torch.arange(features))


class BOFTAdapter(OrthogonalAdapter):
    def __init__(self, config: BOFTConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        count, size = config.block_layout(site.in_features)
        self.dropout = config.dropout
        like = {"device": site.device, "dtype": site.dtype}
        self.generators = nn.Parameter(torch.zeros(config.butterfly_factors, count, size, size, **like))  # R = I
        self.scale = nn.Parameter(torch.ones(site.out_features, **like))
        self.shuffles = [None, *(butterfly_shuffle(size, f) for f in range(1, config.butterfly_factors))]  # P_1 = I

    def factors(self) -> list[Factor]:
        generators = self.generators.to(torch.promote_types(self.generators.dtype, torch.float32))
        rotations = cayley(0.5 * (generators - generators.transpose(-1, -2)), None)
        return list(zip(self.shuffles, rotations.unbind(0), strict=True))

    def feature_scale(self) -> torch.Tensor:
        return self.scale


class BOFT(Method):
    name = "boft"
    config = BOFTConfig
    capabilities = Capabilities(
        site="weight",
        module_types=(nn.Linear, Conv1D),
        mergeable=True,
        identity_at_init=True,
        commutes=False,
        compose_rules=frozenset({"stack"}),
    )

    @classmethod
    def site_refusal(cls, config: BOFTConfig, site: WeightSite) -> str | None:
        features = site.in_features
        refusal = config.layout_refusal("BOFT", features)
        if refusal:
            return refusal
        count, size = config.block_layout(features)
        factors = config.butterfly_factors
        if factors > 1 and (size % 2 or count % 2 ** (factors - 1)):
            return (
                f"BOFT butterfly_factors {factors} on {features} input features needs an even block size and a "
                f"number of blocks divisible by {2 ** (factors - 1)}; here {count} blocks of {size}: lower "
                "butterfly_factors or change the block size"
            )
        return None

    @classmethod
    def parameter_count(cls, config: BOFTConfig, site: WeightSite) -> int:
        count, size = config.block_layout(site.in_features)
        return config.butterfly_factors * count * size * size + site.out_features

    @classmethod
    def create(cls, config: BOFTConfig, site: WeightSite) -> BOFTAdapter:
        return BOFTAdapter(config, site)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    peft_type = "BOFT"
    _PEFT_UNSUPPORTED = {"layers_to_transform": None, "modules_to_save": None, "bias": "none", "fan_in_fan_out": False}

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, refuse_features, split_peft_key

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        dropout = float(peft_field(peft_config, "boft_dropout", "number", 0.0))
        held: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, suffix = split_peft_key(key, ("boft_R", "boft_s"))
            held.setdefault(path, {})[suffix] = tensor
        groups: dict[tuple[int, int], list[str]] = {}
        state: dict[str, torch.Tensor] = {}
        for path, pair in held.items():
            generators, scale = pair.get("boft_R"), pair.get("boft_s")
            if generators is None or scale is None:
                raise CheckpointError(f"BOFT module {path!r} lacks boft_R or boft_s in the PEFT file")
            if generators.dim() != 4 or generators.shape[-1] != generators.shape[-2] or scale.dim() != 2:
                shapes = {"boft_R": list(generators.shape), "boft_s": list(scale.shape)}
                raise CheckpointError(f"BOFT on {path!r}: tensors {shapes} are not BOFT's (m, D, b, b) and (d_out, 1)")
            groups.setdefault((generators.shape[0], generators.shape[-1]), []).append(path)
            state[peftkit_key(path, adapter_name, "generators")] = generators
            state[peftkit_key(path, adapter_name, "scale")] = scale.reshape(-1)
        if not groups:
            raise CheckpointError("the PEFT BOFT checkpoint holds no BOFT tensors")
        entries = [
            {"method": cls.name, "target": paths, "block_size": size, "butterfly_factors": factors, "dropout": dropout}
            for (factors, size), paths in groups.items()
        ]
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key, refuse_unless_linear_hosts

        refuse_unless_linear_hosts(attached, "BOFT")
        layouts = {(a.module.generators.shape[0], a.module.generators.shape[-1], a.config.dropout) for a in attached}
        if len(layouts) > 1:
            raise CheckpointError(
                "a PEFT BOFT adapter has one block size, butterfly factor count and dropout; this adapter's hosts "
                f"differ in them ({sorted(layouts)})"
            )
        factors, size, dropout = next(iter(layouts))
        config = {
            "boft_block_size": size,
            "boft_block_num": 0,
            "boft_n_butterfly_factor": factors,
            "boft_dropout": dropout,
            "target_modules": sorted(a.path for a in attached),
            "bias": "none",
            "init_weights": True,
        }
        tensors = {}
        for a in attached:
            tensors[peft_key(a.path, "boft_R")] = a.module.generators
            tensors[peft_key(a.path, "boft_s")] = a.module.scale.reshape(-1, 1)
        return config, tensors
