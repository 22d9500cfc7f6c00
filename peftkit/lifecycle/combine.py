"""Combine attached adapters into a new named adapter: a weighted merge of their weight updates.

The math works on weight updates ΔW (d_out x d_in), never on a method's factors: ``B1 A1 + B2 A2`` is not
``(B1 + B2)(A1 + A2)``. For each module the sources share, their updates are read in float32 (or wider), combined
by one of three rules, truncated to a chosen rank by SVD, and written into a freshly attached adapter:

- ``linear``: ``Σ_t w_t ΔW_t`` (task arithmetic; linear in the weights, negative weights included).
- ``ties``: TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023,
  arXiv:2306.01708, Algorithm 1) applied to the weighted updates ``τ_t = w_t ΔW_t`` with λ = 1: trim each τ_t to
  its largest-magnitude entries, elect each entry's sign as the sign of the sum of the trimmed τ_t, and average
  the trimmed entries that carry the elected sign.
- ``dare``: DARE (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv:2311.03099): drop each
  entry of each ΔW_t with probability ``1 - density``, rescale the survivors by ``1 / density``, then ``linear``.

By the Eckart–Young theorem the SVD truncation is the best rank-k approximation in the Frobenius and spectral
norms; at the default rank (the sum of the sources' ranks) a linear combination is reproduced exactly.

The core names no method: a method opts in with ``Capabilities(combinable=True)`` and the four class-method hooks
of :class:`Combinable`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from peftkit.errors import AttachError, SpecError
from peftkit.lifecycle.attach import AttachedAdapter, attach, detach, require_state
from peftkit.method import Adapter, MethodConfig
from peftkit.spec import adapter_name_problem

How = Literal["linear", "ties", "dare"]
RULES = ("linear", "ties", "dare")


class Combinable(Protocol):
    """The hooks :func:`combine` calls on a method class whose capabilities say ``combinable=True``."""

    @classmethod
    def weight_delta(cls, adapter: Adapter) -> torch.Tensor:
        """The adapter's additive update of its host's weight, (d_out, d_in), in float32 or wider."""
        ...

    @classmethod
    def delta_rank(cls, config: MethodConfig) -> int:
        """An upper bound on the rank of ``weight_delta`` for adapters built from ``config``."""
        ...

    @classmethod
    def low_rank_config(cls, like: MethodConfig, target: list[str], rank: int) -> MethodConfig:
        """A spec entry on ``target`` whose adapters can hold any update of rank ``rank``; ``like`` is a source's
        entry, for the fields that are not about the update's shape (dropout, initialisation...)."""
        ...

    @classmethod
    def load_low_rank_(cls, adapter: Adapter, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """Set the adapter's parameters so that ``weight_delta(adapter) == u @ diag(s) @ vh``
        (u: d_out x k, s: k, vh: k x d_in, k no more than the entry's rank)."""
        ...


# -- the math, on plain tensors ------------------------------------------------------------------------------------
def combine_linear(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ_t w_t Δ_t``."""
    _check_lengths(deltas, weights)
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total.add_(delta, alpha=weight)
    return total


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = round(density · numel)`` (at least 1) largest-magnitude entries and zero the rest.

    Entries tied with the k-th largest magnitude are all kept, so the result does not depend on an ordering.
    """
    _check_density(density)
    count = delta.numel()
    keep = min(count, max(1, round(density * count)))
    if keep == count:
        return delta.clone()
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude.flatten(), count - keep + 1).values
    return torch.where(magnitude >= threshold, delta, torch.zeros_like(delta))


def combine_ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float = 1.0) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, Algorithm 1, λ = 1) of the weighted updates ``τ_t = w_t Δ_t``.

    1. trim: ``τ̂_t = trim(τ_t, density)`` (see :func:`trim`);
    2. elect: ``γ = sign(Σ_t τ̂_t)`` per entry (the sign with the larger total mass);
    3. disjoint mean: per entry, the mean of the ``τ̂_t`` whose sign is ``γ`` (zero entries never count); an entry
       with ``γ = 0`` is 0.

    With one source and weight ``w`` this is ``w · trim(Δ, density)``; a negative weight negates that source's
    update before the sign election. Unlike ``linear`` it is not linear in the weights.
    """
    _check_lengths(deltas, weights)
    trimmed = torch.stack([trim(delta * weight, density) for delta, weight in zip(deltas, weights)])
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (elected != 0)
    total = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return total / agrees.sum(dim=0).clamp_min(1).to(total.dtype)


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """The entries DARE keeps: ``torch.rand(shape, generator=generator) < density`` (drawn on the CPU, in float32)."""
    _check_density(density)
    return torch.rand(shape, generator=generator, dtype=torch.float32) < density


def combine_dare(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE (Yu et al. 2023) then ``linear``: ``Σ_t w_t (m_t ⊙ Δ_t) / density`` with ``m_t = dare_mask(...)`` drawn
    for the sources in order from ``generator``. For a fixed generator state it is linear in the weights, and
    ``density = 1`` keeps everything, so it equals ``linear``."""
    _check_lengths(deltas, weights)
    dropped = []
    for delta in deltas:
        keep = dare_mask(delta.shape, density, generator).to(delta.device)
        dropped.append(torch.where(keep, delta, torch.zeros_like(delta)) / density)
    return combine_linear(dropped, weights)


