"""QLoRA beyond the forward: loading quantised, preparing for k-bit training, `peftkit train`'s quantization
block, merging into a dequantised model and measuring what re-quantising would lose."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

import peftkit
from peftkit.errors import PeftkitError, SpecError
from peftkit.quantization import Quantization, quantize_built_model
from peftkit.training.config import TrainConfig
from peftkit.training.loop import train
from peftkit.zoo import TINY_MODELS, load_model

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'peftkit[quantization]')")
pytest.importorskip("accelerate", reason="transformers loads bitsandbytes models through accelerate")
import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional

KINDS = {"nf4": Quantization(), "nf4-double": Quantization(double_quant=True), "int8": Quantization(bits=8)}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return TINY_MODELS["llama-tiny"](hidden_size=64, intermediate_size=128)


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _randomise(model) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.1)


def _packed(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_quantization_block_is_strict():
    with pytest.raises(ValueError, match="extra"):
        Quantization.model_validate({"bits": 4, "quant_typ": "nf4"})
    with pytest.raises(ValueError, match="bits"):
        Quantization.model_validate({"bits": 3})
    with pytest.raises(ValueError, match="double_quant, type apply to 4-bit quantisation only"):
        Quantization.model_validate({"bits": 8, "type": "fp4", "double_quant": True})
    config = Quantization(double_quant=True, compute_dtype="bfloat16").to_transformers()
    assert config.load_in_4bit and config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


def test_without_bitsandbytes_a_quantized_load_names_the_install_command(monkeypatch, tmp_path):
    peftkit.known_methods()  # plugin discovery (which registers the bitsandbytes hosts) runs before the patch
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(PeftkitError, match=r"needs bitsandbytes.*pip install 'peftkit\[quantization\]'"):
        load_model("llama-tiny", quantization=Quantization())
    config = tmp_path / "config.yaml"
    (tmp_path / "train.txt").write_text("a b c\nd e f\n")
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "llama-tiny", "quantization": {"bits": 4}},
                "data": {"train": "train.txt"},
                "spec": {"adapters": {"d": [{"method": "lora", "target": "q_proj", "r": 2}]}},
                "steps": 2,
                "output": "out",
            }
        )
    )
    with pytest.raises(PeftkitError, match="pip install"):
        train(TrainConfig.from_file(config), tmp_path, progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


METHODS = {
    "lora": {"method": "lora", "target": ["q_proj", "down_proj"], "r": 2},
    "dora": {"method": "dora", "target": ["v_proj"], "r": 2},
    "ia3": {"method": "ia3", "target": ["k_proj", "down_proj"]},
    "houlsby": {"method": "houlsby", "bottleneck": 8},
    "parallel": {"method": "parallel", "bottleneck": 8},
    "prefix": {"method": "prefix", "length": 3},
    "prompt": {"method": "prompt", "length": 3},
}


@pytest.mark.parametrize("prepare", [False, True], ids=["as-loaded", "prepared"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_compute_over_float32_activations_trains_every_method(base, name, prepare):
    """The usual QLoRA setting: bfloat16 compute inside the 4-bit layers, float32 everywhere else."""
    model = quantize_built_model(base, Quantization(compute_dtype="bfloat16")).train()
    if prepare:
        peftkit.prepare_for_kbit_training(model, gradient_checkpointing=True)
    before = _packed(model)
    peftkit.attach(model, {"adapters": {"default": [METHODS[name]]}})
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
    peftkit.detach(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items())


def test_prepare_lifts_the_same_parameters_as_peft_and_checkpointing_keeps_the_gradients(base, tmp_path):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    base.to(torch.bfloat16).save_pretrained(tmp_path)
    base.to(torch.float32)
    config = Quantization(compute_dtype="bfloat16").to_transformers()

    def loaded():
        return AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
        )

    ours = peftkit.prepare_for_kbit_training(loaded())
    theirs = prepare_model_for_kbit_training(loaded(), use_gradient_checkpointing=False)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert torch.float32 in {p.dtype for p in ours.parameters()} and not any(p.requires_grad for p in ours.parameters())

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        model = quantize_built_model(base, Quantization()).train()
        peftkit.prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)
        assert model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        peftkit.attach(model, {"adapters": {"d": [METHODS["lora"]]}})
        _randomise(model)
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for plain, checkpointed in zip(gradients(False), gradients(True), strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_merge_and_detach_into_a_dequantized_model_computes_what_the_adapters_did(base, kind, name, tmp_path):
    model = quantize_built_model(base, KINDS[kind]).train()
    peftkit.attach(model, {"adapters": {"default": [METHODS[name]]}})
    _randomise(model)
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    merged = peftkit.merge_and_detach(model, dequantize=torch.float32)
    assert peftkit.lifecycle.state.get_state(merged) is None
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None and getattr(merged, "hf_quantizer", None) is None
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids()).logits, expected, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path)  # a plain checkpoint: transformers reads it back with no quantisation
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_ids()).logits, expected, rtol=0, atol=1e-5)


def test_dequantized_merge_in_bf16_and_of_unadapted_layers_equals_transformers_dequantize(base):
    model = quantize_built_model(base, Quantization())
    reference = quantize_built_model(base, Quantization()).dequantize(dtype=torch.bfloat16)
    peftkit.attach(model, {"adapters": {"default": [METHODS["lora"]]}})  # B = 0: the update is zero
    merged = peftkit.merge_and_detach(model, dequantize=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dequantizing_under_an_adapter_that_is_not_merged_is_refused_and_changes_nothing(base):
    model = quantize_built_model(base, Quantization()).train()
    peftkit.attach(model, {"adapters": {"a": [METHODS["lora"]], "b": [METHODS["ia3"]]}})
    before, count = _packed(model), len(peftkit.lifecycle.state.get_state(model).attached)
    with pytest.raises(peftkit.AttachError, match=r"adapter 'b' at .* is not being merged"):
        peftkit.merge_and_detach(model, "a", dequantize=torch.float32)
    with pytest.raises(peftkit.AttachError, match="floating-point torch dtype"):
        peftkit.merge_and_detach(model, dequantize=torch.int8)
    with pytest.raises(peftkit.AttachError, match="stored in 4 bits"):
        peftkit.merge_and_detach(model)  # without dequantize: refused as before
    state = peftkit.lifecycle.state.get_state(model)
    assert state is not None and len(state.attached) == count
    assert not any(a.module.merged for a in state.attached)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_error_is_what_a_round_trip_through_four_bits_would_lose(base):
    model = quantize_built_model(base, Quantization()).train()
    peftkit.attach(model, {"adapters": {"d": [{"method": "lora", "target": "q_proj", "r": 2, "alpha": 4}]}})
    _randomise(model)
    errors = peftkit.merge_error(model)
    assert len(errors) == 2 and all(e > 0 for e in errors.values())
    # the reference, from bitsandbytes directly: (dequantised W + s B A) in float64, quantised and read back
    for path, error in errors.items():
        host = model.get_submodule(path)
        adapter = peftkit.lifecycle.state.get_state(model).adapters(["d"])
        lora = next(a.module for a in adapter if a.path == path)
        weight = bnb_functional.dequantize_4bit(host.weight.data, host.weight.quant_state).double()
        exact = weight + 2.0 * (lora.lora_b.double() @ lora.lora_a.double())
        packed, state = bnb_functional.quantize_4bit(exact.float(), blocksize=64, quant_type="nf4")
        kept = bnb_functional.dequantize_4bit(packed, state).double()
        assert abs((kept - exact).abs().max().item() - error) < 1e-6


def test_merge_error_on_int8_matches_the_row_wise_absmax_round_trip(base):
    model = quantize_built_model(base, Quantization(bits=8)).train()
    peftkit.attach(model, {"adapters": {"d": [{"method": "lora", "target": "o_proj", "r": 2}]}})
    _randomise(model)
    for path, error in peftkit.merge_error(model).items():
        host = model.get_submodule(path)
        lora = next(a.module for a in peftkit.lifecycle.state.get_state(model).attached if a.path == path)
        weight = host.weight.data.double() * host.weight.SCB.double()[:, None] / 127
        exact = weight + lora.scaling * (lora.lora_b.double() @ lora.lora_a.double())
        half = exact.half().double()
        scale = half.abs().amax(dim=1, keepdim=True)
        kept = torch.round(half * 127 / scale) * scale / 127
        assert abs((kept - exact).abs().max().item() - error) < 1e-3 * scale.max().item()


def _train_config(tmp_path, **overrides):
    """A 64-wide Llama folder: bitsandbytes' CPU evaluation path repacks 4-bit weights in blocks of 64 inputs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "base" / "config.json").is_file():
        torch.manual_seed(0)
        TINY_MODELS["llama-tiny"](hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    (tmp_path / "train.txt").write_text("\n".join(f"line {i} of the tiny corpus" for i in range(32)))
    (tmp_path / "eval.txt").write_text("\n".join(f"held out {i}" for i in range(6)))
    fields = {
        "model": {
            "name": str(tmp_path / "base"),
            "pretrained": True,
            "quantization": {"bits": 4, "type": "nf4", "double_quant": True},
        },
        "data": {"train": "train.txt", "eval": "eval.txt", "max_length": 16},
        "spec": {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 4}]}},
        "steps": 4,
        "batch_size": 4,
        "output": "out",
        "checkpoint_every": 2,
        "eval_every": 2,  # training goes on after an evaluation (bitsandbytes repacked the weights for it)
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(fields))
    return TrainConfig.from_file(path)


