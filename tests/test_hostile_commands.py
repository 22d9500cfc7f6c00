"""Careless input at the edges: a PEFT config with fields of the wrong type, and command lines whose files are
missing, damaged or of the wrong kind. Each is a peftkit error naming the problem (exit status 2 from the CLI, no
traceback), and nothing is written."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import peftkit
from peftkit.cli import main
from peftkit.lifecycle.attach import get_state
from peftkit.zoo import build_model


def fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("llama-tiny").eval()


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory) -> Path:
    peft = pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("peft-lora")
    peft.get_peft_model(fresh(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": ["LORA"]}, "peft_type must be a string"),
        ({"peft_type": {"a": 1}}, "peft_type must be a string"),
        ({"r": "2"}, r"r must be a whole number of at least 1, got '2' \(str\)"),
        ({"r": 2.5}, "r must be a whole number"),
        ({"r": True}, "r must be a whole number"),
        ({"lora_alpha": "x"}, "lora_alpha must be a finite number"),
        ({"lora_dropout": "x"}, "lora_dropout must be a finite number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"rank_pattern": {"q_proj": "2"}}, "a rank_pattern value must be a whole number"),
        ({"alpha_pattern": {"q_proj": [1]}}, "an alpha_pattern value must be a finite number"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrote the base weights"),
        ({"init_lora_weights": "olora"}, "path_initial_model_for_weight_conversion"),
    ],
)
def test_a_peft_config_field_of_the_wrong_kind_is_named(peft_lora, tmp_path, change, message) -> None:
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((peft_lora / "adapter_model.safetensors").read_bytes())
    config = json.loads((peft_lora / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    model = fresh()
    with pytest.raises(peftkit.CheckpointError, match=message):
        peftkit.from_peft(model, folder)
    assert get_state(model) is None


def test_a_good_peft_config_still_loads(peft_lora) -> None:
    assert get_state(peftkit.from_peft(fresh(), peft_lora)) is not None


@pytest.fixture()
def files(tmp_path, monkeypatch) -> Path:
    """A folder of the things command lines point at, good and bad."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    spec = {"adapters": {"default": [{"method": "lora", "target": "q_proj"}]}}
    peftkit.save(peftkit.attach(build_model("llama-tiny"), spec), tmp_path / "kit")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text("{not json")
    (tmp_path / "odd-config").mkdir()
    (tmp_path / "odd-config" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    (tmp_path / "config-only").mkdir()
    build_model("llama-tiny").config.to_json_file(tmp_path / "config-only" / "config.json")
    (tmp_path / "train.txt").write_text("the movie was fun\nthe plot was long\n" * 8)
    return tmp_path


def training_config(folder: Path, name: str, **changes) -> str:
    config = {
        "model": {"name": "llama-tiny"},
        "data": {"train": "train.txt", "max_length": 16},
        "spec": {"adapters": {"d": [{"method": "lora", "target": "q_proj"}]}},
        "steps": 2,
        "batch_size": 2,
        "output": "out",
        **changes,
    }
    (folder / name).write_text(yaml.safe_dump(config))
    return str(folder / name)


COMMANDS = {
    "plan on a damaged config.json": (["plan", "spec.yaml", "--model", "bad-config"], "is not valid JSON"),
    "plan on an unknown model_type": (["plan", "spec.yaml", "--model", "odd-config"], "not a config transformers"),
    "to-peft from a folder without weights": (
        ["to-peft", "kit", "out", "--model", "config-only", "--pretrained"],
        "holds none; save the model there",
    ),
    "to-peft on a damaged pretrained config": (
        ["to-peft", "kit", "out", "--model", "bad-config", "--pretrained"],
        "is not valid JSON",
    ),
    "to-peft with an adapter name that is a container attribute": (
        ["to-peft", "kit", "out", "--model", "llama-tiny", "--adapter", "forward"],
        r"no attached adapter named \['forward'\]",
    ),
    "to-peft into a file": (["to-peft", "kit", "a-file", "--model", "llama-tiny"], "it is a file, not a folder"),
    "validate a folder": (["validate", "kit"], "unknown extension"),
}
TRAINING = {
    "a tokenizer folder that is missing": ({"data": {"train": "train.txt", "tokenizer": "nowhere"}}, "is not a folder"),
    "a model without a language-model head": (
        {"model": {"name": "bert-tiny"}, "spec": {"adapters": {"d": [{"method": "lora", "target": "query"}]}}},
        "has no language-model head",
    ),
    "an output that is a file": ({"output": "a-file/out"}, "is a file"),
    "a pretrained folder without weights": ({"model": {"name": "config-only", "pretrained": True}}, "holds none"),
}


@pytest.mark.parametrize("case", sorted(COMMANDS))
def test_bad_command_lines_are_errors_not_tracebacks(case, files, capsys) -> None:
    argv, message = COMMANDS[case]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("peftkit: error:") and len(error.splitlines()) == 1, error
    assert re.search(message, error), error
    assert not (files / "out").exists()


@pytest.mark.parametrize("case", sorted(TRAINING))
def test_bad_training_inputs_are_errors_before_anything_is_written(case, files, capsys) -> None:
    changes, message = TRAINING[case]
    config = training_config(files, "train.yaml", **copy.deepcopy(changes))
    assert main(["train", config, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert not (files / "out").exists()
