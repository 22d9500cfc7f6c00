"""`peftkit train`: checks before the first step, exact resume after a crash or SIGKILL, atomic checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftkit
import peftkit.zoo
from peftkit.training import checkpoints as checkpointing
from peftkit.training.config import TrainConfig
from peftkit.training.loop import train

WORDS = ["the", "movie", "was", "great", "bad", "boring", "fun", "long", "short", "plot", "actor", "scene"]


def write_config(folder: Path, **overrides) -> Path:
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (10,), generator=generator)) for _ in range(64)]
    (folder / "train.txt").write_text("\n".join(lines))
    config = {
        "model": {"name": "llama-tiny"},
        "data": {"train": "train.txt", "max_length": 24},
        "spec": {"adapters": {"default": [{"method": "lora", "target": ["@query", "@value"], "r": 4, "dropout": 0.1}]}},
        "steps": 24,
        "batch_size": 4,
        "optimizer": {"lr": 0.01},
        "output": "out",
        "checkpoint_every": 4,
        "log_every": 100,
        **overrides,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(path: Path, **kwargs):
    return train(TrainConfig.from_file(path), path.parent, progress=False, log=lambda *_: None, **kwargs)


def adapters(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter.safetensors")


PISSA = {"adapters": {"default": [{"method": "lora", "target": ["@query", "@value"], "r": 4, "init": "pissa"}]}}


@pytest.mark.parametrize("spec", [None, PISSA], ids=["lora", "pissa"])
def test_a_crashed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, spec):
    """PiSSA's checkpoints are written as trained (the residual recomputed on resume), its final adapter portable."""
    overrides = {} if spec is None else {"spec": spec}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    run(write_config(straight, **overrides))
    config = write_config(crashed, **overrides)
    real_write = checkpointing.write

    def crash_after_step_12(output, save_adapters, state):
        real_write(output, save_adapters, state)
        if state["step"] == 12:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpointing, "write", crash_after_step_12)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(checkpointing, "write", real_write)
    result = run(config)
    assert result.resumed_from == 12
    expected, got = adapters(straight / "out" / "adapters"), adapters(crashed / "out" / "adapters")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    if spec is not None:
        assert peftkit.read_spec(crashed / "out" / "checkpoint").adapters["default"][0].init == "pissa"
        final = peftkit.read_spec(crashed / "out" / "adapters").adapters["default"][0]
        assert (final.init, final.r) == ("kaiming", 8)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run(write_config(straight, steps=150, checkpoint_every=10))
    config = write_config(killed, steps=150, checkpoint_every=10)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "peftkit", "train", str(config), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "out" / "checkpoint" / checkpointing.MARKER
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if marker.is_file() and int(marker.read_text() or 0) >= 20:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "out" / "adapters").exists()
    result = run(config)
    assert 20 <= result.resumed_from < 150
    expected, got = adapters(straight / "out" / "adapters"), adapters(killed / "out" / "adapters")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    config = write_config(tmp_path, steps=8)
    run(config)
    before = adapters(tmp_path / "out" / "checkpoint")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "write_tree", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.write(
            tmp_path / "out", lambda folder: (folder / "adapter.safetensors").write_bytes(b"x"), {"step": 99}
        )
    folder = checkpointing.latest(tmp_path / "out")
    assert folder == tmp_path / "out" / "checkpoint"
    assert all(torch.equal(before[k], v) for k, v in adapters(folder).items())


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"data": {"train": "missing.txt"}}, peftkit.PeftkitError, "data file .*missing.txt' not found"),
        (
            {"spec": {"adapters": {"d": [{"method": "lora", "target": "c_attn"}]}}},
            peftkit.TargetingError,
            "matched no module",
        ),
        ({"steps": 0}, peftkit.SpecError, "steps: Input should be greater than 0"),
        (
            {"spec": {"adapters": {"d": [{"method": "lora", "target": "q", "r": -1}]}}},
            peftkit.SpecError,
            "greater than 0",
        ),
        ({"model": {"name": "gpt7"}}, peftkit.PeftkitError, "neither a zoo name"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, change, error, message):
    config = write_config(tmp_path, **change)
    with pytest.raises(error, match=message):
        run(config)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_is_refused_before_training(tmp_path):
    config = write_config(tmp_path, steps=8)
    run(config)
    saved = (tmp_path / "out" / "adapters" / "adapter.safetensors").read_bytes()
    (tmp_path / "out" / "checkpoint" / "state.safetensors").write_bytes(b"garbage")
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "steps": 16}))
    with pytest.raises(peftkit.CheckpointError, match="cannot be resumed"):
        run(config)
    assert (tmp_path / "out" / "adapters" / "adapter.safetensors").read_bytes() == saved


