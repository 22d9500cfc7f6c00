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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.keys import ADAPTER_CONTAINER
from peftkit.sites.kinds import device_and_dtype, register_site_kind

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


# Keyword arguments of attention functions that hold one additive score per (query, key), like T5's relative
# position bias. Extra keys carry no position, so their columns get a zero bias.
KEY_ALIGNED_SCORES = ("position_bias",)


def check_extra_keys(
    where: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    extra_keys: torch.Tensor,
    extra_values: torch.Tensor,
    mask: Any,
) -> None:
    """Raise an AttachError naming ``where`` unless ``extra_keys``/``extra_values`` (b h p d) fit ``key``/``value``.

    The sizes were read from the module when it was attached; this guard makes sure that anything that got out of
    step since (a hand-edited parameter, a model whose forward reshapes differently than its attributes say) is
    reported as such, not as a shape error from deep inside torch.
    """
    heads, dim = key.shape[1], key.shape[-1]
    fits = extra_keys.shape[1] == heads and extra_keys.shape[-1] == dim and extra_values.shape[-1] == value.shape[-1]
    if not fits or extra_values.shape[1] != value.shape[1] or query.shape[1] % heads:
        raise AttachError(
            f"{where}: the extra keys have {extra_keys.shape[1]} heads of size {extra_keys.shape[-1]} (values: "
            f"{extra_values.shape[-1]}), but the keys reaching the attention function have {heads} heads of size "
            f"{dim} (values: {value.shape[-1]}; queries: {query.shape[1]} heads); "
            "the module's attributes did not describe its attention; detach the adapter and target another module"
        )
    if mask is not None and mask.shape[-1] != key.shape[-2]:
        raise AttachError(
            f"{where}: the attention mask covers {mask.shape[-1]} keys but the attention has {key.shape[-2]}; "
            "extra keys cannot be placed in front of it"
        )


def prepend_keys(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any,
    kwargs: dict[str, Any],
    extra_keys: torch.Tensor,
    extra_values: torch.Tensor,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, Any, dict[str, Any]]:
    """Keys, values, mask and keyword arguments with ``extra_keys``/``extra_values`` (b h p d) in front of the keys.

    Every query may attend to the extra keys; the mask and any per-key score (``KEY_ALIGNED_SCORES``) are widened
    so that the real keys keep theirs.
    """
    check_extra_keys(where, query, key, value, extra_keys, extra_values, mask)
    extra = extra_keys.shape[2]
    kwargs = dict(kwargs)
    mask = widen_mask(mask, extra, query, key, is_causal(module, kwargs))
    kwargs["is_causal"] = False  # the widened mask carries the causal pattern now
    for name in KEY_ALIGNED_SCORES:
        scores = kwargs.get(name)
        if isinstance(scores, torch.Tensor):
            if scores.shape[-1] != key.shape[-2]:
                raise AttachError(
                    f"{where}: {name} covers {scores.shape[-1]} keys but the attention has {key.shape[-2]}; "
                    "extra keys cannot be placed in front of it; target another module"
                )
            kwargs[name] = torch.cat([scores.new_zeros(*scores.shape[:-1], extra), scores], dim=-1)
    return torch.cat([extra_keys, key], dim=2), torch.cat([extra_values, value], dim=2), mask, kwargs


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


