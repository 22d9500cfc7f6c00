"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685), with rsLoRA scaling (Kalajdzievski, 2023).

The frozen weight W0 (d_out x d_in) gets a trainable low-rank update, eq. (3) of the paper:

    h = W0 x + (alpha / r) * B A x,      A: r x d_in,  B: d_out x r,  B = 0 at init

so training starts from the base model. rsLoRA scales by alpha / sqrt(r) instead, which keeps the update's
magnitude stable as r grows.

PiSSA (Meng et al. 2024, arXiv:2404.02948) starts from W0's principal part instead: with W0 = U S V^T,

    s B0 A0 = U_r S_r V_r^T,   A0 = sqrt(S_r / s) V_r^T,   B0 = U_r sqrt(S_r / s),   W_res = W0 - s B0 A0

so B and A train the directions that matter most, over the residual W_res left in the host (the randomised SVD of
Halko et al. 2011 with ``pissa_iterations`` power iterations makes it fast on large weights). OLoRA (Büyükakyüz
2024, arXiv:2406.01775) takes W0 = Q R and A0 = R_r, B0 = Q_r (orthonormal columns), W_res = W0 - s B0 A0. Both
rewrite the host's weight at attach (the core keeps and restores the original), and are saved as the plain LoRA
that makes the same change to W0: s (B A - B0 A0) = s [B, -B0] [A; A0], rank 2r. The forward never builds W0 + BA: it runs ``A`` with the host's own operation (a
linear map, an embedding lookup, a strided convolution), then adds ``scale * B h`` into the host's output in place.
Merging adds the update, computed in float32, to the weight; unmerging subtracts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig, ParameterGroup
from peftkit.sites import WeightSite, weight_site_types, widened


