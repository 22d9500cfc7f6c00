"""LoRA+ and the optimizer groups methods ask for: peftkit.parameter_groups, and peftkit train, AdapterTrainer and
peftkit compare building their optimizers from it."""

from __future__ import annotations

import pytest
import torch
from test_training import run, write_config

import peftkit
import peftkit.testing
from peftkit.zoo import build_model

LORA_PLUS = {"method": "lora", "target": ["c_attn"], "r": 4, "lora_plus_ratio": 16.0}


def group_of(groups: list[dict], parameter: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(p is parameter for p in g["params"])]
    return group


def test_lora_plus_puts_b_at_ratio_times_the_learning_rate_and_everything_trainable_in_one_group() -> None:
    model = build_model("gpt2-tiny")
    spec = {
        "adapters": {"a": [LORA_PLUS], "d": [{"method": "dora", "target": ["c_fc"], "r": 2}]},
        "trainable": ["ln_f"],
    }
    peftkit.attach(model, spec)
    groups = peftkit.parameter_groups(model, lr=1e-3, weight_decay=0.1)
    named = dict(model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    for name, parameter in named.items():
        if not parameter.requires_grad:
            continue
        group = group_of(groups, parameter)
        if ".a." in name and name.endswith("lora_b"):
            assert group["lr"] == pytest.approx(16e-3) and group["weight_decay"] == 0.1, name
        elif name.endswith("lora_magnitude"):
            assert group["lr"] == 1e-3 and group["weight_decay"] == 0.0, name  # DoRA's magnitude does not decay
        else:
            assert group["lr"] == 1e-3 and group["weight_decay"] == 0.1, name


def test_one_sgd_step_moves_b_sixteen_times_as_far_per_gradient() -> None:
    torch.manual_seed(0)
    model = peftkit.attach(build_model("gpt2-tiny"), {"adapters": {"a": [LORA_PLUS]}})
    peftkit.testing.randomise_adapters(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    a = next(p for n, p in model.named_parameters() if n.endswith("lora_a"))
    b = next(p for n, p in model.named_parameters() if n.endswith("lora_b"))
    before = {"a": a.detach().clone(), "b": b.detach().clone()}
    torch.optim.SGD(peftkit.parameter_groups(model, lr=1e-2)).step()
    torch.testing.assert_close(a.detach(), before["a"] - 1e-2 * a.grad)
    torch.testing.assert_close(b.detach(), before["b"] - 16e-2 * b.grad)


def test_gates_of_a_composition_do_not_decay() -> None:
    model = build_model("gpt2-tiny")
    peftkit.attach(
        model,
        {
            "adapters": {"a": [{"method": "lora", "target": "c_attn"}], "b": [{"method": "lora", "target": "c_attn"}]},
            "compose": [{"rule": "gate", "adapters": ["a", "b"]}],
        },
    )
    groups = peftkit.parameter_groups(model, lr=1e-3, weight_decay=0.1)
    gates = [p for n, p in model.named_parameters() if n.endswith("gates")]
    assert gates and all(group_of(groups, g)["weight_decay"] == 0.0 for g in gates)


@pytest.mark.parametrize("ratio", [0, -1.0])
def test_a_ratio_that_is_not_positive_is_refused_naming_the_field(ratio: float) -> None:
    model = build_model("gpt2-tiny")
    with pytest.raises(peftkit.SpecError, match="lora_plus_ratio"):
        peftkit.attach(model, {"adapters": {"a": [{**LORA_PLUS, "lora_plus_ratio": ratio}]}})
    assert not hasattr(model, "_peftkit_state")


class _Recording(torch.optim.AdamW):
    made: list[list[dict]] = []

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        _Recording.made.append(self.param_groups)


def test_peftkit_train_builds_its_optimizer_from_the_groups(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.optim, "AdamW", _Recording)
    _Recording.made.clear()
    spec = {"adapters": {"default": [{"method": "lora", "target": ["@query"], "r": 4, "lora_plus_ratio": 8.0}]}}
    run(write_config(tmp_path, spec=spec, steps=1, checkpoint_every=1))
    (groups,) = _Recording.made
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([0.01, 0.08])  # before the schedule


def test_adapter_trainer_builds_its_optimizer_from_the_groups(tmp_path) -> None:
    import transformers

    from peftkit.training.trainer import AdapterTrainer

    model = peftkit.attach(build_model("gpt2-tiny"), {"adapters": {"a": [LORA_PLUS]}})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True)
    optimizer = AdapterTrainer(model=model, args=args).create_optimizer()
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-3, 16e-3])


def test_compare_builds_its_optimizer_from_the_groups_and_keeps_the_head_apart() -> None:
    from peftkit_benchmarks.compare.train import make_optimizer

    model = peftkit.attach(build_model("bert-tiny"), {"adapters": {"a": [{**LORA_PLUS, "target": ["query"]}]}})
    model.pooler.dense.weight.requires_grad_(True)
    optimizer = make_optimizer(model, lr=1e-3, head_lr=5e-3, weight_decay=0.0, head={"pooler.dense.weight"})
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-3, 5e-3, 16e-3])
