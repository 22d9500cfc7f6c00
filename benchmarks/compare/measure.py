"""Measurements that do not depend on the arm: memory, exact state bytes, inference latency.

Machines are noisy, so latency variants are run round-robin in one process (base, unmerged, merged, base,
…) and each is summarised by its median; anything compared across arms is reported as a ratio to the
full fine-tuning arm of the same run.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftkit.lifecycle.attach import stored_values


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def busy_cpus(interval: float = 0.5) -> float | None:
    """How many CPUs' worth of work other processes are doing now (Linux ``/proc/stat``), else None."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total_0, idle_0 = sample()
    time.sleep(interval)
    total_1, idle_1 = sample()
    elapsed = total_1 - total_0
    return None if elapsed <= 0 else (os.cpu_count() or 1) * (1 - (idle_1 - idle_0) / elapsed)


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    unique = []
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            unique.append(parameter)
    return unique


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(p) for p in unique_parameters(model))


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients that exist right now (call after backward, before zero_grad)."""
    return sum(tensor_bytes(p.grad) for p in unique_parameters(model) if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: two moments per parameter, plus steps)."""
    return sum(
        tensor_bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


class SavedActivations:
    """Counts the bytes autograd keeps for the backward during the steps run inside it.

    These are the activations a frozen base still has to keep (the backward of a frozen layer needs its
    input gradient, and some layers need their inputs for that): with parameter, gradient and optimizer
    bytes they make the exact floor under the training peak, which RSS (an allocator's high-water mark)
    only bounds from above. Each storage is counted once, and the model's own parameters and buffers,
    which autograd saves by reference, not at all.
    """

    def __init__(self, model: nn.Module) -> None:
        self.owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.owned and storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    parameters = unique_parameters(model)
    return sum(stored_values(p) for p in parameters if p.requires_grad), sum(stored_values(p) for p in parameters)


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def round_robin_latency(
    variants: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each variant, calling them in turn so that drift hits all alike."""
    for _ in range(warmup):
        for call in variants.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in times.items()}


def paired_ratios(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-pair ratios: each pair ran back to back, so slow spells cancel out."""
    return median([n / d for n, d in zip(numerator, denominator)])
