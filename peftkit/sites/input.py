"""Input sites: virtual tokens before the model's input embeddings (prompt tuning, P-tuning).

The host is the model's input embedding (``model.get_input_embeddings()``); the work happens in a pre-hook on
the model the user calls, which sees all of its inputs. On a fresh sequence it embeds the ids and puts the adapter's
virtual tokens immediately before each row's first real token: after a left-padded row's pads, so that the row's
virtual and real tokens lie next to each other as when the row runs alone (a sliding window, which counts index
positions, would otherwise drop the virtual tokens earlier in a padded row). ``attention_mask``, ``token_type_ids``,
``position_ids`` and ``labels`` (-100 at the virtual positions) get the same layout. During cached generation the
virtual tokens are already in the cache, so later steps only widen the mask at the same place and shift the
positions. No model forward is copied.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from peftkit.keys import ADAPTER_CONTAINER
from peftkit.sites.kinds import register_site_kind

IGNORE_INDEX = -100


def _cache_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def first_real_token(kwargs: dict[str, Any], batch: int, device: torch.device) -> torch.Tensor:
    """Each row's first attended position in a 2-D ``attention_mask`` (batch,); 0 for every row without one."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return mask.ne(0).int().argmax(dim=1)  # the first maximum; 0 for a row that is all padding


