"""The shape of LoRA's Table 1: forward latency of adapters on a GPT-2-medium-shaped model, as ratios to the base.

Hu et al. (2021), Table 1, measured one forward pass of GPT-2 medium on a GPU: adapter layers added 20.7 % (AdapterL)
and 30.3 % (AdapterH, Houlsby) at batch 1 x seq 128, and only 2-3 % at batch 32 x seq 512, because an adapter adds
depth (small products that run one after another) rather than width. LoRA adds nothing once merged. This script
times the same forward (``torch.inference_mode()``, eval mode, no KV cache) for:

- the base model; LoRA r=4 on ``c_attn`` (as the paper's GPT-2 runs), merged and unmerged;
- Houlsby (after the attention output and the FFN output), Pfeiffer (after the FFN) and the parallel adapter (beside
  the FFN), bottleneck 64, placed by peftkit's family table; they cannot be merged;
- IA3 (keys, values and the FFN activation), merged and unmerged.

Fairness: there is one model. Before each timed visit the variant is attached (seeded, adapters randomised with
``peftkit.testing.randomise_adapters`` so that no update is zero), merged if it is a merged variant, and detached
afterwards; after a merged visit the base weights are copied back from a pristine snapshot, so merge/unmerge rounding
never accumulates. Every variant therefore runs on the very same base tensors, and only the adapter differs.
Attaching, merging and detaching are outside the timed region. Variants are visited round-robin, the starting
variant rotating from round to round, and each ratio is the median over rounds of (variant / base in that round).
On the CPU the headline clock is this process's CPU time (waiting for a shared core does not count), wall-clock
ratios beside it; on CUDA it is CUDA events around each forward, started from an idle (synchronised) device. On the
CPU one more forward per adapter variant times the inside of the adapter modules with hooks, as a share of that
forward: both parts come from one forward, so it stays sharp where the shared machine blurs the ratios.

Shapes. ``--device cuda`` runs the paper's model (24 layers, hidden 1024, 16 heads, vocab 50257) at batch x seq
1 x 128, 16 x 256 and 32 x 512. The CPU default is the same width with 4 layers and vocab 8192, which keeps the
``lm_head`` share of the work what it is in the 24-layer, 50257-vocab model (14 % of the multiply-adds), at 1 x 128 and 4 x 256
(a 16 x 256 forward of even 4 layers takes ~7 s on one core). ``--full`` runs the paper's model on the CPU.

    python benchmarks/adapter_latency.py [--full] [--device cuda] [--shapes 1x128 16x256] [--rounds 11] [--json PATH]
    python benchmarks/adapter_latency.py --quick        # CI smoke run: seconds; the numbers mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.common import environment, run_and_report
from peftkit_benchmarks.lora_overhead import paired_ratio, round_robin
from torch import nn

import peftkit
from peftkit.keys import ADAPTER_CONTAINER
from peftkit.testing import randomise_adapters

# Hu et al. (2021), Table 1 (Quadro RTX8000, GPT-2 medium, mean of 100 trials): latency over Fine-Tune/LoRA.
PAPER_TABLE_1 = {
    (32, 512): {"AdapterL": 1.022, "AdapterH": 1.030},
    (16, 256): {"AdapterL": 1.050, "AdapterH": 1.084},
    (1, 128): {"AdapterL": 1.207, "AdapterH": 1.303},
}


@dataclass(frozen=True)
class Variant:
    """One model variant: the spec entry attached for it (none for the base) and whether it is merged."""

    name: str
    label: str
    entry: dict[str, Any] | None = None
    merged: bool = False


LORA = {"method": "lora", "target": ["c_attn"], "r": 4, "alpha": 32}  # r=4, alpha=32 as in the paper's GPT-2 runs
VARIANTS = [
    Variant("base", "base"),
    Variant("lora_merged", "LoRA r=4 c_attn, merged", LORA, merged=True),
    Variant("lora", "LoRA r=4 c_attn, unmerged", LORA),
    Variant("houlsby", "Houlsby, bottleneck 64", {"method": "houlsby", "bottleneck": 64}),
    Variant("pfeiffer", "Pfeiffer, bottleneck 64", {"method": "pfeiffer", "bottleneck": 64}),
    Variant("parallel", "parallel adapter, bottleneck 64", {"method": "parallel", "bottleneck": 64}),
    Variant("ia3_merged", "IA3, merged", {"method": "ia3"}, merged=True),
    Variant("ia3", "IA3, unmerged", {"method": "ia3"}),
]
BY_NAME = {v.name: v for v in VARIANTS}


# --- model and variants ----------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> nn.Module:
    """A randomly initialised GPT-2 (seeded), dropout off, in eval mode on ``args.device``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.hidden,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=max(seq for _, seq in args.shapes),
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(args.device).eval()


