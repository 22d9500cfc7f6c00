"""Read and write HF PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

The core knows only the files and the common fields; each method maps its own layout. ``from_peft`` reads
``peft_type`` from the config, finds the registered method whose class declares that ``peft_type``, and asks it
for spec entries and tensors under peftkit's state-dict keys (``Method.from_peft``); it then attaches those entries
and fills them, checking every key and shape first, all or nothing. ``to_peft`` asks the method of one named
adapter for a PEFT config and tensors under PEFT's keys (``Method.to_peft``) and writes them.

Both files are untrusted input: the config is JSON only, under a size cap, and must be an object; the weights are
read from safetensors only (a folder with only a pickled ``adapter_model.bin`` is refused). A PEFT feature that a
method cannot represent is a :class:`~peftkit.errors.CheckpointError` that names it, never a partial load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftkit.atomic import write_files_together
from peftkit.errors import CheckpointError, PeftkitError
from peftkit.io import _saved_parameters, check_fits, fill, read_json_object
from peftkit.keys import ADAPTER_CONTAINER
from peftkit.lifecycle.attach import AttachedAdapter, attach, detach, get_state, require_state
from peftkit.method import Method
from peftkit.regex import compile_fullmatch
from peftkit.registry import get_method, known_methods
from peftkit.spec import Spec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
MODEL_PREFIX = "base_model.model."  # PEFT's wrappers put every base-model key under this


# -- helpers the methods use to map keys and refuse features ---------------------------------------------------------
def peft_key(path: str, suffix: str) -> str:
    """PEFT's key for a tensor of the adapter on module ``path``: ``base_model.model.<path>.<suffix>``."""
    return f"{MODEL_PREFIX}{path}.{suffix}"


def peftkit_key(path: str, adapter_name: str, parameter: str) -> str:
    """peftkit's state-dict key: ``<path>.peftkit_adapters.<adapter_name>.<parameter>``."""
    return f"{path}.{ADAPTER_CONTAINER}.{adapter_name}.{parameter}"


def split_peft_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """``base_model.model.<path>.<suffix>`` -> (path, suffix); any other key is refused, naming it."""
    for suffix in suffixes:
        if key.startswith(MODEL_PREFIX) and key.endswith("." + suffix):
            return key[len(MODEL_PREFIX) : -len(suffix) - 1], suffix
    raise CheckpointError(
        f"unexpected tensor {key!r} in the PEFT checkpoint: expected '{MODEL_PREFIX}<module>.<one of {list(suffixes)}>'"
        "; it belongs to a PEFT feature peftkit does not read"
    )


def refuse_features(peft_config: Mapping[str, Any], supported: Mapping[str, Any]) -> None:
    """Refuse every field of ``supported`` whose value in the config is set and differs from the one given.

    ``supported`` maps a PEFT field to the only value peftkit can represent (None, False, "none", {}...); a field
    the config does not hold is fine (older PEFT versions)."""
    for name, allowed in supported.items():
        value = peft_config.get(name, allowed)
        empty = value in (None, False, "none", {}, []) and allowed in (None, False, "none", {}, [])
        if value != allowed and not empty:
            raise CheckpointError(
                f"the PEFT checkpoint uses {name}={value!r}, which peftkit cannot represent (it supports only "
                f"{name}={allowed!r}); nothing was loaded"
            )


_FIELD_KINDS: dict[str, tuple[str, Any]] = {
    "count": ("a whole number of at least 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "number": (
        "a finite number",
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    ),
    "flag": ("true or false", lambda v: isinstance(v, bool)),
}


def pattern_value(patterns: object, path: str, default: Any) -> Any:
    """The value a PEFT pattern table (``rank_pattern``, ``alpha_pattern``) gives module ``path``, else ``default``.

    PEFT's rule: the pattern matches the whole path or a dotted suffix of it. The patterns come from a shared file,
    so they run on the linear-time engine; a bad one is a CheckpointError."""
    if not isinstance(patterns, dict):
        raise CheckpointError(f"a PEFT pattern table must be a mapping, got {type(patterns).__name__}")
    for pattern, value in patterns.items():
        if not isinstance(pattern, str):
            raise CheckpointError(f"a PEFT pattern must be a string, got {pattern!r}")
        try:
            matches = compile_fullmatch(rf"(?:.*\.)?(?:{pattern})", "PEFT pattern")
        except (ValueError, TypeError) as error:
            raise CheckpointError(str(error)) from None
        if matches(path):
            return value
    return default


