"""End to end on the model families the issue names: GPT-2, Llama, BERT, RoBERTa and a plain MLP."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.zoo import build_model

TARGETS = {
    "gpt2-tiny": ["c_attn", "c_proj", "c_fc"],
    "llama-tiny": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert-tiny": ["query", "key", "value", "dense"],
    "roberta-tiny": ["query", "value"],
    "mlp": ["0", "2"],
}


def batch(name: str):
    generator = torch.Generator().manual_seed(0)
    if name == "mlp":
        return {"input": torch.randn(16, 16, generator=generator)}
    ids = torch.randint(2, 128, (4, 12), generator=generator)
    return {"input_ids": ids}


def loss_of(name, model, inputs):
    if name == "mlp":
        return model(inputs["input"]).pow(2).mean()
    output = model(**inputs, labels=inputs["input_ids"]) if "llama" in name or "gpt2" in name else model(**inputs)
    if getattr(output, "loss", None) is not None:
        return output.loss
    return (output.last_hidden_state[..., :4] - 1).pow(2).mean()  # a LayerNorm output: fit some channels


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_train_save_load_merge_detach(name, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = batch(name)
    model.eval()
    with torch.no_grad():
        base_out = loss_of(name, model, inputs)
    assert (
        peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": TARGETS[name], "r": 4}]}}) is model
    )
    counts = peftkit.trainable_parameters(model)
    assert 0 < counts.trainable < counts.total and 0 < counts.percent < 100

    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = loss_of(name, model, inputs)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"LoRA did not learn: {losses}"
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items() if k in base_state)

    model.eval()
    with torch.no_grad():
        tuned = loss_of(name, model, inputs)
        peftkit.save(model, tmp_path)
        fresh = build_model(name).eval()
        fresh.load_state_dict(base_state)
        peftkit.load(fresh, tmp_path)
        assert torch.equal(loss_of(name, fresh, inputs), tuned)
        peftkit.merge(model)
        torch.testing.assert_close(loss_of(name, model, inputs), tuned, rtol=1e-5, atol=1e-6)
        peftkit.unmerge(model)
        peftkit.detach(model)
        assert list(model.state_dict()) == list(base_state)
        torch.testing.assert_close(loss_of(name, model, inputs), base_out, rtol=1e-5, atol=1e-6)


def test_several_named_adapters_and_detaching_one() -> None:
    model = build_model("llama-tiny")
    peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": "q_proj"}]}})
    peftkit.attach(model, {"adapters": {"b": [{"method": "lora", "target": ["q_proj", "v_proj"]}]}})
    with pytest.raises(peftkit.SpecError, match="already attached"):
        peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": "k_proj"}]}})
    peftkit.detach(model, ["a"])
    assert not any(".a." in n for n, _ in model.named_parameters())
    assert sum(".b." in n for n, _ in model.named_parameters()) == 8
    with pytest.raises(peftkit.AttachError, match="no attached adapter named \\['zzz'\\]"):
        peftkit.detach(model, ["zzz"])
