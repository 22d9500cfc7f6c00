"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs_as_written(tmp_path, monkeypatch) -> None:
    text = README.read_text()
    spec_yaml = re.search(r"`spec.yaml`:\n\n```yaml\n(.*?)```", text, re.S).group(1)
    code = re.search(r"## Quickstart.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "spec.yaml").write_text(spec_yaml)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, fresh = namespace["model"], namespace["fresh"]
    assert (tmp_path / "ckpt" / "adapter.safetensors").is_file()
    assert not hasattr(model, "_peftkit_state") and hasattr(fresh, "_peftkit_state")


def test_writing_a_method_shows_the_tested_example_verbatim() -> None:
    docs = README.parent / "docs"
    assert (docs / "examples" / "scale_method.py").read_text() in (docs / "writing-a-method.md").read_text()


def test_the_variant_example_of_writing_a_method_runs_as_written() -> None:
    text = (README.parent / "docs" / "writing-a-method.md").read_text()
    code = re.search(r"## A variant of a registered method.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "writing-a-method.md", "exec"), namespace)
    import peftkit

    assert "lora-no-rules" not in peftkit.known_methods()  # registered for the check and the block only
    assert namespace["NoRulesLoRA"].config.model_fields["method"].default == "lora-no-rules"
