"""AdapterFusion (the ``fuse`` composition rule, ``peftkit.add_rule``) beyond the conformance property: adapters trained
apart are loaded and fused, only the fusion trains, the fused model saves and loads with its rule, and the sets that
cannot be fused are refused with the model unchanged."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model

IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def _base():
    torch.manual_seed(0)
    return build_model("bert-tiny").eval()


def _trained_adapter(name: str, seed: int, folder) -> None:
    """An adapter trained (here: randomised) on its own and saved, as AdapterFusion's first stage."""
    model = peftkit.attach(_base(), {"adapters": {name: [{"method": "pfeiffer"}]}})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peftkit.save(model, folder / name)


def _fused(tmp_path):
    _trained_adapter("a", 1, tmp_path)
    _trained_adapter("b", 2, tmp_path)
    model = _base()
    peftkit.load(model, tmp_path / "a")
    peftkit.load(model, tmp_path / "b")
    return peftkit.add_rule(model, {"rule": "fuse", "adapters": ["a", "b"]})


def test_adapters_trained_apart_are_fused_and_only_the_fusion_trains(tmp_path):
    model = _fused(tmp_path)
    members = {n: p.detach().clone() for n, p in model.named_parameters() if ".a." in n or ".b." in n}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("0_gate" in n for n in trained)  # the rule's fusion at each host, nothing else
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(IDS).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, members[n]) for n, p in model.named_parameters() if n in members)
    model.eval()
    with torch.no_grad():
        expected = model(IDS).last_hidden_state
    peftkit.save(model, tmp_path / "fused")
    assert [c.rule for c in peftkit.read_spec(tmp_path / "fused").compose] == ["fuse"]
    loaded = peftkit.load(_base(), tmp_path / "fused").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).last_hidden_state, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".a." in n or ".b." in n)


def test_at_init_the_fusion_of_two_is_close_to_their_average(tmp_path):
    """Query and key maps start near zero (as AdapterHub's), so the attention starts near uniform."""
    fused = _fused(tmp_path)
    averaged = _base()
    peftkit.load(averaged, tmp_path / "a")
    peftkit.load(averaged, tmp_path / "b")
    peftkit.add_rule(averaged, {"rule": "average", "adapters": ["a", "b"], "weights": [0.5, 0.5]})
    with torch.no_grad():
        one, other = fused(IDS).last_hidden_state, averaged(IDS).last_hidden_state
    with peftkit.disabled(averaged), torch.no_grad():
        base = averaged(IDS).last_hidden_state
    assert (one - other).abs().max() < 0.1 * (other - base).abs().max()


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ([], r"compose\.0\.adapters: List should have at least 1 item"),
        (["a", "zz"], r"adapters \['zz'\] are not in this spec"),
        (["a", "p"], r"'prefix' \(adapter 'p'\) at .* cannot be composed by 'fuse'"),
    ],
)
def test_sets_that_cannot_be_fused_are_refused_and_the_model_left_as_it_was(adapters, message):
    model = _base()
    peftkit.attach(model, {"adapters": {"a": [{"method": "pfeiffer"}], "p": [{"method": "prefix", "length": 2}]}})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.add_rule(model, {"rule": "fuse", "adapters": adapters})
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and list(model.state_dict()) == keys
    assert get_state(model).spec.compose == []


def test_a_fused_adapter_is_not_merged(tmp_path):
    model = _fused(tmp_path)
    with pytest.raises(peftkit.PeftkitError, match="weighted by a composition rule"):
        peftkit.merge(model)


def test_a_spec_can_declare_the_fusion_itself():
    spec = {
        "adapters": {"a": [{"method": "lora", "target": "query"}], "b": [{"method": "lora", "target": "query"}]},
        "compose": [{"rule": "fuse", "adapters": ["a", "b"]}],
    }
    model = peftkit.attach(_base(), spec)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("0_gate" in n for n in trained)
