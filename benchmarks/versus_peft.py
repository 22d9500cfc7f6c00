"""peftkit against HF PEFT on the costs of LoRA, in one process: training step, training memory, unmerged forward,
and mixed-adapter batches.

Both libraries put LoRA (r=8, alpha=16, no dropout) on the same modules of the same randomly initialised model
(built from a config; GPT-2 and Llama, 6 layers of 512 by default: 23M and 27M parameters) and train with AdamW at
batch 8 x 128 on one thread. Every number is a ratio, and every ratio is the median of per-round ratios of variants
run round-robin in one process (full, peftkit, peft, full, ...), so load from other processes hits all alike:

- **train step ÷ full fine-tuning** (forward, backward, AdamW step), for LoRA on every linear of the blocks and on
  the attention's query and value only (``qv``: Llama's ``q_proj``, ``v_proj``; GPT-2 fuses q, k, v in ``c_attn``);
  peftkit runs twice, as a user gets it (the fused path where it applies, ``peftkit/sites/fused.py``) and with every
  host on the hook path (``peftkit.unfused()``), so the fused path's gain is measured in the same rounds;
- **peak RSS growth ÷ full fine-tuning** over a few steps, one forked process per variant, beside the exact floor:
  parameters + gradients + AdamW state + the bytes autograd keeps for the backward (counted through
  ``torch.autograd.graph.saved_tensors_hooks``), which RSS only bounds from above; peftkit with transformers' gradient
  checkpointing (what ``peftkit train`` does with ``gradient_checkpointing: true``) is measured here too;
- **unmerged forward ÷ base** at batch 1 and 8, with peftkit's merged model as the noise floor;
- **mixed batches**: ``benchmarks/routing_throughput.py``'s measurement at 32 adapters (each example its own adapter,
  peftkit's ``route`` against PEFT's ``adapter_names``).

Before timing, both libraries are given the same adapter weights and their outputs are compared; the report carries
the difference. The machine's load average is recorded before and after each section, since a busy machine moves
ratios by a few percent even on the CPU clock.

    python benchmarks/versus_peft.py [--models gpt2 llama] [--targets all qv] [--json out.json] [--quick]
    python benchmarks/versus_peft.py --device cuda --dtype bfloat16 --no-memory   # on a GPU (wall clock)
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks import routing_throughput
from peftkit_benchmarks.attach_time import peft_available
from peftkit_benchmarks.common import environment, run_and_report
from peftkit_benchmarks.compare.measure import SavedActivations
from peftkit_benchmarks.lora_overhead import (
    add_shape_arguments,
    build_model,
    paired_ratio,
    quick_shapes,
    reset_peak_rss,
    round_robin,
    run_children,
    status_kib,
    summary,
    tensor_bytes,
    tokens,
    train_step,
)
from peftkit_benchmarks.routing_throughput import DTYPES, synchronised
from torch import nn

import peftkit
from peftkit.quantization import enable_gradient_checkpointing

TARGET_SETS = {
    "all": {
        "gpt2": ["c_attn", "c_proj", "c_fc"],
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "qv": {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]},
}
# issue #20's targets; each is judged on its worst measured case
TARGETS = {
    "train_step_all_peftkit_over_full": 0.70,
    "train_step_qv_peftkit_over_full": 0.63,
    "train_memory_peftkit_over_full": 0.60,
    "forward_peftkit_over_base": 1.03,
}
# "hooks": peftkit's LoRA with every host on the hook path (peftkit.unfused), to show what the fused path buys
TRAIN_VARIANTS = ("full", "peftkit", "hooks", "peft")
# measured for memory only: peftkit's LoRA with transformers' (non-reentrant) gradient checkpointing
MEMORY_VARIANTS = ("checkpointed",)


# --- the two libraries on one base ---------------------------------------------------------------------------------


def with_peftkit(base: nn.Module, family: str, targets: str, rank: int) -> nn.Module:
    entry = {"method": "lora", "target": TARGET_SETS[targets][family], "r": rank, "alpha": 2 * rank}
    return peftkit.attach(base, {"adapters": {"default": [entry]}})


def with_peft(base: nn.Module, family: str, targets: str, rank: int) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=TARGET_SETS[targets][family],
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores its weight transposed
    )
    return peft.get_peft_model(base, config)


def randomise_and_share(ours: nn.Module, theirs: nn.Module | None) -> None:
    """B drawn at random (seeded), as after some training, so the update is not zero; the same A and B are copied
    into PEFT's model, so that both compute the same function and their outputs can be compared."""
    generator = torch.Generator().manual_seed(1)
    factors = {}
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if name.endswith("lora_b"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)  # cast on copy
            if name.endswith(("lora_a", "lora_b")):
                factors[name] = parameter
        if theirs is None:
            return
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.copy_(factors[f"{name}.peftkit_adapters.default.lora_a"])
                module.lora_B["default"].weight.copy_(factors[f"{name}.peftkit_adapters.default.lora_b"])


