"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, arXiv:2303.10512), in HF PEFT's form.

Each host's update is kept in SVD form,

    dW = alpha / r0 · P · diag(λ) · Q,   P: d_out x r0,  Q: r0 x d_in,  λ = 0 at init  (r0 = init_r)

and trained with an orthogonality regulariser, ``orth_reg_weight`` · the mean over the P's and Q's of ‖QQᵀ − I‖_F and
‖PᵀP − I‖_F (the method's ``training_loss``). After each optimizer step (``after_optimizer_step``) the importance of
every triplet (λ_i, its row of Q, its column of P) is updated, as the smoothed sensitivity |θ ∂L/∂θ| times its
uncertainty, and the least important triplets of all the entry's hosts are pruned (λ_i set to zero) down to a budget
that falls on a cubic schedule from init_r to target_r per host, between ``warmup_steps`` and ``total_steps −
final_steps``; for the last ``final_steps`` steps the final ranks stay fixed. A pruned triplet can come back while
the budget still moves (its λ is zero, not frozen), as in the paper. The ranks each host ends with are kept in the
adapter (``kept``, a 0/1 vector saved with it), and HF PEFT's ADALORA checkpoints, which hold only the kept
triplets and a ``rank_pattern``, load and export with equal outputs.

``total_steps`` is the run's length: left out, it is the run's own step count (``peftkit.check_schedule``,
``after_optimizer_step``); given, a run of another length is refused before it starts, naming both numbers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig
from peftkit.sites import WeightSite, host_class, weight_site_types, widened
from peftkit.sites.weight import Conv1D


class AdaLoRAConfig(MethodConfig):
    method: Literal["adalora"] = "adalora"
    init_r: int = Field(default=12, gt=0, le=4096, description="rank each host starts with")
    target_r: int = Field(default=8, gt=0, description="average rank per host once the budget has fallen")
    alpha: float = Field(default=8.0, gt=0, description="the update is scaled by alpha / init_r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    total_steps: int | None = Field(default=None, gt=0, description="the run's optimizer steps (default: the run's)")
    warmup_steps: int = Field(default=0, ge=0, description="steps before the budget starts to fall (PEFT's tinit)")
    final_steps: int = Field(default=0, ge=0, description="steps at the final ranks at the end (PEFT's tfinal)")
    warmup_share: float | None = Field(default=None, ge=0, lt=1, description="warm-up as a share of the run's steps")
    final_share: float | None = Field(default=None, ge=0, lt=1, description="final phase as a share of the run")
    interval: int = Field(default=1, ge=1, description="steps between two allocations (PEFT's deltaT)")
    beta1: float = Field(default=0.85, gt=0, lt=1, description="smoothing of the sensitivity")
    beta2: float = Field(default=0.85, gt=0, lt=1, description="smoothing of the uncertainty")
    orth_reg_weight: float = Field(default=0.5, ge=0, description="weight of the orthogonality regulariser")
    ranks: dict[str, int] | None = Field(
        default=None, description="each host's rank by module path (a saved, compacted adapter); others: init_r"
    )

    @model_validator(mode="after")
    def _budget_falls(self) -> AdaLoRAConfig:
        for path, rank in (self.ranks or {}).items():
            if not 0 <= rank <= self.init_r:
                raise ValueError(f"ranks[{path!r}] is {rank}: a host's rank is between 0 and init_r ({self.init_r})")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r {self.target_r} is above init_r {self.init_r}: the budget only falls")
        for share, steps in (("warmup_share", "warmup_steps"), ("final_share", "final_steps")):
            if getattr(self, share) is not None and getattr(self, steps):
                raise ValueError(f"give {steps} or {share}, not both")
        if self.total_steps is not None and (problem := schedule_problem(self, self.total_steps)):
            raise ValueError(problem)
        return self


def phases(config: AdaLoRAConfig, total_steps: int) -> tuple[int, int]:
    """(warm-up steps, final steps) of a run of ``total_steps``: as given, or the given shares of the run."""
    warmup = config.warmup_steps if config.warmup_share is None else round(config.warmup_share * total_steps)
    final = config.final_steps if config.final_share is None else round(config.final_share * total_steps)
    return warmup, final


def rank_of(config: AdaLoRAConfig, site: WeightSite) -> int:
    """The number of triplets the adapter on ``site`` holds: its saved rank, or init_r."""
    context = getattr(site, "context", None)
    return (config.ranks or {}).get(context.path if context is not None else "", config.init_r)


def schedule_problem(config: AdaLoRAConfig, total_steps: int) -> str | None:
    """Why the schedule leaves no step for the budget to fall in a run of ``total_steps``, or None."""
    warmup, final = phases(config, total_steps)
    if warmup >= total_steps - final:
        return (
            f"a warm-up of {warmup} and a final phase of {final} steps (warmup_steps/warmup_share, final_steps/"
            f"final_share) leave no step of a {total_steps}-step run for the budget to fall; shorten them"
        )
    return None


class AdaLoRAAdapter(Adapter):
    def __init__(self, config: AdaLoRAConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.scaling = config.alpha / (config.init_r + 1e-5)  # PEFT's divisor, the initial rank (+1e-5)
        like = {"device": site.device, "dtype": site.dtype}
        rank = rank_of(config, site)
        self.lora_a = nn.Parameter(torch.empty(rank, site.in_features, **like))  # Q
        self.lora_e = nn.Parameter(torch.zeros(rank, **like))  # λ: dW = 0, the base at init
        self.lora_b = nn.Parameter(torch.empty(site.out_features, rank, **like))  # P
        self.register_buffer("kept", torch.ones(rank, **like))  # 1 for a triplet in the rank, else 0
        if site.device.type != "meta":
            nn.init.normal_(self.lora_a, std=0.02)
            nn.init.normal_(self.lora_b, std=0.02)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        # the allocator's smoothed scores per parameter name: training state, not saved (as in PEFT)
        self.__dict__["importance"] = {}

    @property
    def rank(self) -> int:
        return int(self.kept.sum().item())

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        down = self.lora_a * self.lora_e[:, None]
        if not self.site.input_is_index:  # an embedding's ids have no float dtype
            down = down.to(x.dtype)
        h = self.site.project_in(self.dropout(x) if not self.site.input_is_index else x, down)
        return self.site.project_out_(out, h, self.lora_b, self.scaling)

    def _delta(self) -> torch.Tensor:
        return widened(self.lora_b) @ (widened(self.lora_a) * widened(self.lora_e)[:, None]) * self.scaling

    def merge(self) -> None:
        self.site.add_to_weight_(self._delta())

    def unmerge(self) -> None:
        self.site.add_to_weight_(-self._delta())

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Smooth |θ · ∂L/∂θ| (sensitivity) and its deviation (uncertainty) for Q, λ and P."""
        for name in ("lora_a", "lora_e", "lora_b"):
            parameter = getattr(self, name)
            if parameter.grad is None:
                continue
            sensitivity = (parameter * parameter.grad).abs()
            smooth, spread = self.importance.get(name, (torch.zeros_like(sensitivity),) * 2)
            smooth = beta1 * smooth + (1 - beta1) * sensitivity
            spread = beta2 * spread + (1 - beta2) * (sensitivity - smooth).abs()
            self.importance[name] = (smooth, spread)

    def triplet_scores(self) -> torch.Tensor:
        """One score per triplet: λ_i's, plus the mean over Q's row i and over P's column i."""
        score = {name: smooth * spread for name, (smooth, spread) in self.importance.items()}
        if len(score) < 3:
            return torch.zeros_like(self.lora_e, dtype=torch.float32)
        return (score["lora_e"] + score["lora_a"].mean(dim=1) + score["lora_b"].mean(dim=0)).float()

    def compact_tensors(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kept = own["kept"].bool()
        return {
            "lora_a": own["lora_a"][kept],
            "lora_e": own["lora_e"][kept],
            "lora_b": own["lora_b"][:, kept],
            "kept": own["kept"][kept],
        }

    @torch.no_grad()
    def keep(self, kept: torch.Tensor) -> None:
        """Make ``kept`` (one 0/1 per triplet) the rank: λ of every other triplet is set to zero."""
        self.kept.copy_(kept.to(self.kept.dtype))
        self.lora_e.mul_(self.kept.to(self.lora_e.dtype))


def budget_at(step: int, warmup: int, falling_until: int, start: int, end: int) -> int | None:
    """The number of triplets kept over all hosts after step ``step``: all ``start`` during the warm-up (None: no
    allocation), then a cubic fall towards ``end``, reached at step ``falling_until``."""
    if step <= warmup:
        return None
    remaining = 1 - (step - warmup) / (falling_until - warmup)
    return int((start - end) * remaining**3 + end)


def allocate(adapters: list[AdaLoRAAdapter], budget: int) -> None:
    """Keep the ``budget`` most important triplets over all ``adapters`` (ties at the threshold are all pruned)."""
    scores = [adapter.triplet_scores() for adapter in adapters]
    pruned = sum(score.numel() for score in scores) - budget
    if pruned <= 0:
        for adapter in adapters:
            adapter.keep(torch.ones_like(adapter.kept))
        return
    threshold = torch.kthvalue(torch.cat([s.cpu() for s in scores]), pruned).values.item()
    for adapter, score in zip(adapters, scores, strict=True):
        adapter.keep((score > threshold).to(adapter.kept.device))


class AdaLoRA(Method):
    name = "adalora"
    config = AdaLoRAConfig
    capabilities = Capabilities(
        site="weight", module_types=weight_site_types(), mergeable=True, identity_at_init=True, compose_rules=ALL_RULES
    )

    @classmethod
    def parameter_count(cls, config: AdaLoRAConfig, site: WeightSite) -> int:
        return rank_of(config, site) * (site.in_features + site.out_features + 1)

    @classmethod
    def compact_config(cls, config: AdaLoRAConfig, adapters: list[tuple[str, AdaLoRAAdapter]]) -> AdaLoRAConfig | None:
        """The final ranks: each host's kept triplets only, its rank recorded by path (the scale stays
        alpha / init_r, so the saved adapter computes what the trained one does)."""
        if all(adapter.rank == adapter.kept.numel() for _, adapter in adapters):
            return None
        return config.model_copy(update={"ranks": {path: adapter.rank for path, adapter in adapters}})

    @classmethod
    def create(cls, config: AdaLoRAConfig, site: WeightSite) -> AdaLoRAAdapter:
        return AdaLoRAAdapter(config, site)

    @classmethod
    def schedule_refusal(cls, config: AdaLoRAConfig, total_steps: int) -> str | None:
        if config.total_steps is not None and config.total_steps != total_steps:
            return (
                f"total_steps is {config.total_steps} but this run takes {total_steps} optimizer steps, so the "
                f"ranks would not settle where the schedule says; set total_steps: {total_steps}, or leave it out to "
                "follow the run"
            )
        return schedule_problem(config, total_steps)

    @classmethod
    def training_loss(cls, config: AdaLoRAConfig, adapters: list[AdaLoRAAdapter]) -> torch.Tensor | None:
        if not config.orth_reg_weight:
            return None
        terms = []
        for adapter in adapters:
            for gram in (adapter.lora_a @ adapter.lora_a.T, adapter.lora_b.T @ adapter.lora_b):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return config.orth_reg_weight * torch.stack(terms).mean()

    @classmethod
    def after_optimizer_step(
        cls, config: AdaLoRAConfig, adapters: list[AdaLoRAAdapter], step: int, total_steps: int
    ) -> None:
        total = config.total_steps or total_steps
        for adapter in adapters:
            adapter.__dict__["run_steps"] = total  # what an export names as PEFT's total_step
        warmup, final = phases(config, total)
        falling_until = total - final
        # PEFT allocates the final budget at step total − final_steps, which a run without final steps never
        # reaches; here it then happens at the run's last step
        last = min(falling_until, total - 1)
        if step > last:  # the final ranks are fixed: the optimizer's update of a pruned λ is undone
            for adapter in adapters:
                adapter.keep(adapter.kept)
            return
        if step < falling_until:
            for adapter in adapters:
                adapter.update_importance(config.beta1, config.beta2)
        start, end = sum(adapter.kept.numel() for adapter in adapters), config.target_r * len(adapters)
        if step == last:
            allocate(adapters, end)
            for adapter in adapters:
                adapter.importance.clear()
            return
        budget = budget_at(step, warmup, falling_until, start, end)
        if budget is not None and step % config.interval == 0:
            allocate(adapters, budget)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # Per module base_model.model.<path>.lora_A (k, d_in), .lora_E (k, 1), .lora_B (d_out, k) with k the kept
    # triplets when the config has a rank_pattern ({"<path>.lora_E": [kept?] * init_r}), else init_r.
    peft_type = "ADALORA"
    _PEFT_UNSUPPORTED = {
        "layers_to_transform": None,
        "modules_to_save": None,
        "bias": "none",
        "use_dora": False,
        "alpha_pattern": {},
        "lora_bias": False,
    }
    _PEFT_FIELDS = {  # ours: (PEFT's, kind, default)
        "init_r": ("init_r", "count", 12),
        "target_r": ("target_r", "count", 8),
        "alpha": ("lora_alpha", "number", 8),
        "dropout": ("lora_dropout", "number", 0.0),
        "total_steps": ("total_step", "count", 1),
        "interval": ("deltaT", "count", 1),
        "beta1": ("beta1", "number", 0.85),
        "beta2": ("beta2", "number", 0.85),
        "orth_reg_weight": ("orth_reg_weight", "number", 0.5),
    }

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, refuse_features, split_peft_key

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        fields = {
            ours: peft_field(peft_config, theirs, kind, default)
            for ours, (theirs, kind, default) in cls._PEFT_FIELDS.items()
        }
        for ours in ("alpha", "dropout", "beta1", "beta2", "orth_reg_weight"):
            fields[ours] = float(fields[ours])
        for ours, theirs in (("warmup_steps", "tinit"), ("final_steps", "tfinal")):
            value = peft_config.get(theirs) or 0
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"adapter_config.json: {theirs} must be a whole number >= 0, got {value!r}")
            fields[ours] = value
        init_r = fields["init_r"]
        pattern = peft_config.get("rank_pattern") or {}
        if not isinstance(pattern, dict):
            raise CheckpointError(f"adapter_config.json: rank_pattern must be a mapping, got {type(pattern).__name__}")
        held: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, suffix = split_peft_key(key, ("lora_A", "lora_E", "lora_B"))
            held.setdefault(path, {})[suffix] = tensor
        state: dict[str, torch.Tensor] = {}
        for path, parts in held.items():
            if set(parts) != {"lora_A", "lora_E", "lora_B"}:
                raise CheckpointError(f"AdaLoRA module {path!r} lacks lora_A, lora_E or lora_B in the PEFT file")
            mask = pattern.get(f"{path}.lora_E", [True] * init_r)
            if not (isinstance(mask, list) and len(mask) == init_r and all(isinstance(v, bool) for v in mask)):
                raise CheckpointError(f"rank_pattern of {path!r} must be {init_r} true/false values, got {mask!r}")
            kept = torch.tensor(mask, dtype=torch.bool)
            a, e, b = parts["lora_A"], parts["lora_E"].reshape(-1), parts["lora_B"]
            rank = int(kept.sum())
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or e.numel() != rank or b.shape[1] != rank:
                shapes = {name: list(t.shape) for name, t in parts.items()}
                raise CheckpointError(f"AdaLoRA on {path!r}: tensors {shapes} do not hold the {rank} kept triplets")
            full_a = a.new_zeros(init_r, a.shape[1])
            full_e = e.new_zeros(init_r)
            full_b = b.new_zeros(b.shape[0], init_r)
            full_a[kept], full_e[kept], full_b[:, kept] = a, e, b
            for name, tensor in (
                ("lora_a", full_a),
                ("lora_e", full_e),
                ("lora_b", full_b),
                ("kept", kept.to(a.dtype)),
            ):
                state[peftkit_key(path, adapter_name, name)] = tensor
        if not held:
            raise CheckpointError("the PEFT AdaLoRA checkpoint holds no AdaLoRA tensors")
        return [{"method": cls.name, "target": sorted(held), **fields}], state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key

        if len({a.config.model_dump_json(exclude={"target", "layers", "module_types", "ranks"}) for a in attached}) > 1:
            raise CheckpointError("a PEFT AdaLoRA adapter has one configuration; this adapter's entries differ")
        kinds = {host_class(a.module.site.module) for a in attached}
        if not (kinds <= {nn.Linear} or kinds <= {Conv1D}):
            raise CheckpointError(f"a PEFT AdaLoRA adapter's hosts are all nn.Linear or all Conv1D; these are {kinds}")
        config = attached[0].config
        total = config.total_steps or attached[0].module.__dict__.get("run_steps")
        if total is None:
            total = max(1 + config.warmup_steps + config.final_steps, 1)
        warmup, final = phases(config, total)
        pruned = any(a.module.rank < config.init_r for a in attached)
        tensors: dict[str, torch.Tensor] = {}
        pattern: dict[str, list[bool]] = {}
        for a in attached:
            kept = a.module.kept.bool()
            tensors[peft_key(a.path, "lora_A")] = a.module.lora_a[kept]
            tensors[peft_key(a.path, "lora_E")] = a.module.lora_e[kept].reshape(-1, 1)
            tensors[peft_key(a.path, "lora_B")] = a.module.lora_b[:, kept]
            # PEFT's pattern marks init_r slots; a compacted adapter's triplets take the first ones (order is free)
            marks = kept.tolist() if kept.numel() == config.init_r else [True] * a.module.rank
            pattern[f"{a.path}.lora_E"] = marks + [False] * (config.init_r - len(marks))
        fields = {theirs: getattr(config, ours) for ours, (theirs, _, _) in cls._PEFT_FIELDS.items()}
        fields.update(
            r=config.init_r,
            # PEFT's config names the run's length and phases in steps; a schedule that followed the run gives
            # the run's (or, before any step, the shortest run the phases fit)
            total_step=total,
            tinit=warmup,
            tfinal=final,
            rank_pattern=pattern if pruned else None,
            target_modules=sorted(a.path for a in attached),
            fan_in_fan_out=kinds != {nn.Linear},
            bias="none",
            init_lora_weights=True,
        )
        return fields, tensors