def test_peftkit_train_takes_a_quantization_block(tmp_path):
    logs = []
    result = train(_train_config(tmp_path), tmp_path, progress=False, log=logs.append)
    assert result.resumed_from == 0 and result.eval_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    assert result.merge_error is not None and result.merge_error > 0  # what re-quantising would lose
    assert any('"base_dtype": "nf4+double (float32 compute)"' in line for line in logs)
    spec = peftkit.read_spec(result.adapters)
    fresh = load_model(str(tmp_path / "base"), pretrained=True, quantization=Quantization(double_quant=True))
    peftkit.load(fresh, result.adapters)
    assert spec.adapters.keys() == {"default"}
    resumed = train(_train_config(tmp_path, steps=6), tmp_path, progress=False, log=lambda *_: None)
    assert resumed.resumed_from == 4 and resumed.steps == 6


def test_gradient_checkpointing_in_train_gives_the_same_run(tmp_path):
    plain = train(_train_config(tmp_path / "a", output="out"), tmp_path / "a", progress=False, log=lambda *_: None)
    checkpointed = train(
        _train_config(tmp_path / "b", gradient_checkpointing=True), tmp_path / "b", progress=False, log=lambda *_: None
    )
    assert abs(plain.final_loss - checkpointed.final_loss) < 1e-5


def test_a_quantized_base_is_not_sharded_by_fsdp2(tmp_path):
    with pytest.raises(SpecError, match="use strategy ddp"):
        _train_config(tmp_path, distributed={"strategy": "fsdp2"})


def test_parameter_counts_of_a_quantized_model_count_the_values_its_packed_weights_stand_for(base):
    spec = {"adapters": {"d": [METHODS["lora"]]}}
    floating = peftkit.trainable_parameters(
        peftkit.attach(TINY_MODELS["llama-tiny"](hidden_size=64, intermediate_size=128), spec)
    )
    for quantization in KINDS.values():
        counted = peftkit.trainable_parameters(peftkit.attach(quantize_built_model(base, quantization), spec))
        assert (counted.trainable, counted.total) == (floating.trainable, floating.total)