def _set(key, value):
    return lambda state: {**state, key: value}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_set("step", -5), "at step -5, but this run has 16 steps"),
        (_set("step", 10**6), "at step 1000000, but this run has 16 steps"),
        (_set("step", "3"), "at step '3'"),
        (lambda state: {k: v for k, v in state.items() if k != "optimizer"}, r"lacks \['optimizer'\]"),
        (_set("optimizer", {"state": {"nope": {}}, "param_groups": []}), "does not fit this run"),
        (_set("scheduler", {"last_epoch": "x"}), "does not fit this run"),
        (_set("rng", []), "rng must be a non-empty list"),
        (_set("rng", [{"torch": torch.zeros(3, dtype=torch.uint8), "python": [1]}]), "does not fit this run"),
        (None, "pickled state.pt from an older peftkit"),
    ],
    ids=["negative", "beyond", "text", "missing", "optimizer", "scheduler", "rng", "bad-rng", "pickle"],
)
def test_a_malformed_training_state_is_refused_before_training(tmp_path, damage, message):
    from peftkit.training.state_file import read_tree, write_tree

    config = write_config(tmp_path, steps=8)
    run(config)
    saved = (tmp_path / "out" / "adapters" / "adapter.safetensors").read_bytes()
    path = tmp_path / "out" / "checkpoint" / "state.safetensors"
    if damage is None:  # an older peftkit's pickle is not read, not even by torch's restricted loader
        path.unlink()
        torch.save({"step": 8}, path.with_name("state.pt"))
    else:
        write_tree(path, damage(read_tree(path)))
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "steps": 16}))
    with pytest.raises(peftkit.CheckpointError, match=message):
        run(config)
    assert (tmp_path / "out" / "adapters" / "adapter.safetensors").read_bytes() == saved


def test_bf16_autocast_trains_fp32_adapters(tmp_path):
    result = run(write_config(tmp_path, steps=4, precision="bf16"))
    assert all(t.dtype == torch.float32 for t in adapters(result.adapters).values())
    assert result.final_loss == result.final_loss  # not NaN


def test_bf16_keeps_fp32_adapters_over_a_bf16_base(tmp_path):
    peftkit.zoo.load_model("llama-tiny").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    result = run(
        write_config(tmp_path, steps=2, precision="bf16", model={"name": str(tmp_path / "base"), "pretrained": True})
    )
    assert all(t.dtype == torch.float32 for t in adapters(result.adapters).values())
    assert result.final_loss == result.final_loss  # not NaN


def test_the_yaml_in_docs_training_is_a_valid_config():
    page = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    assert blocks, "docs/training.md shows no YAML"
    full = TrainConfig.model_validate(yaml.safe_load(blocks[0]))
    assert full.precision == "bf16" and full.distributed.strategy == "ddp"
    for block in blocks[1:]:  # fragments: each must fit into the full example
        TrainConfig.model_validate({**yaml.safe_load(blocks[0]), **yaml.safe_load(block)})


def test_eval_every_logs_the_eval_loss_during_training_and_at_the_end(tmp_path):
    config = write_config(tmp_path, steps=6, eval_every=2)
    (tmp_path / "eval.txt").write_text("the movie was fun\nthe plot was long\n")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["eval"] = "eval.txt"
    config.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    result = train(TrainConfig.from_file(config), tmp_path, progress=False, log=lines.append)
    evaluated = [json.loads(line) for line in lines if "eval_loss" in line]
    assert [entry.get("step") for entry in evaluated] == [2, 4, None]  # during training, then the final one
    assert all(entry["eval_loss"] > 0 for entry in evaluated)
    assert round(result.eval_loss, 6) == evaluated[-1]["eval_loss"]


def test_training_reports_what_a_merge_into_its_base_would_lose(tmp_path):
    lines: list[str] = []
    result = train(TrainConfig.from_file(write_config(tmp_path, steps=2)), tmp_path, progress=False, log=lines.append)
    assert result.merge_error is not None and 0 <= result.merge_error < 1e-5  # an fp32 base
    assert any("merge_error_max_abs" in line for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU offloading runs (tests/test_cuda.py)")
def test_offloading_activations_on_the_cpu_is_refused_by_name_before_anything_is_written(tmp_path):
    with pytest.raises(
        peftkit.PeftkitError, match=r"offload_activations .* computes on cpu.*Remove offload_activations"
    ):
        run(write_config(tmp_path, offload_activations=True))
    assert not (tmp_path / "out").exists()
