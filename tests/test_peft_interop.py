"""HF PEFT checkpoints in and out: peftkit and peft (the installed package, a test-only oracle) compute the same.

Each test builds a tiny model, makes an adapter in one library with random (not initial) values, saves it in PEFT's
format, loads it into the other library on a fresh copy of the same base, and checks the outputs agree in float32
(max abs diff <= 1e-5). Prefix tuning is compared with explicit ``position_ids`` (see docs/migrating-from-peft.md:
PEFT shifts the real tokens' positions by the prefix length, peftkit does not).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftkit
from peftkit.zoo import build_model

peft = pytest.importorskip("peft", reason="the HF peft package (the oracle for these tests) is not installed")
from peft import (  # noqa: E402
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

TOLERANCE = 1e-5
CAUSAL = {"gpt2-tiny", "llama-tiny"}
LORA_TARGETS = {
    "gpt2-tiny": ["c_attn", "c_proj"],
    "llama-tiny": ["q_proj", "v_proj", "down_proj"],
    "bert-tiny": ["query", "value", "output.dense"],
    "roberta-tiny": ["query", "value", "output.dense"],
}
IA3_TARGETS = {  # (targets, feedforward)
    "gpt2-tiny": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama-tiny": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert-tiny": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta-tiny": (["key", "value", "output.dense"], ["output.dense"]),
}


def _base(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(family).eval()


def _inputs(family: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _output(model: torch.nn.Module, family: str, **extra) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(family), **extra)
    return out.logits if family in CAUSAL else out.last_hidden_state


def _randomise(parameters, ones: bool = False) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in parameters:
            noise = torch.randn(parameter.shape, generator=generator) * 0.3
            parameter.copy_(noise + (1.0 if ones else 0.0))


def _task(family: str) -> str:
    return "CAUSAL_LM" if family in CAUSAL else "FEATURE_EXTRACTION"


def _peft_to_peftkit(family, config, tmp_path, ones=False, **extra):
    """peft makes and saves the adapter; peftkit loads it on a fresh base: (peft output, peftkit output).
    ``extra`` inputs go to peftkit only."""
    base = _base(family)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    _randomise([p for p in peft_model.parameters() if p.requires_grad], ones)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _output(peft_model, family)
    model = peftkit.from_peft(copy.deepcopy(base), tmp_path / "peft")
    return expected, _output(model, family, **extra)


def _peftkit_to_peft(family, spec, tmp_path, ones=False, **extra):
    """peftkit makes and exports the adapter; peft loads it on a fresh base: (peftkit output, peft output).
    ``extra`` inputs go to peftkit only."""
    base = _base(family)
    model = peftkit.attach(copy.deepcopy(base), spec).eval()
    _randomise([p for p in model.parameters() if p.requires_grad], ones)
    expected = _output(model, family, **extra)
    peftkit.to_peft(model, tmp_path / "export")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    return expected, _output(loaded, family)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOLERANCE


FAMILIES = ["gpt2-tiny", "llama-tiny", "bert-tiny", "roberta-tiny"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "rslora", "rank_pattern"])
def test_peft_lora_loads_in_peftkit_with_equal_outputs(family, variant, tmp_path):
    targets = LORA_TARGETS[family]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_rslora=variant == "rslora",
        rank_pattern={targets[0]: 2} if variant == "rank_pattern" else {},
        alpha_pattern={targets[-1]: 3} if variant == "rank_pattern" else {},
    )
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "rslora", "mixed_ranks"])
def test_peftkit_lora_exports_to_peft_with_equal_outputs(family, variant, tmp_path):
    targets = LORA_TARGETS[family]
    entries = [{"method": "lora", "target": targets[:-1], "r": 4, "alpha": 8.0, "rslora": variant == "rslora"}]
    entries.append(
        {
            "method": "lora",
            "target": targets[-1:],
            "r": 2 if variant == "mixed_ranks" else 4,
            "alpha": 3.0 if variant == "mixed_ranks" else 8.0,
            "rslora": variant == "rslora",
        }
    )
    _close(*_peftkit_to_peft(family, {"adapters": {"default": entries}}, tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_dora_loads_in_peftkit_with_equal_outputs(family, tmp_path):
    targets = LORA_TARGETS[family]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, rank_pattern={targets[0]: 2})
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_peftkit_dora_exports_to_peft_with_equal_outputs(family, tmp_path):
    spec = {"adapters": {"default": [{"method": "dora", "target": LORA_TARGETS[family], "r": 4, "alpha": 8.0}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path))


@pytest.mark.parametrize(("family", "embedding"), [("gpt2-tiny", "wte"), ("llama-tiny", "embed_tokens")])
def test_dora_on_input_embeddings_round_trips_with_peft(family, embedding, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[embedding], use_dora=True)
    _close(*_peft_to_peftkit(family, config, tmp_path / "in"))
    spec = {"adapters": {"default": [{"method": "dora", "target": embedding, "r": 4}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path / "out"))


def test_a_dora_checkpoint_becomes_dora_entries_and_a_merged_model_matches_peft(tmp_path):
    base = _base("llama-tiny")
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    )
    _randomise([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.from_peft(copy.deepcopy(base), tmp_path / "peft")
    from peftkit.lifecycle.attach import get_state

    assert {a.method.name for a in get_state(model).attached} == {"dora"}
    merged_peft = peft_model.merge_and_unload()
    _close(_output(peftkit.merge_and_detach(model), "llama-tiny"), _output(merged_peft, "llama-tiny"))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_ia3_loads_in_peftkit_with_equal_outputs(family, tmp_path):
    targets, feedforward = IA3_TARGETS[family]
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward)
    _close(*_peft_to_peftkit(family, config, tmp_path, ones=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_peftkit_ia3_exports_to_peft_with_equal_outputs(family, tmp_path):
    targets, feedforward = IA3_TARGETS[family]
    spec = {"adapters": {"default": [{"method": "ia3", "target": targets, "feedforward": feedforward}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path, ones=True))


LINEAR_FAMILIES = ["llama-tiny", "bert-tiny", "roberta-tiny"]  # PEFT's LoHa has no GPT-2 Conv1D form


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "patterns", "dropouts"])
def test_peft_loha_loads_in_peftkit_with_equal_outputs(family, variant, tmp_path):
    targets = LORA_TARGETS[family]
    extra = {
        "plain": {},
        "patterns": {"rank_pattern": {targets[0]: 3}, "alpha_pattern": {targets[1]: 2.5}},
        "dropouts": {"rank_dropout": 0.2, "module_dropout": 0.1},  # training only: equal in eval
    }[variant]
    config = LoHaConfig(target_modules=targets, r=2, alpha=4.0, **extra)
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "mixed_ranks"])
def test_peftkit_loha_exports_to_peft_with_equal_outputs(family, variant, tmp_path):
    targets = LORA_TARGETS[family]
    entries = [{"method": "loha", "target": targets, "r": 2, "alpha": 4.0}]
    if variant == "mixed_ranks":
        entries = [
            {"method": "loha", "target": targets[:1], "r": 3, "alpha": 1.5},
            {"method": "loha", "target": targets[1:], "r": 2, "alpha": 4.0},
        ]
    _close(*_peftkit_to_peft(family, {"adapters": {"default": entries}}, tmp_path))


LOKR_VARIANTS = {
    "plain": {"r": 2},
    "decompose_both": {"r": 1, "decompose_both": True},
    "factor": {"r": 2, "decompose_factor": 4},
    "whole_factors": {"r": 16},  # r >= half of every factor's side: both kept whole
    "dropouts": {"r": 2, "rank_dropout": 0.2, "rank_dropout_scale": True, "module_dropout": 0.1},
}


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("variant", sorted(LOKR_VARIANTS))
def test_peft_lokr_loads_in_peftkit_with_equal_outputs(family, variant, tmp_path):
    config = LoKrConfig(target_modules=LORA_TARGETS[family], alpha=3.0, **LOKR_VARIANTS[variant])
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("variant", sorted(LOKR_VARIANTS))
def test_peftkit_lokr_exports_to_peft_with_equal_outputs(family, variant, tmp_path):
    entry = {"method": "lokr", "target": LORA_TARGETS[family], "alpha": 3.0, **LOKR_VARIANTS[variant]}
    _close(*_peftkit_to_peft(family, {"adapters": {"default": [entry]}}, tmp_path))


@pytest.mark.parametrize("variant", sorted(LOKR_VARIANTS))
def test_lokr_counts_the_parameters_peft_makes(variant):
    config = LoKrConfig(target_modules=LORA_TARGETS["llama-tiny"], **LOKR_VARIANTS[variant])
    theirs = sum(p.numel() for p in get_peft_model(_base("llama-tiny"), config).parameters() if p.requires_grad)
    entry = {"method": "lokr", "target": LORA_TARGETS["llama-tiny"], **LOKR_VARIANTS[variant]}
    ours = peftkit.plan(_base("llama-tiny"), {"adapters": {"default": [entry]}})
    assert sum(row.parameters for row in ours.rows) == theirs


def test_loha_on_a_gpt2_conv1d_is_not_exported_to_peft_and_says_why(tmp_path):
    model = peftkit.attach(_base("gpt2-tiny"), {"adapters": {"default": [{"method": "loha", "target": "c_attn"}]}})
    with pytest.raises(peftkit.PeftkitError, match=r"LoHa on .*c_attn' \(Conv1D\) is not exported"):
        peftkit.to_peft(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_prompt_tuning_loads_in_peftkit_with_equal_outputs(family, tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=3, task_type=_task(family))
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_peftkit_prompt_tuning_exports_to_peft_with_equal_outputs(family, tmp_path):
    spec = {"adapters": {"default": [{"method": "prompt", "length": 3}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path))


def _positions_after_prefix(family: str, length: int) -> dict[str, torch.Tensor]:
    """PEFT passes its prefix as a KV cache of ``length`` tokens, so the model numbers the real tokens from
    ``length`` on (RoBERTa: from padding_idx + 1 + length); peftkit keeps their positions unless told otherwise."""
    offset = 2 if family == "roberta-tiny" else 0  # RoBERTa's positions start at padding_idx + 1
    return {"position_ids": (torch.arange(7) + length + offset).expand(2, -1)}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_prefix_tuning_loads_in_peftkit_with_equal_outputs(family, tmp_path):
    config = PrefixTuningConfig(num_virtual_tokens=3, task_type=_task(family))
    _close(*_peft_to_peftkit(family, config, tmp_path, **_positions_after_prefix(family, 3)))


@pytest.mark.parametrize("family", FAMILIES)
def test_peftkit_prefix_tuning_exports_to_peft_with_equal_outputs(family, tmp_path):
    spec = {"adapters": {"default": [{"method": "prefix", "length": 3}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path, **_positions_after_prefix(family, 3)))


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
def test_prefix_outputs_differ_from_peft_only_by_positions(family, tmp_path):
    """Without the shifted positions the outputs differ: PEFT's real tokens sit after the prefix, peftkit's do not."""
    config = PrefixTuningConfig(num_virtual_tokens=3, task_type=_task(family))
    peft_output, peftkit_output = _peft_to_peftkit(family, config, tmp_path)
    assert (peft_output - peftkit_output).abs().max().item() > TOLERANCE


@pytest.mark.parametrize(("family", "embedding"), [("gpt2-tiny", "wte"), ("llama-tiny", "embed_tokens")])
def test_lora_on_input_embeddings_round_trips_with_peft(family, embedding, tmp_path):
    _close(*_peft_to_peftkit(family, LoraConfig(r=4, lora_alpha=8, target_modules=[embedding]), tmp_path))
    spec = {"adapters": {"default": [{"method": "lora", "target": embedding, "r": 4}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path))


def test_export_of_an_import_has_the_same_keys_and_values(tmp_path):
    base = _base("llama-tiny")
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5}
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    _randomise([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "in")
    peftkit.to_peft(peftkit.from_peft(copy.deepcopy(base), tmp_path / "in"), tmp_path / "out")
    from safetensors.torch import load_file

    before, after = (
        load_file(tmp_path / "in" / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_cli_converts_a_peft_checkpoint_to_peftkit_and_back(tmp_path, capsys):
    from safetensors.torch import load_file

    from peftkit.cli import main

    peft_model = get_peft_model(_base("llama-tiny"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "peft-in")
    assert main(["from-peft", str(tmp_path / "peft-in"), str(tmp_path / "kit"), "--model", "llama-tiny"]) == 0
    assert (tmp_path / "kit" / "spec.json").is_file()
    assert main(["to-peft", str(tmp_path / "kit"), str(tmp_path / "peft-out"), "--model", "llama-tiny"]) == 0
    before = load_file(tmp_path / "peft-in" / "adapter_model.safetensors")
    after = load_file(tmp_path / "peft-out" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert "HF PEFT" in capsys.readouterr().out


def test_the_migration_page_shows_its_tested_example_verbatim_and_it_runs(capsys):
    import runpy
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    example = docs / "examples" / "peft_side_by_side.py"
    assert example.read_text() in (docs / "migrating-from-peft.md").read_text()
    runpy.run_path(str(example), run_name="__main__")
    assert "checkpoints carried both ways with equal outputs" in capsys.readouterr().out


def test_the_cli_names_a_bad_peft_folder(tmp_path, capsys):
    from peftkit.cli import main

    assert main(["from-peft", str(tmp_path / "missing"), str(tmp_path / "kit"), "--model", "llama-tiny"]) != 0
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


# -- what is refused, and that a refusal leaves the model as it was ------------------------------------------------
def _save_peft(family, config, directory):
    get_peft_model(_base(family), config).save_pretrained(directory)
    return directory


def _assert_refused_and_untouched(family, directory, *words):
    model = _base(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.CheckpointError) as error:
        peftkit.from_peft(model, directory)
    for word in words:
        assert word in str(error.value)
    assert sorted(model.state_dict()) == sorted(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "_peftkit_state")


@pytest.mark.parametrize(
    ("config", "feature"),
    [
        (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, bias="all"), "bias"),
        (LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "bias"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", prefix_projection=True), "prefix_projection"),
    ],
)
def test_unsupported_peft_features_are_refused_by_name(config, feature, tmp_path):
    _assert_refused_and_untouched("llama-tiny", _save_peft("llama-tiny", config, tmp_path / "c"), feature)


def test_a_dora_checkpoint_without_the_dora_method_is_refused_by_name(tmp_path):
    directory = _save_peft("llama-tiny", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), tmp_path / "c")
    dora = peftkit.get_method("dora")
    peftkit.unregister_method("dora")
    try:
        _assert_refused_and_untouched("llama-tiny", directory, "use_dora")
    finally:
        peftkit.register_method(dora)


def test_a_checkpoint_for_another_architecture_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    directory = _save_peft("llama-tiny", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "c")
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config))
    _assert_refused_and_untouched("gpt2-tiny", directory, "q_proj")


def test_an_unknown_peft_type_lists_the_supported_ones(tmp_path):
    directory = _save_peft("llama-tiny", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "c")
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "VBLORA"}))
    _assert_refused_and_untouched("llama-tiny", directory, "VBLORA", "BOFT", "LOHA", "LOKR", "LORA", "OFT")


@pytest.mark.parametrize("text", ["not json", "[1, 2]", " " * (1024 * 1024 + 1)])
def test_a_config_that_is_not_a_small_json_object_is_refused(text, tmp_path):
    directory = _save_peft("llama-tiny", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "c")
    (directory / "adapter_config.json").write_text(text)
    _assert_refused_and_untouched("llama-tiny", directory, "adapter_config.json")


def test_pickled_weights_are_not_read(tmp_path):
    directory = _save_peft("llama-tiny", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "c")
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    _assert_refused_and_untouched("llama-tiny", directory, "pickle")


def test_an_unexpected_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _save_peft("llama-tiny", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "c")
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(tensors, directory / "adapter_model.safetensors")
    _assert_refused_and_untouched("llama-tiny", directory, "lora_magnitude_vector")


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([{"method": "prefix", "length": 3, "gate": True}], ["gate"]),
        ([{"method": "prefix", "length": 3, "layers": [0]}], ["every attention layer"]),
        ([{"method": "lora", "target": "q_proj"}, {"method": "ia3"}], ["mixes methods"]),
        ([{"method": "ptuning", "length": 3}], ["ptuning", "peft_type"]),
    ],
)
def test_adapters_peft_cannot_represent_are_not_exported(entries, words, tmp_path):
    model = peftkit.attach(_base("llama-tiny"), {"adapters": {"default": entries}})
    with pytest.raises(peftkit.CheckpointError) as error:
        peftkit.to_peft(model, tmp_path / "out")
    assert all(word in str(error.value) for word in words)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
