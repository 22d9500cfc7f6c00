"""What PiSSA's and OLoRA's initialisation costs at attach, in peftkit and in HF PEFT, against LoRA's.

PiSSA factors every targeted weight by an SVD (exact, or randomised with ``pissa_iterations`` power iterations) and
OLoRA by a QR decomposition before training starts; LoRA draws A at random. One process; a Llama-shaped model
(hidden 768, 4 blocks by default) with the adapter on every linear projection of the blocks. Each call deep-copies
the base and attaches; the copy alone is timed as its own arm and its median is subtracted. Calls are interleaved
round robin (A B C ... A B C ...), one torch thread by default, medians of CPU time. peftkit's and PEFT's residual
weights are compared for each initialisation they share.

    python benchmarks/init_cost.py [--rank 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any

from peftkit_benchmarks.common import environment, run_and_report
from peftkit_benchmarks.lora_overhead import LORA_TARGETS, build_model, round_robin
from torch import nn

import peftkit

# initialisation -> (peftkit's LoRA fields, PEFT's init_lora_weights)
INITS: dict[str, tuple[dict[str, Any], Any]] = {
    "kaiming": ({}, True),
    "pissa": ({"init": "pissa"}, "pissa"),
    "pissa, 4 iterations": ({"init": "pissa", "pissa_iterations": 4}, "pissa_niter_4"),
    "olora": ({"init": "olora"}, "olora"),
}


def peftkit_attach(base: nn.Module, init: str, rank: int) -> nn.Module:
    entry = {"method": "lora", "target": LORA_TARGETS["llama"], "r": rank, "alpha": float(rank), **INITS[init][0]}
    return peftkit.attach(copy.deepcopy(base), {"adapters": {"default": [entry]}})


def peft_attach(base: nn.Module, init: str, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS["llama"], init_lora_weights=INITS[init][1])
    return get_peft_model(copy.deepcopy(base), config)


def residual_difference(base: nn.Module, init: str, rank: int) -> float:
    """Max abs difference between the two libraries' residual weights (exact factorisations only)."""
    ours = peftkit_attach(base, init, rank).state_dict()
    theirs = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in peft_attach(base, init, rank).state_dict().items()
    }
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours if k.endswith("proj.weight"))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = build_model("llama", args)
    calls = {"copy": lambda: copy.deepcopy(base)}
    for init in INITS:
        calls[f"peftkit {init}"] = lambda init=init: peftkit_attach(base, init, args.rank)
        if not args.no_peft:
            calls[f"peft {init}"] = lambda init=init: peft_attach(base, init, args.rank)
    seconds = round_robin(calls, args.repeats)["cpu"]
    copying = statistics.median(seconds["copy"])
    rows = [
        {"arm": name, "attach_s": max(statistics.median(times) - copying, 0.0)}
        for name, times in seconds.items()
        if name != "copy"
    ]
    agreement = {} if args.no_peft else {i: residual_difference(base, i, args.rank) for i in ("pissa", "olora")}
    return {
        "benchmark": "init_cost",
        "environment": environment(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "copy_s": copying,
        "peftkit_vs_peft_max_abs_residual_diff": agreement,
        "results": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"Llama-shaped, hidden {config['hidden']}, {config['layers']} blocks, rank {config['rank']}, "
        f"{report['environment']['torch_threads']} thread(s), {report['environment']['cpu']}; medians of "
        f"{config['repeats']} interleaved rounds (CPU time), less the deep copy ({report['copy_s'] * 1e3:.1f} ms)",
        "",
        "| arm | attach |",
        "| --- | --- |",
    ]
    lines += [f"| {row['arm']} | {row['attach_s'] * 1e3:.1f} ms |" for row in report["results"]]
    for init, diff in report["peftkit_vs_peft_max_abs_residual_diff"].items():
        lines.append(f"\n{init}: peftkit's and PEFT's residual weights differ by at most {diff:.2e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128, help="the model's positions (no forward runs)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true", help="peftkit's arms only (no HF PEFT installed)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 1 block, hidden 64, 2 rounds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        import peft  # noqa: F401
    except ImportError:
        args.no_peft = True
    if args.quick:
        args.layers, args.hidden, args.vocab, args.repeats = 1, 64, 256, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()