@dataclass(frozen=True)
class HeadLayout:
    """How many query and key/value heads an attention module has, and their size."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


# Where transformers' attention modules keep their sizes and projections. Read from the module, not its config:
# a config describes the model, and one model can hold attentions of several shapes (BART's decoder may have
# another head count than its encoder; T5's d_kv need not be d_model / heads).
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_QUERY = ("q_proj", "query", "q", "q_lin", "q_attn")
_KEY = ("k_proj", "key", "k", "k_lin")
_VALUE = ("v_proj", "value", "v", "v_lin")
_FUSED = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv")  # query, key and value (or key and value) in one


def _int_attribute(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _projection(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    """The first child called one of ``names`` with a known output width (nn.Linear, GPT-2's Conv1D)."""
    for name in names:
        child = module._modules.get(name)
        if child is None:
            continue
        width = getattr(child, "out_features", None) or getattr(child, "nf", None)
        if isinstance(width, int):
            return name, width
    return None


def read_head_layout(module: nn.Module) -> HeadLayout | str:
    """The module's heads and head size, checked against its key/value projections; or why they cannot be told."""
    dim = _int_attribute(module, _HEAD_DIM)
    if dim is None:
        return f"cannot tell its head size (it has none of the attributes {', '.join(_HEAD_DIM)})"
    head_dim = dim[1]
    query, key, value, fused = (_projection(module, n) for n in (_QUERY, _KEY, _VALUE, _FUSED))
    heads = _int_attribute(module, _HEADS)
    kv_heads = _int_attribute(module, _KV_HEADS)
    groups = _int_attribute(module, ("num_key_value_groups",))
    if heads:
        num_heads = heads[1]
    elif query:
        num_heads = query[1] // head_dim
    elif fused and not (kv_heads or groups):  # GPT-NeoX: query, key and value of equally many heads in one
        num_heads = fused[1] // (3 * head_dim)
    else:
        num_heads = 0
    if not num_heads:
        return f"cannot tell its number of heads (none of the attributes {', '.join(_HEADS)}, no query projection)"
    if kv_heads:
        num_kv_heads = kv_heads[1]
    elif groups:
        num_kv_heads = num_heads // groups[1]
    elif key:
        num_kv_heads = key[1] // head_dim
    else:
        num_kv_heads = num_heads
    layout = HeadLayout(num_heads, num_kv_heads, head_dim)
    said = f"{num_heads} heads, {num_kv_heads} key/value heads of size {head_dim}"
    if not num_kv_heads or num_heads % num_kv_heads:
        return f"{said}: the heads do not split into key/value groups"
    expected = {}
    if key and value:
        expected = {key: num_kv_heads * head_dim, value: num_kv_heads * head_dim}
    elif fused:
        expected = {fused: (0 if query else num_heads) * head_dim + 2 * num_kv_heads * head_dim}
    else:
        return f"{said}, but no key/value projection to check them against ({', '.join(_KEY + _VALUE + _FUSED)})"
    if query:
        expected[query] = num_heads * head_dim
    for (name, width), want in expected.items():
        if width != want:
            return f"{said} would make {name} {want} wide, but it is {width}; its attention is not laid out as they say"
    return layout


class AttentionSite:
    """An attention module that computes attention through transformers' attention-function registry."""

    kind = "attention"

    def __init__(self, module: nn.Module, config: Any, layout: HeadLayout) -> None:
        self.module = module
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
        self.hidden_size = getattr(config, "hidden_size", None) or self.num_heads * self.head_dim
        self.device, self.dtype = device_and_dtype(module)

    def install(self, adapter: object = None) -> list[_ImplementationSwitch]:
        return [_ImplementationSwitch(self.config)]


@functools.cache
def dispatches_through_registry(module_type: type[nn.Module]) -> bool:
    """Whether the class's forward looks its attention function up in the registry (read once per class)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(module_type.forward)
    except (OSError, TypeError):
        return False


def make_attention_site(module: nn.Module) -> AttentionSite | str:
    config = getattr(module, "config", None)
    name = type(module).__name__
    if config is None or not hasattr(config, "_attn_implementation"):
        return f"{name} is not a transformers attention module (it has no transformers config)"
    if not dispatches_through_registry(type(module)):
        return f"{name} does not compute attention through transformers' attention-function registry"
    implementation = config._attn_implementation or "eager"
    base = implementation.removeprefix(WRAPPER_PREFIX)
    if base not in SUPPORTED:
        return f"attention implementation {implementation!r} cannot host extra keys; use 'sdpa' or 'eager'"
    if next(module.parameters(), None) is None:
        return f"{name} has no parameters to take a device and dtype from"
    layout = read_head_layout(module)
    if isinstance(layout, str):
        return f"{name} {layout}; target another attention module"
    return AttentionSite(module, config, layout)


register_site_kind("attention", lambda module, context: make_attention_site(module))
