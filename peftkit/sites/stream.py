"""Stream sites: the hidden states leaving a transformer block (``@block``), the residual stream, seen per token.

An adapter here changes chosen positions of each sequence (representation fine-tuning intervenes on the first and
last tokens), so the site tells it which positions of the current call hold real tokens: a forward pre-hook on the
model records the call's ``attention_mask`` (all ones without one). A call that continues a cached sequence
(generation after the prompt: a non-empty ``cache``/``past_key_values`` or a ``cache_position`` past 0, or fewer new positions
than the mask covers) is reported as such, so an adapter can leave it alone: what it did to the prompt lives on in
the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftkit.sites.kinds import SiteContext, register_site_kind
from peftkit.sites.sublayer import SublayerSite, make_sublayer_site


class StreamSite(SublayerSite):
    """A block's output, with the real-token mask of the model call it is part of."""

    def __init__(self, base: SublayerSite, root: nn.Module) -> None:
        super().__init__("stream", base.module, base.in_features, base.out_features, None)
        self.root = root
        self._mask: torch.Tensor | None = None
        self._continues = False

    def install(self, adapter: object = None) -> list[RemovableHandle]:
        return [self.root.register_forward_pre_hook(self._record_mask, with_kwargs=True)]

    def _record_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            mask = None if ids is None else torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        self._mask = mask
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 calls it ``cache``
        length = getattr(past, "get_seq_length", None)
        position = kwargs.get("cache_position")
        self._continues = (callable(length) and length() > 0) or (
            isinstance(position, torch.Tensor) and position.numel() > 0 and int(position.reshape(-1)[0]) > 0
        )

    def token_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(batch, positions) True at the real tokens of this call's ``hidden`` (batch, positions, features); None
        when the call continues a cached sequence (its mask covers more positions than it computes)."""
        mask = self._mask
        if self._continues:
            return None
        if mask is None:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if mask.shape[1] != hidden.shape[1]:
            return None
        return mask.to(device=hidden.device).bool()


def make_stream_site(module: nn.Module, context: SiteContext | None) -> StreamSite | str:
    blocks = context.places.layout.paths.get("block", []) if context is not None and context.places else []
    if context is None or context.path not in blocks or context.root is None:
        return (
            f"{type(module).__name__} is not a transformer block of this model; a stream adapter acts on a block's "
            "output (target '@block')"
        )
    config = getattr(context.root, "config", None)
    if getattr(config, "is_encoder_decoder", False) and ".decoder." in f".{context.path}.":
        return (
            "a decoder block of an encoder-decoder model: its positions are not those of the model's "
            "attention_mask (the encoder's); target the encoder's blocks (e.g. 're:.*encoder.*' with '@block')"
        )
    base = make_sublayer_site("output", module, context)
    return base if isinstance(base, str) else StreamSite(base, context.root)


register_site_kind("stream", make_stream_site)
