"""copy.deepcopy of a model with adapters is an independent model: its hooks drive its own adapters and state.

Found by `peftkit compare`, which deep-copies a trained model to time a merged copy: hooks that closed over the
original's adapters kept scaling the copy's inputs after the copy had merged them (IA3 merged vs unmerged was 1.2
apart in the logits). Hooks are now partials and bound methods, which deepcopy rebinds to the copy.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS

EVERY_SITE_KIND = [  # weight, input-scaling, output, parallel (recorded sub-layer input), input embedding, attention
    {"method": "lora", "target": ["@query", "@value"], "r": 4, "layers": [0]},
    {"method": "ia3", "layers": [1]},
    {"method": "houlsby", "bottleneck": 8, "layers": [0]},
    {"method": "parallel", "bottleneck": 8, "layers": [1]},
    {"method": "prompt", "length": 3},
    {"method": "prefix", "length": 2, "layers": [1]},
]
MERGEABLE = [
    {"method": "lora", "target": ["@query"], "r": 4},
    {"method": "ia3"},
]


def _model(family: str, entries: list[dict]) -> torch.nn.Module:
    torch.manual_seed(0)
    adapters = {f"a{i}": [entry] for i, entry in enumerate(entries)}  # one named adapter each: hosts may repeat
    model = peftkit.attach(TINY_MODELS[f"{family}-tiny"]().eval(), {"adapters": adapters})
    randomise_adapters(model, seed=1)
    return model


def _out(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 11).reshape(2, 4)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_a_deep_copy_runs_its_own_adapters(family):
    original = _model(family, EVERY_SITE_KIND)
    before = _out(original)
    twin = copy.deepcopy(original)
    torch.testing.assert_close(_out(twin), before, rtol=0, atol=0)
    randomise_adapters(twin, seed=2)  # the copy's adapters change: only the copy's outputs may
    assert not torch.allclose(_out(twin), before)
    torch.testing.assert_close(_out(original), before, rtol=0, atol=0)
    peftkit.activate(twin, [])  # the copy's activation is the copy's
    torch.testing.assert_close(_out(original), before, rtol=0, atol=0)
    peftkit.detach(twin)
    torch.testing.assert_close(_out(original), before, rtol=0, atol=0)
    assert hasattr(original, "_peftkit_state") and not hasattr(twin, "_peftkit_state")


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_merging_a_deep_copy_keeps_its_outputs_and_leaves_the_original_alone(family):
    original = _model(family, MERGEABLE)
    before = _out(original)
    twin = peftkit.merge(copy.deepcopy(original))
    torch.testing.assert_close(_out(twin), before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_out(original), before, rtol=0, atol=0)
