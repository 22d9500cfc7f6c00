"""The contract between the core and a method plugin.

A method is a class with a name, a pydantic config, a :class:`Capabilities` record and two class methods: one that
counts the parameters an adapter will have (so a plan can be printed before anything is built) and one that builds
the adapter for a site. The adapter is an ``nn.Module`` whose ``forward(x, out)`` turns the host module's output
into the adapted output. Everything the core decides about a method (what it can attach to, whether it can merge,
which properties the conformance suite checks) is read from the capabilities, never from the method's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from peftkit.compose import Rule
from peftkit.layers import parse_layers
from peftkit.patterns import check_patterns

SiteKind = Literal["weight", "output", "parallel", "attention", "input", "parameter", "vector", "stream"]
# The composition rules of peftkit.compose. A method takes part in ``sum`` unless it says otherwise: every adapter
# whose forward turns the host's output into the adapted output has a change (adapted - output) that can be added to
# others'. ``ALL_RULES`` is for methods whose adapter is a function of the host's input and output only.
ALL_RULES: frozenset[str] = frozenset(get_args(Rule))
DEFAULT_RULES: frozenset[str] = frozenset({"sum"})


class MethodConfig(BaseModel):
    """Fields every spec entry has; a method's own config subclasses this and pins ``method`` to a Literal."""

    # allow_inf_nan=False: an infinite alpha or a NaN scale would pass every range check and poison the model
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    method: str
    target: str | list[str] = Field(description="module-path glob(s); a 're:' prefix makes a regex")
    layers: list[int] | None = Field(default=None, description="layer indices; a string such as '0-3,8' works too")
    module_types: list[str] | None = Field(
        default=None, description="keep only matched modules whose class name is listed (e.g. ['Linear'])"
    )

    @field_validator("target")
    @classmethod
    def _targets_are_patterns(cls, value: str | list[str]) -> str | list[str]:
        patterns = [value] if isinstance(value, str) else value
        if not patterns:
            raise ValueError("target must name at least one pattern")
        check_patterns(patterns)
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_from_ranges(cls, value: Any) -> Any:
        return parse_layers(value)

    @property
    def targets(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; validation and the conformance suite read these flags.

    ``module_types`` are the host module classes the method adapts (exact class or subclass).
    ``identity_at_init``: a freshly attached adapter leaves the model's outputs unchanged.
    ``mergeable``: the adapter can be folded into the host's weights and unfolded again.
    ``input_is_index``: hosts such as nn.Embedding take integer ids, not activations.
    ``routable``: the method class provides a batched ``route(adapters, index, x, out)`` for per-example routing.
    ``commutes``: the adapter's change does not depend on what other adapters at the host did first.
    ``compose_rules``: the rules of :mod:`peftkit.compose` the adapter can take part in; by default
    ``DEFAULT_RULES`` (``{"sum"}``), ``peftkit.ALL_RULES`` for all five, ``frozenset()`` for none (an adapter that acts
    on the input or inside attention has no output change to add up or stack).
    ``combinable``: the adapter's update is a weight delta that ``peftkit.combine`` can read and write back; the
    method class then implements the hooks of the ``Combinable`` protocol in ``peftkit/lifecycle/combine.py``.
    ``rewrites_base``: the adapter changes its host's own weight when it is attached (an initialisation that moves
    part of W0 into the adapter and leaves a residual). The core then keeps the host's original values (on the CPU)
    and puts them back bit for bit at detach; ``plan`` marks the row; the adapter must implement ``rewrite_base``,
    ``removed_forward`` and ``portable_tensors``, and its method ``portable_config``, so that an inactive adapter
    leaves the host computing what it computed before, and ``save`` writes a checkpoint that applies to the
    original weight.
    """

    site: SiteKind
    module_types: tuple[type[nn.Module], ...]
    mergeable: bool
    identity_at_init: bool
    routable: bool = False
    commutes: bool = True
    compose_rules: frozenset[str] = DEFAULT_RULES
    combinable: bool = False
    rewrites_base: bool = False


@dataclass(frozen=True)
class SharedState:
    """Tensors that all the adapters of one spec entry share, across every host the entry selects (VeRA's frozen
    random projections: one pair for many layers). ``Method.shared_state`` returns it; the core keeps the tensors
    once, in a module the entry's adapters reach as ``site.shared`` (attribute access by name), moved with the model.

    The tensors are frozen (buffers: what trains belongs to an adapter, one per host, where the plan counts it).
    ``saved``: whether the checkpoint holds them; when False they are rebuilt at load by ``shared_state`` from the
    configuration, which must then make them deterministically (from a seed)."""

    tensors: dict[str, torch.Tensor]
    saved: bool = True


@dataclass(frozen=True)
class ParameterGroup:
    """How the optimizer treats one adapter parameter (see :func:`peftkit.parameter_groups`): its learning rate is
    the base rate times ``lr_scale``, and it decays with the optimizer's weight decay unless ``weight_decay`` is off."""

    lr_scale: float = 1.0
    weight_decay: bool = True