@dataclass
class Workbench:
    """The one model every variant runs on, and a pristine copy of its weights to undo merges exactly."""

    model: nn.Module
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pristine = {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    @contextlib.contextmanager
    def running(self, variant: Variant) -> Iterator[nn.Module]:
        """The model with ``variant`` attached (and merged) for the duration of the block; the base afterwards."""
        if variant.entry is None:
            yield self.model
            return
        torch.manual_seed(1)  # the same adapters on every visit
        peftkit.attach(self.model, {"adapters": {"default": [variant.entry]}})
        try:
            randomise(self.model, seed=1)
            if variant.merged:
                peftkit.merge(self.model)
            yield self.model
        finally:
            peftkit.detach(self.model)
            if variant.merged:  # unmerging rounds; put back the exact base weights
                with torch.no_grad():
                    for name, tensor in self.model.state_dict().items():
                        tensor.copy_(self.pristine[name])


def randomise(model: nn.Module, seed: int) -> None:
    """``peftkit.testing.randomise_adapters`` on any device: it draws its noise on the CPU and adds it in place, which
    works only for CPU parameters, so adapters elsewhere visit the CPU for it (outside the timed region)."""
    adapters = [getattr(m, ADAPTER_CONTAINER) for m in model.modules() if hasattr(m, ADAPTER_CONTAINER)]
    device = next(p.device for adapter in adapters for p in adapter.parameters())
    if device.type != "cpu":
        for adapter in adapters:
            adapter.cpu()
    randomise_adapters(model, seed=seed)
    if device.type != "cpu":
        for adapter in adapters:
            adapter.to(device)


def forward_call(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def forward() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    return forward


def token_ids(batch: int, seq: int, vocab: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 100_003 + seq)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


# --- timing -------------------------------------------------------------------------------------------------------


def cuda_seconds(call: Callable[[], Any], warmup: int, repeats: int) -> dict[str, list[float]]:
    """``{"cuda": [...], "wall": [...]}``: CUDA-event and wall seconds of each call, each started on an idle device.

    Synchronising before each call makes this the latency of one forward (launches included), as in the paper,
    not the throughput of back-to-back forwards that overlap launch and compute.
    """
    for _ in range(warmup):
        call()
    seconds: dict[str, list[float]] = {"cuda": [], "wall": []}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            wall = time.perf_counter()
            start.record()
            call()
            end.record()
            end.synchronize()
            seconds["wall"].append(time.perf_counter() - wall)
            seconds["cuda"].append(start.elapsed_time(end) / 1e3)
    finally:
        gc.enable()
    return seconds


def visit_seconds(call: Callable[[], Any], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of ``args.inner`` calls on each clock, after ``args.visit_warmup`` untimed calls."""
    if args.device.startswith("cuda"):
        seconds = cuda_seconds(call, args.visit_warmup, args.inner)
    else:  # the CPU clocks of lora_overhead's round robin, here for one variant at a time
        both = round_robin({"forward": call}, rounds=args.inner, warmup=args.visit_warmup)
        seconds = {clock: times["forward"] for clock, times in both.items()}
    return {clock: statistics.median(times) for clock, times in seconds.items()}


def measure_shape(bench: Workbench, variants: list[Variant], ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Per-variant seconds on each clock, one value per round, variants visited round-robin (rotating start)."""
    seconds: dict[str, dict[str, list[float]]] = {}
    for index in range(args.warmup_rounds + args.rounds):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            with bench.running(variant) as model:
                visit = visit_seconds(forward_call(model, ids), args)
            if index >= args.warmup_rounds:
                for clock, value in visit.items():
                    seconds.setdefault(clock, {v.name: [] for v in variants})[variant.name].append(value)
    return seconds


def shape_row(batch: int, seq: int, seconds: dict[str, dict[str, list[float]]], headline: str) -> dict[str, Any]:
    """Median milliseconds and paired ratios to the base for every variant of one shape."""
    row: dict[str, Any] = {"batch": batch, "seq": seq, "tokens": batch * seq, "variants": {}}
    for name in seconds[headline]:
        result = {
            "ms": statistics.median(seconds[headline][name]) * 1e3,
            "rounds_ms": [1e3 * s for s in seconds[headline][name]],
        }
        result["wall_ms"] = statistics.median(seconds["wall"][name]) * 1e3
        if name != "base":
            result["over_base"] = paired_ratio(seconds[headline], name, "base")
            result["over_base_wall"] = paired_ratio(seconds["wall"], name, "base")
        row["variants"][name] = result
    return row


def inside_adapters(model: nn.Module, call: Callable[[], Any], repeats: int = 3) -> float:
    """Median fraction of a forward's CPU time spent inside the adapter modules, timed by hooks on those modules.

    On a shared CPU the paired ratio wanders by a few percent, as much as the adapters cost; this share is sharper
    because both of its parts come from the same forward. It leaves out peftkit's hook dispatch and what runs
    outside ``Adapter.forward`` (IA3 scales the FFN activation from a pre-hook), so it is a lower bound.
    """
    started: dict[int, float] = {}
    spent = [0.0]

    def enter(module: nn.Module, args: Any) -> None:
        started[id(module)] = time.process_time()

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        spent[0] += time.process_time() - started[id(module)]

    adapters = [m for m in model.modules() if isinstance(m, peftkit.Adapter)]
    hooks = [h for a in adapters for h in (a.register_forward_pre_hook(enter), a.register_forward_hook(leave))]
    shares = []
    try:
        for _ in range(repeats):
            spent[0], start = 0.0, time.process_time()
            call()
            shares.append(spent[0] / (time.process_time() - start))
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.median(shares)


def adapter_shares(bench: Workbench, variants: list[Variant], ids: torch.Tensor) -> dict[str, float]:
    """``inside_adapters`` for every unmerged adapter variant (merged adapters do not run)."""
    shares = {}
    for variant in variants:
        if variant.entry is not None and not variant.merged:
            with bench.running(variant) as model:
                shares[variant.name] = inside_adapters(model, forward_call(model, ids))
    return shares


# --- checks: the adapters run, and merging does not change the outputs -------------------------------------------


def checks(bench: Workbench, variants: list[Variant], args: argparse.Namespace) -> dict[str, Any]:
    """One small forward per variant: adapter parameters, |output - base| (non-zero: the adapter ran), finiteness,
    and the relative |merged - unmerged| for each mergeable method."""
    ids = token_ids(1, min(32, args.shapes[0][1]), args.vocab, args.device)
    outputs, parameters = {}, {}
    for variant in variants:
        with bench.running(variant) as model:
            outputs[variant.name] = forward_call(model, ids)().float()
            parameters[variant.name] = peftkit.trainable_parameters(model).trainable if variant.entry else 0
    base = outputs["base"]
    result: dict[str, Any] = {"adapter_parameters": parameters, "max_abs_diff_to_base": {}, "finite": {}}
    for name, out in outputs.items():
        result["finite"][name] = bool(torch.isfinite(out).all())
        if name != "base":
            result["max_abs_diff_to_base"][name] = (out - base).abs().max().item()
    result["merged_vs_unmerged_relative_diff"] = {  # max |merged - unmerged| / max |unmerged|
        v.name: ((outputs[v.name] - outputs[unmerged]).abs().max() / outputs[unmerged].abs().max()).item()
        for v in variants
        if v.merged and (unmerged := v.name.removesuffix("_merged")) in outputs
    }
    return result


# --- report -------------------------------------------------------------------------------------------------------


def device_environment(device: str) -> dict[str, Any]:
    """lora_overhead's environment (versions, CPU, threads, date) plus the accelerator, if any."""
    info = environment()
    info["device"] = device
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def measure(args: argparse.Namespace) -> dict[str, Any]:
    variants = [BY_NAME[name] for name in args.variants]
    bench = Workbench(build_model(args))
    # The round robin collects garbage before every visit; with torch and transformers loaded a full collection
    # walks ~10^6 long-lived objects (0.35 s here). Freezing them once leaves only what the visits create.
    gc.collect()
    gc.freeze()
    checked = checks(bench, variants, args)
    headline = "cuda" if args.device.startswith("cuda") else "cpu"
    rows = []
    for batch, seq in args.shapes:
        ids = token_ids(batch, seq, args.vocab, args.device)
        row = shape_row(batch, seq, measure_shape(bench, variants, ids, args), headline)
        if headline == "cpu":  # host-side hooks cannot time asynchronous CUDA work
            row["inside_adapters_share"] = adapter_shares(bench, variants, ids)
        rows.append(row)
    config = {k: getattr(args, k) for k in ("device", "layers", "hidden", "heads", "vocab", "rounds", "inner")}
    config.update(
        shapes=[list(s) for s in args.shapes],
        warmup_rounds=args.warmup_rounds,
        visit_warmup=args.visit_warmup,
        clock=headline,
        full=args.full,
        quick=args.quick,
    )
    return {
        "benchmark": "adapter_latency",
        "environment": device_environment(args.device),
        "config": config,
        "variants": {v.name: {"label": v.label, "entry": v.entry, "merged": v.merged} for v in variants},
        "checks": checked,
        "results": rows,
        "paper_table_1": [{"batch": b, "seq": s, **ratios} for (b, s), ratios in PAPER_TABLE_1.items()],
    }


def markdown(report: dict[str, Any]) -> str:
    config, rows = report["config"], report["results"]
    clock = "CUDA events" if config["clock"] == "cuda" else "CPU time"
    lines = [
        f"GPT-2 shape: {config['layers']} layers, hidden {config['hidden']}, {config['heads']} heads, vocab "
        f"{config['vocab']}; {config['device']}, {report['environment']['torch_threads']} thread(s); {clock}, median "
        f"of {config['rounds']} paired rounds (wall-clock ratio in brackets)",
        "",
        "| variant | adapter params | " + " | ".join(f"{r['batch']} x {r['seq']}" for r in rows) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in rows) + " |",
    ]
    parameters = report["checks"]["adapter_parameters"]
    for name, variant in report["variants"].items():
        cells = []
        for row in rows:
            result = row["variants"][name]
            if name == "base":
                cells.append(f"{result['ms']:.1f} ms")
            else:
                cells.append(f"{result['over_base']:.3f} ({result['over_base_wall']:.3f})")
        lines.append(f"| {variant['label']} | {parameters[name]:,} | " + " | ".join(cells) + " |")
    if rows and "inside_adapters_share" in rows[0]:
        lines += [
            "",
            "Time inside the adapter modules, % of the same forward's CPU time (sharper; a lower bound):",
            "",
            "| variant | " + " | ".join(f"{r['batch']} x {r['seq']}" for r in rows) + " |",
            "| --- | " + " | ".join("---:" for _ in rows) + " |",
        ]
        for name in rows[0]["inside_adapters_share"]:
            shares = [f"{100 * r['inside_adapters_share'][name]:.2f} %" for r in rows]
            lines.append(f"| {report['variants'][name]['label']} | " + " | ".join(shares) + " |")
    lines += ["", "Paper, Table 1 (GPT-2 medium, RTX8000), adapter latency / Fine-Tune-or-LoRA:"]
    lines += [
        f"- {p['batch']} x {p['seq']}: AdapterL {p['AdapterL']:.3f}, AdapterH {p['AdapterH']:.3f}"
        for p in report["paper_table_1"]
    ]
    merge_error = report["checks"]["merged_vs_unmerged_relative_diff"]
    if merge_error:
        lines.append(
            "- merged vs unmerged, max |logit difference| / max |logit|: "
            + ", ".join(f"{k} {v:.2g}" for k, v in merge_error.items())
        )
    if not all(report["checks"]["finite"].values()):
        lines.append(f"- WARNING: non-finite outputs: {report['checks']['finite']}")
    if config["quick"]:
        lines.append("(--quick: tiny shapes for a smoke run; the numbers say nothing about performance)")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------------------


def shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: write batch x seq, e.g. 16x256") from None
    return batch, seq


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; cuda runs the paper's model and shapes")
    parser.add_argument("--full", action="store_true", help="the paper's model (24 layers, vocab 50257) on the CPU")
    parser.add_argument("--shapes", type=shape, nargs="+", help="batch x seq, e.g. 1x128 16x256 (default per mode)")
    parser.add_argument("--layers", type=int, help="override the mode's layer count")
    parser.add_argument("--variants", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 11 on the CPU, 10 on CUDA)")
    parser.add_argument("--inner", type=int, help="timed forwards per visit (default: 1 on the CPU, 10 on CUDA)")
    parser.add_argument("--visit-warmup", type=int, help="untimed forwards per visit (default: 0 CPU, 2 CUDA)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed round-robin rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable numbers)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny model and shapes, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.full = args.full or cuda
    args.hidden, args.heads = 1024, 16
    if args.quick:
        args.hidden, args.heads, args.vocab, layers, shapes = 128, 4, 512, 2, [(1, 16), (2, 32)]
        args.rounds, args.warmup_rounds = args.rounds or 2, 0
    elif args.full:
        args.vocab, layers = 50257, 24
        shapes = [(1, 128), (16, 256), (32, 512)] if cuda else [(1, 128), (16, 256)]
    else:
        args.vocab, layers, shapes = 8192, 4, [(1, 128), (4, 256)]
    args.layers = args.layers or layers
    args.shapes = args.shapes or shapes
    args.rounds = args.rounds or (10 if cuda else 11)
    args.inner = args.inner or (10 if cuda and not args.quick else 1)
    args.visit_warmup = args.visit_warmup if args.visit_warmup is not None else (2 if cuda else 0)
    if "base" not in args.variants:
        args.variants = ["base", *args.variants]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()
