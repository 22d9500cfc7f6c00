"""Mixed-batch inference throughput: every example of a batch routed to its own LoRA adapter, on a small Llama.

LoRA (r=8, alpha=16) on ``q_proj`` and ``v_proj`` with 1, 8 and 32 adapters attached; example ``i`` of the batch runs
with adapter ``a{i % n}``. For each adapter count, one model per library, four variants timed round-robin in one
process (A B C D A B C D ...):

- ``base``: no adapter (``peftkit.disabled``), for scale: what the whole LoRA path costs;
- ``single``: one active adapter for the whole batch (``peftkit.activate(model, ["a0"])``), no routing;
- ``routed``: ``with peftkit.route(model, names): model(input_ids=...)``, the batched LoRA path (``LoRA.route``);
- ``peft_mixed`` (when ``peft`` is installed): HF PEFT's mixed-batch path, ``model(input_ids=..., adapter_names=names)``
  on a ``PeftModel`` holding the same adapters (weights copied from peftkit, so the logits are compared too).

Targets: on CPU a mixed batch over 8 or 32 adapters costs <= 1.1x a single-adapter batch and no more than PEFT's
mixed batch; on a GPU peftkit's mixed batch has >= 2x PEFT's throughput at 32 adapters. Ratios are medians of
per-round ratios; the headline clock is the process's CPU time on CPU (waiting for a core does not count) and the
wall clock on CUDA (each call ends with a synchronize).

    python benchmarks/routing_throughput.py [--adapters 1,8,32] [--device cpu|cuda] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.attach_time import peft_available
from peftkit_benchmarks.common import environment, run_and_report
from peftkit_benchmarks.lora_overhead import build_model, paired_ratio, round_robin
from torch import nn

import peftkit

TARGETS = {
    "cpu_routed_over_single": 1.1,  # time ratio, at 8 and 32 adapters
    "cpu_routed_over_peft_mixed": 1.0,  # time ratio, at 8 and 32 adapters
    "gpu_routed_speedup_over_peft_mixed": 2.0,  # throughput ratio, at 32 adapters
}
LORA_TARGETS = ["q_proj", "v_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- models ------------------------------------------------------------------------------------------------------


def adapter_names(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def per_example(count: int, batch: int) -> list[str]:
    """Example i runs with adapter a{i % count}: every adapter is used once the batch is at least ``count``."""
    return [f"a{i % count}" for i in range(batch)]


def peftkit_model(base: nn.Module, count: int, rank: int) -> nn.Module:
    """A copy of ``base`` with ``count`` LoRA adapters, A and B drawn at random (seeded) so every update differs."""
    model = copy.deepcopy(base)
    entry = {"method": "lora", "target": LORA_TARGETS, "r": rank, "alpha": 2 * rank}
    peftkit.attach(model, {"adapters": {name: [dict(entry)] for name in adapter_names(count)}})
    generator = torch.Generator().manual_seed(count)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".peftkit_adapters." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator).mul_(0.02))
    return model.eval()


def peft_model(base: nn.Module, adapted: nn.Module, count: int, rank: int) -> nn.Module:
    """HF PEFT on a copy of ``base`` holding the same adapters as ``adapted`` (A and B copied over)."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    names = adapter_names(count)
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    ours = dict(adapted.named_parameters())
    with torch.no_grad():
        for module_name, module in model.base_model.model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            for name in names:
                module.lora_A[name].weight.copy_(ours[f"{module_name}.peftkit_adapters.{name}.lora_a"])
                module.lora_B[name].weight.copy_(ours[f"{module_name}.peftkit_adapters.{name}.lora_b"])
    return model.eval()


# --- variants ----------------------------------------------------------------------------------------------------