def training_variant(
    base: nn.Module, family: str, targets: str, variant: str, rank: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Full fine-tuning, peftkit's LoRA or PEFT's LoRA on ``base`` (taken, not copied), with its own AdamW."""
    if variant in ("peftkit", "hooks", "checkpointed"):
        model = with_peftkit(base, family, targets, rank)
        if variant == "checkpointed":  # what `peftkit train` does with gradient_checkpointing: true
            enable_gradient_checkpointing(model)
    elif variant == "peft":
        model = with_peft(base, family, targets, rank)
    else:
        model = base
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def built(family: str, args: argparse.Namespace) -> nn.Module:
    """The seeded model on the benchmark's device and dtype."""
    return build_model(family, args).to(device=args.device, dtype=args.dtype)


def batch_of(args: argparse.Namespace, size: int) -> torch.Tensor:
    return tokens(args, size).to(args.device)


def timed(
    calls: dict[str, Callable[[], Any]], rounds: int, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Round-robin seconds; on a GPU each call waits for its kernels and the wall clock is the headline ("cpu"
    holds it too, since the host's CPU time says nothing about the device's)."""
    device = torch.device(args.device)
    seconds = round_robin({name: synchronised(call, device) for name, call in calls.items()}, rounds)
    if device.type != "cpu":
        seconds["cpu"] = seconds["wall"]
    return seconds


def machine_load() -> list[float]:
    """1-, 5- and 15-minute load averages: what else was running while a section measured."""
    return [round(value, 2) for value in os.getloadavg()]


def loaded(section: Callable[[], Any]) -> tuple[Any, dict[str, list[float]]]:
    before = machine_load()
    result = section()
    return result, {"load_before": before, "load_after": machine_load()}


# --- sections ----------------------------------------------------------------------------------------------------


def agreement(family: str, targets: str, args: argparse.Namespace) -> float:
    """Max |logit difference| between peftkit's and PEFT's LoRA holding the same weights (should be ~1e-6)."""
    base = built(family, args)
    ours = with_peftkit(copy.deepcopy(base), family, targets, args.rank)
    theirs = with_peft(base, family, targets, args.rank)
    randomise_and_share(ours, theirs)
    ids = batch_of(args, 2)
    with torch.inference_mode():
        return (ours.eval()(ids).logits - theirs.eval()(input_ids=ids).logits).abs().max().item()


def training_time(family: str, targets: str, args: argparse.Namespace) -> dict[str, Any]:
    base = built(family, args)
    variants = {name: training_variant(copy.deepcopy(base), family, targets, name, args.rank) for name in args.variants}
    ids = batch_of(args, args.train_batch)
    calls = {name: (lambda pair=pair: train_step(*pair, ids)) for name, pair in variants.items()}
    if "hooks" in calls:
        calls["hooks"] = lambda pair=variants["hooks"]: unfused_step(*pair, ids)
    seconds = timed(calls, args.train_repeats, args)
    row = {"model": family, "targets": targets, "batch": args.train_batch, "seq": args.seq}
    row.update(summary(seconds, "full", 1.0))
    if "peft" in variants:
        row["peftkit_over_peft"] = paired_ratio(seconds["cpu"], "peftkit", "peft")
    if "hooks" in variants:
        row["peftkit_over_hooks"] = paired_ratio(seconds["cpu"], "peftkit", "hooks")
    return row


def unfused_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    with peftkit.unfused():
        train_step(model, optimizer, ids)


def inference_latency(family: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    base = built(family, args).eval()
    ours = with_peftkit(copy.deepcopy(base), family, "all", args.rank)
    theirs = with_peft(copy.deepcopy(base), family, "all", args.rank) if "peft" in args.variants else None
    randomise_and_share(ours, theirs)
    models = {"base": base, "peftkit": ours.eval()}
    if theirs is not None:
        models["peft"] = theirs.eval()
    models["merged"] = peftkit.merge(copy.deepcopy(ours))
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            ids = batch_of(args, batch)
            calls = {name: (lambda m=model, i=ids: m(input_ids=i)) for name, model in models.items()}
            seconds = timed(calls, args.repeats, args)
            rows.append({"model": family, "batch": batch, "seq": args.seq, **summary(seconds, "base", 1e-3)})
    return rows


def memory_child(family: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """In a forked process: RSS before the build and at the peak of a few steps, and the exact floor under it."""
    rss_start = status_kib("VmRSS") * 1024
    model, optimizer = training_variant(built(family, args), family, "all", variant, args.rank)
    ids = batch_of(args, args.train_batch)
    step = unfused_step if variant == "hooks" else train_step
    exact_peak = reset_peak_rss()
    for _ in range(args.memory_steps):
        step(model, optimizer, ids)
    peak = status_kib("VmHWM") * 1024
    with SavedActivations(model) as saved:  # one more step, counted: what autograd keeps for its backward
        step(model, optimizer, ids)
    parameters = list({id(p): p for p in model.parameters()}.values())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    floor = tensor_bytes(parameters) + tensor_bytes([p.grad for p in parameters if p.grad is not None])
    return {
        "model": family,
        "variant": variant,
        "peak_method": "VmHWM after clear_refs" if exact_peak else "VmHWM over the process lifetime",
        "peak_over_start_bytes": peak - rss_start,
        "exact_floor_bytes": floor + tensor_bytes(state) + saved.bytes,
        "saved_activation_bytes": saved.bytes,
    }


def warm_up(args: argparse.Namespace) -> None:
    """One step of each variant on a tiny model before forking, so that one-off costs (lazy imports, kernel caches,
    the loss's first use) sit in the baseline every child inherits, not in one variant's peak."""
    tiny = argparse.Namespace(**{**vars(args), "layers": 1, "hidden": 64, "vocab": 128, "seq": 8})
    for family in args.models:
        for variant in args.variants:
            train_step(*training_variant(build_model(family, tiny), family, "all", variant, args.rank), tokens(tiny, 1))


def training_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    warm_up(args)
    variants = (*args.variants, *MEMORY_VARIANTS)
    children = run_children([(f, v) for f in args.models for v in variants], args, child=memory_child)
    rows = []
    for family in args.models:
        found = {c["variant"]: c for c in children if c["model"] == family}
        row: dict[str, Any] = {"model": family, "targets": "all", "batch": args.train_batch, **found}
        for variant in variants[1:]:
            row[f"peak_rss_{variant}_over_full"] = (
                found[variant]["peak_over_start_bytes"] / found["full"]["peak_over_start_bytes"]
            )
            row[f"exact_floor_{variant}_over_full"] = (
                found[variant]["exact_floor_bytes"] / found["full"]["exact_floor_bytes"]
            )
        rows.append(row)
    return rows


def mixed_batches(args: argparse.Namespace) -> dict[str, Any]:
    options = ["--adapters", ",".join(map(str, args.mixed_adapters)), "--threads", str(args.threads)]
    options += ["--device", str(args.device), "--dtype", str(args.dtype).removeprefix("torch.")]
    if args.quick:
        options.append("--quick")
    return routing_throughput.measure(routing_throughput.parse_args(options))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sections: dict[str, Any] = {"load": {}}
    sections["agreement"] = {
        f"{family}/{targets}": agreement(family, targets, args)
        for family in args.models
        for targets in args.targets
        if "peft" in args.variants
    }
    if args.memory and Path("/proc/self/clear_refs").exists():
        sections["memory"], sections["load"]["memory"] = loaded(lambda: training_memory(args))
    else:
        sections["memory"] = []
    sections["training"], sections["load"]["training"] = loaded(
        lambda: [training_time(f, t, args) for f in args.models for t in args.targets]
    )
    sections["inference"], sections["load"]["inference"] = loaded(
        lambda: [row for family in args.models for row in inference_latency(family, args)]
    )
    if args.mixed:
        mixed, sections["load"]["mixed"] = loaded(lambda: mixed_batches(args))
        sections["mixed"] = mixed["results"]
    else:
        sections["mixed"] = []
    env = environment()
    if "peft" in args.variants:
        import peft

        env["peft"] = peft.__version__
    config = {
        k: getattr(args, k)
        for k in ("models", "targets", "variants", "layers", "hidden", "vocab", "seq", "rank", "batches")
    }
    config.update(
        device=args.device,
        dtype=str(args.dtype).removeprefix("torch."),
        clock="process CPU time" if torch.device(args.device).type == "cpu" else "wall, synchronised",
        train_batch=args.train_batch,
        repeats=args.repeats,
        train_repeats=args.train_repeats,
        memory_steps=args.memory_steps,
        mixed_adapters=args.mixed_adapters,
        threads=args.threads,
        quick=args.quick,
    )
    return {
        "benchmark": "versus_peft",
        "environment": env,
        "config": config,
        **sections,
        "targets": verdicts(sections),
    }


# --- report ------------------------------------------------------------------------------------------------------


def verdicts(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    worst = {
        "train_step_all_peftkit_over_full": [
            r["peftkit_over_full"] for r in sections["training"] if r["targets"] == "all"
        ],
        "train_step_qv_peftkit_over_full": [
            r["peftkit_over_full"] for r in sections["training"] if r["targets"] == "qv"
        ],
        "train_memory_peftkit_over_full": [r["peak_rss_peftkit_over_full"] for r in sections["memory"]],
        "forward_peftkit_over_base": [r["peftkit_over_base"] for r in sections["inference"]],
    }
    return {
        name: {"target": TARGETS[name], "measured": max(values), "met": max(values) <= TARGETS[name]}
        for name, values in worst.items()
        if values
    }


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "—"


def markdown(report: dict[str, Any]) -> str:
    config, load = report["config"], report["load"]
    lines = [
        f"LoRA r={config['rank']}; {config['layers']} layers of {config['hidden']}, vocab {config['vocab']}, seq "
        f"{config['seq']}; {config['threads']} thread(s); {config['device']}, {config['dtype']}; {config['clock']} ratios, medians of "
        f"paired rounds; "
        f"peft {report['environment'].get('peft', 'not installed')}",
    ]
    if report["agreement"]:
        worst = max(report["agreement"].values())
        lines.append(f"peftkit vs PEFT, same weights: max |logit difference| {worst:.2e}")
    if report["training"]:
        lines += [
            "",
            f"Training step, AdamW, batch {config['train_batch']} (median of {config['train_repeats']} rounds; "
            f"load {load['training']['load_before']} -> {load['training']['load_after']})",
            "",
            "| model | LoRA on | full (s) | peftkit ÷ full | hook path ÷ full | PEFT ÷ full | peftkit ÷ PEFT "
            "| fused ÷ hook path |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['model']} | {r['targets']} | {r['full_s']:.3f} | {_cell(r, 'peftkit_over_full')} | "
            f"{_cell(r, 'hooks_over_full')} | {_cell(r, 'peft_over_full')} | {_cell(r, 'peftkit_over_peft')} | "
            f"{_cell(r, 'peftkit_over_hooks')} |"
            for r in report["training"]
        ]
    if report["memory"]:
        mib = 2**20
        lines += [
            "",
            f"Training memory, LoRA on every linear ({config['memory_steps']} steps, one process per variant; load "
            f"{load['memory']['load_before']} -> {load['memory']['load_after']})",
            "",
            "| model | full: peak RSS growth (MiB) | peftkit ÷ full | hook path ÷ full | PEFT ÷ full "
            "| checkpointed ÷ full | exact floor: full (MiB) | peftkit ÷ full | hook path ÷ full | PEFT ÷ full "
            "| checkpointed ÷ full |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['model']} | {r['full']['peak_over_start_bytes'] / mib:.0f} | "
            f"{_cell(r, 'peak_rss_peftkit_over_full')} | {_cell(r, 'peak_rss_hooks_over_full')} | "
            f"{_cell(r, 'peak_rss_peft_over_full')} | {_cell(r, 'peak_rss_checkpointed_over_full')} | "
            f"{r['full']['exact_floor_bytes'] / mib:.0f} | "
            f"{_cell(r, 'exact_floor_peftkit_over_full')} | {_cell(r, 'exact_floor_hooks_over_full')} | "
            f"{_cell(r, 'exact_floor_peft_over_full')} | {_cell(r, 'exact_floor_checkpointed_over_full')} |"
            for r in report["memory"]
        ]
    if report["inference"]:
        lines += [
            "",
            f"Unmerged forward, LoRA on every linear (median of {config['repeats']} rounds; load "
            f"{load['inference']['load_before']} -> {load['inference']['load_after']})",
            "",
            "| model | batch | base (ms) | peftkit ÷ base | PEFT ÷ base | merged ÷ base (noise floor) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['model']} | {r['batch']} | {r['base_ms']:.1f} | {_cell(r, 'peftkit_over_base')} | "
            f"{_cell(r, 'peft_over_base')} | {_cell(r, 'merged_over_base')} |"
            for r in report["inference"]
        ]
    if report["mixed"]:
        lines += [
            "",
            f"Mixed-adapter batches, Llama, q and v (benchmarks/routing_throughput.py; load "
            f"{load['mixed']['load_before']} -> {load['mixed']['load_after']})",
            "",
            "| adapters | routed ÷ one adapter | routed ÷ PEFT's mixed batch |",
            "| ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['adapters']} | {r['routed_over_single']:.3f} | {_cell(r, 'routed_over_peft_mixed')} |"
            for r in report["mixed"]
        ]
    lines.append("")
    if config["quick"]:
        lines.append("(--quick: tiny shapes for a smoke run; the numbers and verdicts say nothing about performance)")
    for name, verdict in report["targets"].items():
        lines.append(
            f"- {name}: target <= {verdict['target']}, worst measured {verdict['measured']:.3f} -> "
            + ("met" if verdict["met"] else "MISSED")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, layers=6, hidden=512, train_batch=8)
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGET_SETS), default=["all", "qv"])
    parser.add_argument("--repeats", type=int, default=9, help="inference rounds")
    parser.add_argument("--train-repeats", type=int, default=9, help="training rounds")
    parser.add_argument("--memory-jobs", type=int, default=1, help="memory processes run at once")
    parser.add_argument("--mixed-adapters", type=routing_throughput.adapter_counts, default=[32], help="e.g. 8,32")
    parser.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the mixed-batch section")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="peftkit and full fine-tuning only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N); on a GPU the memory section is skipped")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and adapter dtype")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny shapes, 2 rounds; seconds")
    args = parser.parse_args(argv)
    if args.quick:
        quick_shapes(args)
        args.mixed_adapters = [8]
    args.memory = args.memory and torch.device(args.device).type == "cpu"  # peak RSS is a CPU measure
    args.dtype = DTYPES[args.dtype]
    args.variants = TRAIN_VARIANTS if args.peft and peft_available() else TRAIN_VARIANTS[:3]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()
