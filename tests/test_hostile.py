"""Hostile and careless input: names, failures injected at every step of attach, and what must stay untouched."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from snapshots import assert_same, snapshot
from torch import nn

import peftkit
import peftkit.testing
from peftkit import SpecError, compose
from peftkit.lifecycle.attach import get_state
from peftkit.zoo import build_model

attach_module = importlib.import_module("peftkit.lifecycle.attach")  # `peftkit.attach` is the function
IDS = torch.tensor([[3, 14, 15, 92, 65]])


@pytest.mark.parametrize("name", ["keys", "forward", "to", "training", "items", "default\n", "a" * 65, "0a", "a.b"])
def test_names_that_cannot_be_container_keys_are_refused_at_validation(name: str) -> None:
    with pytest.raises(SpecError, match="adapter name"):
        peftkit.Spec.model_validate({"adapters": {name: [{"method": "lora", "target": "c_attn"}]}})


def test_a_name_is_one_name_not_its_letters() -> None:
    model = build_model("llama-tiny")
    peftkit.attach(model, {"adapters": {"ab": [{"method": "lora", "target": "q_proj"}]}})
    peftkit.detach(model, "ab")
    assert get_state(model) is None


SECOND = {
    "adapters": {
        "second": [{"method": "lora", "target": "v_proj"}],
        "fourth": [{"method": "lora", "target": "v_proj", "r": 2}],
        "third": [{"method": "ia3", "target": "down_proj", "feedforward": ["down_proj"]}],  # an input pre-hook
        "fifth": [{"method": "lora", "target": "embed_tokens", "r": 2}],  # an embedding: a forward hook
    },
    "compose": [{"rule": "gate", "adapters": ["second", "fourth"]}],
}
# Every call that changes the model during attach; a failure is injected at each call of each in turn.
STEPS = [
    (nn.Module, "add_module"),
    (nn.Module, "register_forward_hook"),  # hosts other than plain linears (the embedding)
    (attach_module, "SwappedClass"),  # a plain linear host's class, swapped so its forward runs its adapters
    (nn.Module, "register_forward_pre_hook"),
    (nn.ModuleDict, "__setitem__"),
    (compose.Gates, "__init__"),
    (attach_module, "AttachedAdapter"),
    (attach_module, "_set_training_state"),
]


def first_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    return peftkit.attach(model, {"adapters": {"first": [{"method": "lora", "target": "q_proj"}]}})


def calls_during_attach(owner: object, attribute: str, monkeypatch) -> int:
    original, count = getattr(owner, attribute), [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    model = first_model()
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, counting)
        peftkit.attach(model, SECOND)
    return count[0]


@pytest.mark.parametrize(("owner", "attribute"), STEPS, ids=[a for _, a in STEPS])
def test_a_failure_at_any_step_of_attach_leaves_the_model_as_it_was(owner, attribute, monkeypatch) -> None:
    calls = calls_during_attach(owner, attribute, monkeypatch)
    assert calls > 0, f"{attribute} is not called by attach: the step list is stale"
    original = getattr(owner, attribute)
    for failing in range(calls):
        model = first_model()
        before = snapshot(model)
        seen = [0]

        def failing_call(*args, _at=failing, _seen=seen, **kwargs):
            _seen[0] += 1
            if _seen[0] == _at + 1:
                raise RuntimeError("injected")
            return original(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, failing_call)
            with pytest.raises(RuntimeError, match="injected"):
                peftkit.attach(model, SECOND)
        assert_same(before, snapshot(model))
        peftkit.attach(model, SECOND)  # the same attach now works, and every adapter runs
        assert {"first", "second", "third", "fourth", "fifth"} == set(peftkit.active_adapters(model))
        assert model(IDS).logits.isfinite().all()
        peftkit.detach(model)
        assert get_state(model) is None


LORA = {"method": "lora", "target": "q_proj"}


@pytest.mark.parametrize(
    "entry",
    [
        {**LORA, "alpha": float("inf")},
        {**LORA, "alpha": float("nan")},
        {"method": "houlsby", "scaling": float("nan")},
    ],
)
def test_non_finite_numbers_are_refused(entry: dict) -> None:
    with pytest.raises(SpecError, match="finite"):
        peftkit.Spec.model_validate({"adapters": {"a": [entry]}})


@pytest.mark.parametrize(
    "compose",
    [
        {"rule": "gate", "adapters": ["a", "b"], "gate_init": float("nan")},
        {"rule": "average", "adapters": ["a", "b"], "weights": [float("nan"), 1.0]},
    ],
)
def test_non_finite_composition_numbers_are_refused(compose: dict) -> None:
    spec = {"adapters": {"a": [LORA], "b": [{**LORA, "target": "v_proj"}]}, "compose": [compose]}
    with pytest.raises(SpecError, match="finite"):
        peftkit.Spec.model_validate(spec)


def test_json_infinity_and_yaml_inf_are_refused() -> None:
    with pytest.raises(SpecError, match="Infinity is not a number JSON allows"):
        peftkit.Spec.from_json('{"adapters": {"a": [{"method": "lora", "target": "q", "alpha": Infinity}]}}')
    with pytest.raises(SpecError, match="finite"):
        peftkit.Spec.from_yaml("adapters: {a: [{method: lora, target: q, alpha: .inf}]}")


@pytest.mark.parametrize("depth", [40, 5000, 200_000])
def test_deep_nesting_is_a_peftkit_error(depth: int, tmp_path) -> None:
    text = '{"adapters": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(SpecError, match="nested too deeply"):
        peftkit.Spec.from_json(text)
    with pytest.raises(SpecError, match="nested too deeply"):
        peftkit.Spec.from_yaml("adapters: " + "[" * depth + "]" * depth)
    (tmp_path / "adapter_config.json").write_text(text)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(peftkit.CheckpointError, match="nested too deeply"):
        peftkit.from_peft(build_model("llama-tiny"), tmp_path)


def test_a_huge_layer_range_is_refused_without_being_expanded() -> None:
    with pytest.raises(SpecError, match="beyond 65535"):
        peftkit.Spec.model_validate({"adapters": {"a": [{**LORA, "layers": "0-999999999"}]}})
    with pytest.raises(SpecError, match="not an index or a range"):
        peftkit.Spec.model_validate({"adapters": {"a": [{**LORA, "layers": "0-" + "9" * 5000}]}})
    assert peftkit.Spec.model_validate({"adapters": {"a": [{**LORA, "layers": "0-3,8"}]}}).adapters["a"][0].layers == [
        0, 1, 2, 3, 8,
    ]  # fmt: skip


# -- checkpoints ---------------------------------------------------------------------------------------------------
CKPT_SPEC = {
    "adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 4}]},
    "trainable": ["lm_head"],
}


def saved(tmp_path, spec=CKPT_SPEC, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = peftkit.attach(build_model("llama-tiny").eval(), spec)
    peftkit.testing.randomise_adapters(model, seed)
    peftkit.save(model, tmp_path)
    return model


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return build_model("llama-tiny").eval()


@pytest.mark.parametrize("killed_at", [0, 1])
def test_a_save_killed_between_its_writes_leaves_the_old_or_the_new_checkpoint(
    killed_at, tmp_path, monkeypatch
) -> None:
    from peftkit import io

    old = saved(tmp_path)
    new = peftkit.attach(fresh(), {"adapters": {"other": [{"method": "lora", "target": "k_proj", "r": 2}]}})
    peftkit.testing.randomise_adapters(new, 7)
    write, calls = io.write_file_atomically, [0]

    def killed(path, produce):
        calls[0] += 1
        if calls[0] > killed_at:
            raise KeyboardInterrupt  # the process dies before this file is renamed into place
        write(path, produce)

    monkeypatch.setattr(io, "write_file_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        peftkit.save(new, tmp_path)
    monkeypatch.undo()
    expected = new if killed_at == 1 else old  # the weights file, renamed first, carries its spec with it
    loaded = peftkit.load(fresh(), tmp_path)
    assert torch.equal(loaded(IDS).logits, expected(IDS).logits)


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path) -> None:
    saved(tmp_path)
    (tmp_path / ".adapter.safetensors.k3j2h1").write_bytes(b"half a file")
    saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "spec.json"]


def rewrite(tmp_path, change_tensors=None, spec=None) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as stream:
        metadata = stream.metadata()
    tensors = load_file(path)
    if change_tensors is not None:
        change_tensors(tensors)
    if spec is not None:
        metadata["peftkit_spec"] = spec
    save_file(tensors, path, metadata=metadata)


def test_a_spec_that_asks_for_more_than_its_tensors_hold_is_refused_before_anything_is_built(tmp_path) -> None:
    saved(tmp_path)
    huge = {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 100_000_000}]}}
    rewrite(tmp_path, spec=json.dumps({**huge, "trainable": ["lm_head"]}))
    model = fresh()
    with pytest.raises(peftkit.CheckpointError, match=r"does not fit its own spec .* 6,400,000,000 parameters"):
        peftkit.load(model, tmp_path)
    assert get_state(model) is None


def first_lora_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("lora_b"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({first_lora_key(t): t[first_lora_key(t)].to(torch.float8_e4m3fn)}), "dtype F8_E4M3"),
        (lambda t: t.update({first_lora_key(t): t[first_lora_key(t)].to(torch.int32)}), "dtype I32"),
        (lambda t: t[first_lora_key(t)].view(-1).__setitem__(0, float("nan")), "NaN or infinite"),
        (lambda t: t[first_lora_key(t)].view(-1).__setitem__(0, float("inf")), "NaN or infinite"),
    ],
)
def test_a_bad_tensor_is_refused_before_any_value_is_copied(tmp_path, change, message) -> None:
    saved(tmp_path)
    rewrite(tmp_path, change_tensors=change)
    model = fresh()
    head = model.lm_head.weight.clone()  # a `trainable` base module: loaded from the file, so filled first
    with pytest.raises(peftkit.CheckpointError, match=message):
        peftkit.load(model, tmp_path)
    assert torch.equal(model.lm_head.weight, head) and get_state(model) is None


def test_saving_or_restoring_through_a_merged_host_is_refused(tmp_path) -> None:
    from peftkit.io import restore_adapter_weights

    spec = {"adapters": {"default": [{"method": "lora", "target": "lm_head", "r": 2}]}, "trainable": ["lm_head"]}
    model = saved(tmp_path, spec)
    peftkit.merge(model)
    with pytest.raises(peftkit.AttachError, match="save: the checkpoint would hold the merged update twice"):
        peftkit.save(model, tmp_path / "again")
    with pytest.raises(peftkit.AttachError, match="restoring adapter weights: adapters at \\['lm_head'\\] are merged"):
        restore_adapter_weights(model, tmp_path)
    peftkit.unmerge(model)
    restore_adapter_weights(model, tmp_path)
    merged_elsewhere = saved(tmp_path / "q", {"adapters": {"default": [{"method": "lora", "target": "q_proj"}]}})
    peftkit.merge(merged_elsewhere)
    peftkit.save(merged_elsewhere, tmp_path / "q2")  # no merged host is saved: the adapters' values are what they were


def test_ia3_unmerge_is_exact_even_for_a_zero_scale_and_a_non_finite_one_is_not_merged() -> None:
    spec = {"adapters": {"a": [{"method": "lora", "target": "q_proj"}], "s": [{"method": "ia3"}]}}
    model = peftkit.attach(fresh().to(torch.bfloat16), spec)
    peftkit.testing.randomise_adapters(model)
    scale = next(p for n, p in model.named_parameters() if n.endswith("ia3_scale"))
    with torch.no_grad():
        scale.view(-1)[0] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items() if "peftkit" not in k}
    for _ in range(20):
        peftkit.merge(model, ["s"])
        peftkit.unmerge(model, ["s"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # bf16, 20 cycles: bit for bit
    with torch.no_grad():
        scale.view(-1)[0] = float("nan")
    with pytest.raises(peftkit.AttachError, match=r"NaN or infinite entry.*nothing was merged"):
        peftkit.merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(a.module.merged for a in get_state(model).attached)


# -- patterns --------------------------------------------------------------------------------------------------------
def test_a_catastrophic_regex_finishes_at_once() -> None:
    model = fresh()
    with pytest.raises(peftkit.TargetingError, match="matched no module"):  # Python's re would never return
        peftkit.plan(model, {"adapters": {"a": [{"method": "lora", "target": "re:(.*.*)*Z"}]}})
    assert peftkit.plan(model, {"adapters": {"a": [{"method": "lora", "target": r"re:(.*.*)*q_proj"}]}}).rows


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("re:(a)\\1", "no backreferences or lookaround"),
        ("re:(?=q)q_proj", "no backreferences or lookaround"),
        ("x" * 1_000_000, r"'xxxxx.*\.\.\. \(1000000 characters\) is longer than 1000"),
        ("re:" + "a" * 5000, "longer than 1000 characters"),
    ],
)
def test_patterns_beyond_the_safe_engine_or_too_long_are_refused_briefly(target: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        peftkit.Spec.model_validate({"adapters": {"a": [{"method": "lora", "target": target}]}})
    assert len(str(caught.value)) < 1000  # the echo is cut


def test_hostile_peft_patterns_are_checkpoint_errors_not_hangs(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    oracle = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    oracle.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for patterns, message in [({"(.*.*)*Z": 4}, None), (["q_proj"], "must be a mapping"), ({"(": 4}, "not a regex")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": patterns}))
        if message is None:
            assert get_state(peftkit.from_peft(fresh(), tmp_path)) is not None  # matches nothing, at once
        else:
            with pytest.raises(peftkit.CheckpointError, match=message):
                peftkit.from_peft(fresh(), tmp_path)


@pytest.mark.parametrize(
    "entry",
    [
        {"method": "lora", "target": "q_proj", "r": 10**30},
        {"method": "lora", "target": "q_proj", "r": 100_000_000},
        {"method": "prefix", "target": "self_attn", "length": 10**12},
        {"method": "houlsby", "target": "o_proj", "bottleneck": 10**12},
    ],
)
def test_adapters_far_larger_than_the_model_are_refused_before_allocation(entry: dict) -> None:
    model = fresh()
    with pytest.raises(peftkit.AttachError, match="more than 4x the model"):
        peftkit.attach(model, {"adapters": {"a": [entry]}})
    assert get_state(model) is None


def test_size_fields_that_overflow_are_refused_at_validation() -> None:
    with pytest.raises(SpecError, match=r"greater than or equal to 0\.015625"):
        peftkit.Spec.model_validate({"adapters": {"a": [{"method": "houlsby", "reduction_factor": 5e-324}]}})


@pytest.mark.parametrize("token", [-1, 10_000])
def test_prompt_init_tokens_outside_the_vocabulary_are_refused(token: int) -> None:
    model = fresh()
    entry = {"method": "prompt", "length": 2, "init": "vocab", "init_tokens": [1, token]}
    with pytest.raises(peftkit.AttachError, match=f"token id {token} is outside the vocabulary"):
        peftkit.attach(model, {"adapters": {"p": [entry]}})
    assert get_state(model) is None


def test_bad_training_configs_and_data_are_peftkit_errors(tmp_path) -> None:
    from peftkit.cli import main
    from peftkit.training.config import TrainConfig
    from peftkit.training.loop import _read_texts

    (tmp_path / "latin1.yaml").write_bytes(b"steps: 2\nname: caf\xe9\n")
    with pytest.raises(SpecError, match="is not UTF-8 text"):
        TrainConfig.from_file(tmp_path / "latin1.yaml")
    (tmp_path / "deep.yaml").write_text("spec: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(SpecError, match="nested too deeply"):
        TrainConfig.from_file(tmp_path / "deep.yaml")
    assert main(["train", str(tmp_path / "latin1.yaml")]) == 2
    for line, message in [("[" * 5000 + "]" * 5000, "nested too deeply"), ('{"text": 3}', "string 'text' field")]:
        (tmp_path / "data.jsonl").write_text(line + "\n")
        with pytest.raises(peftkit.PeftkitError, match=message):
            _read_texts(tmp_path / "data.jsonl", "text")
