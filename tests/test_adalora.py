"""AdaLoRA and the training hooks it needs (``peftkit.regularization``, ``peftkit.after_optimizer_step``,
``peftkit.check_schedule``): its training follows HF PEFT's step for step (the `peft` package as the oracle: the same
losses, the same ranks at every allocation), PEFT's ADALORA checkpoints with pruned ranks go both ways on all four
families, bad schedules are refused before anything is attached, and the three training loops run the hooks."""

from __future__ import annotations

import json

import pytest
import torch
from test_peft_interop import FAMILIES, LORA_TARGETS, _base, _close, _inputs, _output

import peftkit
from peftkit.lifecycle.state import get_state

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, PeftModel, get_peft_model  # noqa: E402


def _train_peft(model, steps: int) -> None:
    """PEFT's AdaLoRA loop as its docs write it; ``base_model(...)`` is the call that adds the regulariser."""
    ids = _inputs("llama-tiny")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(steps):
        model.base_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()


def _train_peftkit(model, steps: int, lr: float = 5e-2) -> list[list[int]]:
    ids = _inputs("llama-tiny")["input_ids"]
    optimizer = torch.optim.AdamW(peftkit.parameter_groups(model, lr, 0.01), lr=lr)
    model.train()
    ranks = []
    for step in range(steps):
        (model(input_ids=ids, labels=ids).loss + peftkit.regularization(model)).backward()
        optimizer.step()
        peftkit.after_optimizer_step(model, step, steps)
        optimizer.zero_grad()
        ranks.append([a.module.rank for a in get_state(model).attached])
    return ranks


