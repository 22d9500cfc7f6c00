"""What unmerged LoRA costs at inference, and what it saves in training, on small GPT-2 and Llama models (CPU).

LoRA (r=8) goes on every linear layer of the blocks: GPT-2's Conv1D layers (``c_attn``, ``c_proj``, ``c_fc``) and
Llama's seven projections (not ``lm_head``). Every number is a ratio to the base model or to full fine-tuning, which
is what the targets are about:

- inference forward latency, unmerged LoRA / base and merged LoRA / base, at (batch 1, seq 128) and (batch 8, seq
  128); target <= 1.06 for unmerged;
- training step time (AdamW: forward, backward, step), LoRA / full fine-tuning; target <= 0.80;
- training peak memory, LoRA / full fine-tuning; target <= 0.70. Peak RSS is measured in a forked process per
  variant (the kernel's high-water mark is reset after the model is built, via /proc/self/clear_refs), and the exact
  bytes of parameters + gradients + AdamW state are counted beside it.

CPUs are shared and noisy, so variants run round-robin in one process (base, LoRA, merged, base, ...), each ratio
is the median of the per-round ratios, and times are the process's CPU time (waiting for a core does not count);
wall-clock ratios are reported beside them.

    python benchmarks/lora_overhead.py [--models gpt2 llama] [--layers 4] [--hidden 768] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.common import environment, run_and_report
from torch import nn

import peftkit

TARGETS = {"inference_lora_over_base": 1.06, "train_step_lora_over_full": 0.80, "train_memory_lora_over_full": 0.70}
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


# --- models and variants -------------------------------------------------------------------------------------------


def build_model(family: str, args: argparse.Namespace) -> nn.Module:
    """A randomly initialised small model; the seed makes every process build the same weights."""
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=args.layers,
            n_embd=args.hidden,
            n_head=heads,
            vocab_size=args.vocab,
            n_positions=args.seq,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=(args.hidden * 8 // 3 + 255) // 256 * 256,  # Llama's ~8/3 ratio: 768 -> 2048
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=args.vocab,
            max_position_embeddings=args.seq,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown model family {family!r}; choose from {sorted(LORA_TARGETS)}")


def lora_spec(family: str, rank: int) -> dict[str, Any]:
    entry = {"method": "lora", "target": LORA_TARGETS[family], "r": rank, "alpha": 2 * rank}
    return {"adapters": {"default": [entry]}}


def attach_lora(model: nn.Module, family: str, rank: int) -> nn.Module:
    """Attach LoRA in place, with B drawn at random so the update is non-zero, as after some training.

    Seeded, so two calls on copies of one base give the same adapters (the merged model must match the unmerged).
    """
    torch.manual_seed(1)
    peftkit.attach(model, lora_spec(family, rank))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model


def inference_variants(base: nn.Module, family: str, rank: int) -> dict[str, nn.Module]:
    """Base, unmerged LoRA and merged LoRA as three models (deep copies of one base), all in eval mode."""
    lora = attach_lora(copy.deepcopy(base), family, rank)
    merged = peftkit.merge(attach_lora(copy.deepcopy(base), family, rank))
    return {"base": base.eval(), "lora": lora.eval(), "merged": merged.eval()}


def training_variant(base: nn.Module, family: str, rank: int, variant: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Full fine-tuning (every parameter trains) or LoRA (only the adapters train), each with its own AdamW."""
    model = base if variant == "full" else attach_lora(base, family, rank)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-4)


def tokens(args: argparse.Namespace, batch: int) -> torch.Tensor:
    return torch.randint(0, args.vocab, (batch, args.seq), generator=torch.Generator().manual_seed(batch))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


# --- timing ------------------------------------------------------------------------------------------------------