class Adapter(nn.Module):
    """An adapter at one site. ``forward(x, out)`` returns the adapted output of the host for input ``x``.

    It may update ``out`` in place (the host's output is not saved by autograd for any supported host), which is how
    weight-site adapters avoid a full-size temporary. Mergeable adapters also implement ``merge``/``unmerge``.
    """

    merged: bool = False
    transforms_input: bool = False  # True: ``transform_input`` runs on the host's input before the host does
    # True: the adapter changes its host's weight as a value, so every module holding the same tensor (a tied LM
    # head) must see the change too. The core then runs ``tied_forward`` at each such holder while the adapter is
    # active and unmerged, and lets the adapter merge into the shared tensor (which changes all holders at once).
    follows_tied_weight: bool = False

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Weight, output and parallel sites call this; an attention-site adapter acts in ``attend`` instead."""
        return out

    def fuses(self, x: torch.Tensor, host: nn.Module) -> bool:
        """Whether :meth:`fused_forward` computes ``host``'s output with this adapter applied, for input ``x``. The
        core asks before the host runs, where this adapter is the first to act on the host's output; when True the
        host's own forward is skipped and :meth:`forward` is not called for this adapter in that call. ``host`` is
        the module being called: the site's module, or a replica of it (``nn.DataParallel``), whose weights to use."""
        return False

    def fused_forward(self, x: torch.Tensor, host: nn.Module) -> torch.Tensor:
        """``host``'s output for ``x`` with this adapter's change, computed together in one autograd function (a
        weight site's :meth:`~peftkit.sites.WeightSite.fused_product`); it must equal ``forward(x, host(x))``."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse with its host")

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The host's input as the adapted model sees it (only called when ``transforms_input`` is True)."""
        return x

    def parameter_group(self, name: str) -> ParameterGroup:
        """The optimizer settings of this adapter's parameter ``name`` (its name inside the adapter, as
        ``named_parameters`` gives it); by default the optimizer's own."""
        return ParameterGroup()

    def tied_refusal(self, holder: nn.Module) -> str | None:
        """Why this adapter cannot follow its weight into ``holder`` (another module holding the same tensor), or
        None; asked at attach, before the model is touched, only when ``follows_tied_weight`` is True."""
        return f"{type(self).__name__} does not say how {type(holder).__name__} uses the shared weight"

    def tied_forward(self, holder: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The output of ``holder`` (a module sharing the host's weight) as it would be with the adapted weight."""
        return out

    def merge_refusal(self) -> str | None:
        """Why this adapter cannot be merged in its current state, or None. :func:`peftkit.merge` asks every chosen
        adapter before it changes any weight (a scale with a zero in it cannot be unmerged, for example)."""
        return None

    def rewrite_base(self) -> None:
        """Write the host's new weight (only for a method whose capabilities say ``rewrites_base``). Called once at
        attach, after the core has kept the host's original values; it must be a deterministic function of those
        values and the configuration, so that a checkpoint of the adapter as trained (``save(portable=False)``)
        loads onto the original base and finds the same residual."""
        raise NotImplementedError(f"{type(self).__name__} does not rewrite its host")

    def removed_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus what ``rewrite_base`` took out of the host's output: the core runs this while the adapter is
        attached but not running (inactive, or ``peftkit.disabled``), so the host computes what it did before."""
        raise NotImplementedError(f"{type(self).__name__} does not rewrite its host")

    def portable_tensors(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's tensors as an adapter of ``Method.portable_config`` would hold them, applied to the host's
        original weight: what ``peftkit.save`` writes for an adapter that rewrote its host. ``own`` holds the
        adapter's saved tensors by name (``lora_a``...), gathered whole when the model is sharded (FSDP2), so read
        them from there rather than from the adapter's own, possibly sharded, parameters."""
        raise NotImplementedError(f"{type(self).__name__} does not rewrite its host")

    def compact_tensors(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's saved tensors (``own``, by name) with what training left unused cut away, as an adapter of
        ``Method.compact_config`` holds them (only asked when that returns a configuration)."""
        return own

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")


class Method(ABC):
    """A registered PEFT method. Subclass, fill the three class attributes, implement the two class methods."""

    name: ClassVar[str]
    config: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities]
    # The ``peft_type`` of HF PEFT's adapter_config.json this method reads and writes (``from_peft``/``to_peft``
    # class methods, see peftkit.interop.peft); None: no PEFT interoperability. Only the class that declares it
    # claims the format: a subclass registered under another name (a variant) does not inherit the claim.
    peft_type: ClassVar[str | None] = None

    @classmethod
    def reads_peft(cls, peft_config: dict[str, Any]) -> bool:
        """Whether this method reads a PEFT config of its ``peft_type``; override when methods share a type and
        split on a field of its config (one PEFT type with a flag that turns on a variant)."""
        return True

    @classmethod
    def capabilities_for(cls, config: MethodConfig) -> Capabilities:
        """The capabilities of one configuration; by default the method's. Override when a field changes them
        (a gated prefix is an identity at init, a plain one is not)."""
        return cls.capabilities

    @classmethod
    def site_refusal(cls, config: MethodConfig, site: Any) -> str | None:
        """Why this configuration cannot go on this site (a field that does not fit the host, e.g. an index past
        its size), or None. Asked while the plan is made, so the refusal comes before anything is built."""
        return None

    @classmethod
    def shared_state(cls, config: MethodConfig, sites: list[Any]) -> SharedState | None:
        """Tensors one entry's adapters share (:class:`SharedState`), built once from the configuration and all the
        sites the entry selects, before any of its adapters; None (the default): nothing shared. Each adapter then
        finds them as ``site.shared`` in ``create`` and in its forward."""
        return None

    @classmethod
    def schedule_refusal(cls, config: MethodConfig, total_steps: int) -> str | None:
        """Why this configuration's schedule does not fit a run of ``total_steps`` optimizer steps, or None (the
        default: a method without a schedule fits every run). Asked by ``peftkit.check_schedule`` before training."""
        return None

    @classmethod
    def training_loss(cls, config: MethodConfig, adapters: list[Adapter]) -> torch.Tensor | None:
        """A term added to the training loss for one entry's adapters (a regulariser), or None (the default).
        ``peftkit.regularization`` sums them; the training loops add the sum before ``backward``."""
        return None

    @classmethod
    def after_optimizer_step(cls, config: MethodConfig, adapters: list[Adapter], step: int, total_steps: int) -> None:
        """Act on one entry's adapters after optimizer step ``step`` (0-based) of ``total_steps``, while the
        gradients are still there (a rank re-allocation by importance). Called by ``peftkit.after_optimizer_step``;
        by default nothing happens."""
        return None

    @classmethod
    def compact_config(cls, config: MethodConfig, adapters: list[tuple[str, Adapter]]) -> MethodConfig | None:
        """For one entry's adapters (``(host path, adapter)`` pairs): the configuration of the same adapters with
        what training left unused cut away (AdaLoRA's pruned ranks), which ``peftkit.save`` writes together with each
        adapter's ``compact_tensors``; None (the default): the adapters are saved as they are. ``save(portable=False)``
        (a checkpoint to resume from) keeps the full form."""
        return None

    @classmethod
    def portable_config(cls, config: MethodConfig) -> MethodConfig:
        """For a configuration that rewrites its host: the configuration of an adapter that makes the same change
        to the host's original weight (what ``peftkit.save`` writes into the checkpoint's spec)."""
        raise NotImplementedError(f"{cls.name!r} does not rewrite its host")

    @classmethod
    @abstractmethod
    def parameter_count(cls, config: MethodConfig, site: Any) -> int:
        """The number of trainable parameters ``create`` will make for this site (the method's own formula)."""

    @classmethod
    @abstractmethod
    def create(cls, config: MethodConfig, site: Any) -> Adapter:
        """Build the adapter for ``site`` on the host's device and dtype, initialised as the method prescribes."""
