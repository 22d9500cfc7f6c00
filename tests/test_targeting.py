"""Selectors resolve to a plan before anything is attached; bad selectors are errors that point somewhere useful."""

from __future__ import annotations

import re

import pytest
import torch

import peftkit
from peftkit import TargetingError
from peftkit.zoo import build_model


def lora(target, **fields):
    return {"adapters": {"default": [{"method": "lora", "target": target, **fields}]}}


def paths(plan) -> list[str]:
    return [row.path for row in plan.rows]


def test_suffix_globs_regexes_layers_and_types() -> None:
    model = build_model("llama-tiny")
    assert paths(peftkit.plan(model, lora("q_proj"))) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert paths(peftkit.plan(model, lora("*.self_attn.?_proj", layers=[1]))) == [
        f"model.layers.1.self_attn.{n}_proj" for n in "qkvo"
    ]
    assert paths(peftkit.plan(model, lora(r"re:model\.layers\.0\.mlp\.(up|down)_proj"))) == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    every_linear = peftkit.plan(model, lora("*", module_types=["Linear"]))
    assert len(every_linear.rows) == 2 * 7 + 1  # 7 per block, plus the LM head
    assert paths(peftkit.plan(model, lora("q_proj", layers="1-1"))) == ["model.layers.1.self_attn.q_proj"]


def test_plan_counts_and_prints() -> None:
    model = build_model("gpt2-tiny")
    plan = peftkit.plan(model, lora("c_attn", r=4))
    assert [row.parameters for row in plan.rows] == [4 * (32 + 96)] * 2
    assert plan.adapter_parameters == 2 * 4 * (32 + 96)
    text = str(plan)
    assert "transformer.h.0.attn.c_attn" in text and "Conv1D" in text and "1,024" in text
    assert not any("peftkit_adapters" in name for name in model.state_dict())  # a dry run changes nothing


def test_no_match_names_the_closest_paths() -> None:
    model = build_model("llama-tiny")
    with pytest.raises(
        TargetingError,
        match=r"'q_prj' matched no module this method can adapt; closest: 'model\.layers\.\d\.self_attn\.q_proj'",
    ):
        peftkit.plan(model, lora("q_prj"))


def test_unadaptable_module_names_module_and_method() -> None:
    model = build_model("gpt2-tiny")
    with pytest.raises(TargetingError, match=r"'transformer\.h\.0\.ln_1' \(LayerNorm\), which 'lora' cannot adapt"):
        peftkit.plan(model, lora("ln_1"))


def test_layers_out_of_range_and_models_without_layers() -> None:
    with pytest.raises(TargetingError, match=r"layers \[7\] do not exist; this model has layers 0-1"):
        peftkit.plan(build_model("bert-tiny"), lora("query", layers=[7]))
    with pytest.raises(TargetingError, match="no layer list"):
        peftkit.plan(build_model("mlp"), lora("*", module_types=["Linear"], layers=[0]))


def test_module_types_that_match_nothing() -> None:
    with pytest.raises(TargetingError, match="none of module_types"):
        peftkit.plan(build_model("mlp"), lora("*", module_types=["Conv2d"]))


def test_two_entries_of_one_adapter_on_one_module_are_refused() -> None:
    spec = {"adapters": {"a": [{"method": "lora", "target": "q_proj"}, {"method": "lora", "target": "*_proj"}]}}
    with pytest.raises(TargetingError, match="both target"):
        peftkit.plan(build_model("llama-tiny"), spec)


def test_attach_is_all_or_nothing() -> None:
    model = build_model("llama-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = {"adapters": {"ok": [{"method": "lora", "target": "q_proj"}], "bad": [{"method": "lora", "target": "norm"}]}}
    with pytest.raises(TargetingError):
        peftkit.attach(model, spec)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_modules_are_trained_and_unknown_ones_refused() -> None:
    model = build_model("bert-tiny")
    spec = {**lora("query"), "trainable": ["pooler.dense"]}
    peftkit.attach(model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= trainable
    assert not any(n.startswith("embeddings") for n in trainable)
    with pytest.raises(TargetingError, match="trainable: 'classifer' matched no module with parameters"):
        peftkit.plan(build_model("bert-tiny"), {**lora("query"), "trainable": ["classifer"]})


def test_meta_device_plan_of_a_7b_shaped_llama() -> None:
    model = build_model("llama-7b-shape", meta=True)
    plan = peftkit.plan(model, lora(["q_proj", "v_proj"], r=8))
    assert len(plan.rows) == 64 and plan.adapter_parameters == 64 * 8 * (4096 + 4096)


def test_a_typo_in_a_target_list_is_refused_and_named() -> None:
    model = build_model("llama-tiny")
    with pytest.raises(TargetingError, match=r"target 'q_porj' matched no module this method can adapt; closest: "):
        peftkit.plan(model, lora(["q_proj", "v_proj", "q_porj"]))
    with pytest.raises(TargetingError, match=r"k_proj'\]\.\.\. but none in layers \[0\]"):
        peftkit.plan(model, lora(["q_proj", r"re:model\.layers\.1\.self_attn\.k_proj"], layers=[0]))
    with pytest.raises(TargetingError, match="trainable: 'lm_haed' matched no module"):
        peftkit.plan(model, {**lora("q_proj"), "trainable": ["lm_head", "lm_haed"]})


def test_optional_patterns_may_match_nothing() -> None:
    """One spec for several families: GPT-2's fused c_attn and Llama's q_proj/v_proj, each optional."""
    spec = lora(["optional:q_proj", "optional:v_proj", "optional:c_attn", "optional:@ffn_output"])
    assert paths(peftkit.plan(build_model("gpt2-tiny"), spec)) == [
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "mlp.c_proj")
    ]
    assert len(peftkit.plan(build_model("llama-tiny"), spec).rows) == 6
    optional_place = peftkit.plan(build_model("mlp"), lora(["optional:@query", "*"], module_types=["Linear"]))
    assert optional_place.rows  # a place the model lacks is skipped, not refused
    with pytest.raises(TargetingError, match="the adapter would be empty"):
        peftkit.plan(build_model("llama-tiny"), lora(["optional:c_attn"]))
    trainable = {**lora("q_proj"), "trainable": ["optional:classifier", "lm_head"]}
    assert peftkit.plan(build_model("llama-tiny"), trainable).trainable_modules == ["lm_head"]


def test_suggestions_name_only_modules_the_method_can_adapt() -> None:
    model = build_model("llama-tiny")
    with pytest.raises(TargetingError) as caught:
        peftkit.plan(model, lora("rotary"))
    suggested = re.findall(r"'([^']+)'", str(caught.value).split("closest: ")[1].split(". Fix")[0])
    adaptable = {row.path for row in peftkit.plan(model, lora("*", module_types=["Linear", "Embedding"])).rows}
    assert len(suggested) == 3 and set(suggested) <= adaptable, suggested  # not model.rotary_emb, not a norm