def round_robin(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Seconds per call on two clocks, ``{"cpu": {name: [...]}, "wall": {name: [...]}}``, variants interleaved
    A B C A B C ... so that load from other processes hits all alike.

    The CPU clock (this process's CPU time) is the headline: on a shared machine it leaves out the time spent
    waiting for a core, which the wall clock counts; with one torch thread the two agree on a quiet machine. The
    cyclic garbage collector is off while timing, as in ``timeit``: a collection costs ~0.1 s with transformers
    imported and would land on whichever call triggered it. Tensors are freed by reference counting either way.
    """
    seconds: dict[str, dict[str, list[float]]] = {"cpu": {n: [] for n in calls}, "wall": {n: [] for n in calls}}
    gc.collect()
    gc.disable()
    try:
        for index in range(warmup + rounds):
            for name, call in calls.items():
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                if index >= warmup:
                    seconds["cpu"][name].append(time.process_time() - cpu)
                    seconds["wall"][name].append(time.perf_counter() - wall)
    finally:
        gc.enable()
    return seconds


def paired_ratio(seconds: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator/denominator: each ratio compares two runs made moments apart."""
    return statistics.median(a / b for a, b in zip(seconds[numerator], seconds[denominator]))


def summary(seconds: dict[str, dict[str, list[float]]], baseline: str, unit: float) -> dict[str, float]:
    """Median time of each variant on both clocks (in ``unit`` seconds) and its paired ratio to ``baseline``."""
    row = {}
    for name in seconds["cpu"]:
        suffix = "ms" if unit == 1e-3 else "s"
        row[f"{name}_{suffix}"] = statistics.median(seconds["cpu"][name]) / unit
        row[f"{name}_wall_{suffix}"] = statistics.median(seconds["wall"][name]) / unit
        if name != baseline:
            row[f"{name}_over_{baseline}"] = paired_ratio(seconds["cpu"], name, baseline)
            row[f"{name}_over_{baseline}_wall"] = paired_ratio(seconds["wall"], name, baseline)
    return row


def inference_latency(family: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    variants = inference_variants(build_model(family, args), family, args.rank)
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            ids = tokens(args, batch)
            outputs = {name: model(ids).logits for name, model in variants.items()}
            merge_error = (outputs["merged"] - outputs["lora"]).abs().max().item()
            calls = {name: (lambda m=model, i=ids: m(i)) for name, model in variants.items()}
            seconds = round_robin(calls, args.repeats)
            row = {"model": family, "batch": batch, "seq": args.seq, **summary(seconds, "base", 1e-3)}
            rows.append({**row, "merged_vs_unmerged_max_abs_diff": merge_error})
    return rows


def training_time(family: str, args: argparse.Namespace) -> dict[str, Any]:
    base = build_model(family, args)
    variants = {name: training_variant(copy.deepcopy(base), family, args.rank, name) for name in ("full", "lora")}
    del base
    ids = tokens(args, args.train_batch)
    calls = {name: (lambda mo=mo: train_step(*mo, ids)) for name, mo in variants.items()}
    seconds = round_robin(calls, args.train_repeats)
    return {"model": family, "batch": args.train_batch, "seq": args.seq, **summary(seconds, "full", 1.0)}


# --- memory, one fresh process per (model, variant) --------------------------------------------------------------


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_child(family: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh interpreter: RSS before the build, after it, and at the peak of a few training steps."""
    gc.collect()
    rss_start = status_kib("VmRSS") * 1024
    model, optimizer = training_variant(build_model(family, args), family, args.rank, variant)
    ids = tokens(args, args.train_batch)
    gc.collect()
    rss_built = status_kib("VmRSS") * 1024
    exact_peak = reset_peak_rss()
    for _ in range(args.memory_steps):
        train_step(model, optimizer, ids)
    peak = status_kib("VmHWM") * 1024
    parameters = list({id(p): p for p in model.parameters()}.values())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "model": family,
        "variant": variant,
        "peak_method": "VmHWM after clear_refs" if exact_peak else "VmHWM over the process lifetime",
        "rss_start_bytes": rss_start,
        "rss_after_build_bytes": rss_built,
        "rss_peak_bytes": peak,
        "peak_over_start_bytes": peak - rss_start,
        "peak_over_built_bytes": peak - rss_built,
        "parameter_bytes": tensor_bytes(parameters),
        "gradient_bytes": tensor_bytes([p.grad for p in parameters if p.grad is not None]),
        "optimizer_state_bytes": tensor_bytes(state),
    }


def warm_up(family: str, args: argparse.Namespace) -> None:
    """One training step of each variant on a tiny model, so the one-off costs (lazy imports, kernel caches, the
    loss function's first use: ~100 MiB) land in the baseline every child inherits, not in either variant's peak."""
    tiny = argparse.Namespace(**{**vars(args), "layers": 1, "hidden": 64, "vocab": 128, "seq": 8, "train_batch": 1})
    for variant in ("full", "lora"):
        model, optimizer = training_variant(build_model(family, tiny), family, args.rank, variant)
        train_step(model, optimizer, tokens(tiny, 1))
    gc.collect()


def _memory_child_entry(
    child: Callable[..., dict[str, Any]], family: str, variant: str, args: argparse.Namespace, results: Any
) -> None:
    try:
        results.put(child(family, variant, args))
    except BaseException as error:  # the parent waits on the queue, so it must always hear back
        results.put({"model": family, "variant": variant, "error": repr(error)})


def run_children(
    jobs: list[tuple[str, str]], args: argparse.Namespace, child: Callable[..., dict[str, Any]] = memory_child
) -> list[dict[str, Any]]:
    """``child(family, variant, args)`` in one forked process per job, ``args.memory_jobs`` at a time.

    Forking (not a fresh interpreter) skips ~5 s of imports per child; the child's baseline is taken after the
    fork and its high-water mark is reset after the build, so the parent's pages do not count. The parent forks
    before it has run any torch compute, with one intra-op thread, which keeps OpenMP fork-safe.
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    collected: list[dict[str, Any]] = []
    for start in range(0, len(jobs), args.memory_jobs):
        batch = [
            context.Process(target=_memory_child_entry, args=(child, *job, args, results))
            for job in jobs[start : start + args.memory_jobs]
        ]
        for process in batch:
            process.start()
        collected += [results.get(timeout=900) for _ in batch]
        for process in batch:
            process.join()
    failed = [c for c in collected if "error" in c]
    if failed:
        raise RuntimeError(f"memory measurement failed: {failed}")
    return collected


def training_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak RSS of a few training steps per (model, variant), each in a process of its own; no timing runs meanwhile."""
    jobs = [(family, variant) for family in args.models for variant in ("full", "lora")]
    for family in args.models:
        warm_up(family, args)
    children = run_children(jobs, args)
    rows = []
    for family in args.models:
        full, lora = (next(c for c in children if c["model"] == family and c["variant"] == v) for v in ("full", "lora"))
        exact = {
            v: c["parameter_bytes"] + c["gradient_bytes"] + c["optimizer_state_bytes"]
            for v, c in (("full", full), ("lora", lora))
        }
        rows.append(
            {
                "model": family,
                "batch": args.train_batch,
                "seq": args.seq,
                "full": full,
                "lora": lora,
                "peak_rss_lora_over_full": lora["peak_over_start_bytes"] / full["peak_over_start_bytes"],
                "training_increment_lora_over_full": lora["peak_over_built_bytes"] / full["peak_over_built_bytes"],
                "exact_state_lora_over_full": exact["lora"] / exact["full"],
                "exact_state_full_bytes": exact["full"],
                "exact_state_lora_bytes": exact["lora"],
            }
        )
    return rows


# --- report ------------------------------------------------------------------------------------------------------


def verdicts(inference: list[dict], training: list[dict], memory: list[dict]) -> dict[str, dict[str, Any]]:
    """Each target against its worst measured case."""
    worst = {
        "inference_lora_over_base": max((r["lora_over_base"] for r in inference), default=None),
        "train_step_lora_over_full": max((r["lora_over_full"] for r in training), default=None),
        "train_memory_lora_over_full": max((r["peak_rss_lora_over_full"] for r in memory), default=None),
    }
    return {
        name: {"target": TARGETS[name], "measured": value, "met": value <= TARGETS[name]}
        for name, value in worst.items()
        if value is not None
    }


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"LoRA r={config['rank']}; models: {config['layers']} layers, hidden {config['hidden']}, vocab "
        f"{config['vocab']}, seq {config['seq']}; {config['threads']} thread(s); ratios are medians of paired rounds",
    ]
    if report["inference"]:
        lines += [
            "",
            f"Inference forward (CPU time; median of {config['repeats']} rounds; wall-clock ratios for comparison)",
            "",
            "| model | batch x seq | base (ms) | LoRA (ms) | merged (ms) | LoRA / base | merged / base "
            "| LoRA / base (wall) | merged / base (wall) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['model']} | {r['batch']} x {r['seq']} | {r['base_ms']:.1f} | {r['lora_ms']:.1f} | "
            f"{r['merged_ms']:.1f} | {r['lora_over_base']:.3f} | {r['merged_over_base']:.3f} | "
            f"{r['lora_over_base_wall']:.3f} | {r['merged_over_base_wall']:.3f} |"
            for r in report["inference"]
        ]
    if report["training"]:
        lines += [
            "",
            f"Training step, AdamW (CPU time; median of {config['train_repeats']} rounds)",
            "",
            "| model | batch x seq | full FT (s) | LoRA (s) | LoRA / full | LoRA / full (wall) |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['model']} | {r['batch']} x {r['seq']} | {r['full_s']:.3f} | {r['lora_s']:.3f} | "
            f"{r['lora_over_full']:.3f} | {r['lora_over_full_wall']:.3f} |"
            for r in report["training"]
        ]
    if report["memory"]:
        mib = 2**20
        lines += [
            "",
            f"Training memory (one process per variant, {config['memory_steps']} steps; MiB)",
            "",
            "| model | full: peak RSS - start | LoRA: peak RSS - start | LoRA / full | increment ratio | "
            "exact params+grads+AdamW full | LoRA | LoRA / full |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['model']} | {r['full']['peak_over_start_bytes'] / mib:.0f} | {r['lora']['peak_over_start_bytes'] / mib:.0f} | "
            f"{r['peak_rss_lora_over_full']:.3f} | {r['training_increment_lora_over_full']:.3f} | "
            f"{r['exact_state_full_bytes'] / mib:.1f} | {r['exact_state_lora_bytes'] / mib:.1f} | "
            f"{r['exact_state_lora_over_full']:.3f} |"
            for r in report["memory"]
        ]
    lines.append("")
    if config["quick"]:
        lines.append(
            "(--quick: tiny shapes for a smoke run; the numbers and verdicts below say nothing about performance)"
        )
    for name, verdict in report["targets"].items():
        lines.append(
            f"- {name}: target <= {verdict['target']}, worst measured {verdict['measured']:.3f} -> "
            + ("met" if verdict["met"] else "MISSED")
        )
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    memory = training_memory(args) if args.memory and Path("/proc/self/clear_refs").exists() else []
    inference = [row for family in args.models for row in inference_latency(family, args)]
    training = [training_time(family, args) for family in args.models] if args.train_repeats > 0 else []
    config = {
        k: getattr(args, k)
        for k in ("models", "layers", "hidden", "vocab", "seq", "rank", "batches", "train_batch", "repeats")
    }
    config.update(
        train_repeats=args.train_repeats, memory_steps=args.memory_steps, threads=args.threads, quick=args.quick
    )
    return {
        "benchmark": "lora_overhead",
        "environment": environment(),
        "config": config,
        "inference": inference,
        "training": training,
        "memory": memory,
        "targets": verdicts(inference, training, memory),
    }


def add_shape_arguments(parser: argparse.ArgumentParser, layers: int, hidden: int, train_batch: int) -> None:
    """The model, batch and round options every LoRA-cost benchmark takes (this one and versus_peft.py)."""
    parser.add_argument("--models", nargs="+", choices=sorted(LORA_TARGETS), default=["gpt2", "llama"])
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--vocab", type=int, default=8192, help="small, so lm_head does not drown the blocks")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="inference batch sizes")
    parser.add_argument("--train-batch", type=int, default=train_batch)
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable numbers)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def quick_shapes(args: argparse.Namespace) -> None:
    """--quick: tiny shapes and 2 rounds, for a CI smoke run whose numbers say nothing."""
    args.layers, args.hidden, args.vocab, args.seq = 2, 128, 512, 32
    args.batches, args.train_batch, args.repeats, args.train_repeats, args.memory_steps = [1, 2], 2, 2, 2, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, layers=4, hidden=768, train_batch=4)
    parser.add_argument("--repeats", type=int, default=7, help="inference rounds")
    parser.add_argument("--train-repeats", type=int, default=5, help="training rounds (0 skips training time)")
    parser.add_argument("--memory-jobs", type=int, default=2, help="memory processes run at once")
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: tiny shapes, 2 rounds; seconds, not minutes"
    )
    args = parser.parse_args(argv)
    if args.quick:
        quick_shapes(args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()
