"""The training loop and the evaluation, identical for every arm.

AdamW with linear warmup and linear decay; the classifier head (parameters the checkpoint lacked) may get
its own learning rate. Each step is timed on its own (with a device sync on CUDA) so that the step-time
median is not blurred by evaluation or checkpointing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

import peftkit
from peftkit import parameter_groups
from peftkit.lifecycle.attach import get_state


@dataclass
class StepLog:
    """Per-step wall times (seconds) and real (non-pad) token counts, in step order."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def is_head_parameter(name: str, head: set[str]) -> bool:
    """Whether ``name`` is one of the head's parameters, also under PEFT's renaming.

    PEFT prefixes ``base_model.model.`` and trains a copy named ``….modules_to_save.default.…``.
    """
    name = name.replace("modules_to_save.default.", "")
    return any(name == h or name.endswith("." + h) for h in head)


def make_optimizer(
    model: nn.Module, lr: float, head_lr: float | None, weight_decay: float, head: set[str]
) -> torch.optim.AdamW:
    """AdamW (the fused kernel where the device has one) over the parameters that require grad, with the new
    head in its own group; a peftkit model's adapters in the groups their methods ask for (peftkit.parameter_groups:
    LoRA+'s B learning rate, no decay on DoRA's magnitude)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_ids = {id(p) for n, p in named if is_head_parameter(n, head)}
    if get_state(model) is not None:
        body = [
            {**group, "params": [p for p in group["params"] if id(p) not in head_ids]}
            for group in parameter_groups(model, lr, weight_decay)
        ]
    else:
        body = [{"params": [p for _, p in named if id(p) not in head_ids], "lr": lr}]
    groups = [*body, {"params": [p for _, p in named if id(p) in head_ids], "lr": head_lr or lr}]
    params = [p for _, p in named]
    # The fused kernel is what HF Trainer uses by default (torch >= 2.8): full fine-tuning, whose optimizer
    # step walks every weight, is measured at its fastest, not handicapped by the per-tensor loop.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay, fused=fused)


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float):
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast (weights and optimizer stay fp32) or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    dtype: torch.dtype | None,
    after_backward: Callable[[], None] | None = None,
    position: tuple[int, int] = (0, 1),
) -> tuple[float, float]:
    """One optimisation step, step ``position[0]`` of ``position[1]`` (for the methods that act between steps);
    returns (seconds, loss). The methods' loss terms and actions are in the time: they are part of their cost."""
    sync(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        loss = model(**batch).loss + peftkit.regularization(model)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    peftkit.after_optimizer_step(model, *position)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, loss.item()


def train(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    dtype: torch.dtype | None,
    on_step: Callable[[int], None] = lambda step: None,
    after_first_backward: Callable[[], None] | None = None,
    first_step_context: contextlib.AbstractContextManager | None = None,
    total_steps: int = 1,
) -> StepLog:
    """``first_step_context`` wraps the first step only (its time is not in the medians): a measurement.
    ``total_steps``: how many steps ``batches`` holds, for the methods whose schedule follows the run."""
    model.train()
    log = StepLog()
    for step, batch in enumerate(batches):
        tokens = int(batch["attention_mask"].sum())
        hook = after_first_backward if step == 0 else None
        context = first_step_context if step == 0 and first_step_context is not None else contextlib.nullcontext()
        with context:
            seconds, loss = train_step(
                model, to_device(batch, device), optimizer, scheduler, device, dtype, hook, (step, total_steps)
            )
        log.seconds.append(seconds)
        log.tokens.append(tokens)
        log.losses.append(loss)
        on_step(step + 1)
    return log


@torch.inference_mode()
def predict(
    model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype | None
) -> tuple[list[int], list[int]]:
    """(predictions, labels) in batch order."""
    model.eval()
    predictions, labels = [], []
    for batch in batches:
        batch = to_device(batch, device)
        gold = batch.pop("labels")
        with autocast(device, dtype):
            logits = model(**batch).logits
        predictions += logits.argmax(-1).tolist()
        labels += gold.tolist()
    return predictions, labels


@torch.inference_mode()
def generate_texts(
    model: nn.Module, batches, tokenizer, max_new_tokens: int, device: torch.device
) -> tuple[list[str], list[int]]:
    """Greedy continuations of each batch of prompts, decoded, and the row index of each."""
    model.eval()
    written, rows = [], []
    for batch, indices in batches:
        batch = to_device(batch, device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        written += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        rows += indices
    return written, rows


@torch.inference_mode()
def completion_loss(
    model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype | None
) -> float:
    """Mean negative log-likelihood per completion token (the labels that are not ignored), over every batch."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with autocast(device, dtype):
            logits = model(**batch).logits
        shifted = labels[:, 1:]  # the token each position predicts
        total += nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum"
        ).item()
        tokens += int((shifted != -100).sum())
    return total / max(tokens, 1)


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == g for p, g in zip(predictions, labels)) / len(labels)
