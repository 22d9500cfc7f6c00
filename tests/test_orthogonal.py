"""OFT and BOFT beyond the conformance suite: the factored rotation against dense matrices built from PEFT's own
butterfly permutations (the oracle), the Cayley maps against PEFT's, the rotations' orthogonality, the shapes that are
refused at plan, COFT's constraint, the block dropout, and how a rotation of the input composes with other adapters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model

orthogonal = pytest.importorskip("peftkit_methods.orthogonal")
boft = pytest.importorskip("peftkit_methods.boft")


def _attached(entry: dict, d_in: int = 32, d_out: int = 12, dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).to(dtype)
    peftkit.attach(model, {"adapters": {"default": [{"target": "0", **entry}]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model, adapter


def _peft_butterfly_matrix(adapter, features: int, size: int) -> torch.Tensor:
    """M = B_m ··· B_1 as PEFT builds it: its permutations (block_butterfly_perm, perm2mat) and dense products."""
    layer = pytest.importorskip("peft.tuners.boft.layer")
    rotations = [blocks for _, blocks in adapter.factors()]
    count, m = features // size, len(rotations)
    matrix = torch.eye(features, dtype=torch.float64)
    for i, blocks in enumerate(rotations):
        perm = layer.BOFTLayer.block_butterfly_perm(None, features, count // 2**i, size // 2, m - 1)
        p = layer.BOFTLayer.perm2mat(None, perm).double()
        matrix = p @ torch.block_diag(*blocks) @ p.t() @ matrix
    return matrix


@given(
    size=st.sampled_from([2, 4]),
    factors=st.integers(1, 3),
    extra=st.integers(0, 1),
    seed=st.integers(0, 1000),
)
def test_the_butterfly_chain_equals_peft_dense_product(size, factors, extra, seed):
    features = size * 2 ** (factors - 1) * (1 + extra)
    torch.manual_seed(seed)
    model, adapter = _attached({"method": "boft", "block_size": size, "butterfly_factors": factors}, features)
    matrix = _peft_butterfly_matrix(adapter, features, size)
    x = torch.randn(3, features, dtype=torch.float64)
    torch.testing.assert_close(adapter.transform_input(x), x @ matrix, rtol=1e-10, atol=1e-10)
    weight = model[0].weight.detach().clone()
    expected = (x @ matrix @ weight.t()) * adapter.scale.detach() + model[0].bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
        peftkit.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
        peftkit.unmerge(model)
    torch.testing.assert_close(model[0].weight, weight, rtol=1e-12, atol=1e-12)


def test_butterfly_permutations_equal_peft_for_many_layouts():
    layer = pytest.importorskip("peft.tuners.boft.layer")
    for size in (2, 4, 6, 8):
        for factors in (2, 3, 4):
            for runs in (1, 2, 3):
                features = size * 2 ** (factors - 1) * runs
                count = features // size
                for i in range(1, factors):
                    theirs = layer.BOFTLayer.block_butterfly_perm(None, features, count // 2**i, size // 2, factors - 1)
                    assert torch.equal(boft.butterfly_permutation(features, size, i), theirs)


@pytest.mark.parametrize("terms", [None, 1, 2, 3, 4, 5, 6, 9])
def test_cayley_maps_equal_peft_oft_rotation(terms):
    layer = pytest.importorskip("peft.tuners.oft.layer")
    theirs = layer.OFTRotationModule(3, 6, 4, 12, use_cayley_neumann=terms is not None, num_cayley_neumann_terms=terms)
    vector = torch.randn(3, 6, dtype=torch.float64) * 0.3
    skew = theirs._pytorch_skew_symmetric(vector, 4)
    expected = theirs._cayley_batch(vector, 4, terms is not None, terms or 5)
    torch.testing.assert_close(orthogonal.cayley(skew, terms), expected, rtol=1e-12, atol=1e-12)


@given(size=st.integers(2, 8), seed=st.integers(0, 1000))
def test_the_exact_cayley_map_gives_rotations(size, seed):
    generator = torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rotation = orthogonal.cayley(generator - generator.transpose(-1, -2), None)
    eye = torch.eye(size, dtype=torch.float64).expand_as(rotation)
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), eye, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"method": "oft", "block_size": 5}, r"OFT block_size 5 does not divide the host's 32 input features; use one"),
        (
            {"method": "oft", "blocks": 3},
            r"OFT blocks 3 does not divide the host's 32 input features; use one of 1, 2, 4, 8",
        ),
        ({"method": "boft", "block_size": 3}, r"BOFT block_size 3 does not divide"),
        ({"method": "boft", "block_size": 8, "butterfly_factors": 4}, r"divisible by 8; here 4 blocks of 8"),
    ],
)
def test_block_layouts_that_do_not_fit_are_refused_at_plan_by_name(entry, message):
    model = build_model("llama-tiny")  # 32 wide
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.attach(model, {"adapters": {"default": [{"target": "q_proj", **entry}]}})
    assert get_state(model) is None and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_block_size_and_blocks_together_are_refused(method):
    with pytest.raises(peftkit.PeftkitError, match="give block_size or blocks, not both"):
        peftkit.Spec.model_validate(
            {"adapters": {"a": [{"method": method, "target": "x", "block_size": 4, "blocks": 8}]}}
        )


def test_coft_keeps_each_generator_within_its_radius_while_training():
    model, adapter = _attached({"method": "oft", "block_size": 4, "coft": True, "eps": 1e-3})
    optimizer = torch.optim.SGD(adapter.parameters(), lr=10.0)
    for _ in range(3):
        model(torch.randn(5, 32, dtype=torch.float64)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model(torch.randn(1, 32, dtype=torch.float64))  # each use projects first
        radius = 1e-3 / adapter.skew.shape[0] ** 0.5
        assert (adapter.skew.norm(dim=1) * 2**0.5 <= radius * (1 + 1e-9)).all()


@pytest.mark.parametrize(("method", "field"), [("oft", "module_dropout"), ("boft", "dropout")])
def test_block_dropout_acts_in_training_only(method, field):
    _, adapter = _attached({"method": method, "block_size": 4, field: 0.5})
    x = torch.randn(2, 32, dtype=torch.float64)
    adapter.eval()
    assert torch.equal(adapter.transform_input(x), adapter.transform_input(x))
    adapter.train()
    kept = adapter.transform_input(x).reshape(2, 8, 4) == x.reshape(2, 8, 4)
    assert kept.all(dim=(0, 2)).sum() == 4  # half of the 8 blocks pass their input through unrotated


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_a_rotation_is_composed_by_stack_only(method):
    spec = {
        "adapters": {"rot": [{"method": method, "target": "q_proj"}], "lora": [{"method": "lora", "target": "q_proj"}]},
        "compose": [{"rule": "sum", "adapters": ["rot", "lora"]}],
    }
    with pytest.raises(
        peftkit.PeftkitError, match=rf"'{method}' .* cannot be composed by 'sum'; it supports \['stack'\]"
    ):
        peftkit.attach(build_model("llama-tiny"), spec)
    spec["compose"][0]["rule"] = "stack"
    peftkit.attach(build_model("llama-tiny"), spec)


@pytest.mark.parametrize("rotation_first", [True, False])
def test_a_rotation_and_lora_at_one_host_merge_to_what_they_compute_unmerged(rotation_first):
    """Unmerged the host computes (W + s B A) Rᵀ x: the merge takes LoRA first whatever the attach order, and
    merging the rotation alone, or unmerging LoRA alone under it, is refused."""
    adapters = [("rot", {"method": "oft", "block_size": 8}), ("lora", {"method": "lora", "r": 2})]
    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).double()
    for name, entry in adapters if rotation_first else adapters[::-1]:
        peftkit.attach(model, {"adapters": {name: [{"target": "0", **entry}]}})
    with torch.no_grad():
        for adapter in get_state(model).attached:
            for parameter in adapter.module.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
    x = torch.randn(4, 32, dtype=torch.float64)
    weight = model[0].weight.detach().clone()
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(
            peftkit.PeftkitError, match=r"changes its host's input, which the active adapters \['lora'\]"
        ):
            peftkit.merge(model, ["rot"])
        peftkit.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
        with pytest.raises(peftkit.PeftkitError, match=r"input transform\(s\) \['rot'\]"):
            peftkit.unmerge(model, ["lora"])
        peftkit.unmerge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model[0].weight, weight, rtol=1e-10, atol=1e-10)


def test_oft_on_a_quantized_host_rotates_its_input_and_refuses_to_merge():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    host = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    model = torch.nn.Sequential(host)
    peftkit.attach(model, {"adapters": {"default": [{"method": "oft", "target": "0", "block_size": 16}]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        adapter.skew.normal_(std=0.2)
    x = torch.randn(3, 64)
    with torch.no_grad():
        with peftkit.disabled(model):
            expected = model(adapter.transform_input(x))
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(peftkit.PeftkitError, match="cannot merge"):
        peftkit.merge(model)
