"""``peftkit merge`` / ``peftkit.export_merged``: base folder + adapter folder -> a plain transformers folder.

The written folder is loaded by a separate Python process in which ``import peftkit`` fails, so the check is that it
needs nothing of peftkit; its outputs must equal the adapted (unmerged) model's in float32 (1e-5). HF PEFT adapter
folders come from the ``peft`` package (a test-only oracle)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model

TOLERANCE = 1e-5
IDS = torch.tensor([[5, 9, 3, 17, 42, 7, 11]])

# Loads the folder with transformers only (peftkit made unimportable), and writes its logits and state-dict keys.
PLAIN_LOAD = """
import sys, json, torch
sys.modules["peftkit"] = None  # any import of peftkit now raises ImportError
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
torch.save({"logits": logits, "keys": list(model.state_dict())}, sys.argv[3])
"""


def _plain_load(folder: Path, tmp_path: Path) -> dict:
    result_file = tmp_path / "plain.pt"
    command = [sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(IDS.tolist()), str(result_file)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(result_file)


def _base_folder(family: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(family).eval()
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return model, folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


SPECS = {
    "lora": {"method": "lora", "target": ["q_proj", "v_proj", "down_proj"], "r": 4},
    "dora": {"method": "dora", "target": ["q_proj", "o_proj"], "r": 4},
    "ia3": {"method": "ia3", "target": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
}


@pytest.mark.parametrize("method", sorted(SPECS))
def test_a_peftkit_adapter_merges_into_a_plain_folder(method, tmp_path) -> None:
    model, base = _base_folder("llama-tiny", tmp_path)
    peftkit.attach(model, {"adapters": {"task": [SPECS[method]]}})
    randomise_adapters(model, seed=3)
    expected = _logits(model)
    peftkit.save(model, tmp_path / "adapter")

    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    plain = _plain_load(tmp_path / "merged", tmp_path)
    assert (plain["logits"] - expected).abs().max() <= TOLERANCE
    assert not [k for k in plain["keys"] if "peftkit" in k]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert "peftkit" not in (tmp_path / "merged" / "config.json").read_text()


def test_a_hf_peft_adapter_merges_like_peft_merge_and_unload(tmp_path) -> None:
    peft = pytest.importorskip("peft", reason="the HF peft package (the oracle) is not installed")
    model, base = _base_folder("gpt2-tiny", tmp_path)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"])).eval()
    with torch.no_grad():
        for parameter in (p for p in peft_model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = _logits(peft_model.merge_and_unload())

    peftkit.export_merged(base, tmp_path / "adapter", tmp_path / "merged")
    assert (_plain_load(tmp_path / "merged", tmp_path)["logits"] - expected).abs().max() <= TOLERANCE


def test_only_the_named_adapters_are_merged(tmp_path) -> None:
    model, base = _base_folder("llama-tiny", tmp_path)
    peftkit.attach(model, {"adapters": {"kept": [SPECS["lora"]], "dropped": [{**SPECS["lora"], "r": 2}]}})
    randomise_adapters(model, seed=4)
    peftkit.save(model, tmp_path / "adapter")
    peftkit.activate(model, ["kept"])
    expected = _logits(model)

    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "m"), "--adapters", "kept"]) == 0
    assert (_plain_load(tmp_path / "m", tmp_path)["logits"] - expected).abs().max() <= TOLERANCE
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "n"), "--adapters", "nope"]) == 2
    assert not (tmp_path / "n").exists()


def test_a_tied_embedding_needs_untie(tmp_path, capsys) -> None:
    model, base = _base_folder("gpt2-tiny", tmp_path)
    peftkit.attach(model, {"adapters": {"emb": [{"method": "lora", "target": "transformer.wte", "r": 4}]}})
    randomise_adapters(model, seed=5)
    expected = _logits(model)
    peftkit.save(model, tmp_path / "adapter")

    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "tied")]) == 2
    assert "tied weights" in capsys.readouterr().err and not (tmp_path / "tied").exists()
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "untied"), "--untie"]) == 0
    assert (_plain_load(tmp_path / "untied", tmp_path)["logits"] - expected).abs().max() <= TOLERANCE
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False


def test_an_unmergeable_adapter_is_refused_before_the_base_is_read(tmp_path, capsys) -> None:
    model, _ = _base_folder("llama-tiny", tmp_path)
    peftkit.attach(model, {"adapters": {"soft": [{"method": "prompt", "target": "model.embed_tokens", "length": 2}]}})
    peftkit.save(model, tmp_path / "adapter")
    missing_base = tmp_path / "no-such-base"  # never opened: the refusal comes from the adapter's spec alone

    assert main(["merge", str(missing_base), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "adapter 'soft'" in err and "'prompt'" in err and "cannot be merged" in err
    assert not (tmp_path / "out").exists()


def test_bad_folders_are_messages(tmp_path, capsys) -> None:
    _, base = _base_folder("llama-tiny", tmp_path)
    assert main(["merge", str(base), str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not an adapter folder" in capsys.readouterr().err
    assert main(["merge", str(base), str(tmp_path), str(base)]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
