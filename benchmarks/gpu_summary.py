"""One JSON and one markdown summary of a ``benchmarks/gpu_check.sh`` run, judged against issue #20's GPU targets.

It reads what the check wrote into its folder: ``cuda-tests.xml`` (pytest's JUnit report), ``compare/report.json``
(``peftkit compare --peer peft``), ``routing.json`` (``routing_throughput.py``) and ``versus_peft.json``. A part that
is missing or failed is reported as not measured, with the file it looked for; nothing is filled in.

    python -m peftkit_benchmarks.gpu_summary OUT [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

TARGETS = {
    "lora_step_speedup_over_peft": 1.3,  # peftkit's LoRA step is at least this many times as fast as PEFT's
    "mixed_batch_speedup_over_peft_at_32": 2.0,
    "check_seconds": 480,  # the whole check, at most
}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cuda_tests(folder: Path) -> dict[str, Any]:
    try:
        root = ElementTree.parse(folder / "cuda-tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return {"measured": False, "looked_for": str(folder / "cuda-tests.xml")}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {
        "measured": True,
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
    }


def compare_step(folder: Path) -> dict[str, Any]:
    """peftkit's LoRA step ÷ its PEFT twin's, paired in the compare's probe, as a speed-up."""
    report = _read_json(folder / "compare" / "report.json")
    ratio = ((report or {}).get("ratios_to_peer") or {}).get("lora", {}).get("step_seconds_paired_probe")
    if not ratio:
        return {"measured": False, "looked_for": str(folder / "compare" / "report.json")}
    environment = report.get("environment", {})
    return {
        "measured": True,
        "model": report.get("experiment", {}).get("name"),
        "step_time_over_peft": ratio,
        "speedup": 1.0 / ratio,
        "score_difference_to_peft": report["ratios_to_peer"]["lora"].get("score_difference"),
        "device": environment.get("cuda_device") or environment.get("device"),
    }


def versus_peft_step(folder: Path) -> dict[str, Any]:
    report = _read_json(folder / "versus_peft.json")
    rows = [r for r in (report or {}).get("training", []) if "peftkit_over_peft" in r]
    if not rows:
        return {"measured": False, "looked_for": str(folder / "versus_peft.json")}
    return {
        "measured": True,
        "rows": [
            {
                "model": r["model"],
                "targets": r["targets"],
                "speedup": 1.0 / r["peftkit_over_peft"],
                "fused_over_hook_path": r.get("peftkit_over_hooks"),
            }
            for r in rows
        ],
    }


def mixed_batches(folder: Path) -> dict[str, Any]:
    report = _read_json(folder / "routing.json")
    rows = {r["adapters"]: r for r in (report or {}).get("results", [])}
    if 32 not in rows or "routed_speedup_over_peft_mixed" not in rows[32]:
        return {"measured": False, "looked_for": str(folder / "routing.json")}
    return {
        "measured": True,
        "gpu": (report.get("environment") or {}).get("gpu"),
        "speedup_by_adapters": {n: r.get("routed_speedup_over_peft_mixed") for n, r in sorted(rows.items())},
        "routed_vs_peft_max_abs_diff": rows[32].get("routed_vs_peft_mixed_max_abs_diff"),
    }


def verdicts(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    measured: dict[str, float] = {}
    if summary["compare"]["measured"]:
        measured["lora_step_speedup_over_peft"] = summary["compare"]["speedup"]
    if summary["mixed_batches"]["measured"]:
        measured["mixed_batch_speedup_over_peft_at_32"] = summary["mixed_batches"]["speedup_by_adapters"][32]
    if summary.get("seconds") is not None:
        measured["check_seconds"] = summary["seconds"]
    found = {}
    for name, target in TARGETS.items():
        if name not in measured:
            found[name] = {"target": target, "measured": None, "met": None}
            continue
        met = measured[name] <= target if name == "check_seconds" else measured[name] >= target
        found[name] = {"target": target, "measured": measured[name], "met": met}
    return found


def summarise(folder: Path, seconds: float | None = None) -> dict[str, Any]:
    summary = {
        "folder": str(folder),
        "seconds": seconds,
        "cuda_tests": cuda_tests(folder),
        "compare": compare_step(folder),
        "versus_peft": versus_peft_step(folder),
        "mixed_batches": mixed_batches(folder),
    }
    summary["targets"] = verdicts(summary)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check ({summary['folder']}, {summary['seconds']} s)", ""]
    tests = summary["cuda_tests"]
    lines.append(
        f"- CUDA tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"
        if tests["measured"]
        else f"- CUDA tests: not measured ({tests['looked_for']} missing)"
    )
    for row in summary["versus_peft"].get("rows", []):
        fused = row["fused_over_hook_path"]
        lines.append(
            f"- versus_peft, {row['model']} LoRA on {row['targets']}: step {row['speedup']:.2f}x PEFT's speed"
            + (f"; fused ÷ hook path {fused:.3f}" if fused else "")
        )
    lines += ["", "| target | wanted | measured | verdict |", "| --- | ---: | ---: | --- |"]
    for name, verdict in summary["targets"].items():
        wanted = f"<= {verdict['target']}" if name == "check_seconds" else f">= {verdict['target']}"
        value = "not measured" if verdict["measured"] is None else f"{verdict['measured']:.2f}"
        state = "—" if verdict["met"] is None else ("met" if verdict["met"] else "MISSED")
        lines.append(f"| {name} | {wanted} | {value} | {state} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seconds", type=float, help="how long the whole check took")
    args = parser.parse_args(argv)
    summary = summarise(args.folder, args.seconds)
    text = markdown(summary)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.folder / "summary.md").write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
