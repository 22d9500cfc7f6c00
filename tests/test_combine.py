"""peftkit.combine: weighted merging of adapters' weight updates into a new named adapter.

The rules are checked on plain tensors against hand-computed values; the model-level operation against ΔW
computed from the sources (linearity, the SVD optimum), on llama-tiny.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import peftkit
from peftkit.lifecycle.combine import combine_dare, combine_linear, combine_ties, dare_mask, trim, truncate
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model

TARGETS = ["q_proj", "k_proj", "v_proj"]  # llama-tiny: q (32 x 32), k and v (16 x 32)
IDS = torch.tensor([[3, 17, 42, 5, 99, 7]])


def lora(r: int, targets: list[str] = TARGETS, **fields) -> dict:
    return {"method": "lora", "target": targets, "r": r, **fields}


def model_with(seed: int = 0, **adapters: dict) -> torch.nn.Module:
    """llama-tiny with the given LoRA adapters attached and moved away from their initialisation."""
    torch.manual_seed(seed)
    model = build_model("llama-tiny").eval()
    peftkit.attach(model, {"adapters": {name: [entry] for name, entry in adapters.items()}})
    randomise_adapters(model, seed)
    return model


def deltas(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Module path -> the named adapter's ΔW there (float32)."""
    return {
        path: module.peftkit_adapters[name].delta_weight().detach()
        for path, module in model.named_modules()
        if hasattr(module, "peftkit_adapters") and name in module.peftkit_adapters
    }


def logits_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    peftkit.activate(model, name)
    with torch.no_grad():
        return model(IDS).logits


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual - expected).abs().max() / scale).item() <= rtol


# -- the rules on tensors --------------------------------------------------------------------------------------
TAU_1 = torch.tensor([3.0, -2.0, 0.5, 1.0])
TAU_2 = torch.tensor([-1.0, 4.0, 0.2, 2.0])


def test_trim_keeps_the_largest_magnitudes() -> None:
    assert torch.equal(trim(TAU_1, 0.5), torch.tensor([3.0, -2.0, 0.0, 0.0]))
    assert torch.equal(trim(TAU_1, 0.01), torch.tensor([3.0, 0.0, 0.0, 0.0]))  # at least one entry
    assert torch.equal(trim(TAU_1, 1.0), TAU_1)
    assert torch.equal(trim(torch.tensor([1.0, -1.0, 0.5]), 0.34), torch.tensor([1.0, -1.0, 0.0]))  # ties kept


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries() -> None:
    # trimmed to [3, -2, 0, 0] and [0, 4, 0, 2]; sum [3, 2, 0, 2]: entry 1 keeps 4 only, its -2 disagrees.
    assert torch.equal(combine_ties([TAU_1, TAU_2], [1.0, 1.0], density=0.5), torch.tensor([3.0, 4.0, 0.0, 2.0]))
    # nothing trimmed; all signs agree except entry 0, where 3 outvotes -1: disjoint means.
    expected = torch.tensor([3.0, 4.0, 0.35, 1.5])
    torch.testing.assert_close(combine_ties([TAU_1, TAU_2], [1.0, 1.0]), expected)


def test_ties_applies_the_weights_before_the_election() -> None:
    # w τ: [6, -4, 1, 2] and [1, -4, -0.2, -2]; sum [7, -8, 0.8, 0]: entry 3 cancels, so it is 0.
    expected = torch.tensor([3.5, -4.0, 1.0, 0.0])
    torch.testing.assert_close(combine_ties([TAU_1, TAU_2], [2.0, -1.0]), expected)


@given(weight=st.floats(-4, 4), density=st.floats(0.05, 1.0))
def test_ties_of_one_update_is_its_weighted_trim(weight, density) -> None:
    delta = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(combine_ties([delta], [weight], density), trim(delta * weight, density))


def test_dare_keeps_each_entry_with_probability_density_and_rescales_the_rest() -> None:
    delta = torch.arange(1.0, 13.0).reshape(3, 4)
    kept = dare_mask(delta.shape, 0.25, torch.Generator().manual_seed(3))
    expected = torch.where(kept, delta * 4.0, torch.zeros_like(delta)) * 0.5
    assert torch.equal(combine_dare([delta], [0.5], 0.25, torch.Generator().manual_seed(3)), expected)


