"""Trainable tokens: only the chosen embedding rows train and are saved, a tied LM head sees the same rows, merge
is exact, bad ids are refused at plan, and HF PEFT's TRAINABLE_TOKENS checkpoints carry over (peft as the oracle)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import peftkit
from peftkit.zoo import build_model

IDS = torch.tensor([[3, 7, 120, 3, 9, 5], [5, 1, 2, 7, 7, 0]])
NEW = [7, 120, 5]


def _model(family: str = "gpt2-tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(family).eval()


def _spec(target: str = "transformer.wte", indices: list[int] = NEW) -> dict:
    return {"adapters": {"tokens": [{"method": "trainable-tokens", "target": target, "indices": indices}]}}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _set_rows(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    adapter = next(m for m in model.modules() if hasattr(m, "rows"))
    with torch.no_grad():
        adapter.rows.copy_(torch.randn(adapter.rows.shape, generator=torch.Generator().manual_seed(seed)))
    return adapter.rows.detach().clone()


def test_only_the_chosen_rows_train_and_a_tied_head_sees_them() -> None:
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    before = _logits(model)
    peftkit.attach(model, _spec())
    assert torch.equal(_logits(model), before)  # the rows start as they were
    assert peftkit.trainable_parameters(model).trainable == len(NEW) * 32
    rows = _set_rows(model)

    # The reference: a copy of the model whose shared weight has the new rows written in.
    reference = _model()
    with torch.no_grad():
        reference.transformer.wte.weight[NEW] = rows
    assert torch.allclose(_logits(model), _logits(reference), atol=1e-5)

    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == ["transformer.wte.peftkit_adapters.tokens.rows"]


def test_merge_writes_the_rows_into_the_shared_weight_and_unmerge_is_exact() -> None:
    model = _model()
    original = model.transformer.wte.weight.detach().clone()
    peftkit.attach(model, _spec())
    _set_rows(model)
    unmerged = _logits(model)
    peftkit.merge(model)  # no untie needed: the adapter means to change both holders
    assert torch.allclose(_logits(model), unmerged, atol=1e-5)
    peftkit.unmerge(model)
    assert torch.equal(model.transformer.wte.weight, original)
    peftkit.merge_and_detach(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.allclose(_logits(model), unmerged, atol=1e-5)


def test_inactive_and_detached_adapters_leave_the_base() -> None:
    model = _model()
    before = _logits(model)
    peftkit.attach(model, _spec())
    _set_rows(model)
    with peftkit.disabled(model):
        assert torch.equal(_logits(model), before)
    peftkit.detach(model)
    assert torch.equal(_logits(model), before)
    assert not model.lm_head._forward_hooks  # the head's hook went with the adapter


def test_only_the_rows_are_saved(tmp_path) -> None:
    model = _model()
    peftkit.attach(model, _spec())
    rows = _set_rows(model)
    expected = _logits(model)
    peftkit.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as stream:
        assert {k: tuple(stream.get_slice(k).get_shape()) for k in stream.keys()} == {  # noqa: SIM118 (not iterable)
            "transformer.wte.peftkit_adapters.tokens.rows": (3, 32)
        }
    fresh = peftkit.load(_model(), tmp_path)
    assert torch.equal(_logits(fresh), expected)
    assert torch.equal(next(m for m in fresh.modules() if hasattr(m, "rows")).rows, rows)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([3, 128], "indices [128] are outside its vocabulary of 128 rows"),
        ([-1], "token ids are >= 0"),
        ([4, 4], "each token id may appear once"),
        ([], "at least 1 item"),
    ],
)
def test_bad_ids_are_refused_and_the_model_is_unchanged(indices, message) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(peftkit.PeftkitError, match="indices") as raised:
        peftkit.attach(model, _spec(indices=indices))
    assert message in str(raised.value)
    assert model.state_dict().keys() == before.keys() and peftkit.trainable_parameters(model).trainable > 0


peft = pytest.importorskip("peft", reason="the HF peft package (the oracle for these tests) is not installed")

TARGETS = {
    "gpt2-tiny": "transformer.wte",
    "llama-tiny": "model.embed_tokens",
    "bert-tiny": "embeddings.word_embeddings",
}


def _out(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_peft_trainable_tokens_in_and_out(family, tmp_path) -> None:
    config = peft.TrainableTokensConfig(target_modules=[TARGETS[family].rpartition(".")[2]], token_indices=NEW)
    peft_model = peft.get_peft_model(_model(family), config).eval()
    with torch.no_grad():
        for parameter in (p for p in peft_model.parameters() if p.requires_grad):
            parameter.normal_(0, 1)
    peft_model.save_pretrained(tmp_path / "from-peft")
    expected = _out(peft_model, family)

    model = peftkit.from_peft(_model(family), tmp_path / "from-peft")
    assert (_out(model, family) - expected).abs().max() <= 1e-5

    peftkit.to_peft(model, tmp_path / "to-peft")
    back = peft.PeftModel.from_pretrained(_model(family), tmp_path / "to-peft").eval()
    assert (_out(back, family) - expected).abs().max() <= 1e-5


def test_routing_sends_each_example_to_its_own_rows_at_the_tied_head_too() -> None:
    model = _model()
    peftkit.attach(model, _spec())
    _set_rows(model)
    adapted = _logits(model)
    with peftkit.disabled(model):
        plain = _logits(model)
    with peftkit.route(model, ["tokens", None]):
        routed = _logits(model)
    assert torch.allclose(routed[0], adapted[0], atol=1e-6) and torch.allclose(routed[1], plain[1], atol=1e-6)
