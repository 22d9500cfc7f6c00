"""Composition rules (sum, stack, gate, average), their properties, presets, and saving a whole composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS

PRESETS = Path(__file__).resolve().parent.parent / "docs" / "examples" / "presets"
LORA = {"method": "lora", "target": ["@query", "@value"], "r": 3}
HOULSBY = {"method": "houlsby", "bottleneck": 4}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)[0]


def composed(family, adapters, compose, seed, randomise=None):
    torch.manual_seed(seed)
    model = TINY_MODELS[f"{family}-tiny"]().eval()
    peftkit.attach(model, {"adapters": adapters, "compose": compose})
    if randomise is None:
        randomise_adapters(model, seed)
    else:  # only the named adapters leave their initialisation
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if any(f"peftkit_adapters.{n}." in name for n in randomise):
                    parameter.add_(torch.randn(parameter.shape, generator=generator).mul_(0.3))
    return model


IDS = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))
families = st.sampled_from(["llama", "gpt2", "bert"])
seeds = st.integers(0, 50)


@settings(max_examples=max(settings.default.max_examples, 10))
@given(family=families, seed=seeds)
def test_sum_commutes_for_commuting_methods(family, seed):
    adapters = {"a": [LORA], "b": [{**LORA, "r": 5}]}
    ab = composed(family, adapters, [{"rule": "sum", "adapters": ["a", "b"]}], seed)
    ba = composed(family, adapters, [{"rule": "sum", "adapters": ["b", "a"]}], seed)
    torch.testing.assert_close(logits(ab, IDS), logits(ba, IDS), rtol=1e-5, atol=1e-5)


@settings(max_examples=max(settings.default.max_examples, 10))
@given(family=families, seed=seeds, rule=st.sampled_from(["sum", "stack", "gate"]))
def test_identity_at_init_members_leave_the_output_unchanged(family, seed, rule):
    with_fresh = composed(family, {"a": [LORA], "h": [HOULSBY]}, [{"rule": rule, "adapters": ["a", "h"]}], seed, ["a"])
    alone = composed(family, {"a": [LORA], "h": [HOULSBY]}, [], seed, ["a"])
    peftkit.activate(alone, ["a"])
    torch.testing.assert_close(logits(with_fresh, IDS), logits(alone, IDS), rtol=1e-5, atol=1e-5)


@settings(max_examples=max(settings.default.max_examples, 10))
@given(family=families, seed=seeds)
def test_stack_order_matters_only_where_declared(family, seed):
    stacked = {"h1": [HOULSBY], "h2": [HOULSBY]}
    first = composed(family, stacked, [{"rule": "stack", "adapters": ["h1", "h2"]}], seed)
    second = composed(family, stacked, [{"rule": "stack", "adapters": ["h2", "h1"]}], seed)
    assert not torch.allclose(logits(first, IDS), logits(second, IDS), atol=1e-6)  # output transforms: order matters
    loras = {"a": [LORA], "b": [{**LORA, "r": 5}]}
    first = composed(family, loras, [{"rule": "stack", "adapters": ["a", "b"]}], seed)
    second = composed(family, loras, [{"rule": "stack", "adapters": ["b", "a"]}], seed)
    torch.testing.assert_close(logits(first, IDS), logits(second, IDS), rtol=1e-5, atol=1e-5)  # LoRA commutes


@settings(max_examples=max(settings.default.max_examples, 10))
@given(
    family=families,
    seed=seeds,
    raw=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4),
    method=st.sampled_from(
        [LORA, HOULSBY, {"method": "ia3", "target": ["@key", "@value"]}, {"method": "parallel", "bottleneck": 3}]
    ),
)
def test_average_of_identical_adapters_equals_one(family, seed, raw, method):
    weights = [w / sum(raw) for w in raw]
    weights[-1] = 1.0 - sum(weights[:-1])
    names = [f"n{i}" for i in range(len(raw))]
    model = composed(
        family, {n: [method] for n in names}, [{"rule": "average", "adapters": names, "weights": weights}], seed
    )
    state = {k: v for k, v in model.state_dict().items() if ".n0." in k}
    with torch.no_grad():  # make every member a copy of n0
        for name, parameter in model.named_parameters():
            for other in names[1:]:
                if f".{other}." in name:
                    parameter.copy_(state[name.replace(f".{other}.", ".n0.")])
    averaged = logits(model, IDS)
    peftkit.detach(model, names[1:])
    torch.testing.assert_close(averaged, logits(model, IDS), rtol=1e-4, atol=1e-5)


def test_gates_are_learned_and_start_where_the_spec_says():
    model = composed(
        "llama",
        {"a": [LORA], "h": [HOULSBY]},
        [{"rule": "gate", "adapters": ["a", "h"], "gate_init": 0.25}],
        0,
        ["a", "h"],
    )
    gates = [p for n, p in model.named_parameters() if n.endswith("0_gate.gates")]
    assert gates and all(torch.equal(g, torch.full((2,), 0.25)) and g.requires_grad for g in gates)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_a_whole_composition_saves_and_loads(tmp_path):
    compose = [
        {"rule": "gate", "adapters": ["a", "b"], "gate_init": 0.5},
        {"rule": "average", "adapters": ["h", "p"], "weights": [0.3, 0.7]},
    ]
    adapters = {"a": [LORA], "b": [{**LORA, "r": 2}], "h": [HOULSBY], "p": [{"method": "parallel", "bottleneck": 4}]}
    model = composed("llama", adapters, compose, 3)
    peftkit.save(model, tmp_path)
    torch.manual_seed(3)
    fresh = peftkit.load(TINY_MODELS["llama-tiny"]().eval(), tmp_path)
    assert peftkit.read_spec(tmp_path).compose[1].weights == [0.3, 0.7]
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_detaching_a_member_drops_its_rule_and_keeps_the_other_gates():
    compose = [{"rule": "gate", "adapters": ["a", "b"]}, {"rule": "gate", "adapters": ["h", "p"], "gate_init": 0.3}]
    adapters = {"a": [LORA], "b": [LORA], "h": [HOULSBY], "p": [{"method": "parallel", "bottleneck": 4}]}
    model = composed("gpt2", adapters, compose, 0, ["a", "b", "h", "p"])
    peftkit.detach(model, ["a"])
    spec = model._peftkit_state.spec
    assert [c.adapters for c in spec.compose] == [["h", "p"]]
    gates = {n: p for n, p in model.named_parameters() if "_gate" in n}
    assert (
        gates
        and all(".0_gate." in n for n in gates)
        and all(torch.equal(p, torch.full((2,), 0.3)) for p in gates.values())
    )


def test_unsupported_rules_and_bad_compositions_are_refused():
    with pytest.raises(
        peftkit.AttachError, match=r"'prefix' \(adapter 'p'\) at '.*self_attn' cannot be composed by 'gate'"
    ):
        composed("llama", {"a": [LORA], "p": [{"method": "prefix"}]}, [{"rule": "gate", "adapters": ["a", "p"]}], 0)
    for compose, message in [
        ([{"rule": "sum", "adapters": ["a", "zz"]}], "adapters \\['zz'\\] are not in this spec"),
        ([{"rule": "average", "adapters": ["a", "b"], "weights": [0.5, 0.6]}], "must sum to 1"),
        ([{"rule": "sum", "adapters": ["a", "b"]}, {"rule": "stack", "adapters": ["b", "a"]}], "already composed"),
        ([{"rule": "blend", "adapters": ["a", "b"]}], "'sum', 'stack', 'gate', 'average' or 'fuse'"),
        ([{"rule": "sum", "adapters": ["a"]}], "a 'sum' rule combines at least two adapters"),
    ]:
        with pytest.raises(peftkit.SpecError, match=message):
            peftkit.Spec.model_validate({"adapters": {"a": [LORA], "b": [LORA]}, "compose": compose})
    model = composed(
        "llama", {"a": [LORA], "b": [LORA]}, [{"rule": "average", "adapters": ["a", "b"], "weights": [0.5, 0.5]}], 0
    )
    with pytest.raises(peftkit.AttachError, match="weighted by a composition rule"):
        peftkit.merge(model)


@pytest.mark.parametrize(
    ("preset", "model"),
    [
        ("mam-adapter.yaml", lambda: TINY_MODELS["llama-tiny"]()),
        ("unipelt.yaml", lambda: TINY_MODELS["gpt2-tiny"]()),
        ("lora-then-houlsby.yaml", lambda: TINY_MODELS["bert-tiny"](num_hidden_layers=12)),
        ("lora-attention-ia3-ffn.yaml", lambda: TINY_MODELS["llama-tiny"]()),
    ],
)
def test_presets_train_save_and_load(preset, model, tmp_path):
    torch.manual_seed(0)
    net = model()
    spec = peftkit.Spec.from_file(PRESETS / preset)
    peftkit.attach(net, spec)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    output = net(input_ids=IDS)[0]
    output.float().pow(2).mean().backward()
    optimizer.step()
    net.eval()
    peftkit.save(net, tmp_path)
    torch.manual_seed(0)
    fresh = peftkit.load(model().eval(), tmp_path)
    assert torch.equal(logits(fresh, IDS), logits(net, IDS))
