"""LoKr: the low-rank Kronecker product (Yeh et al. 2024, arXiv:2309.14859, LyCORIS's LoKr).

With d_out = o1·o2 and d_in = i1·i2,

    dW = (alpha / r) · W1 ⊗ W2,    W1: o1 x i1,  W2: o2 x i2,  W1 = 0 at init

The Kronecker product of a small o1 x i1 matrix and an o2 x i2 one fills the whole d_out x d_in update (rank up to
rank(W1)·rank(W2)) from o1·i1 + o2·i2 numbers. Each factor is a full matrix, or a rank-r product when that is
smaller: W2 = W2a W2b when r < max(o2, i2) / 2, and W1 = W1a W1b as well with ``decompose_both``, by the same rule. The
split of each dimension is ``decompose_factor`` x the rest when the factor divides it, else the divisor pair
closest to the square root (-1, the default); a factor that divides neither dimension is refused at plan, naming
it. These are the rules of LyCORIS and HF PEFT, whose LOKR checkpoints load and export for linear hosts
(``lokr_w1``/``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2``/``lokr_w2_a``/``lokr_w2_b``).

As for LoHa the update is dense: the forward runs the host's own operation with it (``add_dense_update_``), the
merge adds it in float32 or wider. Training-time ``rank_dropout`` (rows of dW; rescaled by the share kept with
``rank_dropout_scale``, as in PEFT) and ``module_dropout`` as in LyCORIS.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from peftkit_methods.dense_update import DenseUpdateAdapter
from pydantic import Field
from torch import nn

from peftkit import ALL_RULES, Capabilities, Method, MethodConfig
from peftkit.sites import WeightSite, widened
from peftkit.sites.weight import Conv1D


class LoKrConfig(MethodConfig):
    method: Literal["lokr"] = "lokr"
    r: int = Field(default=8, gt=0, description="rank of a factor that is kept as a low-rank product")
    alpha: float = Field(default=8.0, gt=0, description="the update is scaled by alpha / r")
    decompose_both: bool = Field(default=False, description="W1 as a rank-r product too, when that is smaller")
    decompose_factor: int = Field(
        default=-1, description="split each dimension as this factor x the rest (-1: the pair nearest its root)"
    )
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="training: drop rows of dW with this chance")
    rank_dropout_scale: bool = Field(default=False, description="rescale the kept rows by the share kept")
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="training: skip the adapter this often")


def split(dimension: int, factor: int) -> tuple[int, int]:
    """(a, b) with a·b = dimension: (factor, dimension / factor) when it divides, else the divisor a closest below
    the square root (bounded by ``factor`` when one is given), with b = dimension / a."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = math.isqrt(dimension) if factor <= 0 else min(factor, math.isqrt(dimension))
    a = max(d for d in range(1, bound + 1) if dimension % d == 0)
    return a, dimension // a


def shapes(config: LoKrConfig, site: WeightSite) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """(W1's shape, W2's shape, W1 kept whole, W2 kept whole) for this host: d_out = o1·o2, d_in = i1·i2."""
    (o1, o2), (i1, i2) = (
        split(site.out_features, config.decompose_factor),
        split(site.in_features, config.decompose_factor),
    )
    whole_w1 = not (config.decompose_both and config.r < max(o1, i1) / 2)
    whole_w2 = not config.r < max(o2, i2) / 2
    return (o1, i1), (o2, i2), whole_w1, whole_w2


class LoKrAdapter(DenseUpdateAdapter):
    def __init__(self, config: LoKrConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.scaling = config.alpha / config.r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rank_dropout_scale = config.rank_dropout_scale
        (o1, i1), (o2, i2), whole_w1, whole_w2 = shapes(config, site)
        self.inner = (i1, i2)
        like = {"device": site.device, "dtype": site.dtype}
        # W1 starts at zero (a zero W1a when W1 is a product), so dW = 0: the adapted model starts as the base
        if whole_w1:
            self.w1 = nn.Parameter(torch.zeros(o1, i1, **like))
        else:
            self.w1_a = nn.Parameter(torch.zeros(o1, config.r, **like))
            self.w1_b = nn.Parameter(torch.empty(config.r, i1, **like))
        if whole_w2:
            self.w2 = nn.Parameter(torch.empty(o2, i2, **like))
        else:
            self.w2_a = nn.Parameter(torch.empty(o2, config.r, **like))
            self.w2_b = nn.Parameter(torch.empty(config.r, i2, **like))
        if site.device.type != "meta":
            for name in ("w1_b", "w2", "w2_a", "w2_b"):
                if hasattr(self, name):
                    nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))

    def _factor(self, name: str, wide: bool) -> torch.Tensor:
        """W1 or W2: the whole matrix, or its two rank-r factors multiplied."""
        widen = widened if wide else (lambda tensor: tensor)
        whole = getattr(self, name, None)
        if whole is not None:
            return widen(whole)
        return widen(getattr(self, f"{name}_a")) @ widen(getattr(self, f"{name}_b"))

    def delta_weight(self, wide: bool = False) -> torch.Tensor:
        """The unscaled (d_out, d_in) update W1 ⊗ W2; ``wide``: in float32 or wider, for merging."""
        return torch.kron(self._factor("w1", wide), self._factor("w2", wide))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """On a host that is a linear map of its features, (W1 ⊗ W2) x without building W1 ⊗ W2: with x's features
        laid out as an i1 x i2 matrix X, the update's output is W1 X W2ᵀ, laid out as o1 x o2 (o1·i1·i2 + o1·i2·o2
        multiplications a token instead of d_out·d_in). Other hosts (a lookup, a convolution, a layer that casts its
        input) take the dense update."""
        if self.site.input_is_index or type(self.site).project_in is not WeightSite.project_in:
            return super().forward(x, out)
        if self.skips_this_forward():
            return out
        w1, w2 = self._factor("w1", False).to(x.dtype), self._factor("w2", False).to(x.dtype)
        features = x.reshape(*x.shape[:-1], *self.inner)  # "... (i1 i2) -> ... i1 i2"
        update = torch.matmul(torch.matmul(w1, features), w2.t())  # "... o1 o2"
        update = update.reshape(*x.shape[:-1], -1) * self.scaling  # "... o1 o2 -> ... (o1 o2)"
        kept = self.kept_rows(update.shape[-1], update)  # a row of dW is an output feature
        if kept is not None:
            update = update * kept
        return out + update.to(out.dtype)