def truncate(
    delta: torch.Tensor, rank: int, *, rank_bound: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of a matrix, as ``(u, s, vh)`` with ``u @ diag(s) @ vh`` ≈ delta.

    ``rank`` is capped at ``min(d_out, d_in)``: ``u`` is (d_out, k), ``s`` is (k,), ``vh`` is (k, d_in).
    ``rank_bound``, a known bound on the matrix's rank (a sum of low-rank updates), allows a shortcut: an
    orthonormal basis Q of the column space (from an oversampled Gaussian sketch ``delta @ G``), then the SVD of
    the small ``Qᵀ delta``, in float64. For a matrix of that rank this is the same decomposition at
    O(d_out·d_in·bound) cost instead of a full SVD's O(d_out·d_in·min(d_out, d_in)); if ``delta`` is not within
    rounding of Q's span (a bound that was wrong), the full SVD runs.
    """
    smaller = min(delta.shape)
    # Oversampled twice over: a square Gaussian sketch is often ill-conditioned enough to miss a direction.
    width = 2 * max(rank, rank_bound) + 4 if rank_bound is not None else smaller
    if 2 * width <= smaller:
        wide = delta.to(torch.float64)  # the shortcut in float64 is cheap, and more accurate than a float32 SVD
        generator = torch.Generator().manual_seed(0)
        sketch = torch.randn(delta.shape[1], width, generator=generator, dtype=torch.float64)
        basis, _ = torch.linalg.qr(wide @ sketch.to(delta.device))  # "o i, i b -> o b", orthonormal columns
        projected = basis.T @ wide  # "b o, o i -> b i"
        residual = torch.linalg.matrix_norm(wide - basis @ projected)
        if residual <= 16 * torch.finfo(delta.dtype).eps * torch.linalg.matrix_norm(wide):
            u_small, s, vh = torch.linalg.svd(projected, full_matrices=False)
            k = min(rank, s.shape[0])
            return (basis @ u_small[:, :k]).to(delta.dtype), s[:k].to(delta.dtype), vh[:k].to(delta.dtype)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    return u[:, :k], s[:k], vh[:k]


def _check_lengths(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not deltas or len(deltas) != len(weights):
        raise SpecError(f"need one weight per update and at least one update; got {len(deltas)} and {len(weights)}")


def _check_density(density: float) -> None:
    if not isinstance(density, int | float) or isinstance(density, bool) or not 0.0 < density <= 1.0:
        raise SpecError(f"density must be a number in (0, 1] (the fraction of entries kept); got {density!r}")


# -- the model-level operation -------------------------------------------------------------------------------------
@dataclass
class _Site:
    path: str
    sources: list[AttachedAdapter]  # one per source adapter, in the order of ``weights``


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    into: str,
    *,
    how: How = "linear",
    rank: int | None = None,
    density: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Attach a new adapter ``into`` whose update at every module is a weighted combination of the named adapters'.

    ``weights`` maps attached adapter names to their weights. Every source must be of one combinable method (its
    capabilities say ``combinable``) and sit on the same modules. Per module the sources' updates ΔW are combined
    in float32 (or wider) by ``how`` (``linear``, ``ties`` or ``dare``; ``density`` is the fraction of entries
    ``ties`` and ``dare`` keep, ``seed`` seeds ``dare``'s drop masks), then truncated by SVD to ``rank`` — by
    default the sum of the sources' ranks there, so that ``linear`` is exact — capped at ``min(d_out, d_in)``.

    The new adapter is attached like any other: active, unmerged, trainable, saved by ``peftkit.save``. The
    sources are left as they are (still active if they were): ``peftkit.activate(model, into)`` runs the
    combination alone, ``peftkit.detach(model, list(weights))`` drops the sources. Returns ``model``.
    """
    state = require_state(model)
    rule = _check_arguments(weights, how, rank, seed)
    _check_density(density)
    problem = adapter_name_problem(into)
    if problem:
        raise SpecError(f"into: {problem}")
    if into in {a.adapter_name for a in state.attached}:
        raise AttachError(f"an adapter named {into!r} is already attached; pick another name for the combination")
    names = list(weights)
    factors = [float(weights[name]) for name in names]
    sites, method = _sites(state.adapters(names), names)
    generator = torch.Generator().manual_seed(seed)

    truncated: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for site in sites:
            deltas = [_delta(method, source) for source in site.sources]
            dtype = _widest(deltas)
            deltas = [delta.to(dtype) for delta in deltas]
            if rule == "linear":
                combined = combine_linear(deltas, factors)
            elif rule == "ties":
                combined = combine_ties(deltas, factors, density)
            else:
                combined = combine_dare(deltas, factors, density, generator)
            bound = sum(method.delta_rank(source.config) for source in site.sources)
            ranks[site.path] = min(rank if rank is not None else bound, *combined.shape)
            # a linear combination has rank <= the sum of the sources' ranks; TIES and DARE sparsify, so not theirs
            truncated[site.path] = truncate(combined, ranks[site.path], rank_bound=bound if rule == "linear" else None)

    by_rank: dict[int, list[_Site]] = {}
    for site in sites:
        by_rank.setdefault(ranks[site.path], []).append(site)
    entries = [
        method.low_rank_config(group[0].sources[0].config, ["re:" + re.escape(s.path) for s in group], k)
        for k, group in by_rank.items()
    ]
    attach(model, {"adapters": {into: entries}})
    try:
        with torch.no_grad():
            for attached in state.adapters([into]):
                method.load_low_rank_(attached.module, *truncated[attached.path])
    except BaseException:
        detach(model, [into])
        raise
    return model


def _check_arguments(weights: Mapping[str, float], how: str, rank: int | None, seed: int) -> str:
    if not isinstance(weights, Mapping) or not weights:
        raise SpecError("weights must map at least one attached adapter name to its weight, e.g. {'a': 0.5, 'b': 0.5}")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise SpecError(f"the weight of {name!r} must be a finite number; got {weight!r}")
    if how not in RULES:
        raise SpecError(f"how={how!r} is not a combination rule; choose one of {', '.join(RULES)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SpecError(f"rank must be a positive integer or None (the sum of the sources' ranks); got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"seed must be an integer; got {seed!r}")
    return how


def _sites(attached: list[AttachedAdapter], names: list[str]) -> tuple[list[_Site], Any]:
    """Group the sources by module, checking that they can be combined; returns the sites and the method."""
    refused = sorted(
        {
            (a.adapter_name, a.method.name)
            for a in attached
            if not getattr(a.method.capabilities_for(a.config), "combinable", False)
        }
    )
    if refused:
        raise AttachError(
            f"cannot combine {refused}: these methods are not combinable (their capabilities say so); "
            "only methods whose update is a weight delta can be combined"
        )
    methods = sorted({(a.method.name, a.adapter_name) for a in attached})
    if len({name for name, _ in methods}) > 1:
        raise AttachError(f"cannot combine adapters of different methods: {methods}; combine one method at a time")
    paths = {name: [a.path for a in attached if a.adapter_name == name] for name in names}
    first = names[0]
    for name in names[1:]:
        missing = [p for p in paths[first] if p not in paths[name]]
        extra = [p for p in paths[name] if p not in paths[first]]
        if missing or extra:
            problems = [f"{name!r} is not on {_some(missing)}"] if missing else []
            problems += [f"only {name!r} is on {_some(extra)}"] if extra else []
            raise AttachError(
                f"cannot combine {first!r} and {name!r}: they must sit on the same modules, but "
                + "; ".join(problems)
                + ". Combine adapters attached with the same targets."
            )
    by_path = {(a.adapter_name, a.path): a for a in attached}
    sites = [_Site(path, [by_path[name, path] for name in names]) for path in paths[first]]
    return sites, attached[0].method


def _some(paths: list[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:3])
    return f"{shown}{f' and {len(paths) - 3} more' if len(paths) > 3 else ''}"


def _delta(method: Any, source: AttachedAdapter) -> torch.Tensor:
    delta = method.weight_delta(source.module)
    if delta.is_meta:
        raise AttachError(
            f"adapter {source.adapter_name!r} at {source.path!r} is on the meta device; materialise the model first"
        )
    return delta.detach()


def _widest(deltas: list[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for delta in deltas:
        dtype = torch.promote_types(dtype, delta.dtype)
    return dtype
