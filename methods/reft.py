"""ReFT: representation fine-tuning (Wu et al. 2024, arXiv:2404.03592): a low-rank intervention on the hidden
states a transformer block emits (``@block``), at chosen positions, the base's weights untouched.

    LoReFT:  h <- h + Rᵀ (W h + b − R h),   R: r x d with orthonormal rows
    DiReFT:  h <- h + W2ᵀ (W1 h + b)        (no orthogonality, no subtraction: cheaper)

at the ``first`` and ``last`` real tokens of each sequence (the paper's f+l positions; padding on either side is
skipped, read from the call's attention mask by the stream site). peftkit keeps LoReFT's W as R + U, with U and b
trained, so that U = 0, b = 0 is an exact identity (``init: identity``, the default); ``init: random`` draws W as the
paper's code does, which is not an identity, and the capabilities say so. R is orthonormalised in every forward (a
QR of its raw r x d matrix, in float32). DiReFT's W2 starts at zero. In generation the prompt's positions are
intervened in the first call and live on in the KV cache; the tokens generated after it are not intervened, as in
the paper's library. An intervention is not a weight change: not mergeable. A sequence with fewer real tokens than
``first`` or ``last`` is refused in the forward, naming the row and the fields.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig
from peftkit.errors import PeftkitError
from peftkit.sites import StreamSite


class ReFTConfig(MethodConfig):
    method: Literal["reft"] = "reft"
    target: str | list[str] = Field(default="@block", description="transformer blocks whose output is intervened")
    kind: Literal["loreft", "direft"] = Field(default="loreft", description="the intervention's form")
    r: int = Field(default=4, gt=0, le=4096, description="rank of the intervention")
    first: int = Field(default=1, ge=0, description="intervene at the first this many real tokens")
    last: int = Field(default=1, ge=0, description="and at the last this many")
    init: Literal["identity", "random"] = Field(default="identity", description="identity: an exact no-op at init")

    @model_validator(mode="after")
    def _some_position(self) -> ReFTConfig:
        if self.first + self.last == 0:
            raise ValueError("first and last are both 0: the intervention would act at no position")
        return self


def chosen_positions(real: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """(batch, positions) True at the first ``first`` and last ``last`` real tokens of each row of ``real``."""
    index = real.long().cumsum(dim=1)  # 1 at the first real token, counting only real ones
    count = index[:, -1:]
    short = (count < max(first, last)).nonzero()
    if len(short):
        row = int(short[0, 0])
        raise PeftkitError(
            f"ReFT intervenes at the first {first} and last {last} tokens, but row {row} of the batch has "
            f"{int(count[row])} real tokens; lower first/last, or keep shorter sequences out of the batch"
        )
    return real & ((index <= first) | (index > count - last))


class ReFTAdapter(Adapter):
    def __init__(self, config: ReFTConfig, site: StreamSite) -> None:
        super().__init__()
        self.site = site
        self.kind, self.first, self.last = config.kind, config.first, config.last
        d, r = site.out_features, config.r
        like = {"device": site.device, "dtype": site.dtype}
        self.source = nn.Linear(d, r, **like)  # LoReFT: U (W = R + U) and b; DiReFT: W1 and b
        if config.kind == "loreft":
            self.rotation = nn.Parameter(torch.empty(r, d, **like))  # R before its rows are orthonormalised
        else:
            self.proj = nn.Parameter(torch.zeros(r, d, **like))  # W2: zero, the identity at init
        if site.device.type != "meta":
            if config.kind == "loreft":  # drawn in float32 (the QR it takes has no bf16 kernel on the CPU)
                with torch.no_grad():
                    self.rotation.copy_(nn.init.orthogonal_(torch.empty(r, d, device=site.device)))
            if config.init == "identity" and config.kind == "loreft":
                nn.init.zeros_(self.source.weight)
            if config.init == "random" and config.kind == "direft":
                nn.init.normal_(self.proj, std=d**-0.5)
            with torch.no_grad():
                self.source.bias.zero_()

    def orthonormal_rotation(self) -> torch.Tensor:
        """R with orthonormal rows, from the raw parameter (a QR in float32 or wider)."""
        raw = self.rotation.to(torch.promote_types(self.rotation.dtype, torch.float32))
        q, _ = torch.linalg.qr(raw.T)  # (d, r), orthonormal columns
        return q.T.to(self.rotation.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        real = self.site.token_mask(out)
        if real is None:  # a cached generation step: the prompt was intervened when it was computed
            return out
        where = chosen_positions(real, self.first, self.last).unsqueeze(-1).to(out.dtype)
        h = out
        if self.kind == "loreft":
            rotation = self.orthonormal_rotation()
            delta = self.source(h) @ rotation  # Rᵀ(U h + b) = Rᵀ(W h + b − R h) with W = R + U
        else:
            delta = self.source(h) @ self.proj
        return out + delta * where


class ReFT(Method):
    name = "reft"
    config = ReFTConfig
    capabilities = Capabilities(
        site="stream", module_types=(nn.Module,), mergeable=False, identity_at_init=True, compose_rules=ALL_RULES
    )

    @classmethod
    def capabilities_for(cls, config: ReFTConfig) -> Capabilities:
        if config.init == "random":
            from dataclasses import replace

            return replace(cls.capabilities, identity_at_init=False)
        return cls.capabilities

    @classmethod
    def parameter_count(cls, config: ReFTConfig, site: StreamSite) -> int:
        d, r = site.out_features, config.r
        return r * d + r + r * d  # U or W1 with b, and R or W2

    @classmethod
    def create(cls, config: ReFTConfig, site: StreamSite) -> ReFTAdapter:
        return ReFTAdapter(config, site)
