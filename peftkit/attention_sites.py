"""Attention sites: extra keys and values for an attention layer, through transformers' attention-function registry.

transformers (4.48+, 5.x) computes attention in GPT-2, Llama-family, BERT/RoBERTa and most other models by looking
up ``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` and calling that function with the projected,
cached, rotated ``query``, ``key`` and ``value``. peftkit registers one wrapper per base implementation
(``peftkit_sdpa``, ``peftkit_eager``) and points the model's config at it while an attention adapter is attached.
The wrapper calls the active attention adapters of the module being run, each of which may extend the keys and
values or add to the output, and then the original function. Because this happens after the KV cache update and
the rotary embedding, a prefix is never cached and never rotated, real tokens keep their positions, and
``generate()`` needs nothing special. No model's forward is copied.

The mask function of the wrapped implementation is registered under the new name too: without it transformers
passes ``attention_mask=None`` and padding would be silently ignored.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WRAPPER_PREFIX = "peftkit_"
SUPPORTED = ("sdpa", "eager")
_USERS_ATTRIBUTE = "_peftkit_attention_users"
_ORIGINAL_ATTRIBUTE = "_peftkit_original_attention"


def _base_function(module: nn.Module, implementation: str) -> Callable[..., Any]:
    if implementation == "eager":  # not in the registry: each modeling file defines its own
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def _attention_adapters(module: nn.Module) -> list[Any]:
    from peftkit.targeting import ADAPTER_CONTAINER

    container = module._modules.get(ADAPTER_CONTAINER)
    if container is None:
        return []
    state = container.__dict__.get("_peftkit_state")
    active = state.active if state is not None else set()
    return [a for name, a in container.items() if name in active and hasattr(a, "attend")]


def _wrapper(implementation: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs
    ) -> tuple[torch.Tensor, Any]:
        base = _base_function(module, implementation)

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any) -> tuple[torch.Tensor, Any]:
            return base(module, q, k, v, mask, **kw)

        for adapter in _attention_adapters(module):
            call = functools.partial(adapter.attend, module=module, inner=call)
        return call(query, key, value, attention_mask, **kwargs)

    return attention


def _register(implementation: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = WRAPPER_PREFIX + implementation
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(implementation))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


def widen_mask(mask: Any, extra: int, query: torch.Tensor, key: torch.Tensor, causal: bool) -> Any:
    """The attention mask for ``extra`` key positions prepended to ``key``, which every query may attend to.

    Masks come as None (no mask, or causal via ``is_causal``), a boolean mask (True = attend) or an additive float
    mask (0 = attend), shaped (batch or 1, heads or 1, queries, keys).
    """
    q_length, kv_length = query.shape[-2], key.shape[-2]
    if mask is None:
        if not causal or q_length == 1:
            return None
        # The causal pattern the kernel would have applied, aligned to the end (queries are the last keys).
        mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - q_length)
        mask = mask[None, None]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], extra, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def is_causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if flag is None else flag)


class _ImplementationSwitch:
    """Points a config at the wrapper while at least one attention adapter uses it; restores it after the last."""

    def __init__(self, config: Any) -> None:
        self.config = config
        users = config.__dict__.get(_USERS_ATTRIBUTE, 0)
        if users == 0:
            original = config._attn_implementation or "eager"
            config.__dict__[_ORIGINAL_ATTRIBUTE] = original
            config._attn_implementation = _register(original)
        config.__dict__[_USERS_ATTRIBUTE] = users + 1

    def remove(self) -> None:
        users = self.config.__dict__.get(_USERS_ATTRIBUTE, 0) - 1
        self.config.__dict__[_USERS_ATTRIBUTE] = users
        if users == 0:
            self.config._attn_implementation = self.config.__dict__.pop(_ORIGINAL_ATTRIBUTE)
            del self.config.__dict__[_USERS_ATTRIBUTE]


class AttentionSite:
    """An attention module that computes attention through transformers' attention-function registry."""

    kind = "attention"

    def __init__(self, module: nn.Module, config: Any) -> None:
        self.module = module
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        parameter = next(module.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def install(self, adapter: object = None) -> list[_ImplementationSwitch]:
        return [_ImplementationSwitch(self.config)]


@functools.cache
def _dispatches_through_registry(module_type: type[nn.Module]) -> bool:
    """Whether the class's forward looks its attention function up in the registry (read once per class)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(module_type.forward)
    except (OSError, TypeError):
        return False


def make_attention_site(module: nn.Module) -> AttentionSite | str:
    config = getattr(module, "config", None)
    name = type(module).__name__
    if config is None or not hasattr(config, "num_attention_heads"):
        return f"{name} is not a transformers attention module (it has no config with num_attention_heads)"
    if not _dispatches_through_registry(type(module)):
        return f"{name} does not compute attention through transformers' attention-function registry"
    implementation = config._attn_implementation or "eager"
    base = implementation.removeprefix(WRAPPER_PREFIX)
    if base not in SUPPORTED:
        return f"attention implementation {implementation!r} cannot host extra keys; use 'sdpa' or 'eager'"
    if next(module.parameters(), None) is None:
        return f"{name} has no parameters to take a device and dtype from"
    return AttentionSite(module, config)