def test_dare_masks_are_drawn_per_source_in_order() -> None:
    a, b = torch.ones(6, 6), torch.full((6, 6), 10.0)
    generator = torch.Generator().manual_seed(7)
    mask_a, mask_b = dare_mask(a.shape, 0.5, generator), dare_mask(b.shape, 0.5, generator)
    expected = (a * mask_a + b * mask_b) / 0.5
    assert torch.equal(combine_dare([a, b], [1.0, 1.0], 0.5, torch.Generator().manual_seed(7)), expected)


def test_dare_is_unbiased() -> None:
    delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    mean = sum(combine_dare([delta], [1.0], 0.3, generator) for _ in range(400)) / 400
    assert (mean - delta).abs().mean() < 0.1 * delta.abs().mean()


@given(weights=st.lists(st.floats(-3, 3), min_size=1, max_size=3))
def test_dare_at_density_one_is_linear(weights) -> None:
    updates = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(len(weights))]
    dare = combine_dare(updates, weights, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(dare, combine_linear(updates, weights))


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5, True])
def test_densities_outside_zero_one_are_refused(density) -> None:
    with pytest.raises(peftkit.SpecError, match="density"):
        trim(TAU_1, density)


@given(rank=st.integers(1, 12))
def test_truncation_is_the_best_approximation_of_its_rank(rank) -> None:
    matrix = torch.randn(6, 9, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    u, s, vh = truncate(matrix, rank)
    k = min(rank, 6)
    assert u.shape == (6, k) and s.shape == (k,) and vh.shape == (k, 9)
    singular = torch.linalg.svdvals(matrix)
    error = torch.linalg.matrix_norm(matrix - u @ torch.diag(s) @ vh)
    torch.testing.assert_close(error, singular[k:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)


@given(true_rank=st.integers(1, 6), rank=st.integers(1, 8), bound=st.integers(1, 8))
def test_a_rank_bound_gives_the_same_truncation_faster_or_falls_back(true_rank, rank, bound) -> None:
    generator = torch.Generator().manual_seed(true_rank)
    matrix = torch.randn(90, true_rank, generator=generator) @ torch.randn(true_rank, 70, generator=generator)
    u, s, vh = truncate(matrix, rank, rank_bound=bound)  # bound < true_rank: a wrong bound, the full SVD runs
    u_full, s_full, vh_full = truncate(matrix, rank)
    assert s.shape == s_full.shape
    k = min(rank, true_rank)  # beyond the true rank the singular vectors are arbitrary, their values ~0
    torch.testing.assert_close(s[:k], s_full[:k], rtol=1e-5, atol=1e-5)
    rebuilt, expected = u @ torch.diag(s) @ vh, u_full @ torch.diag(s_full) @ vh_full
    assert_relatively_close(rebuilt, expected, rtol=1e-4 if k < true_rank else 1e-5)


# -- combining adapters on a model -----------------------------------------------------------------------------
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 32), rslora=st.booleans())
def test_one_adapter_with_weight_one_returns_itself(r, alpha, rslora) -> None:
    model = model_with(a=lora(r, alpha=alpha, rslora=rslora))
    peftkit.combine(model, {"a": 1.0}, "copy")
    source, copy = deltas(model, "a"), deltas(model, "copy")
    assert source.keys() == copy.keys()
    for path, delta in source.items():
        assert_relatively_close(copy[path], delta)
        assert model.get_submodule(path).peftkit_adapters["copy"].rank == r
    assert_relatively_close(logits_of(model, "copy"), logits_of(model, "a"), rtol=1e-4)  # through 2 layers


@given(w_a=st.floats(-3, 3), w_b=st.floats(-3, 3), r_a=st.integers(1, 6), r_b=st.integers(1, 6))
def test_the_linear_combination_is_linear_in_the_weights(w_a, w_b, r_a, r_b) -> None:
    model = model_with(a=lora(r_a), b=lora(r_b, alpha=4.0))
    peftkit.combine(model, {"a": w_a, "b": w_b}, "ab")
    a, b, ab = deltas(model, "a"), deltas(model, "b"), deltas(model, "ab")
    for path in a:
        expected = w_a * a[path] + w_b * b[path]
        bound = (abs(w_a) * a[path].abs().max() + abs(w_b) * b[path].abs().max()).clamp_min(1e-12)
        assert ((ab[path] - expected).abs().max() / bound).item() <= 1e-5


