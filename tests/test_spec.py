"""The spec: dict/YAML/JSON round-trips, and every malformed spec is a SpecError naming the field."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftkit
from peftkit import Spec, SpecError

GOOD = {
    "adapters": {
        "task_a": [{"method": "lora", "target": ["q_proj", "v_proj"], "layers": "0-3,8", "r": 4, "alpha": 8}],
        "task_b": [{"method": "lora", "target": "re:.*mlp\\..*", "rslora": True, "init": "gaussian"}],
    },
    "trainable": ["lm_head"],
}


def test_dict_yaml_json_round_trip() -> None:
    spec = Spec.model_validate(GOOD)
    assert spec.adapters["task_a"][0].layers == [0, 1, 2, 3, 8]
    assert Spec.from_yaml(spec.to_yaml()) == spec
    assert Spec.from_json(spec.to_json()) == spec
    assert Spec.model_validate(spec.to_dict()) == spec
    assert Spec.model_validate(json.loads(spec.to_json())).to_dict() == spec.to_dict()


def test_from_file(tmp_path) -> None:
    spec = Spec.model_validate(GOOD)
    (tmp_path / "s.yaml").write_text(spec.to_yaml())
    (tmp_path / "s.json").write_text(spec.to_json())
    assert Spec.from_file(tmp_path / "s.yaml") == Spec.from_file(tmp_path / "s.json") == spec
    with pytest.raises(SpecError, match="unknown extension"):
        Spec.from_file(tmp_path / "s.txt")
    with pytest.raises(SpecError, match="cannot read"):
        Spec.from_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"method": "lora", "target": "x", "r": -1}, "adapters.a.0.r: Input should be greater than 0"),
        ({"method": "lora", "target": "x", "init": "xavier"}, "'kaiming', 'gaussian', 'pissa' or 'olora'"),
        ({"method": "lora", "target": "x", "layers": "3-1"}, "runs backwards"),
        ({"method": "lora", "target": "x", "layers": "a-b"}, "is not an index or a range"),
        ({"method": "lora", "target": "x", "layers": [-2]}, "negative"),
        ({"method": "lora", "target": "re:(", "r": 2}, "is not a regex peftkit runs: missing )"),
        ({"method": "lora", "target": "x", "rank": 2}, "adapters.a.0.rank: Extra inputs are not permitted"),
        ({"method": "lora", "target": "x", "r": "8"}, "adapters.a.0.r: Input should be a valid integer"),
        (
            {"method": "lorra", "target": "x"},
            "known methods: adalora, bitfit, boft, dora, houlsby, ia3, ln-tuning, loha, lokr, lora, lora-experts, oft,",
        ),
        ({"target": "x"}, "adapters.a.0.method: required"),
        ({"method": "lora"}, "adapters.a.0.target: Field required"),
    ],
)
def test_errors_name_the_field_and_the_allowed_values(entry, fragment) -> None:
    with pytest.raises(SpecError) as error:
        Spec.model_validate({"adapters": {"a": [entry]}})
    assert fragment in str(error.value)


def test_unsafe_yaml_is_refused() -> None:
    with pytest.raises(SpecError, match="not valid YAML"):
        Spec.from_yaml("adapters: !!python/object/apply:os.system ['echo hacked']")


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=6))
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10,
)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "method": st.one_of(st.sampled_from(["lora", "nope", ""]), _json),
        "target": st.one_of(st.sampled_from(["q", "re:(", "re:x+", ""]), st.lists(st.text(max_size=4)), _json),
        "layers": st.one_of(st.sampled_from(["0-3,8", "3-1", "-1", "x", "1,,2"]), st.lists(st.integers(-3, 9)), _json),
        "r": st.one_of(st.integers(-3, 9), _json),
        "alpha": st.one_of(st.floats(-2, 40), _json),
        "dropout": st.one_of(st.floats(-1, 2), _json),
        "init": st.one_of(st.sampled_from(["kaiming", "gaussian", "zeros"]), _json),
        "bogus": _json,
    },
)
_malformed = st.one_of(
    _json,
    st.fixed_dictionaries({"adapters": st.one_of(_json, st.dictionaries(st.text(max_size=5), st.lists(_entry)))}),
    st.fixed_dictionaries({"adapters": st.dictionaries(st.text(max_size=5), st.lists(_entry)), "trainable": _json}),
)


@settings(max_examples=max(settings.default.max_examples, 300))
@given(_malformed)
def test_any_input_validates_or_raises_a_peftkit_error(data) -> None:
    try:
        spec = Spec.model_validate(data)
    except SpecError as error:
        assert str(error).startswith("invalid spec")
        return
    # What validates is well-formed: it dumps and reloads to itself.
    assert Spec.model_validate(spec.to_dict()) == spec


@settings(max_examples=max(settings.default.max_examples, 100))
@given(st.text(max_size=80))
def test_any_yaml_or_json_text_validates_or_raises_a_peftkit_error(text) -> None:
    for loader in (Spec.from_yaml, Spec.from_json):
        with contextlib.suppress(SpecError):
            loader(text)


def test_public_exceptions_are_documented_builtins() -> None:
    assert issubclass(peftkit.SpecError, ValueError) and issubclass(peftkit.SpecError, peftkit.PeftkitError)
    assert issubclass(peftkit.TargetingError, peftkit.PeftkitError)
    assert issubclass(peftkit.CheckpointError, peftkit.PeftkitError)
