"""What OFT and BOFT share: a multiplicative orthogonal transform of a host's input features, kept as a chain of
permuted block-diagonal rotations, never as a dense d_in x d_in matrix.

Each factor of the chain maps a row vector ``v`` to ``v · P · diag(R_1 .. R_D) · Pᵀ`` (P a permutation, None for
the identity; R_j one b x b rotation per block). The host sees its input as ``x · M`` with M the product of the
factors, the last factor applied first, so the adapted map is ``W Mᵀ``: merged, each row of W goes through the
factors first to last with every block transposed; unmerged, it goes back through their inverses. A rotation
costs d_in·b multiplications a token per factor, where a dense M would cost d_in².

Rotations come from skew-symmetric generators Q by the Cayley map, exactly ``(I - Q)(I + Q)⁻¹`` or by PEFT's
truncated Neumann series of ``(I + Q)(I - Q)⁻¹`` (both orthogonal to first order; the series is the faster and is
PEFT's default for OFT). Q = 0 gives R = I either way: a fresh adapter leaves the host as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from peftkit import Adapter, MethodConfig
from peftkit.sites import WeightSite, widened


@dataclass(frozen=True)
class HalfBlockShuffle:
    """BOFT's butterfly permutation of the features: in each run of ``run`` features, the half-blocks (``half``
    features each) of even index first, then the odd ones. A view and a transpose, not a gather: its backward is a
    transpose too, where an index's backward would scatter."""

    run: int
    half: int

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows[..., perm]``: "... (r k two h) -> ... (r two k h)" with k·two half-blocks a run."""
        grouped = rows.reshape(*rows.shape[:-1], -1, self.run // (2 * self.half), 2, self.half)
        return grouped.transpose(-3, -2).reshape(rows.shape)

    def undo(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse: "... (r two k h) -> ... (r k two h)"."""
        grouped = rows.reshape(*rows.shape[:-1], -1, 2, self.run // (2 * self.half), self.half)
        return grouped.transpose(-3, -2).reshape(rows.shape)


Factor = tuple[HalfBlockShuffle | None, torch.Tensor]  # (the features' permutation or None, blocks (D, b, b))


def cayley(skew: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """Rotations (..., b, b) from skew-symmetric generators: ``(I - Q)(I + Q)⁻¹`` when ``neumann_terms`` is None,
    else the series ``I + 2Q + 2Q² + ... + 2Q^k + Q^(k+1)`` with k = max(2, terms - 2) as PEFT truncates it
    (one term: I; two: I + 2Q)."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    if neumann_terms is None:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    if neumann_terms == 1:
        return eye.clone()
    rotation = eye + 2 * skew
    if neumann_terms == 2:
        return rotation
    power = skew
    for _ in range(2, max(2, neumann_terms - 2) + 1):
        power = power @ skew
        rotation = rotation + 2 * power
    return rotation + power @ skew


def apply_factor(rows: torch.Tensor, permutation: HalfBlockShuffle | None, blocks: torch.Tensor) -> torch.Tensor:
    """``rows · P · diag(blocks) · Pᵀ`` over the last axis, where ``v · P = permutation.undo(v)`` (with
    ``P[i, perm[i]] = 1``, ``(v · P)[j] = v[perm⁻¹[j]]``) and ``v · Pᵀ = permutation.apply(v)``."""
    if permutation is not None:
        rows = permutation.undo(rows)
    count, size = blocks.shape[0], blocks.shape[-1]
    grouped = rows.reshape(*rows.shape[:-1], count, size)  # "... (d b) -> ... d b"
    rotated = torch.einsum("...dk,dkc->...dc", grouped, blocks).reshape(rows.shape)
    return rotated if permutation is None else permutation.apply(rotated)


def divisors_near(number: int, wanted: int) -> list[int]:
    """The (up to four) divisors of ``number`` closest to ``wanted``, ascending: what a refusal offers instead."""
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - wanted), d))[:4])


def layout_refusal(method: str, field: str, wanted: int, features: int, size: int) -> str | None:
    """Why ``wanted`` (a block size or count, as ``field`` says) does not lay out a host's ``features`` inputs in
    blocks of side ``size`` at least 2, or None."""
    if features % wanted:
        near = ", ".join(map(str, divisors_near(features, wanted)))
        return f"{method} {field} {wanted} does not divide the host's {features} input features; use one of {near}"
    if size < 2:
        return f"{method} {field} {wanted} leaves blocks of side {size}, which hold no rotation; use fewer blocks"
    return None


class BlockLayoutConfig(MethodConfig):
    """The block layout both methods take: ``block_size`` b or ``blocks`` D, one of them, with D·b = d_in."""

    default_block_size: ClassVar[int] = 32
    block_size: int | None = Field(default=None, ge=2, description="side b of each rotation block")
    blocks: int | None = Field(default=None, gt=0, description="number D of blocks; d_in = D·b (give one of the two)")

    @model_validator(mode="after")
    def _one_size(self) -> BlockLayoutConfig:
        if self.block_size is not None and self.blocks is not None:
            raise ValueError("give block_size or blocks, not both: blocks x block_size must equal the host's d_in")
        return self

    def block_layout(self, features: int) -> tuple[int, int]:
        """(D, b) for a host with ``features`` inputs (not checked to divide: see :meth:`layout_refusal`)."""
        if self.blocks is not None:
            return self.blocks, features // self.blocks
        size = self.block_size or self.default_block_size
        return features // size, size

    def layout_refusal(self, method: str, features: int) -> str | None:
        """Why this layout does not fit a host with ``features`` inputs, or None."""
        field = "blocks" if self.blocks is not None else "block_size"
        wanted = self.blocks if self.blocks is not None else (self.block_size or self.default_block_size)
        return layout_refusal(method, field, wanted, features, self.block_layout(features)[1])


def keep_as_identity(blocks: torch.Tensor, share: float) -> torch.Tensor:
    """Training-time multiplicative dropout (Qiu et al. 2023): ``int(share · D)`` of the D blocks, drawn at random,
    replaced by the identity. Blocks shared by one generator (a single block) are never dropped."""
    count = blocks.shape[-3]
    dropped = int(share * count)
    if count == 1 or dropped == 0:
        return blocks
    mask = torch.zeros(count, dtype=blocks.dtype, device=blocks.device)
    mask[torch.randperm(count, device=blocks.device)[:dropped]] = 1.0
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    mask = mask[:, None, None]
    return blocks * (1 - mask) + eye * mask


class OrthogonalAdapter(Adapter):
    """An adapter that rotates its host's input (``transforms_input``) and optionally rescales its output features.

    A method supplies ``factors`` (the chain, first to last, in float32 or wider) and may supply ``feature_scale``
    (a per-output-feature scale s: the host computes ``s ⊙ (W x') + b``)."""

    transforms_input = True
    site: WeightSite
    dropout: float = 0.0

    def factors(self) -> list[Factor]:
        raise NotImplementedError

    def feature_scale(self) -> torch.Tensor | None:
        return None

    def _dropped(self, chain: list[Factor]) -> list[Factor]:
        if not (self.training and self.dropout):
            return chain
        return [(permutation, keep_as_identity(blocks, self.dropout)) for permutation, blocks in chain]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        rows = x
        for permutation, blocks in reversed(self._dropped(self.factors())):
            rows = apply_factor(rows, permutation, blocks.to(x.dtype))
        return rows

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = self.feature_scale()
        if scale is None:
            return out
        scale = self.site.along_features(scale.to(out.dtype))
        bias = getattr(self.site.module, "bias", None)
        if isinstance(bias, torch.Tensor):  # the bias is added after the scale: s ⊙ (W x') + b
            return out * scale + self.site.along_features(bias.to(out.dtype)) * (1 - scale)
        return out * scale

    def merge_refusal(self) -> str | None:
        scale = self.feature_scale()
        if scale is not None and not (torch.isfinite(scale).all() and (scale != 0).all()):
            return "its output scale holds a zero, NaN or infinite entry, which an unmerge could not undo"
        if not all(torch.isfinite(blocks).all() for _, blocks in self.factors()):
            return "its rotation holds a NaN or infinite entry, which would poison the merged weights"
        return None

    @torch.no_grad()
    def merge(self) -> None:
        rows = self.site.weight_as_matrix()  # (out, in), float32 or wider
        for permutation, blocks in self.factors():
            rows = apply_factor(rows, permutation, widened(blocks).to(rows.dtype).transpose(-1, -2))
        scale = self.feature_scale()
        if scale is not None:
            rows = rows * widened(scale).to(rows.dtype)[:, None]
        self.site.write_weight_(rows)

    @torch.no_grad()
    def unmerge(self) -> None:
        rows = self.site.weight_as_matrix().double()  # the inverses in float64: a rotation's round trip is exact
        scale = self.feature_scale()
        if scale is not None:
            rows = rows / scale.double()[:, None]
        for permutation, blocks in reversed(self.factors()):
            rows = apply_factor(rows, permutation, torch.linalg.inv(blocks.double()).transpose(-1, -2))
        self.site.write_weight_(rows)