def insert(tensor: torch.Tensor, start: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``tensor`` (b s ...) with ``block`` (b p ...) inserted along the sequence before position ``start[row]``."""
    batch, width, length = tensor.shape[0], tensor.shape[1], block.shape[1]
    j = torch.arange(width + length, device=tensor.device)[None]  # "1 (s p)"
    begin = start.to(tensor.device)[:, None]
    source = torch.where(j < begin, j, j - length)  # where each output position reads from in ``tensor``
    source = torch.where((j >= begin) & (j < begin + length), width + j - begin, source)  # ... or in ``block``
    index = source.view(batch, width + length, *[1] * (tensor.dim() - 2)).expand(-1, -1, *tensor.shape[2:])
    return torch.cat([tensor, block.to(tensor.dtype)], dim=1).gather(1, index)


def _insert_filled(tensor: torch.Tensor | None, start: torch.Tensor, length: int, fill: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    return insert(tensor, start, torch.full((tensor.shape[0], length), fill, dtype=tensor.dtype, device=tensor.device))


def _insert_positions(positions: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """The virtual tokens count 0..length-1 from each row's start; the real tokens after them move up by length."""
    index = torch.arange(positions.shape[-1], device=positions.device)
    shifted = torch.where(index >= start.to(positions.device)[:, None], positions + length, positions)
    head = torch.arange(length, device=positions.device).expand(positions.shape[0], -1)
    return insert(shifted, start, head)


def _widened_mask(kwargs: dict[str, Any], length: int) -> torch.Tensor:
    mask = kwargs["attention_mask"]
    return _insert_filled(mask, first_real_token(kwargs, mask.shape[0], mask.device), length, 1)


class InputSite:
    """The model's input embedding, with the model it belongs to.

    On an encoder-decoder the virtual tokens go on the encoder's input, so the hook sits on the encoder, which
    ``generate()`` calls directly; a second hook on the model widens the source mask that the model hands to the
    cross-attention (and to the encoder). The decoder, its inputs and its labels are left as they are.
    """

    kind = "input"

    def __init__(self, embedding: nn.Embedding, root: nn.Module, encoder: nn.Module | None = None) -> None:
        self.module = embedding
        self.root = root
        self.encoder = encoder
        # what turns ids into the embeddings the virtual tokens join: an encoder's own (tied) table, with its scale
        self.words = encoder.get_input_embeddings() if encoder is not None else embedding
        self.embedding_dim = embedding.embedding_dim
        self.device, self.dtype = embedding.weight.device, embedding.weight.dtype

    def install(self, adapter: Any) -> list[Any]:
        # partials of methods, not closures: copy.deepcopy(model) gives the copy's hooks the copy's site and adapter
        hook = functools.partial(self._insert_virtual_tokens, adapter)
        if self.encoder is None:
            return [self.root.register_forward_pre_hook(hook, with_kwargs=True)]
        source = functools.partial(self._widen_source_mask, adapter)
        return [
            self.encoder.register_forward_pre_hook(hook, with_kwargs=True),
            self.root.register_forward_pre_hook(source, with_kwargs=True),
        ]

    def _active(self, adapter: Any) -> bool:
        container = self.module._modules.get(ADAPTER_CONTAINER)
        state = container.__dict__.get("_peftkit_state") if container is not None else None
        return state is not None and any(a is adapter and n in state.active for n, a in container.items())

    def _insert_virtual_tokens(
        self, adapter: Any, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not self._active(adapter):
            return None
        kwargs = dict(kwargs)
        if args:  # model(ids) -> model(input_ids=ids)
            kwargs["input_ids"], args = args[0], args[1:]
        length = adapter.length
        mask = kwargs.get("attention_mask")
        widen = mask is not None and mask.dim() == 2
        if _cache_length(kwargs) == 0:
            embeds = kwargs.pop("inputs_embeds", None)
            ids = kwargs.pop("input_ids", None)
            if embeds is None:
                embeds = self.words(ids)
            widen = widen and mask.shape[1] == embeds.shape[1]  # an encoder-decoder's own forward widened it already
            start = first_real_token(kwargs, embeds.shape[0], embeds.device)
            virtual = adapter.virtual_tokens().to(embeds.dtype)  # "p d"
            kwargs["inputs_embeds"] = insert(embeds, start, virtual.expand(embeds.shape[0], -1, -1))
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() >= 2:  # per-token labels; a sequence's label stays as it is
                kwargs["labels"] = _insert_filled(labels, start, length, IGNORE_INDEX)
            kwargs["token_type_ids"] = _insert_filled(kwargs.get("token_type_ids"), start, length, 0)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = _insert_positions(kwargs["position_ids"], start, length)
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + length
        if widen:  # at the same place as on the first step: the pads have not moved
            kwargs["attention_mask"] = _widened_mask(kwargs, length)
        return args, {k: v for k, v in kwargs.items() if v is not None or k not in ("labels", "token_type_ids")}

    def _widen_source_mask(self, adapter: Any, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Widen an encoder-decoder's ``attention_mask`` where it still covers only the user's source tokens.

        The model passes it to the cross-attention over the encoder's output, which holds the virtual tokens.
        ``generate()`` runs the encoder first (its hook widens a mask of its own) and then passes the user's mask
        with ``encoder_outputs`` at every step; a forward passes it with the ids, and the encoder hook then finds
        it widened already.
        """
        mask = kwargs.get("attention_mask")
        if not self._active(adapter) or mask is None or mask.dim() != 2:
            return None
        source = args[0] if args else kwargs.get("input_ids")
        source = kwargs.get("inputs_embeds") if source is None else source
        encoded = kwargs.get("encoder_outputs")
        if source is not None:
            width = source.shape[1]
        elif encoded is not None:
            width = encoded[0].shape[1] - adapter.length
        else:
            return None
        if mask.shape[1] != width:
            return None
        return args, {**kwargs, "attention_mask": _widened_mask(kwargs, adapter.length)}


def _encoder_decoder_site(module: nn.Module, root: nn.Module) -> InputSite | str:
    """Virtual tokens join an encoder that reads token ids through the model's input embedding, or are refused."""
    name = type(root).__name__
    reads = getattr(root, "main_input_name", "input_ids")
    if reads != "input_ids":
        return (
            f"{name} is an encoder-decoder whose encoder reads {reads!r}, not token ids: there are no token "
            "embeddings on its input for virtual tokens to join (and on the decoder they would shift its labels); "
            "adapt its attention or its weights instead"
        )
    get_encoder = getattr(root, "get_encoder", None)
    encoder = get_encoder() if get_encoder is not None else None
    words = getattr(encoder, "get_input_embeddings", lambda: None)() if encoder is not None else None
    if words is None or getattr(words, "weight", None) is not module.weight:
        return (
            f"{name} is an encoder-decoder whose encoder does not embed its token ids with "
            f"{type(module).__name__} (the model's input embeddings): virtual tokens cannot be placed on its input"
        )
    return InputSite(module, root, encoder)


def make_input_site(module: nn.Module, root: nn.Module | None) -> InputSite | str:
    getter = getattr(root, "get_input_embeddings", None)
    embeddings = getter() if getter is not None else None
    if embeddings is None:
        return "virtual tokens need a transformers model with get_input_embeddings()"
    if module is not embeddings:
        return f"virtual tokens go before the model's input embeddings ({type(embeddings).__name__}), not here"
    if getattr(getattr(root, "config", None), "is_encoder_decoder", False):
        return _encoder_decoder_site(module, root)
    return InputSite(module, root)


register_site_kind("input", lambda module, context: make_input_site(module, getattr(context, "root", None)))
