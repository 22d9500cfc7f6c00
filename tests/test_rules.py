"""What peftkit refuses, or does differently, so that a model is never silently wrong (docs/rules.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM

import peftkit
from peftkit import AttachError, TargetingError
from peftkit.lifecycle.attach import get_state
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model

IDS = torch.tensor([[5, 17, 3, 99, 42, 8], [1, 2, 3, 4, 5, 6]])


def lora(target, **fields) -> dict:
    return {"adapters": {"default": [{"method": "lora", "target": target, **fields}]}}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- tied hosts ------------------------------------------------------------------------------------------------
def tied_gpt2() -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("gpt2-tiny").eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # the zoo's GPT-2 ties its head, as GPT-2 does
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, lora(["c_attn", "lm_head"]))
    randomise_adapters(model)
    return model, model(IDS).logits, before


def test_merging_into_a_tied_host_is_refused_and_changes_nothing() -> None:
    model, unmerged, before = tied_gpt2()
    with pytest.raises(
        AttachError, match=r"cannot merge into 'lm_head': its weight is the same tensor as 'transformer\.wte\.weight'"
    ):
        peftkit.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "peftkit" not in k)
    assert not any(a.module.merged for a in get_state(model).attached)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=0, atol=0)


def test_untie_merges_into_a_copy_and_unmerge_restores_the_tie() -> None:
    model, unmerged, before = tied_gpt2()
    peftkit.merge(model, untie=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])  # the embedding is untouched
    assert relative_error(model(IDS).logits, unmerged) < 1e-5
    peftkit.unmerge(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])  # the shared tensor was never written to


def test_merge_and_detach_with_untie_keeps_the_head_untied_for_good() -> None:
    model, unmerged, _ = tied_gpt2()
    with pytest.raises(AttachError, match="tied weights"):
        peftkit.merge_and_detach(model)
    peftkit.merge_and_detach(model, untie=True)
    assert get_state(model) is None and model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_word_embeddings is False
    assert relative_error(model(IDS).logits, unmerged) < 1e-5


# -- hosts that scale their own output ----------------------------------------------------------------------------
def tiny_gemma() -> nn.Module:
    config = GemmaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return GemmaForCausalLM(config).eval()


def test_a_scaled_embedding_merges_to_what_it_computes_unmerged() -> None:
    model = tiny_gemma()
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(32**0.5)
    peftkit.attach(model, lora("embed_tokens", r=4))
    randomise_adapters(model)
    unmerged = model(IDS).logits
    peftkit.merge(model)
    assert relative_error(model(IDS).logits, unmerged) < 1e-5


def test_a_scaled_embedding_scales_the_update_like_its_lookup() -> None:
    """Against a plain-torch reference: scale * (W + s B A)[ids]."""
    model = tiny_gemma()
    embedding = model.model.embed_tokens
    peftkit.attach(model, lora("embed_tokens", r=4, alpha=8))
    randomise_adapters(model)
    adapter = embedding.peftkit_adapters["default"]
    weight = embedding.weight + (2.0 * adapter.lora_b @ adapter.lora_a).t()
    torch.testing.assert_close(embedding(IDS), weight[IDS] * embedding.embed_scale)


def test_a_scaled_embedding_computes_what_hf_peft_computes(tmp_path) -> None:
    peft = pytest.importorskip("peft")  # the test-only oracle
    base = tiny_gemma()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    oracle = peft.get_peft_model(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in (p for p in oracle.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        oracle.save_pretrained(tmp_path)
    ours = peftkit.from_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, oracle(input_ids=IDS).logits, atol=1e-5, rtol=0)


class OffsetEmbedding(nn.Embedding):
    """Like OPT's learned positions: looks up ``ids + 2``, so its output does not follow its weight as a map of ids."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids + 2)


class ClampedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(-1, 1)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (OffsetEmbedding(10, 4), "OffsetEmbedding overrides nn.Embedding.forward without a scalar `embed_scale`"),
        (ClampedLinear(4, 4), "ClampedLinear overrides Linear.forward"),
    ],
)
def test_a_host_whose_forward_peftkit_cannot_follow_is_refused_by_name(host: nn.Module, message: str) -> None:
    model = nn.Sequential(host)
    with pytest.raises(TargetingError, match=message):
        peftkit.attach(model, lora("0"))
    assert get_state(model) is None


class WrittenOut(nn.Linear):
    """Like Falcon's FalconLinear: the same map as nn.Linear, written out by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


def test_a_linear_subclass_that_computes_the_same_map_is_followed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(WrittenOut(4, 3))
    x = torch.randn(5, 4)
    peftkit.attach(model, lora("0", r=2))
    randomise_adapters(model)
    unmerged = model(x)
    peftkit.merge(model)
    assert relative_error(model(x), unmerged) < 1e-5


def test_a_registered_weight_site_vouches_for_its_type() -> None:
    """On the meta device the probe cannot run, so a subclass is refused until a registration vouches for it."""
    from peftkit.sites import weight as sites

    model = nn.Sequential(WrittenOut(4, 3)).to("meta")
    with pytest.raises(TargetingError, match=r"WrittenOut overrides Linear\.forward"):
        peftkit.plan(model, lora("0"))
    sites.register_weight_site(WrittenOut, lambda module: sites.LinearSite(module))
    try:
        assert len(peftkit.plan(model, lora("0")).rows) == 1
    finally:
        sites._WEIGHT_SITE_TYPES.pop(0)
        sites._REGISTERED_TYPES.pop(WrittenOut)


# -- quantised hosts ----------------------------------------------------------------------------------------------
class PackedLinear(nn.Linear):
    """A stand-in for bitsandbytes' Linear4bit: an nn.Linear subclass whose weight holds packed integers."""

    def __init__(self) -> None:
        super().__init__(8, 8)
        self.weight = nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)


def test_a_quantised_host_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Linear(8, 8), PackedLinear())
    with pytest.raises(TargetingError, match=r"'1' cannot host 'lora': PackedLinear's weight is uint8, not floating"):
        peftkit.attach(model, lora(["0", "1"]))
    assert get_state(model) is None and not hasattr(model[0], "peftkit_adapters")


# -- adapters that take the base in ----------------------------------------------------------------------------
def test_an_adapter_that_registers_its_host_is_refused_at_attach() -> None:
    from scale_method import ScaleAdapter
    from variants import scale_variant

    class HoldsHost(ScaleAdapter):
        def __init__(self, site) -> None:
            super().__init__(site)
            self.host = site.module  # the slip: registers the base module as a submodule

    model = build_model("mlp")
    variant = scale_variant("holds-host", HoldsHost)
    with peftkit.registered(variant), pytest.raises(AttachError, match="registers a module of the model as `host`"):
        peftkit.attach(model, {"adapters": {"a": [{"method": "holds-host", "target": "0"}]}})
    assert get_state(model) is None and all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


# -- attaching without activating -------------------------------------------------------------------------------
def test_a_second_adapter_is_active_unless_attached_with_activate_false() -> None:
    model = build_model("llama-tiny")
    peftkit.attach(model, {"adapters": {"first": [{"method": "lora", "target": "q_proj"}]}})
    peftkit.attach(model, {"adapters": {"second": [{"method": "lora", "target": "v_proj"}]}})
    assert peftkit.active_adapters(model) == ["first", "second"]
    peftkit.attach(model, {"adapters": {"third": [{"method": "lora", "target": "k_proj"}]}}, activate=False)
    assert peftkit.active_adapters(model) == ["first", "second"]
    randomise_adapters(model)
    with_third_inactive = model(IDS).logits
    peftkit.detach(model, ["third"])
    torch.testing.assert_close(model(IDS).logits, with_third_inactive, rtol=0, atol=0)