@pytest.mark.parametrize("interval", [1, 2])
def test_training_follows_peft_step_for_step(interval, tmp_path):
    """Both start from the same initial adapter (PEFT's, loaded into peftkit) and train on the same batch: the
    allocator prunes the same triplets and the trained models agree."""
    config = AdaLoraConfig(
        init_r=6, target_r=2, target_modules=LORA_TARGETS["llama-tiny"], total_step=10, tinit=1, tfinal=3,
        lora_alpha=4, deltaT=interval,
    )  # fmt: skip
    torch.manual_seed(5)
    theirs = get_peft_model(_base("llama-tiny"), config)
    theirs.save_pretrained(tmp_path / "init")
    ours = peftkit.from_peft(_base("llama-tiny"), tmp_path / "init")
    _train_peft(theirs, 10)
    ranks = _train_peftkit(ours, 10)
    pruned = {n: sum(v) for n, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ranks[-1] == [pruned[f"{a.path}.lora_E.default"] for a in get_state(ours).attached]
    assert sum(ranks[-1]) == 2 * len(ranks[-1]) and ranks[0] == [6] * len(ranks[0])
    theirs.eval(), ours.eval()
    with torch.no_grad():
        difference = (theirs(**_inputs("llama-tiny")).logits - ours(**_inputs("llama-tiny")).logits).abs().max()
    assert difference < 1e-4


def test_the_regulariser_is_the_orthogonality_of_every_factor():
    model = peftkit.attach(_base("llama-tiny"), {"adapters": {"a": [{"method": "adalora", "target": "q_proj"}]}})
    adapters = [a.module for a in get_state(model).attached]
    expected = torch.stack(
        [torch.linalg.matrix_norm(m @ m.T - torch.eye(m.shape[0])) for a in adapters for m in (a.lora_a, a.lora_b.T)]
    ).mean()
    torch.testing.assert_close(peftkit.regularization(model), 0.5 * expected)
    peftkit.set_trainable(model, "a", False)  # a frozen adapter is not trained, so it adds no term
    assert peftkit.regularization(model) == 0.0


def test_nothing_is_added_for_methods_without_hooks_or_a_model_without_adapters():
    model = _base("llama-tiny")
    assert peftkit.regularization(model) == 0.0
    peftkit.after_optimizer_step(model, 0, 1)
    peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": "q_proj"}]}})
    assert peftkit.regularization(model) == 0.0


@pytest.mark.parametrize(
    ("fields", "steps", "message"),
    [
        ({"total_steps": 10, "warmup_steps": 6, "final_steps": 4}, None, r"warm-up of 6 and a final phase of 4 steps"),
        ({"warmup_share": 0.5, "final_share": 0.5}, 100, r"warm-up of 50 and a final phase of 50 steps .* 100-step"),
        (
            {"total_steps": 500},
            300,
            r"total_steps is 500 but this run takes 300 optimizer steps, .*; set total_steps: 300",
        ),
        ({"target_r": 16}, None, r"target_r 16 is above init_r 12"),
        ({"warmup_steps": 3, "warmup_share": 0.1}, None, r"give warmup_steps or warmup_share, not both"),
    ],
)
def test_a_schedule_that_does_not_fit_is_refused_before_anything_is_attached(fields, steps, message):
    spec = {"adapters": {"a": [{"method": "adalora", "target": "q_proj", **fields}]}}
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.check_schedule(spec, steps or 10)


def test_the_final_ranks_are_saved_and_load_with_equal_outputs(tmp_path):
    model = peftkit.attach(
        _base("llama-tiny"), {"adapters": {"a": [{"method": "adalora", "target": LORA_TARGETS["llama-tiny"]}]}}
    )
    ranks = _train_peftkit(model, 6)[-1]
    assert sum(ranks) == 8 * len(ranks) and len(set(ranks)) > 1  # the budget moved between hosts
    model.eval()
    expected = _output(model, "llama-tiny")
    peftkit.save(model, tmp_path / "ckpt")  # the final form: each host's kept triplets only
    saved = peftkit.read_spec(tmp_path / "ckpt").adapters["a"][0]
    assert saved.ranks == {a.path: a.module.rank for a in get_state(model).attached}
    loaded = peftkit.load(_base("llama-tiny"), tmp_path / "ckpt").eval()
    assert [a.module.lora_a.shape[0] for a in get_state(loaded).attached] == ranks
    torch.testing.assert_close(_output(loaded, "llama-tiny"), expected, rtol=1e-6, atol=1e-6)
    peftkit.save(model, tmp_path / "resume", portable=False)  # a checkpoint to resume from keeps every triplet
    assert peftkit.read_spec(tmp_path / "resume").adapters["a"][0].ranks is None
    peftkit.to_peft(loaded, tmp_path / "peft", "a")  # a compacted adapter exports with PEFT's init_r-slot pattern
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(_base("llama-tiny"), tmp_path / "peft").eval()
    _close(_output(theirs, "llama-tiny"), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adalora_with_pruned_ranks_loads_in_peftkit_with_equal_outputs(family, tmp_path):
    config = AdaLoraConfig(
        init_r=6, target_r=2, target_modules=LORA_TARGETS[family], total_step=8, tinit=1, tfinal=3, lora_alpha=4
    )
    torch.manual_seed(3)
    theirs = get_peft_model(_base(family), config)
    if family in {"gpt2-tiny", "llama-tiny"}:
        _train_peft(theirs, 8)
    else:  # an encoder: the ranks from a random importance, saved the way PEFT saves them
        with torch.no_grad():
            for name, parameter in theirs.named_parameters():
                if "lora_" in name:
                    parameter.normal_(std=0.3)
        theirs.base_model.rankallocator.update_ipt = lambda model: None
        pattern = {n: [i % 3 != 0 for i in range(6)] for n, _ in theirs.named_parameters() if "lora_E" in n}
        theirs.peft_config["default"].rank_pattern = {k.split("base_model.model.")[-1]: v for k, v in pattern.items()}
        theirs.base_model.rankallocator.mask_using_rank_pattern(
            theirs.base_model.model, theirs.peft_config["default"].rank_pattern
        )
    theirs.eval()
    expected = _output(theirs, family)
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    ours = peftkit.from_peft(_base(family), tmp_path / "peft").eval()
    _close(expected, _output(ours, family))
    peftkit.to_peft(ours, tmp_path / "back")
    _close(expected, _output(PeftModel.from_pretrained(_base(family), tmp_path / "back").eval(), family))


@pytest.mark.parametrize("family", FAMILIES)
def test_peftkit_adalora_exports_to_peft_with_equal_outputs(family, tmp_path):
    entry = {"method": "adalora", "target": LORA_TARGETS[family], "init_r": 4, "target_r": 2, "total_steps": 20}
    model = peftkit.attach(_base(family), {"adapters": {"default": [entry]}}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    expected = _output(model, family)
    peftkit.to_peft(model, tmp_path / "export")
    _close(expected, _output(PeftModel.from_pretrained(_base(family), tmp_path / "export").eval(), family))


def test_adapter_trainer_adds_the_loss_term_and_allocates(tmp_path):
    from transformers import TrainingArguments

    from peftkit.training.trainer import AdapterTrainer

    model = peftkit.attach(
        _base("llama-tiny"),
        {"adapters": {"a": [{"method": "adalora", "target": LORA_TARGETS["llama-tiny"], "final_share": 0.25}]}},
    )
    ids = _inputs("llama-tiny")["input_ids"]
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=5e-2, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True,
    )  # fmt: skip
    AdapterTrainer(model=model, args=args, train_dataset=rows).train()
    ranks = [a.module.rank for a in get_state(model).attached]
    assert sum(ranks) == 8 * len(ranks) and ranks != [12] * len(ranks)

    bad = peftkit.attach(
        _base("llama-tiny"),
        {"adapters": {"a": [{"method": "adalora", "target": "q_proj", "total_steps": 100}]}},
    )
    with pytest.raises(peftkit.PeftkitError, match="total_steps is 100 but this run takes 8"):
        AdapterTrainer(model=bad, args=args, train_dataset=rows).train()


def test_peftkit_train_allocates_and_refuses_a_schedule_that_does_not_fit(tmp_path):
    from safetensors.torch import load_file
    from test_training import run, write_config

    entry = {"method": "adalora", "target": ["@query", "@value"], "init_r": 4, "target_r": 2, "final_share": 0.25}
    result = run(write_config(tmp_path, spec={"adapters": {"default": [entry]}}, steps=12))
    kept = [t for k, t in load_file(result.adapters / "adapter.safetensors").items() if k.endswith(".kept")]
    assert len(kept) == 4 and sum(int(t.sum()) for t in kept) == 2 * 4

    late = tmp_path / "late"
    late.mkdir()
    spec = {"adapters": {"default": [{**entry, "final_share": None, "total_steps": 50}]}}
    with pytest.raises(peftkit.PeftkitError, match="total_steps is 50 but this run takes 12"):
        run(write_config(late, spec=spec, steps=12))
    assert not (late / "out").exists()
