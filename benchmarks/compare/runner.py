"""Run every (seed, arm) job in its own worker process and draw one progress bar for all of them.

A separate process per arm is what makes the CPU peak RSS an arm's own: ``os.wait4`` returns the
rusage of exactly that child. Arm order alternates from seed to seed so that a slow spell on a shared
machine does not always land on the same arm.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit_benchmarks.compare import measure, resume
from peftkit_benchmarks.compare.experiment import Experiment
from peftkit_benchmarks.compare.worker import EVENT_PREFIX
from tqdm import tqdm


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = None
    eval_split: str = "test"
    out: Path = Path("compare-out")
    fresh: bool = False  # discard the finished runs an earlier invocation kept in out/runs


class WorkerFailed(RuntimeError):
    pass


class RemainingTime:
    """Wall-clock time left, from how long each arm's latest run took.

    The bar's own ETA counts training steps only, blind to each run's loading, evaluation and latency phases
    (about a third of a CPU run); whole finished runs see everything. An arm not yet run is taken to cost
    the mean of the others."""

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def record(self, arm: str, seconds: float) -> None:
        self.latest[arm] = seconds

    def seconds_left(self, pending_arms: list[str]) -> float | None:
        if not self.latest:
            return None
        typical = statistics.fmean(self.latest.values())
        return sum(self.latest.get(arm, typical) for arm in pending_arms)

    def describe(self, pending_arms: list[str]) -> str:
        left = self.seconds_left(pending_arms)
        return "peftkit compare" if left is None else f"peftkit compare (runs: ~{round(left / 60)} min left)"


def job_order(experiment: Experiment) -> list[tuple[int, str]]:
    """(seed, arm) pairs, the arm order reversed on every other seed."""
    names = [arm.name for arm in experiment.arms]
    return [
        (seed, name)
        for i, seed in enumerate(experiment.budget.seeds)
        for name in (names if i % 2 == 0 else names[::-1])
    ]


def wait_policy() -> tuple[str | None, str]:
    """The workers' OMP_WAIT_POLICY, and why.

    Idle OpenMP threads that spin make a run on a machine of its own ~12 % faster, and one on a machine shared
    with other work several times slower; so the harness keeps the runtime's default only when nothing else is
    using the CPUs as it starts, and otherwise asks for PASSIVE. A policy the user set is kept."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"], f"{os.environ['OMP_WAIT_POLICY']} (set by the user)"
    busy = measure.busy_cpus()
    if busy is not None and busy >= 0.5:
        return "PASSIVE", f"PASSIVE (set by the harness: other work kept {busy:.1f} CPUs busy at the start)"
    return None, "unset: the OpenMP runtime's default (the CPUs were idle at the start)"


def run_worker(
    job: dict[str, Any], bar: tqdm, label: str, omp_wait_policy: str | None = None
) -> tuple[dict[str, Any], int]:
    """Run one job; returns (result, the child's peak RSS in bytes). Step events advance ``bar``."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if omp_wait_policy is not None:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    process = subprocess.Popen(
        [sys.executable, "-m", "peftkit_benchmarks.compare.worker", handle.name],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    result, done = None, 0
    assert process.stdout is not None
    for line in process.stdout:
        if not line.startswith(EVENT_PREFIX):
            bar.write(line.rstrip())
            continue
        event = json.loads(line[len(EVENT_PREFIX) :])
        if event["event"] == "step":
            bar.update(event["step"] - done)
            done = event["step"]
            bar.set_postfix_str(f"{label} step {done}", refresh=False)
        elif event["event"] == "phase":
            bar.set_postfix_str(f"{label} {event['phase']}")
        elif event["event"] == "result":
            result = event["result"]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    Path(handle.name).unlink(missing_ok=True)
    if process.returncode != 0 or result is None:
        raise WorkerFailed(f"{label} failed (exit code {process.returncode}); its error is printed above")
    return result, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_experiment(experiment: Experiment, options: RunOptions) -> dict[str, Any]:
    """Every (seed, arm) run plus the paired step-time probe; raw results, ready for the report."""
    budget = experiment.budget
    common = {
        "experiment": experiment.model_dump(mode="json"),
        "device": options.device,
        "dtype": options.dtype,
        "threads": options.threads,
        "eval_split": options.eval_split,
    }
    jobs = job_order(experiment)
    policy, policy_reason = wait_policy()
    probe = budget.speed_probe_steps > 0 and len(experiment.arms) > 1
    total = len(jobs) * budget.steps + (budget.speed_probe_steps + 2 if probe else 0)
    runs, clock = [], RemainingTime()
    finished, described = resume.FinishedRuns.open(options.out, fresh=options.fresh), resume.run_options(options)
    keys = {(seed, name): resume.fingerprint(experiment, described, [name], seed) for seed, name in jobs}
    kept = {(seed, name): finished.take(f"{name}-seed{seed}", keys[(seed, name)]) for seed, name in jobs}
    reused = [f"{name} seed {seed}" for (seed, name), result in kept.items() if result is not None]
    if reused:
        print(f"peftkit compare: reusing {len(reused)} finished runs from {finished.folder}: {', '.join(reused)}")
    if finished.discarded:
        print(
            f"peftkit compare: discarded {len(finished.discarded)} runs in {finished.folder} made by a different "
            f"experiment or different options: {', '.join(finished.discarded)}"
        )
    with tqdm(total=total, unit="step", desc="peftkit compare", dynamic_ncols=True) as bar:
        for index, (seed, name) in enumerate(jobs, start=1):
            key = keys[(seed, name)]
            if kept[(seed, name)] is not None:  # finished before this command was stopped: not redone
                runs.append(kept[(seed, name)])
                bar.update(budget.steps)
                continue
            started = time.monotonic()
            label = f"[{index}/{len(jobs)}] {name} seed {seed}"
            job = {
                **common,
                "arm": name,
                "seed": seed,
                # latency is the architecture's, not the seed's: measured once per arm, in its first seed's run
                "measure_latency": seed == budget.seeds[0],
                "checkpoint_dir": str(options.out / "checkpoints" / f"{name}-seed{seed}"),
            }
            result, process_peak = run_worker(job, bar, label, policy)
            result["memory"]["process_peak_rss_bytes"] = process_peak
            finished.keep(f"{name}-seed{seed}", key, result)
            runs.append(result)
            clock.record(name, time.monotonic() - started)
            bar.set_description(clock.describe([arm for _, arm in jobs[index:]]), refresh=True)
        probe_result = None
        if probe:
            names = [a.name for a in experiment.arms]
            key = resume.fingerprint(experiment, described, names, budget.seeds[0])
            probe_result = finished.take("probe", key)
            if probe_result is None:
                job = {**common, "mode": "probe", "seed": budget.seeds[0], "arms": names}
                probe_result, _ = run_worker(job, bar, "step-time probe (all arms in one process)", policy)
                finished.keep("probe", key, probe_result)
            else:
                reused.append("the step-time probe")
    return {"runs": runs, "probe": probe_result, "omp_wait_policy": policy_reason, "reused": reused}
