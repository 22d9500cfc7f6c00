"""``peftkit train``: fine-tune a causal LM with a spec's adapters, checkpointing so that no crash loses the run.

Everything that can be wrong with the inputs (config, data files, model, spec) is checked before the first step,
and nothing in the output folder is overwritten until a step has been trained. Batches are a pure function of the
seed and the step (a fresh permutation of the data per epoch), so the data position is just the step; together
with the optimiser, scheduler and RNG states in each checkpoint, a resumed run computes exactly what the
uninterrupted run would have.

Under ``torchrun`` or ``accelerate launch`` the same function runs on every process, each on its share of the
global batch (:mod:`peftkit.training.distributed` holds the collective parts).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftkit.training.checkpoints as checkpoints
import peftkit.training.distributed as distributed
from peftkit.errors import CheckpointError, PeftkitError
from peftkit.io import SPEC_FILE, _saved_parameters, restore_adapter_weights, save
from peftkit.lifecycle.attach import attach
from peftkit.lifecycle.optimizer import parameter_groups
from peftkit.lifecycle.precision import merge_error
from peftkit.lifecycle.schedule import acts_between_steps, after_optimizer_step, check_schedule, regularization
from peftkit.quantization import enable_gradient_checkpointing, prepare_for_kbit_training
from peftkit.training.config import TrainConfig
from peftkit.training.distributed import Runtime
from peftkit.training.offload import offloaded_activations
from peftkit.untrusted import parse_json

IGNORE_INDEX = -100


def _read_texts(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise PeftkitError(f"data file {str(path)!r} not found; give data.train as a .txt or .jsonl file")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise PeftkitError(f"data file {str(path)!r} is not UTF-8 text: {error}") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, start=1):
            record = parse_json(line, PeftkitError, f"{str(path)!r} line {number}")
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PeftkitError(f"{str(path)!r} line {number}: must be a JSON object with a string {field!r} field")
            texts.append(text)
    else:
        texts = lines
    if not texts:
        raise PeftkitError(f"data file {str(path)!r} holds no examples")
    return texts


class Tokens:
    """Text -> ids: a local tokenizer folder, or UTF-8 bytes modulo the vocabulary (for models built from configs)."""

    def __init__(self, tokenizer: str | None, vocab_size: int, max_length: int) -> None:
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            if not Path(tokenizer).is_dir():
                raise PeftkitError(f"tokenizer {tokenizer!r} is not a folder; give a local tokenizer folder (no hub)")
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise PeftkitError(f"tokenizer folder {tokenizer!r} could not be loaded: {error}") from None

    def __call__(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            ids = [1 + byte % (self.vocab_size - 1) for byte in text.encode("utf-8")]  # 0 stays the padding id
        return ids[: self.max_length]


def _batch(examples: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example)
        mask[row, : len(example)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def batch_at(dataset: list[list[int]], step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The batch of ``step``: position ``step * batch_size`` in an endless sequence of per-epoch permutations."""
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(indices), len(dataset) - offset)
        indices.extend(order[offset : offset + take].tolist())
        position += take
    return _batch([dataset[i] for i in indices])


def _schedule(config: TrainConfig):
    warmup, total, kind = config.schedule.warmup_steps, config.steps, config.schedule.kind

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """The base model, quantised and prepared for k-bit training when the config says so (QLoRA)."""
    from peftkit.zoo import load_model

    quantization = config.model.quantization
    model = load_model(config.model.name, pretrained=config.model.pretrained, quantization=quantization, device=device)
    if quantization is not None:
        return prepare_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _refuse_models_without_a_language_model_head(model: nn.Module, name: str) -> None:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        raise PeftkitError(
            f"peftkit train fine-tunes a causal language model, and {name!r} builds a {type(model).__name__}, which "
            "has no language-model head (get_output_embeddings() is None); use a causal LM such as llama-tiny or "
            "gpt2-tiny, or a folder whose config.json names a ...ForCausalLM architecture"
        )


def _refuse_an_output_that_is_a_file(output: Path) -> None:
    for folder in (output, *output.parents):
        if folder.exists():
            if not folder.is_dir():
                raise PeftkitError(f"output {str(output)!r} cannot be a folder: {str(folder)!r} is a file")
            return


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    final_loss: float
    eval_loss: float | None
    adapters: Path
    # what merging the adapters into this base would lose to its dtype (largest |merged - exact|); None where the
    # adapters cannot be merged or the base is sharded across processes
    merge_error: float | None = None


