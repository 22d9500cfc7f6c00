"""HF PEFT's OFT and BOFT checkpoints in and out, with the `peft` package as the oracle (max abs diff <= 1e-5 in
float32, as tests/test_peft_interop.py does for the other methods). PEFT's OFT and BOFT adapt nn.Linear hosts (not
GPT-2's Conv1D), so the families are those whose projections are linear; a GPT-2 export is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from test_peft_interop import LINEAR_FAMILIES, LORA_TARGETS, _base, _close, _peft_to_peftkit, _peftkit_to_peft

import peftkit

peft = pytest.importorskip("peft")
from peft import BOFTConfig, OFTConfig, get_peft_model  # noqa: E402

OFT_VARIANTS = {
    "neumann": {"oft_block_size": 8},
    "exact": {"oft_block_size": 4, "use_cayley_neumann": False},
    "blocks": {"r": 4, "oft_block_size": 0},
    "shared": {"oft_block_size": 4, "block_share": True},
    "coft": {"oft_block_size": 4, "coft": True, "eps": 1e-2},
    "terms": {"oft_block_size": 8, "num_cayley_neumann_terms": 3},
}


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("variant", sorted(OFT_VARIANTS))
def test_peft_oft_loads_in_peftkit_with_equal_outputs(family, variant, tmp_path):
    config = OFTConfig(target_modules=LORA_TARGETS[family], **{"r": 0, **OFT_VARIANTS[variant]})
    _close(*_peft_to_peftkit(family, config, tmp_path))


OFT_ENTRIES = {
    "neumann": {"block_size": 8},
    "exact": {"block_size": 4, "cayley": "exact"},
    "shared": {"block_size": 4, "block_share": True},
    "coft": {"block_size": 4, "coft": True, "eps": 1e-2},
}


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("variant", sorted(OFT_ENTRIES))
def test_peftkit_oft_exports_to_peft_with_equal_outputs(family, variant, tmp_path):
    entry = {"method": "oft", "target": LORA_TARGETS[family], **OFT_ENTRIES[variant]}
    _close(*_peftkit_to_peft(family, {"adapters": {"default": [entry]}}, tmp_path))
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["peft_type"] == "OFT"


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("size", [2, 4])
def test_peft_boft_loads_in_peftkit_with_equal_outputs(family, size, tmp_path):
    config = BOFTConfig(target_modules=LORA_TARGETS[family], boft_block_size=size, boft_n_butterfly_factor=1)
    _close(*_peft_to_peftkit(family, config, tmp_path))


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_peftkit_boft_exports_to_peft_with_equal_outputs(family, tmp_path):
    entry = {"method": "boft", "target": LORA_TARGETS[family], "block_size": 4}
    _close(*_peftkit_to_peft(family, {"adapters": {"default": [entry]}}, tmp_path))


def test_a_gpu_made_boft_checkpoint_with_two_butterfly_factors_loads_as_trained(tmp_path):
    """PEFT without its CUDA extension builds one factor whatever the config says; a checkpoint written where it
    had the extension holds m factors, and peftkit reads m from the tensor. Written here by hand, in PEFT's layout,
    and checked against PEFT's dense formula (its permutations) in tests/test_orthogonal.py."""
    from safetensors.torch import save_file

    directory = tmp_path / "boft"
    directory.mkdir()
    path = "model.layers.0.self_attn.q_proj"
    generators = torch.randn(2, 8, 4, 4) * 0.1
    scale = torch.rand(32, 1) + 0.5
    save_file(
        {f"base_model.model.{path}.boft_R": generators, f"base_model.model.{path}.boft_s": scale},
        directory / "adapter_model.safetensors",
    )
    config = {"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    model = peftkit.from_peft(_base("llama-tiny"), directory)
    adapter = peftkit.lifecycle.state.get_state(model).attached[0].module
    assert adapter.generators.shape == (2, 8, 4, 4) and torch.equal(adapter.scale, scale.reshape(-1))


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_a_rotation_on_gpt2_conv1d_trains_but_is_not_exported_and_says_why(method, tmp_path):
    model = peftkit.attach(
        _base("gpt2-tiny"), {"adapters": {"default": [{"method": method, "target": "c_attn", "block_size": 4}]}}
    )
    with pytest.raises(peftkit.PeftkitError, match=rf"{method.upper()} on .*c_attn' \(Conv1D\) is not exported"):
        peftkit.to_peft(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    ("method", "config"), [("oft", OFTConfig(oft_block_size=4, r=0)), ("boft", BOFTConfig(boft_block_size=4))]
)
def test_peftkit_counts_the_parameters_peft_makes(method, config):
    config.target_modules = LORA_TARGETS["llama-tiny"]
    theirs = sum(p.numel() for p in get_peft_model(_base("llama-tiny"), config).parameters() if p.requires_grad)
    entry = {"method": method, "target": LORA_TARGETS["llama-tiny"], "block_size": 4}
    assert (
        sum(row.parameters for row in peftkit.plan(_base("llama-tiny"), {"adapters": {"default": [entry]}}).rows)
        == theirs
    )
