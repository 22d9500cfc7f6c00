"""Input sites: virtual tokens before the model's input embeddings (prompt tuning, P-tuning).

The host is the model's input embedding (``model.get_input_embeddings()``); the work happens in a pre-hook on
the model the user calls, which sees all of its inputs. On a fresh sequence it embeds the ids, puts the adapter's
virtual tokens in front, widens the attention mask (and ``token_type_ids``), shifts any ``position_ids`` and marks
the virtual positions of ``labels`` as ignored (-100). During cached generation the virtual tokens are already in
the cache, so later steps only widen the mask and shift the positions. No model forward is copied.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def _cache_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def _prepend(tensor: torch.Tensor | None, length: int, fill: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    pad = torch.full((tensor.shape[0], length), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


class InputSite:
    """The model's input embedding, with the model it belongs to."""

    kind = "input"

    def __init__(self, embedding: nn.Embedding, root: nn.Module) -> None:
        self.module = embedding
        self.root = root
        self.embedding_dim = embedding.embedding_dim
        self.device, self.dtype = embedding.weight.device, embedding.weight.dtype

    def install(self, adapter: Any) -> list[Any]:
        # a partial of a method, not a closure: copy.deepcopy(model) gives the copy's hook the copy's site and adapter
        hook = functools.partial(self._prepend_virtual_tokens, adapter)
        return [self.root.register_forward_pre_hook(hook, with_kwargs=True)]

    def _prepend_virtual_tokens(
        self, adapter: Any, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        container = self.module._modules.get("peftkit_adapters")
        state = container.__dict__.get("_peftkit_state") if container is not None else None
        if state is None or not any(a is adapter and n in state.active for n, a in container.items()):
            return None
        kwargs = dict(kwargs)
        if args:  # model(ids) -> model(input_ids=ids)
            kwargs["input_ids"], args = args[0], args[1:]
        length = adapter.length
        if _cache_length(kwargs) == 0:
            embeds = kwargs.pop("inputs_embeds", None)
            ids = kwargs.pop("input_ids", None)
            if embeds is None:
                embeds = self.module(ids)
            virtual = adapter.virtual_tokens().to(embeds.dtype)  # "p d"
            kwargs["inputs_embeds"] = torch.cat([virtual.expand(embeds.shape[0], -1, -1), embeds], dim=1)
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() >= 2:  # per-token labels; a sequence's label stays as it is
                kwargs["labels"] = _prepend(labels, length, IGNORE_INDEX)
            kwargs["token_type_ids"] = _prepend(kwargs.get("token_type_ids"), length, 0)
            if kwargs.get("position_ids") is not None:
                positions = kwargs["position_ids"]
                head = torch.arange(length, device=positions.device).expand(positions.shape[0], -1)
                kwargs["position_ids"] = torch.cat([head, positions + length], dim=1)
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + length
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = _prepend(mask, length, 1)
        return args, {k: v for k, v in kwargs.items() if v is not None or k not in ("labels", "token_type_ids")}


def make_input_site(module: nn.Module, root: nn.Module | None) -> InputSite | str:
    getter = getattr(root, "get_input_embeddings", None)
    embeddings = getter() if getter is not None else None
    if embeddings is None:
        return "virtual tokens need a transformers model with get_input_embeddings()"
    if module is not embeddings:
        return f"virtual tokens go before the model's input embeddings ({type(embeddings).__name__}), not here"
    return InputSite(module, root)
