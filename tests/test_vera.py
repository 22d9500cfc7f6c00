"""VeRA and the shared state it needs (``Method.shared_state``): one pair of projections per entry, kept once, saved or
regenerated, moved with the model, and HF PEFT's VERA checkpoints in and out (the `peft` package as the oracle, max
abs diff <= 1e-5 in float32, on all four families: PEFT's VeRA adapts GPT-2's Conv1D too)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_peft_interop import FAMILIES, LORA_TARGETS, _base, _close, _peft_to_peftkit, _peftkit_to_peft

import peftkit
from peftkit.keys import SHARED_CHILD
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model


def _vera(model, **fields):
    entry = {"method": "vera", "target": ["q_proj", "v_proj", "down_proj"], "r": 8, **fields}
    return peftkit.attach(model, {"adapters": {"default": [entry]}})


def _randomised(model):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def test_one_pair_of_projections_serves_every_host_of_an_entry():
    model = _vera(build_model("llama-tiny"))  # q, v: 32 -> 32; down: 64 -> 32
    attached = get_state(model).attached
    shared = {id(a.module.site.shared) for a in attached}
    assert len(shared) == 1 and len(attached) == 6
    keys = [k for k in model.state_dict() if SHARED_CHILD in k]
    assert [k.rsplit(".", 1)[-1] for k in keys] == ["vera_a", "vera_b"]  # once, under the first host
    a, b = attached[0].module.site.shared.vera_a, attached[0].module.site.shared.vera_b
    assert a.shape == (8, 64) and b.shape == (32, 8) and not a.requires_grad
    hosts = [a.module.site for a in attached]
    assert peftkit.trainable_parameters(model).trainable == sum(site.out_features + 8 for site in hosts)


def test_two_entries_and_two_adapters_each_get_their_own_pair():
    model = build_model("llama-tiny")
    spec = {
        "adapters": {
            "one": [
                {"method": "vera", "target": "q_proj", "r": 4, "projection_seed": 1},
                {"method": "vera", "target": "down_proj", "r": 4, "projection_seed": 2},
            ],
            "two": [{"method": "vera", "target": "q_proj", "r": 4, "projection_seed": 1}],
        }
    }
    peftkit.attach(model, spec)
    pairs = {(a.adapter_name, a.entry): a.module.site.shared for a in get_state(model).attached}
    assert len({id(s) for s in pairs.values()}) == 3
    torch.testing.assert_close(pairs[("one", 0)].vera_a, pairs[("two", 0)].vera_a)  # same seed, same shape
    assert pairs[("one", 1)].vera_a.shape == (4, 64)


@pytest.mark.parametrize("save_projection", [True, False])
def test_a_checkpoint_holds_the_projections_once_or_regenerates_them(save_projection, tmp_path):
    model = _randomised(_vera(_base("llama-tiny"), save_projection=save_projection)).eval()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
    peftkit.save(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "adapter.safetensors"), "pt") as stream:
        shared = [k for k in stream.keys() if SHARED_CHILD in k]  # noqa: SIM118
    assert len(shared) == (2 if save_projection else 0)
    loaded = peftkit.load(_base("llama-tiny"), tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_a_checkpoint_whose_projection_does_not_fit_is_refused_and_the_model_left_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _vera(build_model("llama-tiny"))
    peftkit.save(model, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith("vera_a"))
    tensors[key] = tensors[key][:, :10].contiguous()
    save_file(tensors, tmp_path / "ckpt" / "adapter.safetensors")
    fresh = build_model("llama-tiny")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(peftkit.CheckpointError, match=r"shape mismatch for .*vera_a: checkpoint has \[8, 10\]"):
        peftkit.load(fresh, tmp_path / "ckpt")
    assert get_state(fresh) is None and list(fresh.state_dict()) == list(before)


def test_the_projections_move_and_cast_with_the_model():
    model = _randomised(_vera(build_model("llama-tiny"))).double()
    shared = get_state(model).attached[0].module.site.shared
    assert shared.vera_a.dtype == torch.float64
    model(torch.randint(0, 128, (1, 4)))


def test_shared_state_is_frozen_tensors_only():
    class Trained(peftkit.get_method("vera")):
        name = "vera-trained-shared"

        @classmethod
        def shared_state(cls, config, sites):
            return peftkit.SharedState({"bank": torch.nn.Parameter(torch.zeros(3))})

    model = build_model("llama-tiny")
    with (
        peftkit.registered(Trained),
        pytest.raises(peftkit.AttachError, match="shared state 'bank' is a Parameter: shared state is frozen"),
    ):
        peftkit.attach(model, {"adapters": {"a": [{"method": "vera-trained-shared", "target": "q_proj"}]}})
    assert get_state(model) is None


# -- HF PEFT -----------------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
from peft import VeraConfig  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_loads_in_peftkit_with_equal_outputs(family, save_projection, tmp_path):
    config = VeraConfig(
        r=8, target_modules=LORA_TARGETS[family], save_projection=save_projection, projection_prng_key=5, d_initial=0.3
    )
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("save_projection", [True, False])
def test_peftkit_vera_exports_to_peft_with_equal_outputs(family, save_projection, tmp_path):
    entry = {"method": "vera", "target": LORA_TARGETS[family], "r": 8, "save_projection": save_projection}
    _close(*_peftkit_to_peft(family, {"adapters": {"default": [entry]}}, tmp_path))
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["fan_in_fan_out"] == (family == "gpt2-tiny")


def test_an_adapter_of_two_vera_entries_is_not_exported_to_peft(tmp_path):
    spec = {
        "adapters": {
            "default": [
                {"method": "vera", "target": "q_proj", "r": 4},
                {"method": "vera", "target": "v_proj", "r": 4},
            ]
        }
    }
    model = peftkit.attach(_base("llama-tiny"), spec)
    with pytest.raises(peftkit.CheckpointError, match="one pair of projections; this adapter has several entries"):
        peftkit.to_peft(model, tmp_path / "export")
