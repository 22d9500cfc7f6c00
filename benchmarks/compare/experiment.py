"""The declarative experiment file: model, task, budget, and one arm per fine-tuning method.

An arm with no ``spec`` is full fine-tuning; any other arm holds a peftkit spec verbatim, so adding a
method to `peftkit compare` means adding a few YAML lines, not code. Hyperparameters that were tuned
live in these files (``benchmarks/experiments/*.yaml``), never as defaults hidden in the harness.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml
from peftkit_benchmarks.compare.task_config import TaskConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftkit.quantization import Quantization

DEFAULT_EXPERIMENT = "minilm-rt-sentiment"


class Strict(BaseModel):
    """Unknown keys are errors: a typo in an experiment file must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class ModelSource(Strict):
    """Where the pretrained weights and tokenizer come from: an installed package's folder or a path.

    ``random_init`` (config overrides) builds a randomly initialised model of the same family instead of
    loading weights; the tests use it to get a tiny BERT that still uses the real tokenizer.
    """

    package: str | None = Field(default=None, description="installed package whose `model/` folder holds it")
    path: str | None = Field(default=None, description="a local folder that from_pretrained loads offline")
    gguf_file: str | None = Field(
        default=None,
        description="a GGUF file in the package's folder: dequantised to fp32 once, then cached (save_pretrained "
        "form) under $PEFTKIT_CACHE (default ~/.cache/peftkit)",
    )
    random_init: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        if (self.package is None) == (self.path is None):
            raise ValueError("model: give exactly one of `package` or `path`")
        return self


class Budget(Strict):
    """The same for every arm, so that differences come from the method alone."""

    steps: int = Field(gt=0)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int = Field(default=128, gt=0)
    warmup_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    group_by_length: bool = True
    latency_batch_size: int = Field(default=32, gt=0)
    latency_repeats: int = Field(default=15, gt=0)
    speed_probe_steps: int = Field(
        default=12, ge=0, description="alternating steps per arm in one process for the paired step-time ratio"
    )


class Arm(Strict):
    """One fine-tuning method. ``spec`` is a peftkit spec; none means full fine-tuning."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    spec: dict[str, Any] | None = None
    peer: Literal["peft"] | None = Field(default=None, description="run this spec with HF PEFT instead")
    lr: float = Field(gt=0)
    head_lr: float | None = Field(default=None, gt=0, description="learning rate of the new classifier head")
    weight_decay: float = Field(default=0.0, ge=0)
    quantization: Quantization | None = Field(
        default=None, description="load the base quantised for this arm (QLoRA: {bits: 4, type: nf4})"
    )

    @property
    def is_full(self) -> bool:
        return self.spec is None

    @model_validator(mode="after")
    def _quantized_arms_train_adapters(self) -> Arm:
        if self.quantization is not None and self.spec is None:
            raise ValueError(
                f"arm {self.name!r}: a quantised base cannot be fully fine-tuned (its weights are packed integers); "
                "give the arm a spec, or drop quantization"
            )
        return self

    @field_validator("spec")
    @classmethod
    def _valid_peftkit_spec(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        if spec is not None:
            import peftkit  # the spec is validated by peftkit itself, so both always agree

            peftkit.Spec.model_validate(spec)
        return spec


class Experiment(Strict):
    name: str
    description: str = ""
    model: ModelSource
    task: TaskConfig
    budget: Budget
    arms: list[Arm] = Field(min_length=1)
    default_arms: list[str] | None = Field(
        default=None,
        description="the arms a run without --methods trains (to keep the default run short); "
        "`--methods all` trains every arm of the file. None: every arm",
    )

    @model_validator(mode="after")
    def _default_arms_exist(self) -> Experiment:
        known = [arm.name for arm in self.arms]
        unknown = [name for name in self.default_arms or [] if name not in known]
        if unknown:
            raise ValueError(f"default_arms names {unknown}, which are not arms of this file; arms: {known}")
        return self

    @model_validator(mode="after")
    def _schedules_fit_the_budget(self) -> Experiment:
        import peftkit

        for arm in self.arms:
            if arm.spec is not None:
                try:
                    peftkit.check_schedule(arm.spec, self.budget.steps)
                except peftkit.PeftkitError as error:
                    raise ValueError(
                        f"arm {arm.name!r} does not fit budget.steps {self.budget.steps}: {error}"
                    ) from None
        return self

    @field_validator("arms")
    @classmethod
    def _unique_names(cls, arms: list[Arm]) -> list[Arm]:
        names = [arm.name for arm in arms]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"arm names must be unique; repeated: {duplicated}")
        return arms

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)


class ExperimentError(ValueError):
    """An experiment file that cannot be used; the message names the file and the field."""


def experiments_dir() -> Path:
    return Path(str(importlib.resources.files("peftkit_benchmarks") / "experiments"))


def builtin_experiments() -> dict[str, Path]:
    """Shipped experiments by name (file stem)."""
    return {path.stem: path for path in sorted(experiments_dir().glob("*.yaml"))}


def load_experiment(name_or_path: str | Path) -> Experiment:
    """Read an experiment from a YAML path, or by the name of a shipped one."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = builtin_experiments()
        if str(name_or_path) not in shipped:
            raise ExperimentError(
                f"no experiment file {str(name_or_path)!r}; shipped experiments: {', '.join(shipped)}"
            )
        path = shipped[str(name_or_path)]
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(raw, dict) and isinstance(raw.get("task"), dict) and raw["task"].get("root") is None:
            raw["task"]["root"] = str(path.resolve().parent)  # the task's files are found beside the experiment
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict) and isinstance(model.get("path"), str) and not Path(model["path"]).is_absolute():
            beside = path.resolve().parent / model["path"]
            if beside.exists():  # a model folder beside the experiment file, else as given (from the working directory)
                model["path"] = str(beside)
        return Experiment.model_validate(raw)
    except (yaml.YAMLError, ValidationError, ValueError) as error:
        raise ExperimentError(f"{path}: {error}") from None


def experiment_for_task(task: str) -> str:
    """Name of the shipped experiment that runs ``task`` (each task has one)."""
    for name, path in builtin_experiments().items():
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if raw.get("task", {}).get("name") == task:
            return name
    raise ExperimentError(f"no shipped experiment for task {task!r}; pass one with --experiment PATH")
