"""Named adapters on one model: activation, disabling, trainability, and per-example routing in one batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS

SPEC = {
    "adapters": {
        "a": [{"method": "lora", "target": ["@query", "@value"], "r": 2}],
        "b": [{"method": "lora", "target": ["@query", "@key", "@value", "@attention_output"], "r": 5, "rslora": True}],
        "c": [{"method": "ia3"}],
        "d": [{"method": "houlsby", "bottleneck": 4}],
    }
}


def model_with_four_adapters(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TINY_MODELS[f"{family}-tiny"]().eval()
    peftkit.attach(model, SPEC)
    randomise_adapters(model, seed)
    return model


def test_activate_switch_disable_and_trainability_is_explicit():
    model = model_with_four_adapters("llama")
    ids = torch.randint(2, 128, (2, 5))
    assert peftkit.active_adapters(model) == ["a", "b", "c", "d"]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peftkit.activate(model, ["a"])
    only_a = model(input_ids=ids).logits
    peftkit.activate(model, "b")  # switch tasks without re-attaching
    only_b = model(input_ids=ids).logits
    assert not torch.allclose(only_a, only_b)
    with peftkit.disabled(model):
        base = model(input_ids=ids).logits
        assert peftkit.active_adapters(model) == []
    assert peftkit.active_adapters(model) == ["b"]
    peftkit.detach(model)
    torch.testing.assert_close(model(input_ids=ids).logits, base)
    assert flags == {n: p.requires_grad for n, p in model_with_four_adapters("llama").named_parameters()}


def test_set_trainable_is_the_only_way_flags_change():
    model = model_with_four_adapters("gpt2")
    peftkit.activate(model, ["a"])
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b." in n)  # activation left them alone
    peftkit.set_trainable(model, ["b", "c", "d"], False)
    trainable = {n.split("peftkit_adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}
    with pytest.raises(peftkit.AttachError, match="no attached adapter named \\['z'\\]"):
        peftkit.activate(model, ["z"])


@settings(max_examples=max(settings.default.max_examples, 20))
@given(
    family=st.sampled_from(["llama", "gpt2", "bert"]),
    names=st.lists(st.sampled_from(["a", "b", "c", "d", None]), min_size=1, max_size=6),
    seq=st.integers(2, 6),
    seed=st.integers(0, 100),
)
def test_a_routed_batch_equals_each_example_alone_with_its_adapter(family, names, seq, seed):
    model = model_with_four_adapters(family, seed)
    ids = torch.randint(2, 128, (len(names), seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), peftkit.route(model, names):
        routed = model(input_ids=ids)[0]
    for row, name in enumerate(names):
        peftkit.activate(model, [] if name is None else [name])
        with torch.no_grad():
            alone = model(input_ids=ids[row : row + 1])[0][0]
        # The routed path adds the update with one batched matmul, the single path in place into the host's
        # output: the same sums in another fp32 order. With randomised (large) adapters that is ~1e-5 apart; a
        # wrong adapter on a row is O(1) apart.
        torch.testing.assert_close(routed[row], alone, rtol=1e-4, atol=1e-4)


def test_lora_routing_is_batched(monkeypatch):
    """LoRA adapters never run one by one while routing: the stacked path handles every row."""
    model = model_with_four_adapters("llama")
    from peftkit_methods.lora import LoRAAdapter

    def one_by_one(*args, **kwargs):
        raise AssertionError("a LoRA adapter ran on its own rows")

    monkeypatch.setattr(LoRAAdapter, "forward", one_by_one)
    with peftkit.route(model, ["a", "b", "a", None]):
        model(input_ids=torch.randint(2, 128, (4, 5)))


def test_routing_gradients_reach_only_the_routed_adapters():
    model = model_with_four_adapters("llama")
    model.train()
    ids = torch.randint(2, 128, (2, 5))
    with peftkit.route(model, ["a", "a"]):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.split("peftkit_adapters.")[1][0] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"a"}


def test_what_cannot_be_routed_is_refused():
    model = model_with_four_adapters("llama")
    peftkit.merge(model, ["a"])
    with pytest.raises(peftkit.AttachError, match="a is merged"), peftkit.route(model, ["a", "b"]):
        pass
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 2}]}})
    with (
        pytest.raises(peftkit.AttachError, match="p \\(prefix\\) sits at an attention site"),
        peftkit.route(model, ["p"]),
    ):
        pass
    peftkit.unmerge(model, ["a"])
    too_many = pytest.raises(peftkit.AttachError, match="routing names 3 examples, but the batch holds 2")
    with too_many, peftkit.route(model, ["a", "b", "a"]):
        model(input_ids=torch.randint(2, 128, (2, 5)))
