"""How long ``peftkit.attach`` takes to put LoRA on every linear layer of a 7B-shaped Llama built on the meta device.

Attaching is something a user waits for before every run, so it should cost nothing next to loading the model: the
target is 0.05 s (warm) for the 225 linear layers of a Llama-2-7B shape. The model lives on the meta device, so the
timings are pure bookkeeping (targeting, validation, module construction) and the memory numbers show whether the
adapters were built where the base lives: a detour through the CPU would cost ~80 MB of RSS for r=8.

*Cold* is the first call in a fresh interpreter (imports done, model built), run in a subprocess of its own so one
measurement cannot warm another. *Warm* is the median of repeats on the same model, detaching in between. Memory is
measured in a separate, untimed call, because tracemalloc slows Python down.

    python benchmarks/attach_time.py [--repeats 9] [--layers 32] [--json out.json] [--no-peft] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.common import environment, run_and_report

import peftkit

TARGET_WARM_ATTACH_S = 0.05
LLAMA_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def lora_spec(rank: int) -> dict[str, Any]:
    """LoRA on every nn.Linear of the model, lm_head included (225 layers for 32 blocks)."""
    entry = {"method": "lora", "target": "*", "module_types": ["Linear"], "r": rank, "alpha": 2 * rank}
    return {"adapters": {"default": [entry]}}


def build_meta_llama(layers: int) -> torch.nn.Module:
    """Llama-2-7B's shape on the meta device; ``layers`` < 32 only to make smoke runs quick."""
    from peftkit.zoo import TINY_MODELS

    with torch.device("meta"):
        return TINY_MODELS["llama-7b-shape"](num_hidden_layers=layers)


