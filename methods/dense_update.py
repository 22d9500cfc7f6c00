"""What LoHa and LoKr share: an update dW built whole from small factors, run through the host's own operation, with
LyCORIS's two training-time regularisers (``rank_dropout``: whole rows of dW zeroed, optionally rescaled by the share
kept; ``module_dropout``: the adapter skipped for a whole forward). A method supplies ``delta_weight``."""

from __future__ import annotations

import torch

from peftkit import Adapter


class DenseUpdateAdapter(Adapter):
    scaling: float
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = True
    module_dropout: float = 0.0

    def delta_weight(self, wide: bool = False) -> torch.Tensor:
        """The unscaled (d_out, d_in) update; ``wide``: in float32 or wider, for merging."""
        raise NotImplementedError

    def skips_this_forward(self) -> bool:
        """``module_dropout``: whether the adapter sits this training forward out."""
        return self.training and bool(self.module_dropout) and bool(torch.rand(()) < self.module_dropout)

    def kept_rows(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """``rank_dropout``: a weight per row of dW (per output feature), zero for a dropped row; None when off."""
        if not (self.training and self.rank_dropout):
            return None
        kept = (torch.rand(rows, device=like.device) > self.rank_dropout).to(like.dtype)
        return kept / kept.mean().clamp(min=1.0 / rows) if self.rank_dropout_scale else kept

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.skips_this_forward():
            return out
        delta = self.delta_weight()
        kept = self.kept_rows(delta.shape[0], delta)
        if kept is not None:
            delta = delta * kept[:, None]
        return self.site.add_dense_update_(out, x, delta, self.scaling)

    def merge(self) -> None:
        self.site.add_to_weight_(self.delta_weight(wide=True) * self.scaling)

    def unmerge(self) -> None:
        self.site.add_to_weight_(-self.delta_weight(wide=True) * self.scaling)