def rank_and_alpha(peft_config: Mapping[str, Any], path: str, alpha_field: str) -> tuple[int, float]:
    """Module ``path``'s rank and alpha in a PEFT config: ``r`` and ``alpha_field`` unless ``rank_pattern`` or
    ``alpha_pattern`` name the module, each checked for its kind."""
    rank = pattern_value(peft_config.get("rank_pattern") or {}, path, peft_field(peft_config, "r", "count", 8))
    alpha = pattern_value(
        peft_config.get("alpha_pattern") or {}, path, peft_field(peft_config, alpha_field, "number", 8)
    )
    return peft_value("a rank_pattern value", rank, "count"), float(
        peft_value("an alpha_pattern value", alpha, "number")
    )


def rank_and_alpha_fields(ranks: Mapping[str, int], alphas: Mapping[str, float], alpha_field: str) -> dict[str, Any]:
    """A PEFT config's ``r``, ``alpha_field``, ``rank_pattern`` and ``alpha_pattern`` for per-module ranks and alphas:
    the most common value of each, and the modules that differ from it by their full path."""
    from collections import Counter

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        alpha_field: alpha,
        "rank_pattern": {path: r for path, r in ranks.items() if r != rank},
        "alpha_pattern": {path: a for path, a in alphas.items() if a != alpha},
    }


def refuse_unless_linear_hosts(attached: list, method: str) -> None:
    """Refuse an export whose adapters sit on anything but ``nn.Linear`` (PEFT's LyCORIS-family checkpoints have no
    form for GPT-2's Conv1D or for embeddings), naming the first such host."""
    for adapter in attached:
        host = adapter.module.site.module
        if type(adapter.module.site).__name__ != "LinearSite" or not isinstance(host, nn.Linear):
            raise CheckpointError(
                f"{method} on {adapter.path!r} ({type(host).__name__}) is not exported: PEFT's {method} checkpoints "
                "hold nn.Linear hosts here (its Conv1D and embedding hosts have no PEFT form); save it with "
                "peftkit.save instead"
            )