def rss_bytes() -> int:
    """Current resident set size, from /proc (Linux); 0 where that is not available."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def timed(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock and CPU seconds of one call, and what it returned; earlier garbage is collected first, untimed.

    The CPU clock leaves out time spent waiting for a core, which the wall clock counts on a shared machine.
    """
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def memory_of(call: Callable[[], Any]) -> tuple[dict[str, int], Any]:
    """Python-heap peak (tracemalloc) and resident-set growth of one call; torch storages are not Python-heap."""
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"tracemalloc_peak_bytes": peak, "rss_delta_bytes": rss_bytes() - rss_before}, result


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_get_peft_model(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """HF PEFT on the same layers, for comparison only; peft is optional and never needed by peftkit."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LLAMA_LINEAR_NAMES)
    return peft.get_peft_model(model, config)


def peft_undo(wrapped: torch.nn.Module) -> torch.nn.Module:
    return wrapped.unload()


# --- what each variant does, so the cold child and the warm loop share one definition ---------------------------


def run_once(variant: str, model: torch.nn.Module, rank: int) -> Callable[[], Any]:
    spec = lora_spec(rank)
    if variant == "attach":
        return lambda: peftkit.attach(model, spec)
    if variant == "plan":
        return lambda: peftkit.plan(model, spec)
    if variant == "peft":
        return lambda: peft_get_peft_model(model, rank)
    raise ValueError(f"unknown variant {variant!r}")


def cold_child(variant: str, layers: int, rank: int) -> None:
    """Runs in a fresh interpreter: time the first call of ``variant`` and print the seconds as JSON."""
    model = build_meta_llama(layers)
    seconds, _, _ = timed(run_once(variant, model, rank))
    print(json.dumps({"cold_s": seconds}))


def cold_seconds(variant: str, layers: int, rank: int) -> float:
    command = [sys.executable, str(Path(__file__).resolve()), "--cold-child", variant]
    command += ["--layers", str(layers), "--rank", str(rank)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["cold_s"])


def warm_seconds(
    variants: list[str], model: torch.nn.Module, rank: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """``{"wall": {variant: [...]}, "cpu": {...}}``, variants interleaved (A B C A B C ...) on one model, each undone
    before the next, so drift hits all alike."""
    seconds: dict[str, dict[str, list[float]]] = {"wall": {v: [] for v in variants}, "cpu": {v: [] for v in variants}}
    for variant in variants:  # one untimed call each: imports, caches, first-use paths
        undo(variant, model, run_once(variant, model, rank)())
    for _ in range(repeats):
        for variant in variants:
            wall, cpu, result = timed(run_once(variant, model, rank))
            seconds["wall"][variant].append(wall)
            seconds["cpu"][variant].append(cpu)
            undo(variant, model, result)
    return seconds


def undo(variant: str, model: torch.nn.Module, result: Any) -> None:
    if variant == "attach":
        peftkit.detach(model)
    elif variant == "peft":
        peft_undo(result)


def adapters_on_meta(model: torch.nn.Module) -> bool:
    adapter_parameters = [p for name, p in model.named_parameters() if "peftkit_adapters" in name]
    return bool(adapter_parameters) and all(p.is_meta for p in adapter_parameters)


def in_process_cold_seconds(variants: list[str], layers: int, rank: int) -> dict[str, float]:
    """First call of each variant in this process, each on a fresh model; later variants find warm caches."""
    seconds = {}
    for variant in variants:
        model = build_meta_llama(layers)
        seconds[variant], _, _ = timed(run_once(variant, model, rank))
    return seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    variants = ["attach", "plan"] + (["peft"] if args.peft and peft_available() else [])
    if args.cold == "subprocess":
        cold = {v: cold_seconds(v, args.layers, args.rank) for v in variants}
    else:
        cold = in_process_cold_seconds(variants, args.layers, args.rank)
    model = build_meta_llama(args.layers)
    plan = peftkit.plan(model, lora_spec(args.rank))
    warm = warm_seconds(variants, model, args.rank, args.repeats)

    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        memory, outcome = memory_of(run_once(variant, model, args.rank))
        on_meta = adapters_on_meta(model) if variant == "attach" else None
        undo(variant, model, outcome)
        results[variant] = {
            "cold_s": cold[variant],
            "warm_median_s": statistics.median(warm["wall"][variant]),
            "warm_min_s": min(warm["wall"][variant]),
            "warm_median_cpu_s": statistics.median(warm["cpu"][variant]),
            "warm_s": warm["wall"][variant],
            **memory,
        }
        if on_meta is not None:
            results[variant]["adapters_on_meta"] = on_meta
    attach_warm = results["attach"]["warm_median_s"]
    on_meta_attach = results["attach"]["adapters_on_meta"]
    return {
        "benchmark": "attach_time",
        "environment": environment(),
        "config": {
            "model": "llama-7b-shape (meta)",
            "layers": args.layers,
            "rank": args.rank,
            "repeats": args.repeats,
            "cold": args.cold,
            "quick": args.quick,
        },
        "adapted_modules": len(plan.rows),
        "adapter_parameters": plan.adapter_parameters,
        "results": results,
        "targets": {
            "attach_warm_s": target(TARGET_WARM_ATTACH_S, attach_warm, attach_warm <= TARGET_WARM_ATTACH_S),
            "adapters_on_meta": target(True, on_meta_attach, on_meta_attach),
        },
    }


def target(wanted: Any, measured: Any, met: bool) -> dict[str, Any]:
    return {"target": wanted, "measured": measured, "met": bool(met)}


LABELS = {"attach": "peftkit.attach", "plan": "peftkit.plan", "peft": "peft.get_peft_model (HF PEFT)"}


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"LoRA r={config['rank']} on {report['adapted_modules']} linear layers of {config['model']}, "
        f"{config['layers']} blocks; cold = first call ({config['cold']}); warm = median of {config['repeats']}",
        "",
        "| call | cold (s) | warm median (s) | warm min (s) | warm median, CPU time (s) | tracemalloc peak (MiB) "
        "| RSS delta (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, result in report["results"].items():
        lines.append(
            f"| {LABELS[variant]} | {result['cold_s']:.4f} | {result['warm_median_s']:.4f} | {result['warm_min_s']:.4f} "
            f"| {result['warm_median_cpu_s']:.4f} "
            f"| {result['tracemalloc_peak_bytes'] / 2**20:.2f} | {result['rss_delta_bytes'] / 2**20:.2f} |"
        )
    lines.append("")
    if config["quick"]:
        lines.append(
            "(--quick: tiny shapes for a smoke run; the numbers and verdicts below say nothing about performance)"
        )
    for name, target in report["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        measured = target["measured"]
        shown = f"{measured:.4f}" if isinstance(measured, float) else measured
        lines.append(f"- {name}: target {target['target']}, measured {shown} -> {verdict}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder blocks (32 = Llama-2-7B)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9, help="warm repeats per call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable numbers)")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip HF PEFT even if installed")
    parser.add_argument(
        "--cold",
        choices=["subprocess", "in-process"],
        default="subprocess",
        help="cold = first call in a fresh interpreter (exact, ~5 s of imports each) or in this one (cheap)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: 4 blocks, 3 repeats, in-process cold, no PEFT"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cold-child", choices=["attach", "plan", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.repeats, args.peft, args.cold = 4, 3, False, "in-process"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.cold_child:
        torch.set_num_threads(args.threads)
        cold_child(args.cold_child, args.layers, args.rank)
        return None
    return run_and_report(args, measure, markdown)


if __name__ == "__main__":
    main()