class LoKr(Method):
    name = "lokr"
    config = LoKrConfig
    capabilities = Capabilities(
        site="weight",
        module_types=(nn.Linear, nn.Embedding, *((Conv1D,) if Conv1D is not None else ())),
        mergeable=True,
        identity_at_init=True,
        compose_rules=ALL_RULES,
    )

    @classmethod
    def site_refusal(cls, config: LoKrConfig, site: WeightSite) -> str | None:
        factor = config.decompose_factor
        if factor == 0 or factor < -1:
            return f"decompose_factor {factor}: give a divisor of the dimensions, or -1 for the pair nearest the root"
        if factor > 0 and (site.in_features % factor or site.out_features % factor):
            return (
                f"decompose_factor {factor} does not divide the host's {site.out_features} x {site.in_features} "
                "weight; give a factor of both dimensions, or -1 for the pair nearest each root"
            )
        return None

    @classmethod
    def parameter_count(cls, config: LoKrConfig, site: WeightSite) -> int:
        (o1, i1), (o2, i2), whole_w1, whole_w2 = shapes(config, site)
        w1 = o1 * i1 if whole_w1 else config.r * (o1 + i1)
        w2 = o2 * i2 if whole_w2 else config.r * (o2 + i2)
        return w1 + w2

    @classmethod
    def create(cls, config: LoKrConfig, site: WeightSite) -> LoKrAdapter:
        return LoKrAdapter(config, site)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    peft_type = "LOKR"
    _PEFT_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    _PEFT_UNSUPPORTED = {"use_effective_conv2d": False, "layers_to_transform": None, "modules_to_save": None}
    _PEFT_FIELDS = ("decompose_both", "decompose_factor", "rank_dropout", "rank_dropout_scale", "module_dropout")

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, rank_and_alpha, refuse_features, split_peft_key

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        shared = {
            "decompose_both": peft_field(peft_config, "decompose_both", "flag", False),
            "decompose_factor": peft_field(peft_config, "decompose_factor", "number", -1),
            "rank_dropout": float(peft_field(peft_config, "rank_dropout", "number", 0.0)),
            "rank_dropout_scale": peft_field(peft_config, "rank_dropout_scale", "flag", False),
            "module_dropout": float(peft_field(peft_config, "module_dropout", "number", 0.0)),
        }
        if not float(shared["decompose_factor"]).is_integer():
            raise CheckpointError(
                f"decompose_factor {shared['decompose_factor']!r} must be a whole number; fix the file"
            )
        shared["decompose_factor"] = int(shared["decompose_factor"])
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, suffix = split_peft_key(key, cls._PEFT_FACTORS)
            factors.setdefault(path, {})[suffix.removeprefix("lokr_")] = tensor
        groups: dict[tuple[int, float], list[str]] = {}
        state: dict[str, torch.Tensor] = {}
        for path, held in factors.items():
            rank, alpha = rank_and_alpha(peft_config, path, "alpha")
            if any(t.dim() != 2 for t in held.values()):
                raise CheckpointError(f"LoKr on {path!r} has factors that are not matrices (a convolution): not read")
            groups.setdefault((rank, alpha), []).append(path)
            for name, tensor in held.items():
                state[peftkit_key(path, adapter_name, name)] = tensor
        if not groups:
            raise CheckpointError("the PEFT LoKr checkpoint holds no LoKr tensors")
        # which factors are whole follows from r and the shapes, as in PEFT; a file that disagrees is refused by
        # load's shape check, naming the tensor
        entries = [
            {"method": cls.name, "target": paths, "r": r, "alpha": a, **shared} for (r, a), paths in groups.items()
        ]
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key, rank_and_alpha_fields, refuse_unless_linear_hosts

        refuse_unless_linear_hosts(attached, "LoKr")
        for field in cls._PEFT_FIELDS:
            if len({getattr(a.config, field) for a in attached}) > 1:
                raise CheckpointError(f"a PEFT LoKr adapter has one {field}; this adapter's entries differ in it")
        ranks = {a.path: a.config.r for a in attached}
        tensors = {
            peft_key(a.path, f"lokr_{name}"): parameter
            for a in attached
            for name, parameter in a.module.named_parameters(recurse=False)
        }
        config = {
            **rank_and_alpha_fields(ranks, {a.path: a.config.alpha for a in attached}, "alpha"),
            "target_modules": sorted(ranks),
            **{field: getattr(attached[0].config, field) for field in cls._PEFT_FIELDS},
            "use_effective_conv2d": False,
            "init_weights": True,
        }
        return config, tensors
