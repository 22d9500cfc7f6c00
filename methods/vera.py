"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

One pair of frozen random matrices serves every host of an entry; each host trains two vectors only:

    dW = diag(λ_b) · B[:d_out] · diag(λ_d) · A[:, :d_in],   A: r x max d_in,  B: max d_out x r,  λ_b = 0 at init

A and B are Kaiming-uniform from a seeded generator (``projection_seed``), sized for the largest host and sliced
for each (as HF PEFT does), so a host costs d_out + r trained numbers (LoRA: r·(d_in + d_out)), and r can be far
larger than LoRA's (256 by default). They are the method's shared state (``Method.shared_state``): kept once on the
model, and saved with the checkpoint when ``save_projection`` (the default, as PEFT's), else regenerated from the seed
at load, which saves their bytes but ties the checkpoint to torch's generator. The forward runs the two thin
projections like LoRA's (never the dense update); the merge adds dW in float32 or wider. HF PEFT's VERA checkpoints
(``vera_lambda_b``, ``vera_lambda_d`` per module; ``base_model.vera_A``/``vera_B`` once) load and export, GPT-2's
Conv1D included.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig, SharedState
from peftkit.sites import WeightSite, host_class, widened
from peftkit.sites.weight import Conv1D


class VeRAConfig(MethodConfig):
    method: Literal["vera"] = "vera"
    r: int = Field(default=256, gt=0, le=65536, description="rank of the shared random projections")
    projection_seed: int = Field(default=0, ge=0, lt=2**63, description="seed of the shared A and B")
    save_projection: bool = Field(default=True, description="save A and B with the checkpoint (else: regenerate)")
    d_initial: float = Field(default=0.1, description="initial value of every entry of λ_d")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")


def _kaiming_uniform(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = ``columns``, drawn from ``generator`` (on the CPU)."""
    bound = math.sqrt(6.0 / columns)
    return torch.empty(rows, columns).uniform_(-bound, bound, generator=generator)


class VeRAAdapter(Adapter):
    def __init__(self, config: VeRAConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        like = {"device": site.device, "dtype": site.dtype}
        self.lambda_b = nn.Parameter(torch.zeros(site.out_features, **like))  # dW = 0: starts as the base
        self.lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, **like))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(λ_b) B, diag(λ_d) A) for this host: (d_out, r) and (r, d_in)."""
        shared = self.site.shared
        a = shared.vera_a[:, : self.site.in_features].to(self.lambda_d.dtype)
        b = shared.vera_b[: self.site.out_features].to(self.lambda_b.dtype)
        return self.lambda_b[:, None] * b, self.lambda_d[:, None] * a

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        up, down = self._factors()
        h = self.site.project_in(self.dropout(x), down.to(x.dtype))
        return self.site.project_out_(out, h, up, 1.0)

    def merge(self) -> None:
        up, down = self._factors()
        self.site.add_to_weight_(widened(up) @ widened(down))

    def unmerge(self) -> None:
        up, down = self._factors()
        self.site.add_to_weight_(-(widened(up) @ widened(down)))


class VeRA(Method):
    name = "vera"
    config = VeRAConfig
    capabilities = Capabilities(
        site="weight", module_types=(nn.Linear, Conv1D), mergeable=True, identity_at_init=True, compose_rules=ALL_RULES
    )

    @classmethod
    def shared_state(cls, config: VeRAConfig, sites: list[WeightSite]) -> SharedState:
        generator = torch.Generator(device="cpu").manual_seed(config.projection_seed)
        a = _kaiming_uniform(config.r, max(site.in_features for site in sites), generator)
        b = _kaiming_uniform(max(site.out_features for site in sites), config.r, generator)
        return SharedState({"vera_a": a, "vera_b": b}, saved=config.save_projection)

    @classmethod
    def parameter_count(cls, config: VeRAConfig, site: WeightSite) -> int:
        return site.out_features + config.r

    @classmethod
    def create(cls, config: VeRAConfig, site: WeightSite) -> VeRAAdapter:
        return VeRAAdapter(config, site)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # Per module base_model.model.<path>.vera_lambda_b (d_out,) and .vera_lambda_d (r,); with save_projection, the
    # shared base_model.vera_A (r, max d_in) and base_model.vera_B (max d_out, r) once, which peftkit keeps under the
    # entry's first host (in the model's module order).
    peft_type = "VERA"
    _PEFT_UNSUPPORTED = {"layers_to_transform": None, "modules_to_save": None, "bias": "none"}
    _PEFT_SHARED = {"base_model.vera_A": "vera_a", "base_model.vera_B": "vera_b"}

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, refuse_features, split_peft_key
        from peftkit.keys import SHARED_CHILD

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        save = peft_field(peft_config, "save_projection", "flag", True)
        shared = {ours: tensors.pop(theirs) for theirs, ours in cls._PEFT_SHARED.items() if theirs in tensors}
        if save and len(shared) != 2:
            raise CheckpointError("the PEFT VeRA checkpoint says save_projection but lacks base_model.vera_A or vera_B")
        state: dict[str, torch.Tensor] = {}
        ranks: set[int] = set()
        paths: set[str] = set()
        for key, tensor in tensors.items():
            path, suffix = split_peft_key(key, ("vera_lambda_b", "vera_lambda_d"))
            ours = "lambda_b" if suffix == "vera_lambda_b" else "lambda_d"
            if suffix == "vera_lambda_d":
                ranks.add(tensor.numel())
            state[peftkit_key(path, adapter_name, ours)] = tensor.reshape(-1)
            paths.add(path)
        if not paths:
            raise CheckpointError("the PEFT VeRA checkpoint holds no VeRA tensors")
        rank = peft_field(peft_config, "r", "count", 256)
        if ranks != {rank}:
            raise CheckpointError(f"the PEFT VeRA checkpoint's r is {rank}, its vera_lambda_d sizes {sorted(ranks)}")
        seed = peft_config.get("projection_prng_key", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise CheckpointError(f"adapter_config.json: projection_prng_key must be a whole number >= 0, got {seed!r}")
        order = {name: index for index, (name, _) in enumerate(model.named_modules())}
        first = min(paths, key=lambda path: order.get(path, len(order)))
        if save:
            for name, tensor in shared.items():
                state[peftkit_key(first, adapter_name, f"{SHARED_CHILD}.{name}")] = tensor
        entry = {
            "method": cls.name,
            "target": sorted(paths),
            "r": rank,
            "projection_seed": seed,
            "save_projection": save,
            "d_initial": float(peft_field(peft_config, "d_initial", "number", 0.1)),
            "dropout": float(peft_field(peft_config, "vera_dropout", "number", 0.0)),
        }
        return [entry], state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key

        if len({a.entry for a in attached}) > 1:
            raise CheckpointError("a PEFT VeRA adapter has one pair of projections; this adapter has several entries")
        kinds = {host_class(a.module.site.module) for a in attached}
        if not (kinds <= {nn.Linear} or (Conv1D is not None and kinds <= {Conv1D})):
            raise CheckpointError(
                f"a PEFT VeRA adapter's hosts are all nn.Linear or all Conv1D (fan_in_fan_out); these are {kinds}"
            )
        config = attached[0].config
        tensors: dict[str, torch.Tensor] = {}
        for a in attached:
            tensors[peft_key(a.path, "vera_lambda_b")] = a.module.lambda_b
            tensors[peft_key(a.path, "vera_lambda_d")] = a.module.lambda_d
        if config.save_projection:
            shared = attached[0].module.site.shared
            tensors["base_model.vera_A"], tensors["base_model.vera_B"] = shared.vera_a, shared.vera_b
        fields = {
            "r": config.r,
            "target_modules": sorted(a.path for a in attached),
            "projection_prng_key": config.projection_seed,
            "save_projection": config.save_projection,
            "d_initial": config.d_initial,
            "vera_dropout": config.dropout,
            "fan_in_fan_out": kinds != {nn.Linear},
            "bias": "none",
            "init_weights": True,
        }
        return fields, tensors
