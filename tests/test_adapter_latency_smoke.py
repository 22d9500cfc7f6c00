"""``benchmarks/adapter_latency.py --quick`` runs end to end, as a user starts it, and writes the JSON docs/latency.md
describes: every variant timed at every shape, every ratio to the base a positive number.

Nothing about speed is asserted: the quick shapes are tiny, where Python overhead decides and the numbers mean nothing.
"""

from __future__ import annotations

import math

VARIANTS = {"base", "lora_merged", "lora", "houlsby", "pfeiffer", "parallel", "ia3_merged", "ia3"}


def test_adapter_latency_quick_writes_a_positive_ratio_for_every_variant_and_shape(run_quick_benchmark) -> None:
    stdout, report = run_quick_benchmark("adapter_latency")
    assert "| variant |" in stdout, "the script should print a markdown table"
    assert report["benchmark"] == "adapter_latency"
    assert set(report["environment"]) >= {"torch", "transformers", "cpu", "torch_threads", "date_utc", "device"}
    assert report["environment"]["torch_threads"] == 1
    assert set(report["variants"]) == VARIANTS

    shapes = {(row["batch"], row["seq"]) for row in report["results"]}
    assert shapes == {tuple(s) for s in report["config"]["shapes"]}
    for row in report["results"]:
        assert set(row["variants"]) == VARIANTS
        for name, result in row["variants"].items():
            assert result["ms"] > 0 and result["wall_ms"] > 0, (name, row["batch"], row["seq"])
            assert len(result["rounds_ms"]) == report["config"]["rounds"]
            if name != "base":
                for key in ("over_base", "over_base_wall"):
                    ratio = result[key]
                    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, (name, key, ratio)

        shares = row["inside_adapters_share"]  # CPU only: time inside the adapter modules, a fraction of the forward
        assert set(shares) == VARIANTS - {"base", "lora_merged", "ia3_merged"}
        assert all(0 < share < 1 for share in shares.values()), shares

    checks = report["checks"]
    assert all(checks["finite"].values()), checks["finite"]
    assert all(diff > 0 for diff in checks["max_abs_diff_to_base"].values()), "every adapter must change the output"
    assert set(checks["merged_vs_unmerged_relative_diff"]) == {"lora_merged", "ia3_merged"}
    assert all(diff < 1e-4 for diff in checks["merged_vs_unmerged_relative_diff"].values()), "merging changed outputs"
