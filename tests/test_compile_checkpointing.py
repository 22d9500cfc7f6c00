"""torch.compile over unmerged adapters without graph breaks, and gradient checkpointing with every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS


@pytest.mark.parametrize("host", ["linear", "conv1d"])
def test_unmerged_lora_with_several_active_adapters_compiles_fullgraph(host):
    torch.manual_seed(0)
    layer = (lambda i, o: nn.Linear(i, o)) if host == "linear" else (lambda i, o: Conv1D(o, i))
    model = nn.Sequential(layer(16, 32), nn.GELU(), layer(32, 16)).eval()
    spec = {
        "adapters": {
            "a": [{"method": "lora", "target": ["0", "2"], "r": 4}],
            "b": [{"method": "lora", "target": ["0"], "r": 2, "rslora": True}],
        }
    }
    peftkit.attach(model, spec)
    randomise_adapters(model)
    x = torch.randn(3, 5, 16)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), eager, rtol=1e-6, atol=1e-6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_training_step_matches_eager_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": ["0", "2"], "r": 2}]}})
    randomise_adapters(model)
    x = torch.randn(6, 8)
    model(x).pow(2).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).pow(2).sum().backward()
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)


METHODS = {
    "lora": {"method": "lora", "target": ["@query", "@value"], "r": 4},
    "ia3": {"method": "ia3"},
    "houlsby": {"method": "houlsby", "bottleneck": 4},
    "pfeiffer": {"method": "pfeiffer", "bottleneck": 4},
    "parallel": {"method": "parallel", "bottleneck": 4},
    "prefix": {"method": "prefix", "length": 3, "reparametrize": True},
    "prompt": {"method": "prompt", "length": 3},
    "ptuning": {"method": "ptuning", "length": 3, "encoder": "lstm", "encoder_hidden": 8},
}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_gives_equal_gradients(family, method):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TINY_MODELS[f"{family}-tiny"]()
        peftkit.attach(model, {"adapters": {"a": [METHODS[method]]}})
        randomise_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))
        out = model(input_ids=ids)[0]
        out.float().pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(g is not None for g in plain.values())
    for name, grad in plain.items():
        assert (grad is None) == (checkpointed[name] is None), name
        if grad is not None:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)
