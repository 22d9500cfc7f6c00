"""Adapters on bitsandbytes-quantised bases (QLoRA), loaded through transformers' own quantization_config path.

bitsandbytes runs 4-bit NF4/FP4 and 8-bit forward and backward on CPU. HF PEFT is the oracle: on the same
quantised tiny Llama and GPT-2 (whose Conv1D projections the quantised load turns into bitsandbytes linears), with
the same adapter values, logits and adapter gradients agree to 1e-5 (fp32 compute). The
models are 64 wide: bitsandbytes' CPU inference path repacks 4-bit weights in blocks of 64 inputs and 32 outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import TINY_MODELS

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'peftkit[quantization]')")
pytest.importorskip("accelerate", reason="transformers loads bitsandbytes models through accelerate")
peft = pytest.importorskip("peft", reason="the HF peft package (the oracle) is not installed")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

TOLERANCE = 1e-5
QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-64")
    torch.manual_seed(0)
    TINY_MODELS["llama-tiny"](hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """GPT-2 keeps its projections as Conv1D; transformers' quantised load turns them into bitsandbytes linears."""
    folder = tmp_path_factory.mktemp("gpt2-64")
    torch.manual_seed(0)
    TINY_MODELS["gpt2-tiny"](n_embd=64).save_pretrained(folder)
    return folder


FAMILIES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "attn.c_proj", "c_fc"]}


def _quantized(folder, kind: str):
    fields = {**QUANTIZATIONS[kind], "bnb_4bit_compute_dtype": torch.float32}
    config = BitsAndBytesConfig(**fields)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _same_values(source, target) -> None:
    """Copy the LoRA factors of one library's model into the other's (both visit A before B, hosts in order)."""
    theirs = [p for n, p in source.named_parameters() if p.requires_grad]
    ours = [p for n, p in target.named_parameters() if p.requires_grad]
    assert len(theirs) == len(ours)
    with torch.no_grad():
        for a, b in zip(theirs, ours, strict=True):
            b.copy_(a)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE, (a - b).abs().max().item()


@pytest.mark.parametrize("kind", sorted(QUANTIZATIONS))
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_qlora_logits_and_adapter_gradients_equal_peft(base_folder, gpt2_folder, family, kind, rslora):
    folder, targets = (base_folder if family == "llama" else gpt2_folder), FAMILIES[family]
    peft_model = get_peft_model(
        _quantized(folder, kind), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    )
    spec = {"adapters": {"default": [{"method": "lora", "target": targets, "r": 4, "alpha": 8.0, "rslora": rslora}]}}
    model = peftkit.attach(_quantized(folder, kind), spec)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in (p for p in peft_model.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    _same_values(peft_model, model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the compute dtype
    ids = _ids()
    ours, theirs = model(input_ids=ids, labels=ids), peft_model(input_ids=ids, labels=ids)
    _close(ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    ours_grads = [p.grad for p in model.parameters() if p.requires_grad]
    theirs_grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        _close(a, b)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize(
    "entry",
    [
        {"method": "lora", "target": ["q_proj", "down_proj"], "r": 2},
        {"method": "ia3", "target": ["k_proj", "v_proj", "down_proj"]},
        {"method": "dora", "target": ["q_proj", "v_proj"], "r": 2},  # its norm from the dequantised weight
        {"method": "houlsby", "bottleneck": 8},
        {"method": "prefix", "length": 3, "gate": True},  # gated: an identity at init
    ],
    ids=lambda entry: entry["method"],
)
def test_methods_start_as_the_base_train_and_detach_leaves_the_packed_weights_bit_for_bit(base_folder, kind, entry):
    model = _quantized(base_folder, kind).train()  # train mode: bitsandbytes' CPU inference repacks 4-bit weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    peftkit.attach(model, {"adapters": {"default": [entry]}})
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        _close(model(input_ids=ids).logits, base)
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    peftkit.detach(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], v) for k, v in after.items())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merging_into_a_quantized_weight_is_refused_and_the_adapter_saves_and_loads(base_folder, kind, tmp_path):
    model = _quantized(base_folder, kind).train()
    peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": "q_proj", "r": 2}]}})
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.1)
        expected = model(input_ids=_ids()).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    bits = "4 bits" if kind == "nf4" else "8 bits"
    for merge in (peftkit.merge, peftkit.merge_and_detach):
        with pytest.raises(
            peftkit.AttachError, match=f"stored in {bits}.*Run the adapter unmerged.*dequantize=torch.bfloat16"
        ):
            merge(model)
        assert get_state(model) is not None and all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    spec = {"adapters": {"p": [{"method": "lora", "target": "k_proj", "r": 2, "init": "pissa"}]}}
    with pytest.raises(peftkit.TargetingError, match="init 'pissa' writes a residual"):
        peftkit.attach(model, spec)
    peftkit.save(model, tmp_path / "peftkit")
    fresh = peftkit.load(_quantized(base_folder, kind).train(), tmp_path / "peftkit")
    peftkit.to_peft(model, tmp_path / "peft")
    from peft import PeftModel

    # train mode, as ours: in eval mode bitsandbytes runs its bf16 CPU kernel
    loaded = PeftModel.from_pretrained(_quantized(base_folder, kind), tmp_path / "peft").train()
    with torch.no_grad():
        _close(fresh(input_ids=_ids()).logits, expected)
        _close(loaded(input_ids=_ids()).logits, expected)


def test_the_host_plugin_is_found_through_its_entry_point():
    import bitsandbytes as bnb

    from peftkit.sites import weight_site_types

    peftkit.known_methods()  # discovery loads the peftkit.hosts entry points too
    assert {bnb.nn.Linear4bit, bnb.nn.Linear8bitLt} <= set(weight_site_types())
    assert not any(name.startswith("host:") for name in peftkit.broken_plugins())
    model = copy.deepcopy(torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.bfloat16)))
    planned = peftkit.plan(model, {"adapters": {"d": [{"method": "lora", "target": "0", "r": 2}]}})
    assert planned.rows[0].module_type == "Linear4bit"


@pytest.mark.parametrize(
    "entry",
    [
        {"method": "lora", "target": ["re:0", "re:2"], "r": 3},
        {"method": "dora", "target": ["re:0", "re:2"], "r": 2},
        {"method": "ia3", "target": ["re:0"], "feedforward": ["re:0"]},
        {"method": "houlsby", "target": ["re:2"], "bottleneck": 4},
    ],
    ids=lambda entry: entry["method"],
)
@pytest.mark.parametrize(
    "prop",
    [
        "identity_at_init",
        "save_load_roundtrip",
        "gradient_isolation",
        "detach_restores",
        "parameter_count_matches_formula",
        "failed_attach_leaves_model_unchanged",
    ],
)
def test_the_conformance_properties_hold_on_the_quantized_host_family(entry, prop):
    """The suite draws this family among the others; here each property runs on it for sure (NF4 then int8)."""
    from peftkit import testing
    from peftkit.testing_cases import FAMILIES, QUANTIZED_FACTORIES, Case, _make_input, _quantized_mlp, _seeded

    assert "quantized" in FAMILIES and FAMILIES["quantized"](lambda strategy: 2)[0] is _quantized_mlp
    assert _quantized_mlp in QUANTIZED_FACTORIES
    case = Case(
        "quantized",
        _seeded(_quantized_mlp, 0, torch.float32),
        _make_input(("randn", (2, 3, 64)), 1, torch.float32),
        entry,
        torch.float32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        testing.PROPERTIES[prop](case)
