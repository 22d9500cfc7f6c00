"""peftkit adapters under transformers.Trainer: adapter-only checkpoints, and resuming from them.

A tiny GPT-2 with a LoRA adapter trains for 4 steps on an in-memory dataset (checkpoints at steps 2 and 4). What
is verified: each checkpoint folder holds adapter.safetensors + spec.json and no model weights; the adapter file
equals the model's adapters at that step; resuming a fresh model from checkpoint-2 ends with the same adapter
weights as the uninterrupted run (max abs diff <= 1e-6, same seed, same data order, optimizer state restored);
and a plain Trainer with AdapterCheckpointCallback also gets the adapter files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.zoo import build_model

transformers = pytest.importorskip("transformers")

SPEC = {"adapters": {"default": [{"method": "lora", "target": ["c_attn"], "r": 4}]}}
TOLERANCE = 1e-6
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 128, (16, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _model(seed: int = 0) -> torch.nn.Module:
    """The same base model every time (a resumed run loads adapters only); ``seed`` sets the adapters' init."""
    torch.manual_seed(0)
    base = build_model("gpt2-tiny")
    torch.manual_seed(seed)
    return peftkit.attach(base, SPEC)


def _args(output: Path, **overrides) -> transformers.TrainingArguments:
    fields = dict(
        output_dir=str(output),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**fields, **overrides})


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "peftkit_adapters" in k}


def _train(output: Path, resume: str | None = None, seed: int = 0) -> torch.nn.Module:
    from peftkit.training.trainer import AdapterTrainer

    model = _model(seed)
    AdapterTrainer(model=model, args=_args(output), train_dataset=_Tokens()).train(resume_from_checkpoint=resume)
    return model


def test_checkpoints_hold_only_the_adapter_files(tmp_path):
    model = _train(tmp_path)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        names = {p.name for p in folder.iterdir()}
        assert {"adapter.safetensors", "spec.json", "optimizer.pt", "trainer_state.json"} <= names
        assert not names & set(FULL_WEIGHTS)
    last = peftkit.load(build_model("gpt2-tiny"), tmp_path / "checkpoint-4")
    for key, value in _adapters(model).items():
        assert torch.equal(_adapters(last)[key], value)


def test_training_changes_the_adapters_and_not_the_base(tmp_path):
    model = _model()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "peftkit_adapters" not in k}
    adapters_before = _adapters(model)
    from peftkit.training.trainer import AdapterTrainer

    AdapterTrainer(model=model, args=_args(tmp_path, save_steps=10), train_dataset=_Tokens()).train()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert any(not torch.equal(after[k], v) for k, v in adapters_before.items())


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    uninterrupted = _adapters(_train(tmp_path / "full"))
    # another seed: the resumed model starts from other adapter values, so only the checkpoint can bring it back
    resumed_model = _train(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-2"), seed=1)
    resumed = _adapters(resumed_model)
    assert sorted(resumed) == sorted(uninterrupted)
    for key in uninterrupted:
        assert (resumed[key] - uninterrupted[key]).abs().max().item() <= TOLERANCE, key


def test_resume_restores_the_saved_weights_before_continuing(tmp_path):
    from peftkit.training.trainer import restore_adapter_weights

    _train(tmp_path)
    model = _model(seed=1)
    restore_adapter_weights(model, tmp_path / "checkpoint-2")
    saved = _adapters(peftkit.load(build_model("gpt2-tiny"), tmp_path / "checkpoint-2"))
    assert all(torch.equal(_adapters(model)[k], v) for k, v in saved.items())


def test_resume_with_another_spec_is_refused(tmp_path):
    from peftkit.training.trainer import restore_adapter_weights

    _train(tmp_path)
    other = peftkit.attach(
        build_model("gpt2-tiny"), {"adapters": {"default": [{"method": "lora", "target": "c_proj"}]}}
    )
    with pytest.raises(peftkit.CheckpointError, match="another spec"):
        restore_adapter_weights(other, tmp_path / "checkpoint-2")


def test_a_plain_trainer_with_the_callback_also_writes_the_adapter_files(tmp_path):
    from peftkit.training.trainer import AdapterCheckpointCallback

    model = _model()
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2),
        train_dataset=_Tokens(),
        callbacks=[AdapterCheckpointCallback()],
    )
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "adapter.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "spec.json").is_file()
