"""benchmarks/routing_throughput.py runs end to end in its ``--quick`` mode and writes the JSON docs/benchmarks.md describes.

The script runs as a user would start it, in a subprocess with one thread. The
timings are not judged (tiny shapes say nothing about performance); only that every variant ran, every number is
positive, and the routed logits agree with HF PEFT's mixed batch where PEFT is installed.
"""

from __future__ import annotations

ENVIRONMENT_FIELDS = {"torch", "transformers", "cpu", "torch_threads", "date_utc"}


def test_routing_throughput_quick_writes_positive_throughputs(run_quick_benchmark) -> None:
    stdout, report = run_quick_benchmark("routing_throughput")
    assert "| adapters |" in stdout, "the script should print a markdown table"
    assert report["benchmark"] == "routing_throughput"
    assert set(report["environment"]) >= ENVIRONMENT_FIELDS
    assert report["environment"]["torch_threads"] == 1
    config = report["config"]
    assert [row["adapters"] for row in report["results"]] == config["adapters"]
    variants = ["base", "single", "routed"] + (["peft_mixed"] if config["peft"] else [])
    for row in report["results"]:
        for variant in variants:
            for key in (f"{variant}_ms", f"{variant}_wall_ms", f"{variant}_tokens_per_s"):
                assert row[key] > 0, (key, row)
        assert row["routed_over_single"] > 0 and row["single_over_base"] > 0
        assert row["routed_vs_base_max_abs_diff"] > 1e-3, "the adapters must change the logits"
        assert row["routed_vs_single_on_a0_rows_max_abs_diff"] < 1e-4, "rows routed to a0 must match a0 alone"
        if config["peft"]:
            assert row["routed_over_peft_mixed"] > 0 and row["routed_speedup_over_peft_mixed"] > 0
            assert row["routed_vs_peft_mixed_max_abs_diff"] < 1e-4, "the same adapters must give the same logits"
    expected = {"cpu_routed_over_single"} | ({"cpu_routed_over_peft_mixed"} if config["peft"] else set())
    assert set(report["targets"]) == expected
