"""How far a merged model's output strays from the unmerged one, over the conformance suite's own generated cases.

This is the measurement behind ``peftkit.testing.MERGE_TOLERANCE`` (docs/rules.md): for every mergeable registered
method it draws the suite's cases (host families, shapes, dtypes, selectors) through ``peftkit.testing.cases``,
moves the adapters with ``randomise_adapters(model, run=...)`` as the properties do, and records per dtype the
relative error max |merged - unmerged| / max |unmerged| and, after unmerging, the worst relative drift of a
weight. Reported: the number of cases, the median, the 99th percentile and the worst, next to the tolerance.

    python benchmarks/merge_tolerance.py [--examples 1000] [--methods lora ia3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peftkit_benchmarks.common import environment, run_and_report

import peftkit
from peftkit import testing

# A method's own fields, drawn as the project's conformance tests draw them (a required field must be here);
# other methods use their defaults.
FIELDS = {
    "lora": st.fixed_dictionaries(
        {"r": st.integers(1, 6), "alpha": st.floats(0.5, 32.0), "rslora": st.booleans()},
    ),
    "trainable-tokens": st.fixed_dictionaries({"indices": st.lists(st.integers(0, 1), min_size=1, unique=True)}),
}


def merge_errors(case: testing.Case) -> tuple[float, float]:
    """(merged-vs-unmerged output error, worst weight drift after unmerging) for one generated case, measured as
    the suite's merge properties measure them."""
    model = case.fresh()
    peftkit.attach(model, case.spec())
    assume(not testing.merge_refused(model))  # a quantised host takes no merge: the properties skip it too
    testing.randomise_adapters(model, run=case.run)
    with torch.no_grad():
        unmerged = case.run(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        peftkit.merge(model)
        merged_output = case.run(model)
        merged = {k: v.clone() for k, v in model.state_dict().items()}
        peftkit.unmerge(model)
    drift = testing.weight_drift(before, merged, model.state_dict())
    return testing.relative_error(merged_output, unmerged), max(drift.values(), default=0.0)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "worst": ordered[-1],
    }


def errors_by_dtype(method: str, examples: int) -> dict[torch.dtype, tuple[list[float], list[float]]]:
    """Both errors of every generated case of ``method``, grouped by the case's dtype."""
    seen: dict[torch.dtype, tuple[list[float], list[float]]] = {}

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=testing.cases(method, FIELDS.get(method, st.just({}))))
    def record(case: testing.Case) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            output, drift = merge_errors(case)
        outputs, drifts = seen.setdefault(case.dtype, ([], []))
        outputs.append(output)
        drifts.append(drift)

    record()
    return seen


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for method in args.methods:
        seen = errors_by_dtype(method, args.examples)
        for dtype, (outputs, drifts) in sorted(seen.items(), key=lambda item: str(item[0])):
            rows.append(
                {
                    "method": method,
                    "dtype": str(dtype).removeprefix("torch."),
                    "cases": len(outputs),
                    "tolerance": testing.MERGE_TOLERANCE[dtype],
                    "merged_vs_unmerged": summary(outputs),
                    "unmerge_drift": summary(drifts),
                }
            )
    return {
        "benchmark": "merge_tolerance",
        "environment": environment(),
        "config": {"examples": args.examples, "methods": args.methods},
        "results": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Merge error over the conformance suite's cases ({report['config']['examples']} drawn per method, "
        f"measured on {report['environment']['cpu']}, torch {report['environment']['torch']})",
        "",
        "| method | dtype | cases | tolerance | merged vs unmerged: median | p99 | worst | unmerge drift: worst |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        out, drift = row["merged_vs_unmerged"], row["unmerge_drift"]
        lines.append(
            f"| {row['method']} | {row['dtype']} | {row['cases']} | {row['tolerance']:.0e} | {out['median']:.2e} | "
            f"{out['p99']:.2e} | {out['worst']:.2e} | {drift['worst']:.2e} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    mergeable = [m for m in peftkit.known_methods() if peftkit.get_method(m).capabilities.mergeable]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="cases drawn per method (all dtypes together)")
    parser.add_argument("--methods", nargs="+", choices=mergeable, default=mergeable)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 12 cases per method")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples = 12
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()
