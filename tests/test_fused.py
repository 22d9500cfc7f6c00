"""The fused path: a linear host's product and a low-rank update in one autograd function (peftkit/sites/fused.py),
chosen per call by the core (peftkit/lifecycle/fused_forward.py), must compute what the hook path computes."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.sites.fused import LowRankLinear
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS


@contextlib.contextmanager
def counting_fused_calls() -> Iterator[list[int]]:
    """How many times the fused function ran inside the block."""
    calls = [0]
    forward = LowRankLinear.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    with mock.patch.object(LowRankLinear, "forward", staticmethod(counting)):
        yield calls


@pytest.fixture
def fused_calls():
    with counting_fused_calls() as calls:
        yield calls


def outputs_and_gradients(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    model.zero_grad()
    out = model(x)
    (out * weight).sum().backward()
    trained = [p.grad for p in model.parameters() if p.requires_grad]
    return [out.detach(), x.grad, *trained]


@given(
    method=st.sampled_from(["lora", "dora"]),
    host=st.sampled_from(["linear", "conv1d"]),
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 6),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    bias=st.booleans(),
    freeze_a=st.booleans(),
    rslora=st.booleans(),
    second=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_outputs_and_gradients_equal_the_hook_path(
    method, host, d_in, d_out, r, lead, bias, freeze_a, rslora, second, seed
):
    """fp32, 1e-6 relative to the largest value, for LoRA and DoRA (which rescales the fused output); with ``second`` a second adapter on the host runs on the hook path
    after the fused one, adding into the fused function's output in place."""
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias) if host == "linear" else Conv1D(d_out, d_in)
    model = nn.Sequential(layer)
    adapters = {"a": [{"method": method, "target": ["0"], "r": r, "freeze_a": freeze_a, "rslora": rslora}]}
    if second:
        adapters["b"] = [{"method": "lora", "target": ["0"], "r": 2}]
    peftkit.attach(model, {"adapters": adapters})
    randomise_adapters(model)
    x = torch.randn(*lead, d_in)
    weight = torch.randn(*lead, d_out)
    with counting_fused_calls() as calls:
        fused = outputs_and_gradients(model, x, weight)
    assert calls[0] == 1
    with peftkit.unfused():
        hooks = outputs_and_gradients(model, x, weight)
    for got, want in zip(fused, hooks, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * max(want.abs().max().item(), 1e-3))


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
def test_a_training_step_is_fused_and_equals_the_hook_path_in_float64(family, fused_calls):
    torch.manual_seed(0)
    model = TINY_MODELS[family]().double()
    target = ["c_attn", "c_proj", "c_fc"] if family == "gpt2-tiny" else ["q_proj", "v_proj", "up_proj", "down_proj"]
    peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": target, "r": 4}]}})
    randomise_adapters(model)
    ids = torch.randint(0, 50, (2, 7))

    def step() -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    fused = step()
    hosts = len(
        peftkit.plan(model.__class__(model.config), {"adapters": {"a": [{"method": "lora", "target": target}]}}).rows
    )
    assert fused_calls[0] == hosts  # every adapted host ran fused
    with peftkit.unfused():
        hooks = step()
    assert fused_calls[0] == hosts  # and none inside unfused()
    for got, want in zip(fused, hooks, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        model(input_ids=ids)
    assert fused_calls[0] == hosts, "without autograd the hook path is used"


def _model_with_lora(**entry) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": ["0", "2"], "r": 2, **entry}]}})
    randomise_adapters(model)
    return model


@pytest.mark.parametrize(
    "situation",
    ["dropout", "trainable host", "merged", "disabled", "routed", "composed", "inactive"],
)
def test_what_the_fused_function_does_not_cover_takes_the_hook_path(situation, fused_calls):
    model = _model_with_lora(dropout=0.1 if situation == "dropout" else 0.0)
    if situation == "trainable host":
        model[0].weight.requires_grad_(True)
    if situation == "merged":
        peftkit.merge(model)
    if situation == "inactive":
        peftkit.activate(model, [])
    if situation == "composed":
        peftkit.attach(model, {"adapters": {"b": [{"method": "lora", "target": ["0"], "r": 2}]}})
        peftkit.add_rule(model, {"rule": "average", "adapters": ["a", "b"], "weights": [0.5, 0.5]})
    x = torch.randn(3, 8, requires_grad=True)  # a backward exists even where no adapter runs
    if situation == "disabled":
        with peftkit.disabled(model):
            model(x).sum().backward()
    elif situation == "routed":
        with peftkit.route(model, ["a", None, "a"]):
            model(x).sum().backward()
    else:
        model(x).sum().backward()
    expected = 1 if situation == "trainable host" else 0  # the other host (2) still fuses
    assert fused_calls[0] == expected


def test_a_host_whose_forward_someone_else_replaced_keeps_it(fused_calls):
    """accelerate's device and offload hooks replace ``module.forward`` on the instance; that forward must run."""
    model = nn.Sequential(nn.Linear(8, 8))
    seen = []
    original = model[0].forward

    def their_forward(x):
        seen.append(x.shape)
        return original(x)

    model[0].forward = their_forward
    peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": ["0"], "r": 2}]}})
    model(torch.randn(2, 8)).sum().backward()
    assert seen and fused_calls[0] == 0
    peftkit.detach(model)
    assert model[0].forward is their_forward


def test_detach_and_failed_attach_leave_the_hosts_class_as_it_was(monkeypatch):
    model = _model_with_lora()
    assert type(model[0]) is not nn.Linear and isinstance(model[0], nn.Linear)
    assert type(model[0]).__name__ == "Linear" and "forward" not in model[0].__dict__
    peftkit.detach(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear

    def fail(*args, **kwargs):
        raise RuntimeError("a failure after every host was installed")

    monkeypatch.setattr("peftkit.lifecycle.attach._add_gates", fail)
    with pytest.raises(RuntimeError, match="after every host"):
        peftkit.attach(model, {"adapters": {"a": [{"method": "lora", "target": ["0", "2"], "r": 2}]}})
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_a_deep_copy_fuses_its_own_adapters(fused_calls):
    model = _model_with_lora()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            if p.requires_grad:
                p.mul_(2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want_model, want_clone = model(x), clone(x)
    assert fused_calls[0] == 0
    torch.testing.assert_close(model(x).detach(), want_model)
    torch.testing.assert_close(clone(x).detach(), want_clone)
    assert fused_calls[0] == 4


def test_a_fused_training_step_compiles_without_graph_breaks():
    model = _model_with_lora()
    x = torch.randn(6, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: model(x).pow(2).sum())()
    assert explanation.graph_break_count == 0


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward, the model's own tensors left out."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    return sum(seen.values())


def test_adapters_on_one_host_keep_one_copy_of_its_input():
    """The fused adapter and one beside it on the hook path save the same input tensor, not a copy each: a second
    adapter costs its r-wide product and its B, not another (tokens, in_features) input."""
    torch.manual_seed(0)
    d, tokens = 64, 256
    one = nn.Sequential(nn.Linear(d, d))
    two = copy.deepcopy(one)
    peftkit.attach(one, {"adapters": {"a": [{"method": "lora", "target": ["0"], "r": 4}]}})
    entry = {"method": "lora", "target": ["0"], "r": 4}
    peftkit.attach(two, {"adapters": {"a": [dict(entry)], "b": [dict(entry)]}})
    x = torch.randn(tokens, d)
    extra = _saved_bytes(two, x) - _saved_bytes(one, x)
    assert 0 < extra < x.numel() * x.element_size() / 4


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_under_autocast_the_fused_step_computes_what_autocast_computes_on_the_hook_path(method, fused_calls):
    """bf16 autocast over an fp32 model (``peftkit compare --dtype bf16``): the fused function gets every operand in
    bf16, as autocast gives them to the host's ``F.linear`` and the adapter's products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
    peftkit.attach(model, {"adapters": {"a": [{"method": method, "target": ["0", "2"], "r": 4}]}})
    randomise_adapters(model)
    x = torch.randn(5, 7, 32)

    def step() -> list[torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().pow(2).sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    fused = step()
    assert fused_calls[0] == 2 and fused[0].dtype == torch.bfloat16
    with peftkit.unfused():
        hooks = step()
    for got, want in zip(fused, hooks, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * max(want.abs().max().item(), 1e-3))


def test_detach_keeps_a_forward_that_wrapped_the_fused_one(fused_calls):
    """accelerate's dispatch after attach wraps the forward it finds (ours); detach must not take theirs away."""
    model = _model_with_lora()
    ours = model[0].forward
    calls = []

    def theirs(x):
        calls.append(1)
        return ours(x)

    model[0].forward = theirs
    peftkit.detach(model)
    assert model[0].forward is theirs
    x = torch.randn(2, 8, requires_grad=True)
    torch.testing.assert_close(model(x), model[2](torch.tanh(nn.functional.linear(x, model[0].weight, model[0].bias))))
    assert calls and fused_calls[0] == 0


def test_a_data_parallel_replica_runs_its_own_weights():
    """nn.DataParallel's replicas copy a module's ``__dict__``; the forward is the class's, so it runs the replica."""
    model = _model_with_lora()
    host = model[0]
    replica = host._replicate_for_data_parallel()
    replica._parameters = dict(host._parameters)
    replica.weight = nn.Parameter(host.weight.detach() * 2, requires_grad=False)
    x = torch.randn(3, 8, requires_grad=True)
    lora = host.peftkit_adapters["a"]
    want = nn.functional.linear(x, replica.weight, host.bias) + lora.scaling * x @ lora.lora_a.t() @ lora.lora_b.t()
    torch.testing.assert_close(replica(x), want)


def test_a_pickled_model_runs_and_detaches_like_the_original():
    import pickle

    model = _model_with_lora()
    x = torch.randn(3, 8, requires_grad=True)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(x), model(x))
    peftkit.detach(clone)
    assert type(clone[0]) is nn.Linear


def test_the_adapters_are_applied_once_whatever_changes_after_the_hosts_forward(fused_calls):
    """The fuse-or-not decision is taken once per call: a wrapper that changes what ``fuses`` would answer after the
    host's forward (as an offloading hook moves the weight away) cannot make the update count twice."""
    model = _model_with_lora()
    x = torch.randn(3, 8, requires_grad=True)
    with peftkit.unfused():
        want = model(x).detach()
    ours = model[0].forward

    def offloading(*args):
        out = ours(*args)
        model[0].weight.requires_grad_(True)  # the host would no longer fuse
        return out

    model[0].forward = offloading
    got = model(x)
    model[0].weight.requires_grad_(False)
    assert fused_calls[0] == 2
    torch.testing.assert_close(got.detach(), want)


def test_a_second_derivative_through_the_fused_path_equals_the_hook_paths(fused_calls):
    """create_graph=True (MAML, Hessian-vector products): the fused backward is then made of recorded ops, with
    ``x Aᵀ`` recomputed from the saved input."""
    model = _model_with_lora()
    x = torch.randn(3, 8, requires_grad=True)
    trained = [p for p in model.parameters() if p.requires_grad]

    def second_order() -> list[torch.Tensor]:
        grads = torch.autograd.grad(model(x).pow(2).sum(), trained, create_graph=True)
        return list(torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [*trained, x]))

    fused = second_order()
    assert fused_calls[0] == 2
    with peftkit.unfused():
        hooks = second_order()
    for got, want in zip(fused, hooks, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_second_derivative_with_a_frozen_and_no_saved_input_is_refused_by_name():
    model = _model_with_lora(freeze_a=True)
    x = torch.randn(3, 8, requires_grad=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match=r"frozen first factor.*peftkit.unfused"):
        torch.autograd.grad(model(x).pow(2).sum(), trained, create_graph=True)


def test_torch_func_transforms_and_forward_mode_take_the_hook_path(fused_calls):
    model = _model_with_lora()
    x = torch.randn(3, 8)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(parameters):
        return torch.func.functional_call(model, parameters, (x,)).pow(2).sum()

    grads = torch.func.grad(loss)(trained)
    model(x).pow(2).sum().backward()
    for name, parameter in trained.items():
        torch.testing.assert_close(grads[name], parameter.grad)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        assert forward_ad.unpack_dual(model(dual)).tangent is not None
    assert fused_calls[0] == 2  # the eager step's two hosts; none under torch.func or forward-mode AD
