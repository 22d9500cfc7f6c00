"""``peftkit train`` under ``torchrun``: N processes take the steps one process takes on the same global batch.

Two gloo processes on the CPU train llama-tiny's LoRA (dropout 0, so no randomness is per rank) and are compared
with single-process runs of the same config. Tolerances: adapter tensors within ``atol=1e-5`` (observed ~1e-7: the
ranks add up the same per-token losses in another order, so only float rounding differs); AdamW's moments within
``rtol=1e-4`` of each tensor's largest entry. The moments are checked because they scale with the gradients, which
Adam's update alone would hide: a loss normalised by the wrong token count fails there. The examples have uneven
lengths, so each rank holds a different number of tokens and a per-rank mean would fail as well.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

import peftkit
from peftkit.training.config import TrainConfig
from peftkit.training.loop import train
from peftkit.training.state_file import read_tree
from peftkit.zoo import load_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORDS = ["the", "movie", "was", "great", "bad", "boring", "fun", "long", "short", "plot", "actor", "scene"]


def write_config(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 12, (40,), generator=generator).tolist()
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator)) for n in lengths]
    (folder / "train.txt").write_text("\n".join(lines))
    config = {
        "model": {"name": "llama-tiny"},
        "data": {"train": "train.txt", "max_length": 24},
        "spec": {"adapters": {"default": [{"method": "lora", "target": ["@query", "@value"], "r": 4, "dropout": 0.0}]}},
        "steps": 4,
        "batch_size": 8,
        "optimizer": {"lr": 0.01},
        "schedule": {"kind": "constant"},  # raising `steps` to resume then keeps the learning rates of one run
        "output": "out",
        "checkpoint_every": 2,
        "log_every": 1,
        **overrides,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# `python -m peftkit` (the same `main`), then each process reports the threads it still has besides the main one:
# the state in which its interpreter starts to finalise, where a leftover gloo worker can abort it (see `_leave`).
ENTRY = """
import os, sys
from peftkit.cli import main

code = main(sys.argv[1:])
names = None
if os.path.isdir("/proc/self/task"):
    names = []
    for task in sorted(set(os.listdir("/proc/self/task")) - {str(os.getpid())}):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except FileNotFoundError:  # ended since the listing: not left
            pass
# one write of one short line: the two ranks share the pipe, and print() writes the text and its newline apart
sys.stdout.write(f"threads left: {sorted(names) if names is not None else None}\\n")
sys.stdout.flush()
raise SystemExit(code)
"""


def torchrun(config: Path) -> str:
    with socket.socket() as probe:  # a free port, so parallel test sessions do not meet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entry = config.parent / "entry.py"
    entry.write_text(ENTRY)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), str(entry), "train", str(config), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=config.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def assert_same_run(expected: Path, got: Path) -> None:
    """Same adapter tensors and same optimiser moments in the final checkpoints of two output folders."""
    want, have = (
        load_file(expected / "adapters" / "adapter.safetensors"),
        load_file(got / "adapters" / "adapter.safetensors"),
    )
    assert want.keys() == have.keys()
    for key in want:
        torch.testing.assert_close(have[key], want[key], atol=1e-5, rtol=0, msg=key)
    want_state = read_tree(expected / "checkpoint" / "state.safetensors")["optimizer"]["state"]
    have_state = read_tree(got / "checkpoint" / "state.safetensors")["optimizer"]["state"]
    assert want_state.keys() == have_state.keys()
    for name, moments in want_state.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            scale = float(moments[moment].abs().max())
            torch.testing.assert_close(have_state[name][moment], moments[moment], atol=1e-4 * scale, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, Path]:
    """One process, 4 and 6 steps: the runs the distributed ones must reproduce."""
    outputs = {}
    for steps in (4, 6):
        config = write_config(tmp_path_factory.mktemp(f"single{steps}"), steps=steps)
        train(TrainConfig.from_file(config), config.parent, progress=False, log=lambda *_: None)
        outputs[steps] = config.parent / "out"
    return outputs


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    config = write_config(tmp_path_factory.mktemp("ddp"), distributed={"strategy": "ddp"})
    return config.parent, torchrun(config)


def test_two_ddp_processes_take_the_single_process_steps(reference, ddp_run):
    folder, stdout = ddp_run
    assert_same_run(reference[4], folder / "out")
    assert stdout.count('"step": 4') == 1, "only rank 0 logs"
    assert len(read_tree(folder / "out" / "checkpoint" / "state.safetensors")["rng"]) == 2


@pytest.fixture(scope="module")
def fsdp2_run(ddp_run, tmp_path_factory) -> tuple[Path, str]:
    """FSDP2 resumes the DDP run's checkpoint (a copy of its folder) and trains on to step 6."""
    folder = tmp_path_factory.mktemp("fsdp2") / "resumed"
    shutil.copytree(ddp_run[0], folder)
    config = write_config(folder, steps=6, distributed={"strategy": "fsdp2"})
    return folder, torchrun(config)


def test_fsdp2_resumes_a_ddp_checkpoint_and_takes_the_single_process_steps(reference, fsdp2_run):
    folder, stdout = fsdp2_run
    assert "at step 4" in stdout and "resumed from 4" in stdout
    assert_same_run(reference[6], folder / "out")
    model = peftkit.load(load_model("llama-tiny"), folder / "out" / "adapters")  # gathered: loads in one process
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_no_thread_outlives_train_in_any_process(ddp_run, fsdp2_run):
    """The gloo backend is destroyed, its worker threads joined, before `train` returns, under DDP and FSDP2.

    A backend kept alive past `train` (by a module's default argument, a reference cycle, a DTensor cache) leaves
    its threads running into interpreter finalisation, where the one freeing the last collective's tensors aborts
    the process now and then; its threads are there after every run, so this fails every time rather than
    sometimes. The processes run with OMP_NUM_THREADS=1, so there is no OpenMP pool either: any thread is a leak.
    """
    for (_, stdout), strategy in ((ddp_run, "ddp"), (fsdp2_run, "fsdp2")):
        reports = ["threads left: " + found for found in re.findall(r"threads left: (\[[^\]]*\]|None)", stdout)]
        if reports == ["threads left: None"] * 2:
            pytest.skip("no /proc/self/task to list a process's threads on this platform")
        assert reports == ["threads left: []"] * 2, f"{strategy}: {reports}"
