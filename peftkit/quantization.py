"""Loading a base model quantised (QLoRA's 4-bit NF4 base) and preparing it for training adapters over it.

A quantisation block in a config is untrusted input, so it is peftkit's own strict schema (unknown fields and
values refused with the field's name), translated to transformers' own ``quantization_config`` at load time: the
model comes in through transformers' loading path, never through a private re-implementation of it. The layers it
creates become hosts through the ``peftkit.hosts`` entry-point group (docs/quantization.md).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftkit.errors import PeftkitError

INSTALL_HINT = "pip install 'peftkit[quantization]' (bitsandbytes and accelerate)"
_REQUIRED = {"bitsandbytes": ("bitsandbytes", "accelerate")}  # accelerate: transformers' device_map loading
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Quantization(BaseModel):
    """How to quantise the base while loading it: QLoRA's usual choice is ``bits: 4, type: nf4``."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["bitsandbytes"] = "bitsandbytes"
    bits: Literal[4, 8] = Field(default=4, description="4: NF4/FP4 blocks of 64 (QLoRA); 8: int8 rows (LLM.int8)")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="the 4-bit code book; 4-bit only")
    double_quant: bool = Field(default=False, description="quantise the block scales too (QLoRA); 4-bit only")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="the dtype the layers compute in, and the adapters live in (4-bit only)"
    )
    skip_modules: list[str] | None = Field(
        default=None, description="modules left unquantised (transformers keeps the LM head unquantised anyway)"
    )

    @model_validator(mode="after")
    def _four_bit_fields_only_on_four_bits(self) -> Quantization:
        if self.bits == 8:
            given = sorted(self.model_fields_set & {"type", "double_quant", "compute_dtype"})
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to 4-bit quantisation only; drop them, or set bits: 4 "
                    "(8-bit layers compute in float32 here)"
                )
        return self

    def describe(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"{self.type}{'+double' if self.double_quant else ''} ({self.compute_dtype} compute)"

    def to_transformers(self) -> Any:
        """transformers' own quantisation config for ``from_pretrained(quantization_config=...)``."""
        require_backend(self.backend)
        from transformers import BitsAndBytesConfig

        skip = {"llm_int8_skip_modules": list(self.skip_modules)} if self.skip_modules is not None else {}
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, **skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=_DTYPES[self.compute_dtype],
            **skip,
        )


def require_backend(backend: str) -> None:
    """Refuse, with the install command, a quantisation backend whose libraries are not installed."""
    missing = [name for name in _REQUIRED.get(backend, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise PeftkitError(
            f"quantization with backend {backend!r} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install with {INSTALL_HINT}"
        )


def load_quantized(
    folder: str | Path,
    quantization: Quantization,
    *,
    device: torch.device | str = "cpu",
    model_class: Any = None,
    **options: Any,
) -> nn.Module:
    """``model_class.from_pretrained(folder)`` quantised as ``quantization`` says, placed on ``device`` by
    transformers (a quantised model cannot be moved afterwards). ``model_class`` defaults to a causal LM."""
    config = quantization.to_transformers()
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    device = torch.device(device)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    try:
        return model_class.from_pretrained(
            folder, quantization_config=config, device_map=device_map, local_files_only=True, **options
        )
    except ImportError as error:  # a library the backend needs at load time (a version too old, a missing one)
        raise PeftkitError(f"loading {str(folder)!r} quantised failed: {error}; install with {INSTALL_HINT}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise PeftkitError(f"model {str(folder)!r}: transformers could not load it quantised: {error}") from None


def quantize_built_model(model: nn.Module, quantization: Quantization, *, device: torch.device | str = "cpu"):
    """A model built in memory (random weights from a config), quantised through the same loading path: written to
    a temporary folder with ``save_pretrained`` and read back with the quantisation config."""
    with tempfile.TemporaryDirectory(prefix="peftkit-quantize-") as folder:
        model.save_pretrained(folder)
        return load_quantized(folder, quantization, device=device, model_class=type(model))


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded ``model`` quantised (its loading path leaves its quantiser on the model): such a
    model was placed on its device by the load and cannot be moved afterwards."""
    return getattr(model, "hf_quantizer", None) is not None


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """What training adapters over a quantised base needs, done once before (or after) attaching them.

    * Every floating-point base parameter in float16 or bfloat16 (norms, embeddings, the LM head: everything that
      is not packed) is lifted to float32, as HF PEFT's ``prepare_model_for_kbit_training`` does: half-precision
      norms lose the small differences that training adapters produces, and a float32 norm over a half-precision
      residual stream fails in some models' layer norms. The packed weights are not touched.
    * Every base parameter is frozen (``attach`` freezes them too; this makes the call safe on its own).
    * With ``gradient_checkpointing``, transformers' checkpointing is switched on (non-reentrant), and the input
      embeddings' output requires grad, so that reentrant checkpointing set up later still reaches the adapters.
    """
    if gradient_checkpointing:
        _refuse_unsupported_checkpointing(model)
    from peftkit.lifecycle.state import get_state

    state = get_state(model)
    adapter_parameters = set() if state is None else {id(p) for a in state.attached for p in a.module.parameters()}
    for parameter in model.parameters():
        if id(parameter) in adapter_parameters:
            continue
        parameter.requires_grad_(False)
        packed = type(parameter) is not nn.Parameter  # bitsandbytes' Params4bit/Int8Params and their kin
        if not packed and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """transformers' gradient checkpointing, non-reentrant (it needs no input that requires grad, and gives the same
    gradients for every built-in method, tests/test_compile_checkpointing.py), with the input embeddings' output
    requiring grad as well, so that a reentrant setting made later still reaches adapters inside the blocks."""
    _refuse_unsupported_checkpointing(model)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2's name for it
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _refuse_unsupported_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PeftkitError(
            f"{type(model).__name__} does not support gradient checkpointing (supports_gradient_checkpointing is "
            "False); drop gradient_checkpointing"
        )


__all__ = [
    "INSTALL_HINT",
    "Quantization",
    "enable_gradient_checkpointing",
    "is_quantized",
    "load_quantized",
    "prepare_for_kbit_training",
    "quantize_built_model",
    "require_backend",
]
