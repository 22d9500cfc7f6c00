"""Turn raw worker results into per-arm summaries, ratios to full fine-tuning, markdown and JSON.

Only measured numbers appear; a cell that was not measured (no CUDA, nothing to merge) reads "—".
Ratios pair runs of the same seed with each other before taking the median.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.compare import scoring
from peftkit_benchmarks.compare.experiment import Experiment
from peftkit_benchmarks.compare.measure import median, paired_ratios


def environment(device: str, dtype: str, threads: int | None, command: str, omp_wait_policy: str) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "command": command,
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "dtype": dtype,
        "omp_wait_policy": omp_wait_policy,  # what the workers ran with, and why (runner.wait_policy)
        "versions": {p: version(p) for p in ["peftkit", "torch", "transformers", "peft", "safetensors", "pydantic"]},
    }


def summarise_arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [r["score"] for r in runs]
    first = runs[0]
    memory = [r["memory"] for r in runs]
    state = [m["parameter_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"] for m in memory]
    cuda = [m["cuda_peak_allocated_bytes"] for m in memory if m["cuda_peak_allocated_bytes"] is not None]
    timed = [r["latency"] for r in runs if r["latency"] is not None]  # the first seed's run measures it
    latency = {
        variant: median(values) if (values := [t["seconds"][variant] for t in timed if t["seconds"][variant]]) else None
        for variant in ["base", "unmerged", "merged"]
    }
    return {
        "seeds": [r["seed"] for r in runs],
        "trainable_parameters": first["trainable_parameters"],
        "base_parameters": first["base_parameters"],
        "trainable_percent_of_base": 100.0 * first["trainable_parameters"] / first["base_parameters"],
        "checkpoint_bytes": int(median([r["checkpoint_bytes"] for r in runs])),
        "weight_bytes": memory[0].get("weight_bytes"),
        "score": {  # the task's primary metric (higher is better), as the metric gives it
            "mean": statistics.fmean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores),
            "max": max(scores),
            "per_seed": scores,
        },
        "metrics": {name: statistics.fmean(r["metrics"][name] for r in runs) for name in first["metrics"]},
        "median_step_seconds": median([r["median_step_seconds"] for r in runs]),
        "median_tokens_per_second": median([r["median_tokens_per_second"] for r in runs]),
        "peak_rss_bytes": int(median([m["peak_rss_bytes"] for m in memory])),
        "rss_growth_bytes": int(median([m["peak_rss_bytes"] - m["rss_before_model_bytes"] for m in memory])),
        "cuda_peak_allocated_bytes": int(median(cuda)) if cuda else None,
        "state_bytes": {
            "parameters": memory[0]["parameter_bytes"],
            "gradients": memory[0]["gradient_bytes"],
            "optimizer": memory[0]["optimizer_state_bytes"],
            "total": int(median(state)),
        },
        "saved_activation_bytes": int(median([m["saved_activation_bytes"] for m in memory])),
        "latency_seconds": latency,
        "latency_shape": [timed[0]["batch_size"], timed[0]["sequence_length"]],
        "merged_max_abs_logit_difference": timed[0].get("merged_max_abs_logit_difference"),
    }


def exact_floor(run: dict[str, Any]) -> int:
    """Parameter, gradient, optimizer-state and saved-activation bytes: what training must hold at once."""
    m = run["memory"]
    return m["parameter_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"] + m["saved_activation_bytes"]


def ratios_to(reference: str, arm: str, by_arm: dict[str, list[dict[str, Any]]], summary, probe) -> dict:
    """Arm ÷ full fine-tuning, each pair from the same seed (or the same probe round)."""
    ref_runs = {r["seed"]: r for r in by_arm[reference]}
    pairs = [(r, ref_runs[r["seed"]]) for r in by_arm[arm] if r["seed"] in ref_runs]

    def paired(key) -> float | None:
        values = [(key(a), key(b)) for a, b in pairs]
        values = [(a, b) for a, b in values if a is not None and b]
        return paired_ratios([a for a, _ in values], [b for _, b in values]) if values else None

    ours, ref = summary[arm], summary[reference]
    probe_ratio = None
    if probe and arm in probe["probe_seconds"] and reference in probe["probe_seconds"]:
        probe_ratio = paired_ratios(probe["probe_seconds"][arm], probe["probe_seconds"][reference])
    return {
        "trainable_parameters": ours["trainable_parameters"] / ref["trainable_parameters"],
        "checkpoint_bytes": ours["checkpoint_bytes"] / ref["checkpoint_bytes"],
        "weight_bytes": ours["weight_bytes"] / ref["weight_bytes"]
        if ours["weight_bytes"] and ref["weight_bytes"]
        else None,
        "step_seconds_paired_probe": probe_ratio,
        "step_seconds_separate_runs": paired(lambda r: r["median_step_seconds"]),
        "peak_rss": paired(lambda r: r["memory"]["peak_rss_bytes"]),
        "rss_growth": paired(lambda r: r["memory"]["peak_rss_bytes"] - r["memory"]["rss_before_model_bytes"]),
        "cuda_peak_allocated": paired(lambda r: r["memory"]["cuda_peak_allocated_bytes"]),
        "state_bytes": ours["state_bytes"]["total"] / ref["state_bytes"]["total"],
        "state_and_saved_activation_bytes": paired(exact_floor),
        "score_difference": ours["score"]["mean"] - ref["score"]["mean"],
    }


def describe_task(experiment: Experiment, loaded: dict[str, Any] | None) -> dict[str, Any]:
    """The task as the report states it: kind, metric and its display scale (the built-in metrics are fractions,
    shown in percent; a user's scorer as it returns), with the split sizes and origins when the data was read."""
    config = experiment.task
    return {
        "name": config.name,
        "kind": config.kind,
        "metric": scoring.metric_name(config),
        "scale": 100.0 if scoring.metric_name(config) in ("accuracy", "exact match") else 1.0,
        "higher_is_better": scoring.higher_is_better(config),
        **(loaded or {}),
    }


def build_report(
    experiment: Experiment, raw: dict[str, Any], env: dict[str, Any], task: dict[str, Any] | None = None
) -> dict[str, Any]:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for run in raw["runs"]:
        by_arm.setdefault(run["arm"], []).append(run)
    summary = {name: summarise_arm(runs) for name, runs in by_arm.items()}
    full = next((arm.name for arm in experiment.arms if arm.is_full and arm.name in by_arm), None)
    ratios = {name: ratios_to(full, name, by_arm, summary, raw.get("probe")) for name in by_arm} if full else {}
    peer_ratios = {
        name: ratios_to(f"{name}-peft", name, by_arm, summary, raw.get("probe"))
        for name in by_arm
        if f"{name}-peft" in by_arm
    }
    return {
        "experiment": experiment.model_dump(mode="json"),
        "task": describe_task(experiment, task),
        "environment": env,
        "reference_arm": full,
        "arms": summary,
        "ratios_to_full": ratios,
        "ratios_to_peer": peer_ratios,
        "probe": raw.get("probe"),
        "reused_runs": raw.get("reused", []),  # finished by an earlier invocation that was stopped, and kept
        "runs": raw["runs"],
    }


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ["B", "KB", "MB", "GB"]:
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}×"


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.1f}"