def _resume_checkpoint(output: Path, model: nn.Module, steps: int) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest checkpoint's state, with its adapter weights already in ``model`` (before any sharding, so FSDP2
    shards the resumed values); anything damaged or written for another spec stops the run before it trains."""
    folder = checkpoints.latest(output)
    if folder is None:
        return None, None
    try:
        state = checkpoints.read_state(folder, steps)
        restore_adapter_weights(model, folder)
    except Exception as error:  # any damage: say which file and stop before training over it
        raise CheckpointError(
            f"checkpoint {str(folder)!r} cannot be resumed: {error}; remove it or choose another output"
        ) from None
    return state, folder


def train(config: TrainConfig, config_dir: Path = Path("."), *, progress: bool = True, log=print) -> TrainResult:
    """Train as the config says, resuming from the output folder's checkpoint when there is one.

    Launched as N processes (``WORLD_SIZE > 1``), each rank trains on its share of every global batch under
    DDP or FSDP2 (``config.distributed.strategy``); rank 0 alone logs and writes.
    """
    with distributed.session() as runtime:
        return _train(config, config_dir, runtime, progress=progress, log=log if runtime.is_main else _quiet)


def _quiet(*_: Any) -> None:
    pass


def _train(config: TrainConfig, config_dir: Path, runtime: Runtime, *, progress: bool, log) -> TrainResult:
    output = Path(config.output)
    output = output if output.is_absolute() else config_dir / output
    spec = config.resolved_spec(config_dir)
    _refuse_an_output_that_is_a_file(output)
    if config.batch_size < runtime.world_size:
        raise PeftkitError(
            f"batch_size {config.batch_size} is the global batch and cannot be split over {runtime.world_size} "
            f"processes; make it at least {runtime.world_size}"
        )
    texts = _read_texts(config_dir / config.data.train, config.data.text_field)  # an absolute path stays as it is
    eval_texts = (
        None if config.data.eval is None else _read_texts(config_dir / config.data.eval, config.data.text_field)
    )

    torch.manual_seed(config.seed)  # the same on every rank: every rank builds the same base and adapters
    random.seed(config.seed)
    check_schedule(spec, config.steps)  # a method's schedule that does not fit the run, before the model is built
    if runtime.distributed and config.distributed.strategy == "fsdp2" and (acting := acts_between_steps(spec)):
        raise PeftkitError(
            f"{acting} act on whole adapter tensors between optimizer steps, which FSDP2 shards across processes; "
            "train them with strategy: ddp (or on one process)"
        )
    if config.offload_activations and runtime.device.type != "cuda":
        raise PeftkitError(
            f"offload_activations moves the tensors autograd saves from the GPU to host memory; this run computes on "
            f"{runtime.device.type}, where they already are. Remove offload_activations (gradient_checkpointing "
            "is what saves memory on a CPU)"
        )
    model = _build_model(config, runtime.device)
    _refuse_models_without_a_language_model_head(model, config.model.name)
    attach(model, spec)  # a spec that does not fit the model fails here, before anything is written
    if config.precision == "bf16":  # AdamW on float32 adapters over a bf16 base: autocast mixes the two
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
                parameter.data = parameter.data.float()
    tokens = Tokens(config.data.tokenizer, model.config.vocab_size, config.data.max_length)
    dataset = [tokens(t) for t in texts]

    if runtime.distributed:  # dropout masks differ per rank, as they would across the rows of one batch
        torch.manual_seed(config.seed + 1_000_003 * runtime.rank)
        random.seed(config.seed + 1_000_003 * runtime.rank)
    start = 0
    state, folder = _resume_checkpoint(output, model, config.steps)
    net = distributed.wrap(model, config.distributed.strategy, runtime)
    # after wrap (FSDP2 swaps DTensors into the model's own modules): each method's learning-rate and decay choices
    groups = parameter_groups(model, config.optimizer.lr, config.optimizer.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.optimizer.lr, betas=config.optimizer.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    if state is not None:
        start = _restore_state(state, folder, net, optimizer, scheduler, runtime, log)

    autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    saved_on = (  # each step's own context: the hooks are pushed and popped around the forward
        functools.partial(offloaded_activations, net) if config.offload_activations else contextlib.nullcontext
    )
    net.train()
    bar = None
    if progress and runtime.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")
    loss_value, began, seen_tokens = float("nan"), time.perf_counter(), 0
    eval_set = [tokens(t) for t in eval_texts] if eval_texts else None
    for step in range(start, config.steps):
        batch = batch_at(dataset, step, config.batch_size, config.seed)
        # Every rank builds the same global batch, so its target count needs no all-reduce. Each rank's loss is
        # its targets' summed loss over the global count, times world_size because DDP and FSDP2 average
        # gradients over ranks: N processes then take the step one process takes on the whole batch.
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        local = {k: v.to(runtime.device) for k, v in distributed.local_rows(batch, runtime).items()}
        with autocast, saved_on():
            loss = net(**local, num_items_in_batch=targets.to(runtime.device)).loss * runtime.world_size
            loss = loss + regularization(model)  # the methods' own loss terms (AdaLoRA's orthogonality)
        loss.backward()
        if config.optimizer.grad_clip:
            distributed.clip_grad_norm_(parameters, config.optimizer.grad_clip)
        optimizer.step()
        after_optimizer_step(model, step, config.steps)  # e.g. AdaLoRA's rank allocation, while grads exist
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = distributed.all_reduce_sum(loss.detach(), runtime).item() / runtime.world_size
        seen_tokens += int(batch["attention_mask"].sum())
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if done % config.log_every == 0 or done == config.steps:
            rate = seen_tokens / max(1e-9, time.perf_counter() - began)
            log(
                json.dumps(
                    {
                        "step": done,
                        "loss": round(loss_value, 6),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": round(rate, 1),
                    }
                )
            )
        if eval_set and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            log(json.dumps({"step": done, "eval_loss": round(_evaluate(model, eval_set, config, runtime), 6)}))
        if done % config.checkpoint_every == 0 and done < config.steps:
            _checkpoint(output, model, net, optimizer, scheduler, done, runtime)
    if bar is not None:
        bar.close()
    eval_loss = _evaluate(model, eval_set, config, runtime) if eval_set else None
    if eval_loss is not None:
        log(json.dumps({"eval_loss": round(eval_loss, 6)}))
    tensors = _checkpoint(output, model, net, optimizer, scheduler, config.steps, runtime)
    distributed.on_main(runtime, lambda: save(model, output / "adapters", tensors=tensors))
    error = _merge_error(model, runtime)
    if error is not None:
        quantization = config.model.quantization
        base = str(next(model.parameters()).dtype) if quantization is None else quantization.describe()
        log(json.dumps({"merge_error_max_abs": error, "base_dtype": base}))
    return TrainResult(config.steps, start, loss_value, eval_loss, output / "adapters", error)


def _merge_error(model: nn.Module, runtime: Runtime) -> float | None:
    """The largest error a later merge would leave in the base weights (bf16 bases round), when one is possible."""
    if runtime.distributed:
        return None
    try:
        errors = merge_error(model)
    except PeftkitError:  # adapter layers, prefixes, prompts: nothing to merge
        return None
    return max(errors.values(), default=0.0)


def _restore_state(state: dict[str, Any], folder, net: nn.Module, optimizer, scheduler, runtime, log) -> int:
    """Put a checked checkpoint's optimiser, scheduler and RNG state in place; returns the step to resume at."""
    try:
        distributed.load_optimizer_state(net, optimizer, state["optimizer"], runtime)
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == runtime.world_size:
            _set_rng_state(state["rng"][runtime.rank])
        else:
            log(f"checkpoint written by {len(state['rng'])} processes: dropout RNG streams start afresh")
    except Exception as error:  # a state that parsed but does not fit this run: name the file, train nothing
        raise CheckpointError(
            f"checkpoint {str(folder)!r} cannot be resumed: its training state does not fit this run "
            f"({type(error).__name__}: {error}); remove it or choose another output"
        ) from None
    log(f"resuming from {folder} at step {state['step']}")
    return state["step"]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _checkpoint(
    output: Path, model: nn.Module, net: nn.Module, optimizer, scheduler, step: int, runtime
) -> dict[str, torch.Tensor]:
    """Gather on every rank (collectives), write on rank 0, and return on every rank once the write is done, with
    the gathered adapter tensors."""
    tensors = distributed.full_tensors(_saved_parameters(model))
    state = {
        "step": step,
        "optimizer": distributed.optimizer_state(net, optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": distributed.gather_objects(_rng_state(), runtime),  # one per rank, restored when N matches
    }
    distributed.on_main(
        runtime,
        lambda: checkpoints.write(output, lambda folder: save(model, folder, tensors=tensors, portable=False), state),
    )
    return tensors


@torch.no_grad()
def _evaluate(model: nn.Module, dataset: list[list[int]], config: TrainConfig, runtime: Runtime) -> float:
    """The mean token loss over the eval set; every rank evaluates all of it (FSDP2 needs every rank's forward)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), config.batch_size):
        batch = {k: v.to(runtime.device) for k, v in _batch(dataset[start : start + config.batch_size]).items()}
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += model(**batch).loss.item() * tokens
        count += tokens
    model.train()
    return total / max(1, count)


__all__ = ["SPEC_FILE", "TrainResult", "batch_at", "train"]