def peft_field(peft_config: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """The config's ``name`` (or ``default`` when absent or null), refused unless it is of ``kind``:
    ``count`` (a whole number >= 1), ``number`` (finite) or ``flag`` (a boolean). adapter_config.json is untrusted
    input, and a value of the wrong type would otherwise surface as a false message far from its cause."""
    value = peft_config.get(name)
    return peft_value(name, default if value is None else value, kind)


def peft_value(name: str, value: Any, kind: str) -> Any:
    """``value`` (read from the config's ``name``, or one of its pattern tables) if it is of ``kind``."""
    description, fits = _FIELD_KINDS[kind]
    if not fits(value):
        raise CheckpointError(
            f"{CONFIG_FILE}: {name} must be {description}, got {value!r} ({type(value).__name__}); fix the file"
        )
    return value


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The dotted path of ``module`` inside ``model``."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise CheckpointError(f"{type(module).__name__} is not a submodule of this model")


# -- the core ---------------------------------------------------------------------------------------------------------
def read_peft_config(directory: str | Path) -> dict[str, Any]:
    holds = f"a PEFT checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
    return read_json_object(Path(directory) / CONFIG_FILE, MAX_CONFIG_BYTES, holds)


def declared_peft_type(method: type[Method]) -> str | None:
    """The ``peft_type`` ``method`` declares in its own class body. A variant (a subclass under another name)
    inherits its parent's code but not its claim to the format: its adapters may compute something else."""
    return vars(method).get("peft_type")


def method_for_peft_type(peft_config: Mapping[str, Any]) -> type[Method]:
    """The registered method that declares the config's ``peft_type`` (see :func:`declared_peft_type`) and reads
    this config (``Method.reads_peft``: two methods may share a PEFT type and split on one of its fields). When the methods of
    that type all decline, the first is returned, so that its ``from_peft`` says which field it cannot represent."""
    peft_type = peft_config.get("peft_type")
    if not isinstance(peft_type, str):
        raise CheckpointError(f"{CONFIG_FILE}: peft_type must be a string (the PEFT method's name), got {peft_type!r}")
    declaring: dict[str, list[type[Method]]] = {}
    for name in known_methods():
        method = get_method(name)
        claimed = declared_peft_type(method)
        if claimed is not None:
            declaring.setdefault(claimed, []).append(method)
    if peft_type not in declaring:
        raise CheckpointError(
            f"PEFT checkpoint of peft_type {peft_type!r}: no registered method reads it; supported: {sorted(declaring)}"
        )
    readers = [method for method in declaring[peft_type] if method.reads_peft(peft_config)]
    if len(readers) > 1:
        names = ", ".join(repr(method.name) for method in readers)
        raise CheckpointError(f"methods {names} all read this {peft_type} checkpoint; unregister all but one")
    return readers[0] if readers else declaring[peft_type][0]


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickled = " (only adapter_model.bin is there: pickle files are not read; convert it to safetensors)"
        raise CheckpointError(f"{str(path)!r} not found{pickled if (directory / 'adapter_model.bin').exists() else ''}")
    try:
        with safe_open(str(path), framework="pt") as stream:
            return {key: stream.get_tensor(key) for key in stream.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


def _without_unchanged_base_copies(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT may save a copy of a targeted base layer (``save_embedding_layers``: ``<path>.base_layer.weight``).
    A copy equal to the model's own weight is dropped; a different one (a resized or retrained vocabulary) would
    change the base model, which from_peft does not do, so it is refused."""
    own = model.state_dict()
    kept = {}
    for key, tensor in tensors.items():
        if ".base_layer." not in key or not key.startswith(MODEL_PREFIX):
            kept[key] = tensor
            continue
        name = key[len(MODEL_PREFIX) :].replace(".base_layer.", ".")
        if name not in own:  # not a copy of a base weight: an adapter tensor of a nested wrapper (target_parameters)
            kept[key] = tensor
            continue
        if own[name].shape != tensor.shape or not torch.equal(own[name], tensor.to(own[name].dtype)):
            raise CheckpointError(
                f"the PEFT checkpoint carries base weights {key!r} (save_embedding_layers) that differ from this "
                "model's; from_peft does not change the base model. Load them into the base model first."
            )
    return kept


def _common_refusals(peft_config: Mapping[str, Any]) -> None:
    """Fields of every PEFT config that change what the checkpoint holds, whatever the method."""
    if peft_config.get("modules_to_save"):
        raise CheckpointError(
            f"the PEFT checkpoint uses modules_to_save={peft_config['modules_to_save']!r} (whole base modules trained "
            "and saved with the adapter), which from_peft does not map; nothing was loaded"
        )


def from_peft(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Attach a HF PEFT checkpoint's adapter to ``model`` as ``adapter_name`` and fill it from the checkpoint.

    All or nothing: an unsupported feature, a missing or unexpected key or a shape mismatch is a
    :class:`~peftkit.errors.CheckpointError` and the model is left as it was."""
    directory = Path(directory)
    peft_config = read_peft_config(directory)
    method = method_for_peft_type(peft_config)
    _common_refusals(peft_config)
    tensors = _without_unchanged_base_copies(_read_tensors(directory), model)
    try:
        entries, state_dict = method.from_peft(peft_config, tensors, model, adapter_name)
        spec = Spec.model_validate({"adapters": {adapter_name: entries}})
    except CheckpointError:
        raise
    except (PeftkitError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"PEFT checkpoint {str(directory)!r} cannot be mapped onto peftkit: {error}") from None
    existing = get_state(model)
    if existing is not None and adapter_name in {a.adapter_name for a in existing.attached}:
        raise CheckpointError(f"an adapter named {adapter_name!r} is already attached; pick another adapter_name")
    try:
        attach(model, spec)
    except PeftkitError as error:
        raise CheckpointError(f"PEFT checkpoint {str(directory)!r} does not fit this model: {error}") from None
    try:
        expected = _saved_parameters(model, {adapter_name})
        shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
        check_fits(expected, shapes, f"PEFT checkpoint {str(directory)!r}")
        fill(expected, state_dict.__getitem__)
    except BaseException:
        detach(model, [adapter_name])
        raise
    return model


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name (PEFT picks its wrapper by it)."""
    name = type(model).__name__
    for ending, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(ending):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


def to_peft(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write the attached adapter ``adapter_name`` as a HF PEFT checkpoint (``PeftModel.from_pretrained`` loads it).

    Refused, before anything is written, when the adapter mixes methods (a PEFT adapter has one ``peft_type``),
    when its method has no PEFT format, or when the spec trains whole base modules (``trainable``)."""
    state = require_state(model)
    attached: list[AttachedAdapter] = state.adapters([adapter_name])
    methods = sorted({a.method.name for a in attached})
    if len(methods) > 1:
        raise CheckpointError(f"adapter {adapter_name!r} mixes methods {methods}; a PEFT checkpoint holds one method")
    method = attached[0].method
    peft_type = declared_peft_type(method)
    if peft_type is None:
        raise CheckpointError(f"method {method.name!r} has no HF PEFT format (its class declares no peft_type)")
    if state.spec.trainable:
        raise CheckpointError(
            f"the spec trains whole base modules {state.spec.trainable}; to_peft does not write them (modules_to_save)"
        )
    peft_config, tensors = method.to_peft(attached, model)
    config = {
        "peft_type": peft_type,
        "task_type": peft_task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        **peft_config,
    }
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise CheckpointError(f"{key} is on the meta device; materialise the model before exporting")
    cpu = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    directory = Path(directory)
    write_files_together(
        directory,
        {
            WEIGHTS_FILE: lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}),
            CONFIG_FILE: lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
        },
    )
    return directory
