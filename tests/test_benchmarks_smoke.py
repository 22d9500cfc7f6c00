"""The benchmark scripts run end to end in their ``--quick`` mode and write the JSON the docs describe.

Each script runs as a user would start it (``python benchmarks/<name>.py``), in a subprocess with one thread. The numbers themselves are not checked: a quick run on tiny shapes says nothing about
performance, only that every measurement ran and produced a positive value.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ENVIRONMENT_FIELDS = {"torch", "transformers", "cpu", "torch_threads", "date_utc"}


@pytest.fixture
def run_quick(run_quick_benchmark):
    def run(script: str) -> dict:
        stdout, report = run_quick_benchmark(script)
        assert "|" in stdout, "the script should print a markdown table"
        assert set(report["environment"]) >= ENVIRONMENT_FIELDS
        assert report["environment"]["torch_threads"] == 1
        return report

    return run


def test_attach_time_quick_writes_positive_timings_and_memory(run_quick) -> None:
    report = run_quick("attach_time")
    assert report["benchmark"] == "attach_time"
    assert report["adapted_modules"] > 0 and report["adapter_parameters"] > 0
    for call in ("attach", "plan"):
        result = report["results"][call]
        assert result["cold_s"] > 0 and result["warm_median_s"] > 0 and result["warm_min_s"] > 0
        assert result["warm_median_cpu_s"] > 0
        assert len(result["warm_s"]) == report["config"]["repeats"]
        assert result["tracemalloc_peak_bytes"] > 0
        assert result["rss_delta_bytes"] >= 0
    assert report["results"]["attach"]["adapters_on_meta"] is True
    assert set(report["targets"]) == {"attach_warm_s", "adapters_on_meta"}


def test_lora_overhead_quick_writes_positive_ratios(run_quick) -> None:
    report = run_quick("lora_overhead")
    assert report["benchmark"] == "lora_overhead"
    models, batches = report["config"]["models"], report["config"]["batches"]
    assert {(r["model"], r["batch"]) for r in report["inference"]} == {(m, b) for m in models for b in batches}
    for row in report["inference"]:
        for key in ("base_ms", "lora_ms", "merged_ms", "base_wall_ms", "lora_over_base", "merged_over_base"):
            assert row[key] > 0, (key, row)
        assert row["merged_vs_unmerged_max_abs_diff"] < 1e-3, "merging must not change the outputs"
    assert {r["model"] for r in report["training"]} == set(models)
    for row in report["training"]:
        assert row["full_s"] > 0 and row["lora_s"] > 0 and row["lora_over_full"] > 0 and row["lora_over_full_wall"] > 0
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS measurement needs Linux /proc")
    assert {r["model"] for r in report["memory"]} == set(models)
    for row in report["memory"]:
        assert row["peak_rss_lora_over_full"] > 0 and row["exact_state_lora_over_full"] > 0
        assert row["exact_state_lora_bytes"] < row["exact_state_full_bytes"]
        for variant in ("full", "lora"):
            assert row[variant]["peak_over_start_bytes"] > 0 and row[variant]["parameter_bytes"] > 0
    assert set(report["targets"]) == {
        "inference_lora_over_base",
        "train_step_lora_over_full",
        "train_memory_lora_over_full",
    }


def test_merge_tolerance_quick_reports_every_mergeable_method_under_its_tolerance(run_quick) -> None:
    report = run_quick("merge_tolerance")
    assert report["benchmark"] == "merge_tolerance"
    assert {r["method"] for r in report["results"]} == set(report["config"]["methods"]) >= {"lora", "ia3"}
    for row in report["results"]:
        assert row["cases"] > 0
        assert 0 <= row["merged_vs_unmerged"]["median"] <= row["merged_vs_unmerged"]["worst"] <= row["tolerance"]


def test_variant_cost_quick_times_every_arm_and_agrees_with_peft(run_quick) -> None:
    report = run_quick("variant_cost")
    assert report["benchmark"] == "variant_cost"
    arms = {row["arm"] for row in report["results"]}
    assert {"peftkit_lora", "peftkit_dora"} <= arms
    for row in report["results"]:
        assert row["train_step_s"] > 0 and row["forward_s"] > 0 and row["saved_for_backward_bytes"] > 0
    for diff in report["peftkit_vs_peft_max_abs_logit_diff"].values():
        assert diff < 1e-4  # the arms compute the same model


def test_init_cost_quick_times_every_initialisation_and_agrees_with_peft(run_quick) -> None:
    report = run_quick("init_cost")
    assert report["benchmark"] == "init_cost"
    arms = {row["arm"] for row in report["results"]}
    assert {"peftkit kaiming", "peftkit pissa", "peftkit pissa, 4 iterations", "peftkit olora"} <= arms
    assert all(row["attach_s"] >= 0 for row in report["results"])
    for diff in report["peftkit_vs_peft_max_abs_residual_diff"].values():
        assert diff < 1e-5  # the same residual weights as PEFT's


def test_versus_peft_quick_measures_every_section_and_agrees_with_peft(run_quick) -> None:
    pytest.importorskip("peft")
    report = run_quick("versus_peft")
    assert report["benchmark"] == "versus_peft"
    assert max(report["agreement"].values()) < 1e-4  # both libraries compute the same model
    config = report["config"]
    assert {(r["model"], r["targets"]) for r in report["training"]} == {
        (m, t) for m in config["models"] for t in config["targets"]
    }
    for row in report["training"]:
        assert row["peftkit_over_full"] > 0 and row["peft_over_full"] > 0 and row["peftkit_over_peft"] > 0
    for row in report["inference"]:
        assert row["peftkit_over_base"] > 0 and row["peft_over_base"] > 0 and row["merged_over_base"] > 0
    assert {r["adapters"] for r in report["mixed"]} and all(r["routed_over_peft_mixed"] > 0 for r in report["mixed"])
    assert all(len(section["load_before"]) == 3 for section in report["load"].values())
    if Path("/proc/self/clear_refs").exists():
        for row in report["memory"]:
            assert row["exact_floor_peftkit_over_full"] < 1 and row["peak_rss_peft_over_full"] > 0
