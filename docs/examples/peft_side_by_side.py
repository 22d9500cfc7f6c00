"""The same LoRA fine-tuning step done with HF PEFT and with peftkit, then checkpoints carried both ways.

Run it: ``python docs/examples/peft_side_by_side.py`` (needs ``pip install peft``; tested in tests/test_peft_interop.py).
"""

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

torch.manual_seed(0)
base = LlamaForCausalLM(
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
)
ids = torch.randint(0, 128, (4, 16))

# --- HF PEFT: a wrapper model; the config lives in Python ---------------------------------------------------------
peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
peft_model.print_trainable_parameters()

# --- peftkit: the model stays itself; the same adapter is a spec (a dict here, YAML or JSON on disk) --------------
spec = {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 8, "alpha": 16}]}}
model = peftkit.attach(copy.deepcopy(base), spec)
print(peftkit.trainable_parameters(model))

# Start both from the same adapter values, take one identical AdamW step, and compare.
with torch.no_grad():
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad:
            path, factor = name.removeprefix("base_model.model.").rsplit(".lora_", 1)
            parameter.normal_(0, 0.02)
            ours[f"{path}.peftkit_adapters.default.lora_{factor[0].lower()}"].copy_(parameter)
for trained in (peft_model, model):
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    trained(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
with torch.no_grad():
    difference = (peft_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
print(f"after one step, max |logits difference| = {difference:.1e}")
assert difference < 1e-5

# --- checkpoints, both ways ---------------------------------------------------------------------------------------
folder = Path(tempfile.mkdtemp())
peft_model.save_pretrained(folder / "from-peft")  # adapter_config.json + adapter_model.safetensors
imported = peftkit.from_peft(copy.deepcopy(base), folder / "from-peft")  # attach + fill, all or nothing
peftkit.save(imported, folder / "peftkit")  # adapter.safetensors + spec.json

peftkit.to_peft(model, folder / "to-peft")  # what PEFT's tools read
reloaded = PeftModel.from_pretrained(copy.deepcopy(base), folder / "to-peft")
with torch.no_grad():
    assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
print("checkpoints carried both ways with equal outputs")
