"""ReFT beyond the conformance suite: the intervention equals its formula at exactly the chosen positions, padding on
either side and generation with a KV cache are handled, positions beyond a sequence are refused by name, and the
stream site refuses what is not a transformer block."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model

reft = pytest.importorskip("peftkit_methods.reft")


def _model(**fields):
    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    peftkit.attach(model, {"adapters": {"r": [{"method": "reft", "r": 2, **fields}]}})
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    return model


@pytest.mark.parametrize(("first", "last"), [(1, 0), (0, 1), (2, 2), (3, 4)])
def test_positions_are_the_first_and_last_real_tokens_of_each_row(first, last):
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    chosen = reft.chosen_positions(real, first, last)
    for row in range(3):
        positions = real[row].nonzero().flatten().tolist()
        expected = set(positions[:first]) | set(positions[len(positions) - last :] if last else [])
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_the_intervention_is_its_formula_at_the_chosen_positions_only(kind):
    model = _model(kind=kind, first=1, last=2)
    block = model.model.layers[0]
    adapter = get_state(model).attached[0].module
    captured = {}
    handle = block.register_forward_hook(
        lambda m, a, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out), prepend=True
    )
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
        handle.remove()
        h = captured["h"]
        w, b = adapter.source.weight, adapter.source.bias
        if kind == "loreft":
            rotation = adapter.orthonormal_rotation()
            torch.testing.assert_close(rotation @ rotation.T, torch.eye(2), rtol=1e-5, atol=1e-5)
            full_w = rotation + w  # W = R + U
            expected = h + (h @ full_w.T + b - h @ rotation.T) @ rotation
        else:
            expected = h + (h @ w.T + b) @ adapter.proj
        adapted = adapter(h, h.clone())
    for position in range(6):
        want = expected[0, position] if position in {0, 4, 5} else h[0, position]
        torch.testing.assert_close(adapted[0, position], want, rtol=1e-5, atol=1e-5)


def test_left_padded_batches_and_cached_generation_give_what_each_prompt_gives_alone():
    model = _model(first=1, last=2)
    prompt = torch.randint(3, 100, (1, 5))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=padded, attention_mask=mask).logits[:, 2:], model(input_ids=prompt).logits
        )
        alone = model.generate(prompt, max_new_tokens=5, do_sample=False)
        batched = model.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False)
        with peftkit.disabled(model):
            base = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert batched[:, 2:].tolist() == alone.tolist()
    assert alone.tolist() != base.tolist()  # the prompt was intervened on


def test_positions_beyond_a_sequence_are_refused_by_name():
    model = _model(first=2, last=3)
    with pytest.raises(
        peftkit.PeftkitError, match=r"first 2 and last 3 tokens, but row 0 of the batch has 2 real tokens"
    ):
        model(input_ids=torch.randint(3, 100, (1, 2)))


def test_the_stream_site_takes_transformer_blocks_only():
    model = build_model("llama-tiny")
    with pytest.raises(peftkit.TargetingError, match=r"is not a transformer block of this model.*'@block'"):
        peftkit.attach(model, {"adapters": {"r": [{"method": "reft", "target": "q_proj"}]}})
    assert get_state(model) is None
    with pytest.raises(peftkit.SpecError, match="first and last are both 0"):
        peftkit.Spec.model_validate({"adapters": {"r": [{"method": "reft", "first": 0, "last": 0}]}})


def test_random_init_declares_it_is_not_an_identity():
    config = reft.ReFTConfig(init="random")
    assert not reft.ReFT.capabilities_for(config).identity_at_init
    assert reft.ReFT.capabilities_for(reft.ReFTConfig()).identity_at_init


def test_an_encoder_decoder_takes_interventions_on_its_encoder_blocks_only():
    from transformers import T5Config, T5Model

    model = T5Model(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)).eval()
    with pytest.raises(peftkit.TargetingError, match="a decoder block of an encoder-decoder model"):
        peftkit.attach(model, {"adapters": {"r": [{"method": "reft"}]}})
    peftkit.attach(model, {"adapters": {"r": [{"method": "reft", "target": "re:encoder\\.block\\.\\d+"}]}})
    assert [a.path for a in get_state(model).attached] == ["encoder.block.0", "encoder.block.1"]