def test_negative_weights_subtract() -> None:
    model = model_with(a=lora(4))
    peftkit.combine(model, {"a": 1.0}, "plus")
    peftkit.combine(model, {"a": -1.0}, "minus")
    for path, delta in deltas(model, "minus").items():
        assert_relatively_close(delta, -deltas(model, "plus")[path])
    with torch.no_grad(), peftkit.disabled(model):
        expected = model(IDS).logits
    peftkit.activate(model, ["plus", "minus"])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_a_chosen_rank_keeps_the_best_approximation_of_that_rank(rank) -> None:
    model = model_with(a=lora(4), b=lora(4))
    peftkit.combine(model, {"a": 0.7, "b": 0.3}, "ab", rank=rank)
    a, b, ab = deltas(model, "a"), deltas(model, "b"), deltas(model, "ab")
    for path in a:
        target = (0.7 * a[path] + 0.3 * b[path]).double()
        singular = torch.linalg.svdvals(target)
        assert torch.linalg.matrix_rank(ab[path].double(), rtol=1e-4) == rank
        error = torch.linalg.matrix_norm(target - ab[path].double())
        torch.testing.assert_close(error, singular[rank:].square().sum().sqrt(), rtol=1e-3, atol=1e-5)
        u, s, vh = torch.linalg.svd(target)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert_relatively_close(ab[path].double(), best, rtol=1e-4)


def test_the_default_rank_is_the_sum_of_ranks_capped_by_the_matrix() -> None:
    model = model_with(a=lora(10), b=lora(8))  # 18: fits q (32 x 32), capped at 16 on k and v (16 x 32)
    peftkit.combine(model, {"a": 1.0, "b": 1.0}, "ab")
    ranks = {path: model.get_submodule(path).peftkit_adapters["ab"].rank for path in deltas(model, "ab")}
    assert {path.rsplit(".", 1)[-1]: rank for path, rank in ranks.items()} == {"q_proj": 18, "k_proj": 16, "v_proj": 16}
    a, b, ab = deltas(model, "a"), deltas(model, "b"), deltas(model, "ab")
    for path in a:
        assert_relatively_close(ab[path], a[path] + b[path], rtol=1e-5)


def test_the_combination_is_a_new_active_trainable_adapter_and_the_sources_stay() -> None:
    model = model_with(a=lora(2), b=lora(3))
    before = {name: deltas(model, name) for name in ("a", "b")}
    peftkit.combine(model, {"a": 0.5, "b": 0.5}, "ab")
    assert peftkit.active_adapters(model) == ["a", "b", "ab"]
    adapter = model.get_submodule("model.layers.1.self_attn.q_proj").peftkit_adapters["ab"]
    assert adapter.lora_a.requires_grad and adapter.lora_b.requires_grad
    for name, was in before.items():
        assert all(torch.equal(deltas(model, name)[p], d) for p, d in was.items())


@pytest.mark.parametrize("how", ["ties", "dare"])
def test_ties_and_dare_on_a_model_match_the_rules_on_each_update(how) -> None:
    model = model_with(a=lora(3), b=lora(5))
    peftkit.combine(model, {"a": 1.0, "b": -0.5}, "c", how=how, density=0.4, seed=11, rank=16)
    a, b, c = deltas(model, "a"), deltas(model, "b"), deltas(model, "c")
    generator = torch.Generator().manual_seed(11)  # one generator, drawn module by module in attachment order
    for path in a:
        if how == "ties":
            expected = combine_ties([a[path], b[path]], [1.0, -0.5], 0.4)
        else:
            expected = combine_dare([a[path], b[path]], [1.0, -0.5], 0.4, generator)
        u, s, vh = truncate(expected, 16)
        assert_relatively_close(c[path], u @ torch.diag(s) @ vh, rtol=1e-4)


def test_dare_at_density_one_equals_linear_on_a_model() -> None:
    model = model_with(a=lora(3), b=lora(2))
    peftkit.combine(model, {"a": 0.3, "b": 0.9}, "linear")
    peftkit.combine(model, {"a": 0.3, "b": 0.9}, "dare", how="dare", density=1.0, seed=5)
    for path, delta in deltas(model, "linear").items():
        assert_relatively_close(deltas(model, "dare")[path], delta)


