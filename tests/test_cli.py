"""The command line: plan, validate and methods, with errors as messages rather than tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peftkit.cli import main

SPEC = """
adapters:
  default:
    - method: lora
      target: [q_proj, v_proj]
      layers: "0-1,31"
      r: 8
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def test_plan_on_a_meta_7b_llama(spec_file, capsys) -> None:
    assert main(["plan", str(spec_file), "--model", "llama-7b-shape"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.31.self_attn.v_proj" in out and "6 adapted module(s); 393,216 adapter parameters" in out


def test_plan_errors_are_messages(spec_file, capsys) -> None:
    assert main(["plan", str(spec_file), "--model", "gpt2-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error:") and "closest:" in err and "Traceback" not in err
    assert main(["plan", str(spec_file), "--model", "no-such-model"]) == 2
    assert "neither a zoo name" in capsys.readouterr().err


def test_validate_and_methods(spec_file, tmp_path, capsys) -> None:
    assert main(["validate", str(spec_file), "--dump"]) == 0
    assert "rslora: false" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"adapters": {"x": [{"method": "lora", "target": "q", "r": 0}]}}')
    assert main(["validate", str(bad)]) == 2
    assert "adapters.x.0.r: Input should be greater than 0" in capsys.readouterr().err
    assert main(["methods"]) == 0
    assert "lora" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "peftkit", "methods"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "mergeable=True" in result.stdout
