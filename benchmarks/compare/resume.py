"""Finished runs kept on disk, so that a killed `peftkit compare` continues where it stopped.

Each finished (arm, seed) run, and the step-time probe, is written to ``OUT/runs/`` as one JSON file, atomically
(a kill leaves the old file or the new one, never half of one). A run is reused only when what produced it is
unchanged: its fingerprint covers the experiment without the other arms (model, task, budget, this arm), the data
files the task reads (path, size and modification time; not where the experiment file lies) and the run options
(device, dtype, threads, split scored), so adding an arm or a seed keeps every finished run, while
a change to the budget, the task or the arm itself discards that run, and the command says how many it discarded
and why. The probe's fingerprint covers every arm, since it alternates them all.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftkit_benchmarks.compare.experiment import Experiment

from peftkit.atomic import write_file_atomically

FORMAT = 1


def fingerprint(experiment: Experiment, options: dict[str, Any], arms: list[str], seed: int) -> str:
    """A hash of everything that makes the run of ``arms`` with ``seed`` what it is: not the other seeds of the
    budget, only whether this one is the first (the run that measures latency)."""
    described = experiment.model_dump(mode="json")
    seeds = described["budget"].pop("seeds")
    described["budget"]["seed"], described["budget"]["measures_latency"] = seed, seed == seeds[0]
    described["arms"] = [arm for arm in described["arms"] if arm["name"] in arms]
    for dropped in ("name", "description", "default_arms"):  # labels and selection, not what is run
        described.pop(dropped, None)
    # where the experiment file lies is not what is run; the data files it names are, by path, size and age
    described["task"].pop("root", None)
    data = data_files(experiment)
    text = json.dumps({"format": FORMAT, "experiment": described, "options": options, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def data_files(experiment: Experiment) -> list[list]:
    """(path, bytes, modification time) of every file or folder the task reads, resolved as the task resolves them."""
    from peftkit_benchmarks.compare.tasks import resolve

    source = experiment.task.data
    if source is None or source.builtin is not None:
        return []
    named = [source.dataset] if source.dataset else [source.train, source.validation, source.test]
    found = []
    for path in (resolve(experiment.task.root, name) for name in named if name):
        status = path.stat() if path.exists() else None
        found.append([str(path.resolve()), status.st_size if status else None, status.st_mtime_ns if status else None])
    return found


@dataclass
class FinishedRuns:
    """The runs of an output folder, by file name (``<arm>-seed<k>.json``, ``probe.json``)."""

    folder: Path
    discarded: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, out: Path, *, fresh: bool = False) -> FinishedRuns:
        folder = out / "runs"
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder)

    def take(self, name: str, expected: str) -> dict[str, Any] | None:
        """The kept result of ``name`` if it was made by the same experiment and options; a stale or unreadable one
        is deleted and noted in ``discarded``."""
        path = self.folder / f"{name}.json"
        if not path.exists():
            return None
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            fresh = isinstance(kept, dict) and kept.get("fingerprint") == expected and "result" in kept
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            path.unlink(missing_ok=True)
            self.discarded.append(name)
            return None
        return kept["result"]

    def keep(self, name: str, expected: str, result: dict[str, Any]) -> None:
        text = json.dumps({"fingerprint": expected, "result": result})
        write_file_atomically(self.folder / f"{name}.json", lambda temporary: Path(temporary).write_text(text))


def run_options(options: Any) -> dict[str, Any]:
    """The options that change a run's numbers (not where its output goes)."""
    described = asdict(options)
    for where in ("out", "fresh"):
        described.pop(where, None)
    return described