def markdown(report: dict[str, Any]) -> str:
    env, experiment = report["environment"], report["experiment"]
    arms, ratios = report["arms"], report["ratios_to_full"]
    budget, task = experiment["budget"], experiment["task"]
    shape = next(iter(arms.values()))["latency_shape"]
    task_info = report["task"]
    scale = task_info["scale"]
    metric = task_info["metric"] + (" %" if scale == 100 else "")
    if not task_info.get("higher_is_better", True):
        metric += ", lower is better"
    units = "points" if scale == 100 else task_info["metric"]
    extras = scoring.beside_primary(arms, task_info)
    lines = [
        f"### {experiment['name']}: {task['name']}, {budget['steps']} steps × batch {budget['batch_size']}, "
        f"seeds {budget['seeds']}",
        "",
        *(
            [f"Scored on a seeded subsample of {task['eval_size']} examples, not the whole split.", ""]
            if task.get("eval_size")
            else []
        ),
        f"`{env['command']}` — {env['device']} ({env['cuda_device'] or env['cpu']}), {env['threads']} threads, "
        f"{env['dtype']}, torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"peftkit {env['versions']['peftkit']}, {env['utc']}; OMP_WAIT_POLICY {env['omp_wait_policy']}",
        "",
        *task_lines(report["task"]),
        *(
            [f"Resumed: {', '.join(report['reused_runs'])} finished in an earlier invocation and were kept.", ""]
            if report.get("reused_runs")
            else []
        ),
        f"| arm | trainable params | % of base | checkpoint | weights in memory | {metric} (mean ± sd, n) "
        f"{''.join(f'| {scoring.DISPLAY_NAMES.get(extra, extra)} ' for extra in extras)}| Δ vs full ({units}) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | " + "---: | " * len(extras) + "---: |",
    ]
    for name, s in arms.items():
        score, r = s["score"], ratios.get(name, {})
        delta = r.get("score_difference")
        lines.append(
            f"| {name} | {s['trainable_parameters']:,} | {s['trainable_percent_of_base']:.3f} | "
            f"{_size(s['checkpoint_bytes'])} | {_size(s.get('weight_bytes'))} | "
            f"{scale * score['mean']:.2f} ± {scale * score['std']:.2f} ({len(score['per_seed'])}) | "
            + "".join(f"{scale * s['metrics'][extra]:.2f} | " for extra in extras)
            + f"{'—' if delta is None else f'{scale * delta:+.2f}'} |"
        )
    peers = report.get("ratios_to_peer") or {}
    if peers:
        lines += [
            "",
            f"| arm ÷ its HF PEFT twin | step (paired) | peak RSS | weights in memory | {metric} Δ ({units}) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in peers.items():
            lines.append(
                f"| {name} ÷ {name}-peft | {_x(r.get('step_seconds_paired_probe'))} | {_x(r.get('peak_rss'))} | "
                f"{_x(r.get('weight_bytes'))} | {scale * r['score_difference']:+.2f} |"
            )
    memory_header = "CUDA peak allocated" if env["device"].startswith("cuda") else "peak RSS (growth)"
    lines += [
        "",
        f"| arm | median step (s) | tokens/s | step ÷ full (paired) | {memory_header} | ÷ full "
        "| params+grads+AdamW bytes | ÷ full | + saved activations | ÷ full |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in arms.items():
        r = ratios.get(name, {})
        if env["device"].startswith("cuda"):
            memory, memory_ratio = _size(s["cuda_peak_allocated_bytes"]), _x(r.get("cuda_peak_allocated"))
        else:
            memory = f"{_size(s['peak_rss_bytes'])} ({_size(s['rss_growth_bytes'])})"
            memory_ratio = f"{_x(r.get('peak_rss'))} ({_x(r.get('rss_growth'))})"
        lines.append(
            f"| {name} | {s['median_step_seconds']:.3f} | {s['median_tokens_per_second']:,.0f} | "
            f"{_x(r.get('step_seconds_paired_probe'))} | {memory} | {memory_ratio} | "
            f"{_size(s['state_bytes']['total'])} | {_x(r.get('state_bytes'), 3)} | "
            f"{_size(s['state_bytes']['total'] + s['saved_activation_bytes'])} | "
            f"{_x(r.get('state_and_saved_activation_bytes'), 3)} |"
        )
    lines += [
        "",
        "| arm | latency base (ms) | unmerged (ms) | merged (ms) | merged vs unmerged max abs logit diff |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in arms.items():
        lat, diff = s["latency_seconds"], s["merged_max_abs_logit_difference"]
        lines.append(
            f"| {name} | {_ms(lat['base'])} | {_ms(lat['unmerged'])} | {_ms(lat['merged'])} | "
            f"{'—' if diff is None else f'{diff:.1e}'} |"
        )
    lines += [
        "",
        f"Latency: one forward of a {shape[0]} × {shape[1]}-token batch, median of {budget['latency_repeats']} "
        'round-robin calls in the first seed\'s run of each arm; for full fine-tuning "unmerged" is the trained model. '
        "Weights in memory: every tensor of the model's state dict once (packed 4-bit weights and their "
        "quantisation statistics included). Step ÷ full (paired): median of per-step ratios from one process alternating the arms on the same "
        "batches. Peak RSS is each arm's own worker process; growth = peak minus the RSS just before the model was "
        "loaded (after imports, data and tokenizer). Saved activations: the bytes autograd kept for the backward of "
        "each seed's first batch (the same batch for every arm), counted exactly. "
        f"{task_info['metric'].capitalize()} on the {env.get('eval_split', 'test')} split.",
        "",
    ]
    return "\n".join(lines)


def task_lines(task: dict[str, Any]) -> list[str]:
    """Where each split came from and its size, when the data was read for this report."""
    if "sizes" not in task:
        return []
    described = "; ".join(f"{split} {task['sizes'][split]:,} ({task['origin'][split]})" for split in task["sizes"])
    return [f"Task: {task['kind']}, scored by {task['metric']}. Splits: {described}.", ""]


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2), encoding="utf-8")
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    return paths
