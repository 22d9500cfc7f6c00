"""Train a model with peftkit adapters under ``transformers.Trainer``, checkpointing only the adapters.

``AdapterTrainer`` is a ``Trainer`` whose model saves are ``peftkit.save`` (``adapter.safetensors`` + ``spec.json``,
plus the Trainer's own ``training_args.bin``, tokenizer and optimizer/scheduler/RNG/state files) instead of the
full weights, and whose ``resume_from_checkpoint`` and ``load_best_model_at_end`` fill the attached adapters back
from such a folder. The base model is never written: a checkpoint is as small as the adapters and the optimizer
state. transformers is imported when the class is first used, so importing peftkit does not import it.

    model = peftkit.attach(model, spec)
    trainer = AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                   # checkpoint-N/ holds adapter.safetensors, spec.json
    trainer.train(resume_from_checkpoint=True)        # continues from the newest checkpoint

With a plain ``Trainer``, ``AdapterCheckpointCallback`` writes the adapter files into each checkpoint folder as
well (the Trainer still writes its full weights there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from peftkit.io import SPEC_FILE, restore_adapter_weights, save
from peftkit.lifecycle.attach import get_state
from peftkit.lifecycle.optimizer import parameter_groups
from peftkit.lifecycle.schedule import after_optimizer_step, check_schedule, regularization

__all__ = ["AdapterCheckpointCallback", "AdapterTrainer", "MethodStepsCallback", "restore_adapter_weights"]

TRAINING_ARGS_FILE = "training_args.bin"  # the name transformers' Trainer gives its arguments


def _is_adapter_checkpoint(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / SPEC_FILE).is_file()


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` that saves and restores only the model's peftkit adapters, and runs what the
    attached methods add to training: their loss terms (``peftkit.regularization``), their schedule check and their
    action between optimizer steps (``MethodStepsCallback``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(MethodStepsCallback())

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        adapted = self._adapter_model()
        if adapted is None or not model.training:
            return result
        term = regularization(adapted)
        if isinstance(term, float) and term == 0.0:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + term, outputs
        return result + term

    def _adapter_model(self) -> nn.Module | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if get_state(model) is not None else None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over :func:`peftkit.parameter_groups`, so that each method's
        learning-rate multipliers and weight-decay choices hold (LoRA+, no decay on magnitudes and gates)."""
        adapted = self._adapter_model() if model is None else model
        if self.optimizer is not None or adapted is None or get_state(adapted) is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, adapted)
        kwargs = {k: v for k, v in kwargs.items() if k != "weight_decay"}
        groups = parameter_groups(adapted, self.args.learning_rate, self.args.weight_decay)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # a checkpoint is written as trained, to resume from; the final model portable, for any original base
        save(model, output_dir, portable=not Path(output_dir).name.startswith(PREFIX_CHECKPOINT_DIR))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapted = self._adapter_model() if model is None else model
        if adapted is None or get_state(adapted) is None or not _is_adapter_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapter_weights(adapted, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        model = self._adapter_model()
        best = self.state.best_model_checkpoint
        if model is None or not _is_adapter_checkpoint(best):
            return super()._load_best_model()
        restore_adapter_weights(model, best)
        return None


class AdapterCheckpointCallback(TrainerCallback):
    """Writes ``peftkit.save`` files into every checkpoint folder of a plain ``Trainer``."""

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None or not state.is_world_process_zero or get_state(model) is None:
            return
        save(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", portable=False)


class MethodStepsCallback(TrainerCallback):
    """What the attached methods do around the optimizer (``peftkit.check_schedule`` when training begins,
    ``peftkit.after_optimizer_step`` after each step, before the gradients are cleared); ``AdapterTrainer`` adds it,
    a plain ``Trainer`` can take it too (then add ``peftkit.regularization(model)`` to the loss yourself)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is not None and get_state(model) is not None:
            check_schedule(model, state.max_steps)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is not None and get_state(model) is not None:
            after_optimizer_step(model, state.global_step, state.max_steps)
