"""The task block of an experiment file: which kind of task, where its rows are, which columns mean what.

Validated strictly (unknown fields refused) because an experiment file may come from anyone; templates may only
name plain columns. Reading the rows is ``tasks.py``'s job, scoring them ``scoring.py``'s.
"""

from __future__ import annotations

import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SPLITS = ("train", "validation", "test")
KINDS = ("classification", "generation", "causal-lm")
# The columns each kind reads, by role; a role maps to the column of that name unless ``columns`` says otherwise.
ROLES = {
    "classification": ("text", "text_pair", "label", "group"),
    "generation": ("group",),
    "causal-lm": ("messages", "group"),  # messages: a chat, its last turn the completion
}
OPTIONAL_ROLES = {"text_pair", "group"}
DEFAULT_PROMPT, DEFAULT_TARGET = "{prompt}", " {target}"  # generation: columns named prompt and target


class TaskError(ValueError):
    """The task's data cannot be used; the message names the file, column or function and the fix."""


class DataFiles(BaseModel):
    """One file (or ``save_to_disk`` folder) per split; a missing validation or test split is carved from train."""

    model_config = ConfigDict(extra="forbid")

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    dataset: str | None = Field(
        default=None, description="a folder written by DatasetDict.save_to_disk: its train/validation/test splits"
    )
    builtin: Literal["rotten-tomatoes", "reuters-r8"] | None = Field(
        default=None, description="a shipped data package's reader, with its own splits"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataFiles:
        sources = [self.builtin is not None, self.dataset is not None, self.train is not None]
        if sum(sources) != 1:
            raise ValueError(
                "task.data: give exactly one of `train` (with optional validation, test), `dataset` or `builtin`"
            )
        if (self.builtin or self.dataset) and (self.validation or self.test):
            raise ValueError("task.data: validation/test files go with `train`, not with `dataset` or `builtin`")
        return self


class TaskConfig(BaseModel):
    """The task of an experiment. The shipped names (``name: rt-sentiment`` alone) still mean their shipped data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="shown in the report; the shipped task names fill in kind and data on their own")
    kind: Literal["classification", "generation", "causal-lm"] = "classification"
    data: DataFiles | None = None
    root: str | None = Field(
        default=None, description="the folder relative paths (and scorer modules) are found in; the experiment file's"
    )
    columns: dict[str, str] = Field(default_factory=dict, description="role -> column name, e.g. {text: sentence}")
    labels: list[str] | None = Field(default=None, description="classification: the label order (default: sorted)")
    prompt: str = Field(default=DEFAULT_PROMPT, description="generation: the prompt, a template over the row's columns")
    target: str = Field(default=DEFAULT_TARGET, description="generation: the text the model learns to write after it")
    scorer: str | None = Field(
        default=None, description="generation: module:function(predictions, references) -> float, higher is better"
    )
    carve: dict[Literal["validation", "test"], float] = Field(
        default_factory=lambda: {"validation": 0.1, "test": 0.2},
        description="fractions of the training rows that become a missing validation/test split (seeded)",
    )
    train_size: int | None = Field(default=None, gt=0, description="subsample of the training split")
    max_length: int = Field(default=128, gt=0, description="tokens per example after truncation")
    split_seed: int = 0
    eval_size: int | None = Field(
        default=None, gt=0, description="score on a seeded subsample of validation/test (smoke runs, slow generation)"
    )

    @model_validator(mode="before")
    @classmethod
    def _shipped_names(cls, raw: Any) -> Any:
        """``name: rt-sentiment`` and the other shipped task names, without ``data``, mean the shipped data."""
        if isinstance(raw, dict) and raw.get("data") is None and raw.get("name") in SHIPPED_TASKS:
            return {**SHIPPED_TASKS[raw["name"]], **raw}
        return raw

    @model_validator(mode="after")
    def _fits_its_kind(self) -> TaskConfig:
        if self.data is None:
            raise ValueError(
                f"task {self.name!r}: give `data` (files per split, a save_to_disk folder, or a builtin reader); "
                f"shipped task names: {', '.join(SHIPPED_TASKS)}"
            )
        allowed = set(ROLES[self.kind]) | set(template_fields(self.prompt) + template_fields(self.target))
        unknown = sorted(set(self.columns) - allowed) if self.kind == "classification" else []
        if unknown:
            raise ValueError(
                f"task.columns: roles {unknown} mean nothing for kind {self.kind}; roles: {sorted(allowed)}"
            )
        templates_set = (self.prompt, self.target) != (DEFAULT_PROMPT, DEFAULT_TARGET)
        if self.kind == "classification" and (self.scorer or templates_set):
            raise ValueError("task: scorer and prompt/target templates are for kinds generation and causal-lm")
        if self.kind != "classification" and self.labels is not None:
            raise ValueError("task.labels is for kind classification")
        if self.scorer is not None and (self.scorer.count(":") != 1 or not all(self.scorer.split(":"))):
            raise ValueError(f"task.scorer {self.scorer!r}: write module:function, e.g. my_scores:rouge_l")
        if sum(self.carve.values()) >= 1 or any(f <= 0 for f in self.carve.values()):
            raise ValueError(f"task.carve {self.carve}: fractions above 0 that add up to less than 1")
        for template in (self.prompt, self.target):
            template_fields(template)  # a malformed template is refused here
        return self


SHIPPED_TASKS: dict[str, dict[str, Any]] = {
    "rt-sentiment": {"kind": "classification", "data": {"builtin": "rotten-tomatoes"}},
    "reuters-r8": {"kind": "classification", "data": {"builtin": "reuters-r8"}},
    "r8-generation": {
        "kind": "generation",
        "data": {"builtin": "reuters-r8"},
        "prompt": "Article: {text}\nTopic:",
        "target": " {label}",
    },
}


def template_fields(template: str) -> list[str]:
    """The column names a template reads: plain ``{name}`` fields only (no attributes, indices or conversions,
    since an experiment file is not trusted to run code)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template {template!r}: {error}; write columns as {{name}} and braces as {{{{ }}}}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template {template!r}: field {{{name}}} must be a plain column name")
        names.append(name)
    return names
