"""Scores of what an arm predicts: accuracy and macro-F1 of a head; exact match, or the user's scorer, of text.

A user's scorer is their own code; what peftkit guards against is its failing late: it is called once on the
references before anything trains, and an exception or anything but a finite number is an error that names it.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

from peftkit_benchmarks.compare import data
from peftkit_benchmarks.compare.task_config import TaskConfig, TaskError

# how the metrics reported beside the primary one are headed
DISPLAY_NAMES = {"macro_f1": "macro-F1 %", "completion_loss": "completion loss", "perplexity": "perplexity"}


def beside_primary(arms: dict, task: dict) -> list[str]:
    """The metric keys a report shows beside the task's primary metric (macro-F1, a perplexity beside a scorer)."""
    primary = task["metric"].replace(" ", "_")  # the primary's display name, as the key the worker stored it under
    return [name for name in next(iter(arms.values()))["metrics"] if name != primary]


def metric_name(config: TaskConfig) -> str:
    """The task's primary metric: accuracy, the scorer's name, or exact match (generation) / perplexity (causal-lm)."""
    if config.kind == "classification":
        return "accuracy"
    if config.scorer:
        return config.scorer.split(":")[1]
    return "exact match" if config.kind == "generation" else "perplexity"


def higher_is_better(config: TaskConfig) -> bool:
    return metric_name(config) != "perplexity"


def load_scorer(config: TaskConfig) -> Callable[[list[str], list[str]], float]:
    """The user's ``module:function``, imported from the experiment's folder or the working directory."""
    module_name, function_name = config.scorer.split(":")
    for folder in (config.root, str(Path.cwd())):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise TaskError(f"task.scorer {config.scorer!r}: importing {module_name!r} failed: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskError(f"task.scorer {config.scorer!r}: {module_name} has no function {function_name!r}")
    return function


def score(config: TaskConfig, predictions: list[str], references: list[str]) -> float:
    """The scorer's number for these predictions; anything but a finite number is an error naming the scorer."""
    function = load_scorer(config)
    try:
        value = function(list(predictions), list(references))
    except Exception as error:
        raise TaskError(f"task.scorer {config.scorer!r} raised {type(error).__name__}: {error}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TaskError(f"task.scorer {config.scorer!r} returned {value!r}; it must return a finite number")
    return float(value)


def check_scorer(config: TaskConfig, split: data.TextSplit) -> None:
    """Call the scorer once before anything trains: on the references themselves, as perfect predictions."""
    references = [t.strip() for t in split.targets[:8]]
    score(config, references, references)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The first line of what the model wrote, stripped, equals the target, stripped."""
    return sum(p.strip().split("\n")[0].strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: list[int], labels: list[int], classes: int) -> float:
    """The mean over classes of F1 (a class never predicted nor present counts 0, as it is absent from neither)."""
    scores = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(predictions, labels))
        fp = sum(p == c and g != c for p, g in zip(predictions, labels))
        fn = sum(p != c and g == c for p, g in zip(predictions, labels))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
