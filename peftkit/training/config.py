"""The training config of ``peftkit train``: model, data, spec, optimiser, schedule, budget, precision, output.

Like a spec, it is read from YAML as untrusted input (``safe_load``, unknown fields refused) and every problem is
a :class:`~peftkit.errors.SpecError` with the field path, raised before anything is trained or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftkit.errors import SpecError
from peftkit.quantization import Quantization
from peftkit.spec import Spec, _format_validation_error
from peftkit.untrusted import parse_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str = Field(description="a zoo name (llama-tiny...) or a local folder with config.json (and weights)")
    pretrained: bool = Field(default=False, description="load the folder's weights (from_pretrained), not random ones")
    quantization: Quantization | None = Field(
        default=None, description="load the base quantised (QLoRA: bits 4, type nf4) through transformers"
    )


class DataConfig(_Strict):
    train: str = Field(description="a .txt file (one example per line) or a .jsonl file")
    eval: str | None = None
    text_field: str = "text"
    tokenizer: str | None = Field(default=None, description="a local tokenizer folder; default: bytes modulo vocab")
    max_length: int = Field(default=64, gt=1)


class OptimizerConfig(_Strict):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(default=1.0, gt=0)


class ScheduleConfig(_Strict):
    kind: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)


class DistributedConfig(_Strict):
    """How to split the work when launched as several processes (``torchrun``, ``accelerate launch``)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        default="ddp", description="ddp: every process holds the whole model; fsdp2: parameters sharded per block"
    )


class TrainConfig(_Strict):
    model: ModelConfig
    data: DataConfig
    spec: dict[str, Any] | str = Field(description="a peftkit spec, inline or as a path to a spec file")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    steps: int = Field(gt=0)
    batch_size: int = Field(default=8, gt=0)
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: autocast; weights stay fp32")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each block's activations in the backward: less memory, more time"
    )
    offload_activations: bool = Field(
        default=False,
        description="keep the activations autograd saves for the backward in pinned host memory instead of the "
        "GPU's (the model's own weights stay): less GPU memory, a copy each way per step; GPU only",
    )
    seed: int = 0
    output: str = Field(description="folder for checkpoints and the final adapters")
    checkpoint_every: int = Field(default=50, gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=10, gt=0)
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="read only when WORLD_SIZE > 1; batch_size stays global"
    )

    @model_validator(mode="after")
    def _spec_validates(self) -> TrainConfig:
        if isinstance(self.spec, dict):
            Spec.model_validate(self.spec)
        return self

    @model_validator(mode="after")
    def _quantized_bases_are_not_sharded(self) -> TrainConfig:
        if self.model.quantization is not None and self.distributed.strategy == "fsdp2":
            raise ValueError(
                "model.quantization with distributed.strategy fsdp2: FSDP2 shards floating-point parameters and a "
                "quantised base's are packed integers; use strategy ddp (each process holds the small 4-bit base)"
            )
        return self

    def resolved_spec(self, base: Path) -> Spec:
        if isinstance(self.spec, str):
            path = Path(self.spec)
            return Spec.from_file(path if path.is_absolute() else base / path)
        return Spec.model_validate(self.spec)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise SpecError(f"cannot read training config {str(path)!r}: {error.strerror or error}") from None
        except UnicodeDecodeError as error:
            raise SpecError(f"training config {str(path)!r} is not UTF-8 text: {error}") from None
        data = parse_yaml(text, SpecError, f"training config {str(path)!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            message = _format_validation_error(error).replace("invalid spec", f"invalid training config {path}")
            raise SpecError(message) from None