def test_dare_is_reproducible_from_its_seed() -> None:
    model = model_with(a=lora(3), b=lora(2))
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        peftkit.combine(model, {"a": 1.0, "b": 1.0}, name, how="dare", density=0.5, seed=seed)
    x, y, z = deltas(model, "x"), deltas(model, "y"), deltas(model, "z")
    assert all(torch.equal(x[p], y[p]) for p in x)
    assert not all(torch.equal(x[p], z[p]) for p in x)


def test_a_bf16_model_is_combined_in_float32() -> None:
    model = model_with(a=lora(4)).to(torch.bfloat16)
    peftkit.combine(model, {"a": 1.0}, "copy")
    adapter = model.get_submodule("model.layers.0.self_attn.q_proj").peftkit_adapters["copy"]
    assert adapter.lora_a.dtype == torch.bfloat16
    for path, delta in deltas(model, "a").items():
        assert_relatively_close(deltas(model, "copy")[path], delta, rtol=2e-2)


def test_the_combined_adapter_saves_and_loads(tmp_path) -> None:
    model = model_with(a=lora(4), b=lora(2))
    peftkit.combine(model, {"a": 0.6, "b": -0.4}, "ab", how="ties", density=0.5)
    peftkit.detach(model, ["a", "b"])
    peftkit.save(model, tmp_path)
    torch.manual_seed(0)
    loaded = peftkit.load(build_model("llama-tiny").eval(), tmp_path)
    assert list(peftkit.read_spec(tmp_path).adapters) == ["ab"]
    for path, delta in deltas(model, "ab").items():
        assert torch.equal(deltas(loaded, "ab")[path], delta)
    assert torch.equal(logits_of(loaded, "ab"), logits_of(model, "ab"))


# -- errors: clear, and the model is left as it was --------------------------------------------------------------
def names_of(model: torch.nn.Module) -> list[str]:
    return peftkit.active_adapters(model)


def test_unknown_adapter_names_are_listed() -> None:
    model = model_with(a=lora(2))
    with pytest.raises(peftkit.AttachError, match=r"no attached adapter named \['nope'\]; attached: \['a'\]"):
        peftkit.combine(model, {"a": 1.0, "nope": 1.0}, "c")
    assert names_of(model) == ["a"]


def test_a_method_that_is_not_combinable_is_refused() -> None:
    model = model_with(a=lora(2))
    peftkit.attach(model, {"adapters": {"bottleneck": [{"method": "houlsby", "bottleneck": 4}]}})
    with pytest.raises(peftkit.AttachError, match=r"cannot combine \[\('bottleneck', 'houlsby'\)\].*not combinable"):
        peftkit.combine(model, {"a": 1.0, "bottleneck": 1.0}, "c")
    assert names_of(model) == ["a", "bottleneck"]


def test_adapters_on_different_modules_are_refused_naming_the_difference() -> None:
    model = model_with(a=lora(2, ["q_proj", "v_proj"]), b=lora(2, ["q_proj", "k_proj"]))
    with pytest.raises(peftkit.AttachError, match=r"same modules.*'b' is not on 'model\.layers\.0\.self_attn\.v_proj'"):
        peftkit.combine(model, {"a": 1.0, "b": 1.0}, "c")
    with pytest.raises(peftkit.AttachError, match=r"only 'b' is on 'model\.layers\.0\.self_attn\.k_proj'"):
        peftkit.combine(model, {"a": 1.0, "b": 1.0}, "c")
    assert names_of(model) == ["a", "b"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"weights": {}}, "at least one"),
        ({"weights": {"a": float("nan")}}, "finite number"),
        ({"how": "mean"}, "linear, ties, dare"),
        ({"rank": 0}, "positive integer"),
        ({"how": "ties", "density": 0.0}, "density"),
        ({"into": "a"}, "already attached"),
        ({"into": "not a name"}, "adapter name"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(arguments, message) -> None:
    model = model_with(a=lora(2))
    call = {"weights": {"a": 1.0}, "into": "c", **arguments}
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.combine(model, call.pop("weights"), call.pop("into"), **call)
    assert names_of(model) == ["a"]


def test_a_meta_model_must_be_materialised_first() -> None:
    model = build_model("llama-tiny", meta=True)
    peftkit.attach(model, {"adapters": {"a": [lora(2)]}})
    with pytest.raises(peftkit.AttachError, match="meta device"):
        peftkit.combine(model, {"a": 1.0}, "c")
