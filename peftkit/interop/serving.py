"""Hand-off to serving: a base model folder plus an adapter folder in, one plain transformers folder out.

Inference servers (vLLM, TGI, llama.cpp's converters, ONNX exporters) read a transformers folder and know nothing
of peftkit; a merged adapter adds no latency there. :func:`export_merged` loads the base's own weights, applies a
peftkit or HF PEFT adapter folder, folds every chosen adapter into the weights and writes the result with
``save_pretrained`` (safetensors), next to the base's tokenizer files. What cannot be merged is refused before the
base is even loaded, naming the adapter and its method, and nothing is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from torch import nn

from peftkit.compose import weighted_adapters
from peftkit.errors import CheckpointError
from peftkit.keys import ADAPTER_CONTAINER

AdapterFormat = Literal["peftkit", "peft"]

# A peftkit folder holds spec.json beside adapter.safetensors; a HF PEFT folder holds adapter_config.json.
_PEFTKIT_SPEC, _PEFT_CONFIG = "spec.json", "adapter_config.json"
# The files beside a model's weights that a server needs and save_pretrained does not write: copied as they are.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def adapter_format(directory: str | Path) -> AdapterFormat:
    """Which kind of adapter folder this is, from the files it holds."""
    directory = Path(directory)
    if (directory / _PEFTKIT_SPEC).is_file():
        return "peftkit"
    if (directory / _PEFT_CONFIG).is_file():
        return "peft"
    raise CheckpointError(
        f"{str(directory)!r} is not an adapter folder: it holds neither {_PEFTKIT_SPEC} (peftkit.save) nor "
        f"{_PEFT_CONFIG} (HF PEFT's save_pretrained)"
    )


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Attach a peftkit (:func:`peftkit.load`) or HF PEFT (:func:`peftkit.from_peft`, as ``adapter_name``) folder."""
    from peftkit.interop.peft import from_peft
    from peftkit.io import load

    if adapter_format(directory) == "peftkit":
        return load(model, directory)
    return from_peft(model, directory, adapter_name=adapter_name)


def refuse_unmergeable(directory: str | Path, names: list[str] | None = None) -> None:
    """Refuse, from the folder's config alone (before any model is loaded), an adapter that cannot be merged."""
    from peftkit.interop.peft import method_for_peft_type, read_peft_config
    from peftkit.io import read_spec
    from peftkit.registry import get_method

    if adapter_format(directory) == "peft":
        method = method_for_peft_type(read_peft_config(directory))
        if not method.capabilities.mergeable:
            raise CheckpointError(
                f"the HF PEFT adapter in {str(directory)!r} is {method.name!r}, which cannot be merged into the "
                "weights (its capabilities say so); serve it unmerged with peftkit or PEFT instead"
            )
        return
    spec = read_spec(directory)
    unknown = sorted(set(names or []) - set(spec.adapters))
    if unknown:
        raise CheckpointError(f"{str(directory)!r} holds adapters {sorted(spec.adapters)}, not {unknown}")
    weighted = weighted_adapters(spec.compose)
    for name, entries in spec.adapters.items():
        if names is not None and name not in names:
            continue
        if name in weighted:
            raise CheckpointError(
                f"adapter {name!r} in {str(directory)!r} is weighted by a composition rule (gate or average), which "
                "a merged weight cannot hold; choose the adapters to merge with names=, or serve it unmerged"
            )
        for config in entries:
            method = get_method(config.method)
            if not method.capabilities_for(config).mergeable:
                raise CheckpointError(
                    f"adapter {name!r} in {str(directory)!r} uses {method.name!r} on {config.target!r}, which cannot "
                    "be merged into the weights; leave it out with names=, or serve it unmerged"
                )


def export_merged(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    names: list[str] | None = None,
    untie: bool = False,
) -> Path:
    """Write ``base`` (a local transformers folder with weights) with ``adapter``'s adapters merged in, as a new
    plain transformers folder ``output`` that loads with ``from_pretrained`` and no peftkit installed.

    ``names``: which adapters of a peftkit folder to merge (default: all; the others are dropped). ``untie``: an
    adapter on a tied input embedding or LM head gives the model its own copy of that weight (the written config
    then no longer ties them); without it such an adapter is refused. ``output`` must not exist yet: the folder is
    built beside it and renamed into place, so a failure leaves no half-written folder."""
    from peftkit.lifecycle.attach import detach, merge_and_detach
    from peftkit.lifecycle.state import get_state, require_state
    from peftkit.zoo import load_model

    base, adapter, output = Path(base), Path(adapter), Path(output)
    if output.exists():
        raise CheckpointError(f"{str(output)!r} exists; give a new folder for the merged model")
    refuse_unmergeable(adapter, names)
    model = load_model(str(base), pretrained=True)
    load_adapter(model, adapter)
    chosen = names if names is not None else sorted({a.adapter_name for a in require_state(model).attached})
    merge_and_detach(model, chosen, untie=untie)
    if get_state(model) is not None:  # adapters left out by names=: dropped, not merged
        detach(model)
    leftover = [key for key in model.state_dict() if ADAPTER_CONTAINER in key.split(".")]
    if leftover:  # cannot happen after detach; a plain folder must never carry adapter tensors
        raise CheckpointError(f"the merged model still holds adapter tensors ({leftover[:3]}); nothing was written")
    output.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(building, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, building / name)
        os.rename(building, output)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return output
