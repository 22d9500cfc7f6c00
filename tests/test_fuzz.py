"""Generated hostile input end to end: specs that attach, checkpoints that load, PEFT folders and command lines.

Whatever is generated, peftkit raises only its own errors (a ``PeftkitError``; from the CLI, exit status 2 and one
message on stderr; argparse's own usage errors are SystemExit 2 as documented), and a failed attach or load leaves the
model exactly as it was. Sizes: ``HYPOTHESIS_PROFILE=ci`` runs about 100 cases per test (CI's budget),
``dev`` 200 and ``thorough`` 1000.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from snapshots import assert_same, snapshot
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.zoo import build_model

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
CASES = {"ci": 100, "dev": 200, "thorough": 1000}.get(PROFILE, 200)
fuzz = settings(  # CI replays the same cases; other profiles explore new ones each run
    max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci"
)
IDS = torch.tensor([[3, 14, 15, 92, 65]])

numbers = st.one_of(
    st.integers(-2, 12),
    st.sampled_from([0, 1, 10**6, 10**12, 10**30, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["2", "", None, True, [], {}]),
)
patterns = st.sampled_from(
    [
        "q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head", "model.norm", "*", "*.self_attn",
        "self_attn", "@attention_output", "@ffn_output", "@ffn", "@query", "@value", "@key", "@input_embeddings",
        "@self_attention", "@nope", "optional:nope", "optional:q_proj", "re:.*proj", "re:(", "re:(.*.*)*Z", "",
        "re:" + "a" * 2000, "keys", "model.layers.0.self_attn.q_proj",
    ]
)  # fmt: skip
targets = st.one_of(patterns, st.lists(patterns, max_size=3), numbers)
layer_ranges = st.sampled_from(["0", "0-1", "1", "1-0", "0-999999999", "x", "", "-1"])
good_fields = {
    "lora": {"r": st.integers(1, 8), "alpha": st.floats(0.5, 32), "dropout": st.floats(0, 0.5), "rslora": st.booleans()},
    "ia3": {"feedforward": st.lists(patterns, max_size=2)},
    "houlsby": {"bottleneck": st.integers(1, 16), "scaling": st.floats(-2, 2), "layer_norm": st.booleans()},
    "pfeiffer": {"reduction_factor": st.floats(0.5, 64)},
    "parallel": {"bottleneck": st.integers(1, 16)},
    "prefix": {"length": st.integers(1, 4), "gate": st.booleans(), "reparametrize": st.booleans()},
    "prompt": {"length": st.integers(1, 4), "init": st.sampled_from(["random", "vocab"]), "init_tokens": st.lists(st.integers(-5, 300), max_size=3)},
    "ptuning": {"length": st.integers(1, 4), "encoder": st.sampled_from(["mlp", "lstm", "none"])},
}  # fmt: skip
bad_fields = st.dictionaries(
    st.sampled_from(["target", "layers", "r", "alpha", "dropout", "length", "bottleneck", "reduction_factor",
                     "scaling", "feedforward", "init", "init_tokens", "module_types", "bogus"]),
    st.one_of(numbers, targets),
    max_size=1,
)  # fmt: skip


def entry_for(method: str) -> st.SearchStrategy[dict]:
    """A mostly sensible entry for ``method``, with at most one field of any value, right or wrong."""
    sensible = st.fixed_dictionaries(
        {"method": st.just(method)},
        optional={"target": targets, "layers": layer_ranges, **good_fields[method]},
    )
    return st.builds(lambda entry, bad: {**entry, **bad}, sensible, bad_fields)


entries = st.sampled_from(sorted(good_fields)).flatmap(entry_for)
names = st.sampled_from(["default", "a", "b", "ok_name"] * 4 + ["keys", "forward", "default\n", "x" * 70, "0"])
composes = st.lists(  # mostly empty: a random rule over random names is mostly refused
    st.fixed_dictionaries(
        {"rule": st.sampled_from(["stack", "sum", "gate", "average", "nope"]), "adapters": st.lists(names, max_size=3)},
        optional={"weights": st.lists(numbers, max_size=3), "gate_init": numbers},
    ),
    max_size=1,
)
specs = st.fixed_dictionaries(
    {"adapters": st.dictionaries(names, st.lists(entries, min_size=1, max_size=2), min_size=1, max_size=2)},
    optional={"compose": composes, "trainable": st.lists(patterns, max_size=2)},
)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return build_model("llama-tiny").eval()


def assert_unchanged(model: nn.Module, before: dict) -> None:
    assert_same(before, snapshot(model))


def loads_or_is_refused_cleanly(model: nn.Module, load) -> None:
    """``load(model)`` either attaches (and detaching restores the model) or raises a peftkit error and changes
    nothing."""
    before = snapshot(model)
    try:
        load(model)
    except peftkit.PeftkitError as error:
        event(f"refused: {type(error).__name__}")
        assert_unchanged(model, before)
        return
    event("loaded")
    peftkit.detach(model)
    assert_unchanged(model, before)


@fuzz
@given(spec=specs)
def test_any_spec_attaches_or_is_refused_and_the_model_stays_as_it_was(base, spec) -> None:
    model = base
    before = snapshot(model)
    try:
        peftkit.plan(model, spec)
        peftkit.attach(model, spec)
    except peftkit.PeftkitError as error:
        event(f"refused: {type(error).__name__}")
        assert_unchanged(model, before)
        return
    event("attached")
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        peftkit.detach(model)
    assert_unchanged(model, before)


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    spec = {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 2}]}}
    model = peftkit.attach(base, spec)
    peftkit.save(model, folder)
    peftkit.detach(model)
    return folder


tensor_damage = st.sampled_from(["drop", "extra", "shape", "dtype", "nan", "int", "empty", "rename"])
spec_damage = st.one_of(st.none(), specs.map(json.dumps), st.sampled_from(["", "{", "[]", "null", '{"a": Infinity}']))


def damaged_copy(source: Path, damages: list[str], spec_text: str | None, seed: int) -> Path:
    folder = Path(tempfile.mkdtemp())
    tensors = load_file(source / "adapter.safetensors")
    keys = sorted(tensors)
    key = keys[seed % len(keys)]
    for damage in damages:
        if key not in tensors:
            break
        if damage == "drop":
            del tensors[key]
        elif damage == "extra":
            tensors["model.layers.0.self_attn.q_proj.peftkit_adapters.default.extra"] = torch.zeros(2)
        elif damage == "shape":
            tensors[key] = torch.zeros(tensors[key].shape[0] + 1, 3)
        elif damage == "dtype":
            tensors[key] = tensors[key].to(torch.float16)
        elif damage == "nan":
            tensors[key] = torch.full(tensors[key].shape, float("nan"))
        elif damage == "int":
            tensors[key] = tensors[key].to(torch.int32)
        elif damage == "empty":
            tensors[key] = torch.zeros(0)
        elif damage == "rename":
            tensors[key.replace("q_proj", "k_proj")] = tensors.pop(key)
    from safetensors import safe_open

    with safe_open(str(source / "adapter.safetensors"), framework="pt") as stream:
        metadata = dict(stream.metadata())
    if spec_text is not None:
        metadata["peftkit_spec"] = spec_text
    save_file(tensors, str(folder / "adapter.safetensors"), metadata=metadata)
    shutil.copy(source / "spec.json", folder / "spec.json")
    return folder


@fuzz
@given(damages=st.lists(tensor_damage, max_size=3), spec_text=spec_damage, seed=st.integers(0, 100))
def test_any_damaged_checkpoint_loads_or_is_refused_and_the_model_stays_as_it_was(
    base, checkpoint, damages, spec_text, seed
) -> None:
    folder = damaged_copy(checkpoint, damages, spec_text, seed)
    try:
        loads_or_is_refused_cleanly(base, lambda model: peftkit.load(model, folder))
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory) -> Path:
    peft = pytest.importorskip("peft")
    import copy

    folder = tmp_path_factory.mktemp("peft")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


peft_fields = st.dictionaries(
    st.sampled_from(
        [
            "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
            "target_modules", "modules_to_save", "use_dora", "bias", "init_lora_weights", "fan_in_fan_out",
            "layers_to_transform", "num_virtual_tokens", "task_type",
        ]
    ),
    st.one_of(numbers, patterns, st.dictionaries(patterns, numbers, max_size=2), st.sampled_from(["LORA", "IA3"])),
    max_size=4,
)  # fmt: skip


@fuzz
@given(fields=peft_fields)
def test_any_peft_config_loads_or_is_refused_and_the_model_stays_as_it_was(base, peft_folder, fields) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        shutil.copy(peft_folder / "adapter_model.safetensors", folder)
        config = json.loads((peft_folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))
        loads_or_is_refused_cleanly(base, lambda model: peftkit.from_peft(model, folder))
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def workspace(checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("workspace")
    shutil.copytree(checkpoint, folder / "kit")
    (folder / "spec.yaml").write_text(yaml.safe_dump({"adapters": {"a": [{"method": "lora", "target": "q_proj"}]}}))
    (folder / "bad.yaml").write_text("adapters: [")
    (folder / "a-file").write_text("x")
    (folder / "cfg").mkdir()
    (folder / "cfg" / "config.json").write_text('{"model_type": "llama", "hidden_size": -4}')
    (folder / "train.txt").write_text("a b c\n" * 4)
    (folder / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name": "llama-tiny"},
                "data": {"train": "train.txt", "max_length": 8},
                "spec": "spec.yaml",
                "steps": 1,
                "batch_size": 2,
                "output": "a-file",
            }
        )
    )
    return folder


commands = st.sampled_from(["plan", "validate", "methods", "train", "from-peft", "to-peft", "nope"])
words = st.sampled_from(
    [
        "plan", "validate", "methods", "train", "from-peft", "to-peft", "--model", "--adapter", "--pretrained",
        "--materialise", "--dump", "--no-progress", "llama-tiny", "bert-tiny", "gpt2-tiny", "cfg", "kit", "spec.yaml",
        "bad.yaml", "train.yaml", "a-file", "missing", "out", "forward", "default", "", "-", "--", "x" * 300,
    ]
)  # fmt: skip


@fuzz
@given(argv=st.builds(lambda first, rest: [first, *rest], commands, st.lists(words, max_size=5)))
def test_any_command_line_succeeds_or_fails_with_a_peftkit_error_and_no_traceback(workspace, argv, capsys) -> None:
    cwd = os.getcwd()
    os.chdir(workspace)
    capsys.readouterr()  # what earlier generated cases printed
    try:
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's documented usage errors and --help
            assert exit.code in (0, 2), exit.code
            event("argparse usage error")
            return
        error = capsys.readouterr().err
        assert status in (0, 2), (argv, status)
        event(f"exit {status}")
        if status == 2:
            assert error.startswith("peftkit: error:") and "Traceback" not in error, error
    finally:
        os.chdir(cwd)
        for leftover in ("out", "missing"):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                shutil.rmtree(workspace / leftover)
