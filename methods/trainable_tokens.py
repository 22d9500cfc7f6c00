"""Trainable tokens: train only chosen rows of an embedding (HF PEFT's TrainableTokens, ``trainable_token_indices``).

Adding special tokens to a vocabulary (a chat template's ``<|im_start|>``, tool-call markers) needs their embeddings
trained; training the whole embedding costs vocab x dim parameters and a checkpoint of that size. Here only the k
chosen rows are parameters, initialised to their current values (so the model is unchanged at init):

    E'[i] = R[j]  where i = indices[j],     E'[i] = E[i]  otherwise

Ids not in ``indices`` keep the base row. When the embedding is tied to the LM head (GPT-2, Llama with
``tie_word_embeddings``), the head's logits for those ids use the same trained rows: ``logit_i = h . R[j]``.
Merging copies R into the rows of the (shared) weight and keeps the rows it replaced, so unmerging is exact.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from peftkit import Adapter, Capabilities, Method, MethodConfig
from peftkit.sites import WeightSite, host_class, tied_holders


class TrainableTokensConfig(MethodConfig):
    method: Literal["trainable-tokens"] = "trainable-tokens"
    indices: list[int] = Field(min_length=1, description="the token ids whose embedding rows train (no repeats)")

    @field_validator("indices")
    @classmethod
    def _distinct_ids(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError(f"token ids are >= 0; got {sorted(i for i in value if i < 0)[:5]}")
        if len(set(value)) != len(value):
            raise ValueError("each token id may appear once in indices")
        return value


class TrainableTokensAdapter(Adapter):
    follows_tied_weight = True

    def __init__(self, config: TrainableTokensConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        weight = site.module.weight  # (num_embeddings, dim)
        ids = torch.tensor(config.indices, dtype=torch.long, device=weight.device)
        self.register_buffer("token_ids", ids, persistent=False)
        # the ids sorted, and where each sorted id's row is in ``rows``: a lookup by binary search, with no table
        # the size of the vocabulary
        order = torch.argsort(ids)
        self.register_buffer("sorted_ids", ids[order], persistent=False)
        self.register_buffer("row_of_sorted", order, persistent=False)
        self.rows = nn.Parameter(weight.detach()[ids].clone())  # "k d"; on the meta device too, where ids index
        self.rows_at_merge: torch.Tensor | None = None

    def _rows_for(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each id: whether it is one of the trained ids, and its trained row (row 0 where it is not)."""
        slot = torch.searchsorted(self.sorted_ids, ids.contiguous()).clamp_(max=self.sorted_ids.numel() - 1)
        hit = self.sorted_ids[slot] == ids
        return hit, self.rows[self.row_of_sorted[slot]]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        hit, rows = self._rows_for(x)
        scale = self.site.output_scale  # a scaled embedding (Gemma) multiplies its lookup: so are the new rows
        if scale is not None:
            rows = rows * (scale.to(rows) if isinstance(scale, torch.Tensor) else scale)
        return torch.where(hit[..., None], rows.to(out.dtype), out)

    def tied_refusal(self, holder: nn.Module) -> str | None:
        if host_class(holder) is nn.Linear and holder.weight is self.site.module.weight:
            return None
        return f"it knows how an nn.Linear LM head uses an embedding's rows, not a {type(holder).__name__}"

    def tied_forward(self, holder: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The head's logits for the trained ids, from the trained rows: ``out[..., i] += x . (R[j] - W[i])``, so
        that ``out[..., i] = x . R[j] (+ bias[i])``. Added as a difference, not recomputed, so that an untrained row
        (R = W) leaves the logits bit for bit as they were."""
        change = self.rows - holder.weight[self.token_ids].detach()  # "k d"
        update = F.linear(x, change.to(x.dtype))  # "... d, k d -> ... k": only k columns
        return out.index_add(-1, self.token_ids, update.to(out.dtype))

    def merge(self) -> None:
        weight = self.site.module.weight
        with torch.no_grad():
            self.rows_at_merge = weight[self.token_ids].clone()
            weight.index_copy_(0, self.token_ids, self.rows.detach().to(weight.dtype))

    def unmerge(self) -> None:
        if self.rows_at_merge is None:
            raise RuntimeError("this trainable-tokens adapter was merged without keeping the rows it replaced")
        with torch.no_grad():
            self.site.module.weight.index_copy_(0, self.token_ids, self.rows_at_merge)
        self.rows_at_merge = None


class TrainableTokens(Method):
    name = "trainable-tokens"
    config = TrainableTokensConfig
    capabilities = Capabilities(site="weight", module_types=(nn.Embedding,), mergeable=True, identity_at_init=True)

    @classmethod
    def site_refusal(cls, config: TrainableTokensConfig, site: WeightSite) -> str | None:
        size = site.module.num_embeddings
        outside = sorted(i for i in config.indices if i >= size)
        if outside:
            return (
                f"indices {outside[:5]} are outside its vocabulary of {size} rows (ids 0..{size - 1}); resize the "
                "embedding first (model.resize_token_embeddings) or fix indices"
            )
        return None

    @classmethod
    def parameter_count(cls, config: TrainableTokensConfig, site: WeightSite) -> int:
        return len(config.indices) * site.module.embedding_dim

    @classmethod
    def create(cls, config: TrainableTokensConfig, site: WeightSite) -> TrainableTokensAdapter:
        return TrainableTokensAdapter(config, site)

    # -- HF PEFT checkpoints: peft_type TRAINABLE_TOKENS, token_indices, one key per holder of the weight ---------
    # base_model.model.<path>.trainable_tokens_delta (k, dim): the trained rows themselves (not a difference);
    # a tied LM head gets a key of its own with the same values.
    peft_type = "TRAINABLE_TOKENS"
    _PEFT_SUFFIXES = ("trainable_tokens_delta",)

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peftkit_key, refuse_features, split_peft_key

        refuse_features(peft_config, {"init_weights": True})
        indices = peft_config.get("token_indices")
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise CheckpointError(f"token_indices must be a list of token ids; got {str(indices)[:80]}")
        modules = dict(model.named_modules())
        rows = {split_peft_key(key, cls._PEFT_SUFFIXES)[0]: tensor for key, tensor in tensors.items()}
        embeddings = [p for p in rows if isinstance(modules.get(p), nn.Embedding)]
        if not embeddings:
            raise CheckpointError(
                f"the PEFT trainable-tokens checkpoint names no embedding of this model: {list(rows)}"
            )
        state: dict[str, torch.Tensor] = {}
        for path in embeddings:
            for holder in tied_holders(model, path):  # PEFT writes the tied head's copy too: it must agree
                if holder in rows and not torch.equal(rows.pop(holder), rows[path]):
                    raise CheckpointError(f"the rows saved for {holder!r} differ from those of the tied {path!r}")
            state[peftkit_key(path, adapter_name, "rows")] = rows.pop(path)
        if rows:
            raise CheckpointError(f"trainable tokens on {sorted(rows)}, which are not embeddings: not supported")
        return [{"method": cls.name, "target": embeddings, "indices": indices}], state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key

        if len({tuple(a.config.indices) for a in attached}) > 1:
            raise CheckpointError("a PEFT trainable-tokens adapter has one token_indices; these entries differ")
        tensors = {}
        for a in attached:
            for path in [a.path, *tied_holders(model, a.path)]:
                tensors[peft_key(path, "trainable_tokens_delta")] = a.module.rows
        config = {
            "token_indices": list(attached[0].config.indices),
            "target_modules": sorted(a.path for a in attached),
            "init_weights": True,
        }
        return config, tensors