class LoRAConfig(MethodConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0, description="rank of the update")
    alpha: float = Field(default=16.0, gt=0, description="the update is scaled by alpha / r (alpha / sqrt(r))")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the input of the LoRA path")
    rslora: bool = Field(default=False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = Field(
        default="kaiming",
        description="kaiming or gaussian: A drawn so, B = 0; pissa, olora: B A starts as the weight's principal part "
        "(SVD) or its first QR factors, and the host keeps the residual",
    )
    pissa_iterations: int | None = Field(
        default=None, ge=0, le=64, description="init pissa by a randomised SVD with this many power iterations"
    )
    lora_plus_ratio: float | None = Field(
        default=None, gt=0, description="LoRA+: B learns at this multiple of A's learning rate (the paper: 16)"
    )
    freeze_a: bool = Field(
        default=False,
        description="LoRA-FA: A stays as initialised (saved, not trained) and only B trains, so the backward keeps "
        "the r-wide product for B's gradient instead of the layer's input",
    )

    @model_validator(mode="after")
    def _iterations_need_pissa(self) -> LoRAConfig:
        if self.pissa_iterations is not None and self.init != "pissa":
            raise ValueError(f"pissa_iterations applies to init 'pissa' only, not {self.init!r}; remove it")
        return self


def lora_scaling(config: MethodConfig) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA: the scale of B A, for every config with r, alpha, rslora."""
    return config.alpha / (math.sqrt(config.r) if config.rslora else config.r)


# initialisations that move part of W0 into B A and leave the residual in the host
REWRITING_INITS = frozenset({"pissa", "olora"})


def randomized_svd(weight: torch.Tensor, rank: int, iterations: int) -> tuple[torch.Tensor, ...]:
    """The top singular triplets of ``weight`` by a randomised range finder with power iterations (Halko, Martinsson
    and Tropp 2011, algorithm 4.4), oversampled by 8 columns; from a fixed seed, so that the same weight always gives
    the same factors (a checkpoint saved as trained finds the same residual when it is loaded)."""
    columns = min(rank + 8, *weight.shape)
    generator = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn(weight.shape[1], columns, generator=generator, device=weight.device, dtype=weight.dtype)
    basis = torch.linalg.qr(weight @ probe).Q  # "o i, i q -> o q"
    for _ in range(iterations):
        basis = torch.linalg.qr(weight.T @ basis).Q
        basis = torch.linalg.qr(weight @ basis).Q
    u, singular, vh = torch.linalg.svd(basis.T @ weight, full_matrices=False)  # "q o, o i -> q i"
    return basis @ u, singular, vh


def initial_factors(weight: torch.Tensor, config: LoRAConfig, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 (r, d_in) and B0 (d_out, r) of PiSSA or OLoRA from the (d_out, d_in) weight, in its (float32+) dtype."""
    r = config.r
    if config.init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if config.pissa_iterations is None:
        u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
    else:
        u, singular, vh = randomized_svd(weight, r, config.pissa_iterations)
    root = (singular[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


class LoRAAdapter(Adapter):
    def __init__(self, config: LoRAConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.rank = config.r
        self.b_lr_scale = config.lora_plus_ratio or 1.0
        self.scaling = lora_scaling(config)
        self.dropout = 0.0 if site.input_is_index else config.dropout
        factory = {"device": site.device, "dtype": site.dtype}
        self.lora_a = nn.Parameter(torch.empty(config.r, site.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(site.out_features, config.r, **factory))
        # A meta tensor holds no values: initialising it would do nothing and cost ~0.3 ms per adapter (about half
        # of attaching to a meta model), so it is skipped; whoever materialises the model initialises it.
        if config.init in REWRITING_INITS:  # B0 and A0 stay beside the trained factors (never saved as such)
            self.register_buffer("initial_a", torch.empty_like(self.lora_a), persistent=False)
            self.register_buffer("initial_b", torch.empty_like(self.lora_b), persistent=False)
        if self.lora_a.is_meta:
            pass
        elif config.init in REWRITING_INITS:
            a0, b0 = initial_factors(site.weight_as_matrix(), config, self.scaling)
            with torch.no_grad():
                for tensor, value in ((self.lora_a, a0), (self.initial_a, a0), (self.lora_b, b0), (self.initial_b, b0)):
                    tensor.copy_(value)
        elif config.init == "kaiming":  # the same as nn.Linear's default initialisation
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_a, std=1.0 / config.r)
        if config.freeze_a:  # LoRA-FA (Zhang et al. 2023): A as a saved buffer, which autograd never differentiates
            frozen = self.lora_a.detach()
            del self.lora_a
            self.register_buffer("lora_a", frozen)

    def parameter_group(self, name: str) -> ParameterGroup:
        """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B at ``lora_plus_ratio`` times A's learning rate."""
        return ParameterGroup(lr_scale=self.b_lr_scale) if name == "lora_b" else ParameterGroup()

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:  # no dropout copy of x when there is no dropout
            x = F.dropout(x, self.dropout, training=True)
        h = self.site.project_in(x, self.lora_a)  # "... d_in -> ... r"
        return self.site.project_out_(out, h, self.lora_b, self.scaling)  # out += scaling * h @ B.T

    def fuses(self, x: torch.Tensor, host: nn.Module) -> bool:
        """The host's product and B A in one autograd function while training, where the site allows it (a plain
        linear host, frozen, same dtypes); not with dropout, whose masked input only the update sees."""
        return not (self.dropout and self.training) and self.site.fuses(x, self.lora_a, self.lora_b, host)

    def fused_forward(self, x: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return self.site.fused_product(x, self.lora_a, self.lora_b, self.scaling, host)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A as a (d_out, d_in) matrix in float32, or float64 for a float64 model."""
        return (widened(self.lora_b) @ widened(self.lora_a)).mul_(self.scaling)

    # -- PiSSA / OLoRA: the host holds W0 - s B0 A0 while the adapter is attached --------------------------------
    def rewrite_base(self) -> None:
        """W_res = W0 - s B0 A0, from the factors as stored (rounded to the adapter's dtype), so that the residual
        plus the adapter is W0 up to one rounding of W_res."""
        self.site.add_to_weight_(-(widened(self.initial_b) @ widened(self.initial_a)).mul_(self.scaling))

    def removed_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.site.project_out_(out, self.site.project_in(x, self.initial_a), self.initial_b, self.scaling)

    def portable_tensors(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[A; A0] and [B, -B0]: their product is B A - B0 A0, the change to W0 (HF PEFT's conversion)."""
        a, b = own["lora_a"], own["lora_b"]
        return {
            "lora_a": torch.cat([a, self.initial_a.to(a.device, a.dtype)]),
            "lora_b": torch.cat([b, -self.initial_b.to(b.device, b.dtype)], dim=1),
        }

    def merge(self) -> None:
        self.site.add_to_weight_(self.delta_weight())

    def unmerge(self) -> None:
        self.site.add_to_weight_(-self.delta_weight())


class LoRA(Method):
    name = "lora"
    config = LoRAConfig
    capabilities = Capabilities(
        site="weight",
        module_types=weight_site_types(),
        mergeable=True,
        identity_at_init=True,
        routable=True,
        commutes=True,
        compose_rules=ALL_RULES,
        combinable=True,
    )

    @classmethod
    def route(
        cls, adapters: list[LoRAAdapter | None], index: torch.Tensor, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor | None:
        """Each example with its own adapter in two batched matmuls: the adapters' A and B are stacked, zero-padded
        to the largest rank, and gathered per example, and each example's scaling multiplies its small (s, r)
        product; rows routed to no adapter gather zeros. Returns None (the core then runs each adapter on its rows)
        where the host is not a feature-last map."""
        present = [a for a in adapters if a is not None]
        site = present[0].site
        if site.input_is_index or type(site).project_in is not WeightSite.project_in:
            return None
        if len({a.dropout for a in present}) > 1:
            return None
        rank = max(a.rank for a in present)
        d_in, d_out = site.in_features, site.out_features
        like = {"device": x.device, "dtype": x.dtype}
        # One stack (one kernel) per factor and the scaling applied after the gather: a per-adapter pad, cast or
        # multiply would cost a few kernels per adapter per layer in every forward (1.3x a single adapter's batch
        # at one token per example and 32 adapters on CPU, and launch-bound on a GPU). Pads only for lower ranks.
        a_stack = torch.stack(  # "n r i"
            [
                (a.lora_a if a.rank == rank else F.pad(a.lora_a, (0, 0, 0, rank - a.rank)))
                if a
                else torch.zeros(rank, d_in, **like)
                for a in adapters
            ]
        ).to(x.dtype)
        b_stack = torch.stack(  # "n o r"
            [
                (a.lora_b if a.rank == rank else F.pad(a.lora_b, (0, rank - a.rank)))
                if a
                else torch.zeros(d_out, rank, **like)
                for a in adapters
            ]
        ).to(x.dtype)
        scaling = torch.tensor([a.scaling if a else 0.0 for a in adapters], **like)  # "n"
        rows = x.reshape(x.shape[0], -1, d_in)  # "b ... i -> b s i"
        if present[0].dropout and present[0].training:
            rows = F.dropout(rows, present[0].dropout, training=True)
        h = torch.bmm(rows, a_stack[index].transpose(1, 2))  # "b s i, b i r -> b s r"
        h = h * scaling[index][:, None, None]  # "b s r, b -> b s r": on the small product, not on B or the output
        b_rows = b_stack[index].transpose(1, 2)  # "b r o"
        if out.dtype == h.dtype:  # the add fused into the matmul: no full-size temporary for the update
            return torch.baddbmm(out.reshape(h.shape[0], -1, d_out), h, b_rows).reshape(out.shape)
        return out + torch.bmm(h, b_rows).reshape(out.shape).to(out.dtype)  # "b s r, b r o -> b s o"

    @classmethod
    def capabilities_for(cls, config: LoRAConfig) -> Capabilities:
        """PiSSA and OLoRA rewrite the host: no per-example routing (the residual is shared by every example), no
        weighted composition (a weight on the adapter would scale the principal part it carries), no
        ``peftkit.combine`` (their B A is not the change to W0)."""
        if config.init not in REWRITING_INITS:
            return cls.capabilities
        return dataclasses.replace(
            cls.capabilities,
            rewrites_base=True,
            routable=False,
            combinable=False,
            compose_rules=frozenset({"sum", "stack"}),
        )

    @classmethod
    def site_refusal(cls, config: LoRAConfig, site: WeightSite) -> str | None:
        most = min(site.in_features, site.out_features)
        unwritable = site.merge_refusal() if config.init in REWRITING_INITS else None
        if unwritable:
            return f"init {config.init!r} writes a residual into the host's weight, and {unwritable}"
        if config.init in REWRITING_INITS and config.r > most:
            return (
                f"r={config.r} is larger than any rank this weight can have (min(out_features, in_features) = "
                f"{most}); init {config.init!r} takes the weight's first r directions, so set r to {most} or less"
            )
        return None

    @classmethod
    def portable_config(cls, config: LoRAConfig) -> LoRAConfig:
        """A plain LoRA of rank 2r with the same scaling s (alpha doubled; times sqrt 2 with rsLoRA)."""
        alpha = config.alpha * (math.sqrt(2.0) if config.rslora else 2.0)
        return config.model_copy(
            update={"r": 2 * config.r, "alpha": alpha, "init": "kaiming", "pissa_iterations": None}
        )

    @classmethod
    def parameter_count(cls, config: LoRAConfig, site: WeightSite) -> int:
        return config.r * ((0 if config.freeze_a else site.in_features) + site.out_features)

    @classmethod
    def create(cls, config: LoRAConfig, site: WeightSite) -> LoRAAdapter:
        return LoRAAdapter(config, site)

    # -- peftkit.combine hooks: the update is scaling * B A, a matrix of rank at most r ---------------------------
    @classmethod
    def weight_delta(cls, adapter: LoRAAdapter) -> torch.Tensor:
        return adapter.delta_weight()

    @classmethod
    def delta_rank(cls, config: LoRAConfig) -> int:
        return config.r

    @classmethod
    def low_rank_config(cls, like: LoRAConfig, target: list[str], rank: int) -> LoRAConfig:
        """alpha = r and no rsLoRA, so scaling = 1 and B A is the update itself; dropout and init follow ``like``."""
        return LoRAConfig(target=target, r=rank, alpha=float(rank), dropout=like.dropout, init=like.init)

    @classmethod
    def load_low_rank_(cls, adapter: LoRAAdapter, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """B = U sqrt(S) / scaling, A = sqrt(S) Vh: the singular values split evenly, so A and B have equal norms
        (neither factor starts near zero if training continues). Ranks below r leave the extra rows/columns 0."""
        root = s.sqrt()
        k = s.shape[0]
        with torch.no_grad():
            adapter.lora_a.zero_()
            adapter.lora_b.zero_()
            adapter.lora_a[:k].copy_(root[:, None] * vh)  # "k, k i -> k i"
            adapter.lora_b[:, :k].copy_(u * (root / adapter.scaling))  # "o k, k -> o k"

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # PEFT keys: base_model.model.<path>.lora_A.weight (r, d_in) and .lora_B.weight (d_out, r), for embeddings
    # .lora_embedding_A (r, num_embeddings) and .lora_embedding_B (dim, r): the same shapes as lora_a and lora_b,
    # for Conv1D too (fan_in_fan_out only changes how PEFT merges). r comes from the tensors; alpha from
    # alpha_pattern (PEFT's rule: the pattern matches the path or a dotted suffix of it, as a regex) or lora_alpha.
    peft_type = "LORA"
    _PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
    _PEFT_UNSUPPORTED = {
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "layer_replication": None,
        "use_qalora": False,
        "use_bdlora": None,
        "target_parameters": None,
        "trainable_token_indices": None,
        "alora_invocation_tokens": None,
        "megatron_config": None,
        "arrow_config": None,
        "monteclora_config": None,
        "kasa_config": None,
        "velora_config": None,
    }

    # initialisations that move part of W0 into the factors and save the residual as the new base (PiSSA, OLoRA,
    # CorDA, LoftQ, LoRA-GA); PEFT keeps the name in the config unless the save converted the adapter to a delta
    _PEFT_INITS_THAT_CHANGE_THE_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")

    @classmethod
    def reads_peft(cls, peft_config: dict) -> bool:
        # a DoRA checkpoint goes to the method that declares it, one with target_parameters to lora-experts
        return not peft_config.get("use_dora") and not peft_config.get("target_parameters")

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import (
            pattern_value,
            peft_field,
            peft_value,
            peftkit_key,
            refuse_features,
            split_peft_key,
        )

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        init = peft_config.get("init_lora_weights")
        if isinstance(init, str) and init.startswith(cls._PEFT_INITS_THAT_CHANGE_THE_BASE):
            raise CheckpointError(
                f"the PEFT checkpoint was trained with init_lora_weights={init!r}, which rewrote the base weights; "
                "its adapter only fits the residual base saved beside it. Save it from PEFT with "
                "path_initial_model_for_weight_conversion (a plain LoRA delta against the original base) and load that"
            )

        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, suffix = split_peft_key(key, cls._PEFT_SUFFIXES)
            factors.setdefault(path, {})["a" if suffix.startswith(("lora_A", "lora_embedding_A")) else "b"] = tensor
        groups: dict[tuple[int, float], list[str]] = {}
        state: dict[str, torch.Tensor] = {}
        for path, pair in factors.items():
            if set(pair) != {"a", "b"}:
                raise CheckpointError(f"LoRA module {path!r} has only lora_{'AB'[0 if 'a' in pair else 1]} in the file")
            a, b = pair["a"], pair["b"]
            if a.dim() != 2 or b.dim() != 2:
                raise CheckpointError(f"LoRA on {path!r} has {a.dim()}-d factors (a convolution): not supported")
            rank = a.shape[0]
            wanted = pattern_value(
                peft_config.get("rank_pattern") or {}, path, peft_field(peft_config, "r", "count", rank)
            )
            wanted = peft_value("a rank_pattern value", wanted, "count")
            if b.shape[1] != rank or wanted != rank:
                raise CheckpointError(
                    f"LoRA on {path!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not give rank {wanted}"
                )
            alpha = pattern_value(
                peft_config.get("alpha_pattern") or {}, path, peft_field(peft_config, "lora_alpha", "number", 8)
            )
            alpha = float(peft_value("an alpha_pattern value", alpha, "number"))
            groups.setdefault((rank, alpha), []).append(path)
            state[peftkit_key(path, adapter_name, "lora_a")] = a
            state[peftkit_key(path, adapter_name, "lora_b")] = b
        if not groups:
            raise CheckpointError("the PEFT LoRA checkpoint holds no LoRA tensors")
        entries = [
            {
                "method": cls.name,
                "target": paths,
                "r": rank,
                "alpha": alpha,
                "dropout": float(peft_field(peft_config, "lora_dropout", "number", 0.0)),
                "rslora": peft_field(peft_config, "use_rslora", "flag", False),
            }
            for (rank, alpha), paths in groups.items()
        ]
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from transformers.pytorch_utils import Conv1D

        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key, rank_and_alpha_fields

        configs = [a.config for a in attached]
        for field in ("rslora", "dropout"):
            if len({getattr(c, field) for c in configs}) > 1:
                raise CheckpointError(f"a PEFT LoRA adapter has one {field}; this adapter's entries differ in it")
        hosts = [a.module.site.module for a in attached]
        if any(isinstance(h, nn.Conv2d) for h in hosts):
            raise CheckpointError("LoRA on nn.Conv2d is not exported (PEFT stores its factors as convolutions)")
        conv1d = [isinstance(h, Conv1D) for h in hosts]
        if any(conv1d) and not all(conv1d):
            raise CheckpointError("PEFT's fan_in_fan_out is one flag: it cannot mix GPT-2 Conv1D and other hosts")
        # PiSSA and OLoRA leave as the plain LoRA that changes the original weight (PEFT's own conversion)
        portable = {a.path: a.config.init in REWRITING_INITS for a in attached}
        configs = [cls.portable_config(a.config) if portable[a.path] else a.config for a in attached]
        ranks = {a.path: c.r for a, c in zip(attached, configs, strict=True)}
        alphas = {a.path: c.alpha for a, c in zip(attached, configs, strict=True)}
        tensors = {}
        for a in attached:
            embedding = a.module.site.input_is_index
            names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            held = (
                a.module.portable_tensors({"lora_a": a.module.lora_a, "lora_b": a.module.lora_b})
                if portable[a.path]
                else {"lora_a": a.module.lora_a, "lora_b": a.module.lora_b}
            )
            tensors[peft_key(a.path, names[0])] = held["lora_a"]
            tensors[peft_key(a.path, names[1])] = held["lora_b"]
        config = {
            **rank_and_alpha_fields(ranks, alphas, "lora_alpha"),
            "target_modules": sorted(ranks),
            "lora_dropout": configs[0].dropout,
            "use_rslora": configs[0].rslora,
            "fan_in_fan_out": all(conv1d),
            "bias": "none",
            "init_lora_weights": True,
        }
        return config, tensors
