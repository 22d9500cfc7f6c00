"""LoRA-FA (``freeze_a: true``): A stays as initialised and only B trains. B takes the steps plain LoRA's B takes
from the same start, A is saved and reloads, the backward keeps fewer bytes, and the export is a plain LoRA."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model

TARGETS = ["c_attn", "c_proj", "c_fc"]
IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _model(freeze_a: bool):
    torch.manual_seed(0)
    model = build_model("gpt2-tiny").train()
    return peftkit.attach(
        model, {"adapters": {"a": [{"method": "lora", "target": TARGETS, "r": 4, "freeze_a": freeze_a}]}}
    )


def _saved_bytes(model) -> int:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(IDS, labels=IDS).loss.backward()
    return total


def test_b_takes_plain_loras_gradient_and_a_never_moves():
    frozen, plain = _model(True), _model(False)
    for adapter, twin in zip(get_state(frozen).attached, get_state(plain).attached, strict=True):
        assert torch.equal(adapter.module.lora_a, twin.module.lora_a) and not adapter.module.lora_a.requires_grad
        with torch.no_grad():
            for module in (adapter.module, twin.module):
                module.lora_b.normal_(generator=torch.Generator().manual_seed(1))
    for model in (frozen, plain):
        model(IDS, labels=IDS).loss.backward()
    for adapter, twin in zip(get_state(frozen).attached, get_state(plain).attached, strict=True):
        torch.testing.assert_close(adapter.module.lora_b.grad, twin.module.lora_b.grad, rtol=1e-5, atol=1e-7)
    assert peftkit.trainable_parameters(frozen).trainable < peftkit.trainable_parameters(plain).trainable


def test_the_backward_keeps_fewer_bytes_than_lora():
    assert _saved_bytes(_model(True)) < 0.85 * _saved_bytes(_model(False))


def _base():
    torch.manual_seed(0)
    return build_model("gpt2-tiny").eval()


def test_a_is_saved_and_reloads_and_exports_as_a_plain_lora(tmp_path):
    model = _model(True).eval()
    with torch.no_grad():
        for adapter in get_state(model).attached:
            adapter.module.lora_b.normal_(std=0.1)
            adapter.module.lora_a.normal_(std=0.1)  # not the A that attaching draws again: the file's must be used
        expected = model(IDS).logits
    peftkit.save(model, tmp_path / "ckpt")
    loaded = peftkit.load(_base(), tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected)
    peftkit.to_peft(model, tmp_path / "peft", "a")
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_base(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, expected, rtol=1e-5, atol=1e-5)
