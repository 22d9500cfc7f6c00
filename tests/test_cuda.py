"""The CUDA cases: what a GPU changes (kernels, bf16, device moves) for the paths a CPU run cannot reach. They skip
without a GPU; ``benchmarks/gpu_check.sh`` runs them on one. The check script and its summary are tested here on the
CPU: without a GPU it refuses at once, and its summary never fills in a measurement it did not find."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_with(method: str, dtype: torch.dtype, **entry) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TINY_MODELS["llama-tiny"]().to("cuda", dtype)
    peftkit.attach(model, {"adapters": {"a": [{"method": method, "target": LLAMA_TARGETS, "r": 4, **entry}]}})
    randomise_adapters(model)
    return model


@gpu
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_step_equals_the_hook_path_on_the_gpu(method, dtype):
    model = _llama_with(method, dtype)
    ids = torch.randint(0, 50, (2, 9), device="cuda")

    def step() -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return [loss.detach().float()] + [p.grad.float() for p in model.parameters() if p.requires_grad]

    fused = step()
    with peftkit.unfused():
        hooks = step()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in zip(fused, hooks, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * max(want.abs().max().item(), 1e-3))


@gpu
def test_merge_unmerge_detach_and_a_cpu_load_keep_the_outputs(tmp_path):
    model = _llama_with("lora", torch.float32)
    ids = torch.randint(0, 50, (2, 9), device="cuda")
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        peftkit.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)
        peftkit.unmerge(model)
        peftkit.save(model, tmp_path / "adapter")
        torch.manual_seed(0)
        cpu = TINY_MODELS["llama-tiny"]()  # the same base, built on the CPU from the same seed
        peftkit.load(cpu, tmp_path / "adapter")
        torch.testing.assert_close(cpu(input_ids=ids.cpu()).logits, unmerged.cpu(), rtol=1e-4, atol=1e-4)


@gpu
def test_a_mixed_batch_on_the_gpu_runs_each_example_with_its_adapter():
    torch.manual_seed(0)
    model = TINY_MODELS["llama-tiny"]().cuda().eval()
    entry = {"method": "lora", "target": ["q_proj", "v_proj"], "r": 4}
    peftkit.attach(model, {"adapters": {name: [dict(entry)] for name in ("a", "b", "c")}})
    randomise_adapters(model)
    ids = torch.randint(0, 50, (4, 7), device="cuda")
    names = ["a", "b", None, "c"]
    with torch.no_grad():
        with peftkit.route(model, names):
            routed = model(input_ids=ids).logits
        for row, name in enumerate(names):
            if name is None:
                with peftkit.disabled(model):
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                peftkit.activate(model, [name])
                alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(routed[row : row + 1], alone, rtol=1e-4, atol=1e-4)


def test_the_check_refuses_at_once_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the check would run")
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert done.returncode == 3, done.stderr
    assert "no CUDA GPU" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []  # nothing was run, nothing written


def test_the_summary_reports_what_it_found_and_nothing_else(tmp_path):
    from peftkit_benchmarks import gpu_summary

    empty = gpu_summary.main([str(tmp_path)])
    assert all(verdict["measured"] is None for name, verdict in empty["targets"].items() if name != "check_seconds")
    assert "not measured" in (tmp_path / "summary.md").read_text()

    (tmp_path / "routing.json").write_text(
        json.dumps(
            {
                "environment": {"gpu": "a GPU"},
                "results": [
                    {"adapters": 8, "routed_speedup_over_peft_mixed": 1.5},
                    {"adapters": 32, "routed_speedup_over_peft_mixed": 2.5, "routed_vs_peft_mixed_max_abs_diff": 1e-3},
                ],
            }
        )
    )
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "report.json").write_text(
        json.dumps({"ratios_to_peer": {"lora": {"step_seconds_paired_probe": 0.8, "score_difference": 0.0}}})
    )
    found = gpu_summary.main([str(tmp_path), "--seconds", "500"])
    assert found["targets"]["mixed_batch_speedup_over_peft_at_32"] == {"target": 2.0, "measured": 2.5, "met": True}
    assert found["targets"]["lora_step_speedup_over_peft"]["measured"] == pytest.approx(1.25)
    assert found["targets"]["lora_step_speedup_over_peft"]["met"] is False
    assert found["targets"]["check_seconds"]["met"] is False
    assert json.loads((tmp_path / "summary.json").read_text())["mixed_batches"]["speedup_by_adapters"]["32"] == 2.5


@gpu
def test_offloaded_activations_train_the_same_adapters(tmp_path):
    """``offload_activations: true`` keeps autograd's saved tensors in host memory; the steps are the same."""
    from test_training import adapters, run, write_config

    trained = {}
    for offload in (False, True):
        folder = tmp_path / str(offload)
        folder.mkdir()
        run(
            write_config(
                folder,
                steps=4,
                offload_activations=offload,
                spec={"adapters": {"default": [{"method": "lora", "target": ["@query", "@value"], "r": 4}]}},
            )
        )
        trained[offload] = adapters(folder / "out")
    for key, tensor in trained[False].items():
        torch.testing.assert_close(trained[True][key], tensor, rtol=1e-4, atol=1e-5)