def synchronised(call: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """On CUDA the call returns before the kernels finish; wait for them so the wall clock sees the work."""
    if device.type != "cuda":
        return call

    def call_and_wait() -> Any:
        result = call()
        torch.cuda.synchronize(device)
        return result

    return call_and_wait


def variants(
    models: dict[str, nn.Module], ids: torch.Tensor, names: list[str]
) -> dict[str, Callable[[], torch.Tensor]]:
    ours = models["peftkit"]

    def base() -> torch.Tensor:
        with peftkit.disabled(ours):
            return ours(input_ids=ids).logits

    def single() -> torch.Tensor:
        return ours(input_ids=ids).logits  # "a0" is the active adapter (set once, below)

    def routed() -> torch.Tensor:
        with peftkit.route(ours, names):
            return ours(input_ids=ids).logits

    calls = {"base": base, "single": single, "routed": routed}
    peftkit.activate(ours, ["a0"])
    if "peft" in models:
        theirs = models["peft"]
        calls["peft_mixed"] = lambda: theirs(input_ids=ids, adapter_names=names).logits
    return calls


def agreement(calls: dict[str, Callable[[], torch.Tensor]], names: list[str]) -> dict[str, float]:
    """Max |difference| of logits: routed vs PEFT's mixed batch, routed vs single on the rows routed to a0, and
    routed vs base (far from 0: the adapters change the output, so the first two are not trivially 0)."""
    routed = calls["routed"]().float()
    rows = [i for i, name in enumerate(names) if name == "a0"]
    found = {
        "routed_vs_base_max_abs_diff": (routed - calls["base"]().float()).abs().max(),
        "routed_vs_single_on_a0_rows_max_abs_diff": (routed[rows] - calls["single"]().float()[rows]).abs().max(),
    }
    if "peft_mixed" in calls:
        found["routed_vs_peft_mixed_max_abs_diff"] = (routed - calls["peft_mixed"]().float()).abs().max()
    return {key: value.item() for key, value in found.items()}


def measure_count(base: nn.Module, count: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    ours = peftkit_model(base, count, args.rank)
    models = {"peftkit": ours}
    if args.peft:
        models["peft"] = peft_model(base, ours, count, args.rank)
    models = {key: model.to(device=device, dtype=args.dtype) for key, model in models.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    names = per_example(count, args.batch)
    clock = "cpu" if device.type == "cpu" else "wall"
    with torch.inference_mode():
        calls = variants(models, ids, names)
        checks = agreement(calls, names)
        seconds = round_robin({k: synchronised(call, device) for k, call in calls.items()}, args.repeats, args.warmup)
    tokens = args.batch * args.seq
    row: dict[str, Any] = {"adapters": count, "batch": args.batch, "seq": args.seq, "clock": clock, **checks}
    for name in calls:
        median_s = statistics.median(seconds[clock][name])
        row[f"{name}_ms"] = median_s * 1e3
        row[f"{name}_wall_ms"] = statistics.median(seconds["wall"][name]) * 1e3
        row[f"{name}_tokens_per_s"] = tokens / median_s
    row["routed_over_single"] = paired_ratio(seconds[clock], "routed", "single")
    row["single_over_base"] = paired_ratio(seconds[clock], "single", "base")
    row["routed_over_single_wall"] = paired_ratio(seconds["wall"], "routed", "single")
    if "peft_mixed" in calls:
        row["routed_over_peft_mixed"] = paired_ratio(seconds[clock], "routed", "peft_mixed")
        row["routed_over_peft_mixed_wall"] = paired_ratio(seconds["wall"], "routed", "peft_mixed")
        row["routed_speedup_over_peft_mixed"] = 1.0 / row["routed_over_peft_mixed"]
    return row


# --- report ------------------------------------------------------------------------------------------------------


def verdicts(rows: list[dict[str, Any]], device: torch.device) -> dict[str, dict[str, Any]]:
    """Each target against its worst measured case, for the device it is about; targets without data are left out."""
    found: dict[str, dict[str, Any]] = {}
    mixed = [r for r in rows if r["adapters"] in (8, 32)]
    if device.type == "cpu" and mixed:
        worst = max(r["routed_over_single"] for r in mixed)
        found["cpu_routed_over_single"] = {"target": TARGETS["cpu_routed_over_single"], "measured": worst}
        against_peft = [r["routed_over_peft_mixed"] for r in mixed if "routed_over_peft_mixed" in r]
        if against_peft:
            found["cpu_routed_over_peft_mixed"] = {
                "target": TARGETS["cpu_routed_over_peft_mixed"],
                "measured": max(against_peft),
            }
        for verdict in found.values():
            verdict["met"] = verdict["measured"] <= verdict["target"]
    at_32 = [r["routed_speedup_over_peft_mixed"] for r in rows if r["adapters"] == 32 and "peft_mixed_ms" in r]
    if device.type == "cuda" and at_32:
        target = TARGETS["gpu_routed_speedup_over_peft_mixed"]
        found["gpu_routed_speedup_over_peft_mixed"] = {"target": target, "measured": min(at_32)}
        found["gpu_routed_speedup_over_peft_mixed"]["met"] = min(at_32) >= target
    return found


def markdown(report: dict[str, Any]) -> str:
    config, rows = report["config"], report["results"]
    has_peft = any("peft_mixed_ms" in r for r in rows)
    clock = "CPU time" if config["device"] == "cpu" else "wall clock, synchronised"
    lines = [
        f"Llama {config['layers']} layers, hidden {config['hidden']}, vocab {config['vocab']}; batch {config['batch']} "
        f"x seq {config['seq']}; LoRA r={config['rank']} on {', '.join(LORA_TARGETS)}; {config['device']} "
        f"{config['dtype']}, {config['threads']} thread(s); {clock}, median of {config['repeats']} rounds; "
        "ratios are medians of paired rounds",
    ]
    columns = [
        ("adapters", lambda r: str(r["adapters"])),
        ("base (ms)", lambda r: f"{r['base_ms']:.1f}"),
        ("single (ms)", lambda r: f"{r['single_ms']:.1f}"),
        ("routed (ms)", lambda r: f"{r['routed_ms']:.1f}"),
        ("routed tok/s", lambda r: f"{r['routed_tokens_per_s']:.0f}"),
        ("routed / single", lambda r: f"{r['routed_over_single']:.3f}"),
        ("single / base", lambda r: f"{r['single_over_base']:.3f}"),
    ]
    if has_peft:
        columns[4:4] = [("PEFT mixed (ms)", lambda r: f"{r['peft_mixed_ms']:.1f}")]
        columns += [
            ("routed / PEFT mixed", lambda r: f"{r['routed_over_peft_mixed']:.3f}"),
            ("PEFT tok/s", lambda r: f"{r['peft_mixed_tokens_per_s']:.0f}"),
            ("routed vs PEFT logits max diff", lambda r: f"{r['routed_vs_peft_mixed_max_abs_diff']:.1e}"),
        ]
    lines += ["", "| " + " | ".join(h for h, _ in columns) + " |", "|" + " ---: |" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    lines.append("")
    if not has_peft:
        lines.append("(HF PEFT not installed or --no-peft: no PEFT comparison)")
    if config["quick"]:
        lines.append(
            "(--quick: tiny shapes for a smoke run; the numbers and verdicts below say nothing about performance)"
        )
    for name, verdict in report["targets"].items():
        relation = ">=" if name.startswith("gpu") else "<="
        worst = "lowest" if name.startswith("gpu") else "worst"
        lines.append(
            f"- {name}: target {relation} {verdict['target']}, {worst} measured {verdict['measured']:.3f} -> "
            + ("met" if verdict["met"] else "MISSED")
        )
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    base = build_model("llama", args).eval()
    rows = [measure_count(base, count, args, device) for count in args.adapters]
    env = environment()
    if args.peft:
        import peft

        env["peft"] = peft.__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    config = {k: getattr(args, k) for k in ("adapters", "layers", "hidden", "vocab", "seq", "batch", "rank")}
    config.update(
        device=args.device,
        dtype=str(args.dtype).removeprefix("torch."),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        peft=args.peft,
        quick=args.quick,
    )
    return {
        "benchmark": "routing_throughput",
        "environment": env,
        "config": config,
        "results": rows,
        "targets": verdicts(rows, device),
    }


def adapter_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"--adapters takes positive counts separated by commas, e.g. 1,8,32; got {text!r}"
        )
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=adapter_counts, default=[1, 8, 32], help="adapter counts, e.g. 1,8,32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192, help="small, so lm_head does not drown the blocks")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="model and adapter dtype (default: float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable numbers)")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip HF PEFT even if installed")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny shapes, 1,8 adapters, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.vocab, args.seq, args.batch = 1, 64, 256, 8, 8
        args.adapters, args.repeats = [1, 8], 2
    args.peft = args.peft and peft_available()
    args.dtype = DTYPES[args.dtype or ("float32" if torch.device(args.device).type == "cpu" else "bfloat16")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()
