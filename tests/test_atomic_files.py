"""A HF PEFT export killed at any instant leaves the old checkpoint or the new one, complete, and keeps the
folder's other files; a kill is simulated by raising KeyboardInterrupt before or after each step of the write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
import peftkit.testing
from peftkit import atomic
from peftkit.zoo import build_model

FILES = ("adapter_config.json", "adapter_model.safetensors")
STEPS = ("_keep_other_entries", "_fsync", "_exchange")


def exported(rank: int, seed: int, directory: Path) -> None:
    torch.manual_seed(0)
    model = peftkit.attach(
        build_model("llama-tiny").eval(), {"adapters": {"default": [{"method": "lora", "target": "q_proj", "r": rank}]}}
    )
    peftkit.testing.randomise_adapters(model, seed)
    peftkit.to_peft(model, directory)


def contents(directory: Path) -> tuple[bytes, ...]:
    return tuple((directory / name).read_bytes() for name in FILES)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[bytes, ...]]:
    root = tmp_path_factory.mktemp("references")
    exported(2, 1, root / "old")
    exported(4, 2, root / "new")
    return {"old": contents(root / "old"), "new": contents(root / "new")}


def prepared(folder: Path) -> Path:
    """The old checkpoint, in a folder that also holds the user's own files."""
    exported(2, 1, folder)
    (folder / "README.md").write_text("the user's notes")
    (folder / "extra").mkdir()
    (folder / "extra" / "tokenizer.json").write_text("{}")
    return folder


def count_steps(tmp_path, monkeypatch) -> int:
    folder, calls = prepared(tmp_path / "count"), [0]
    for step in STEPS:
        real = getattr(atomic, step)

        def counted(*args, _real=real, **kwargs):
            calls[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(atomic, step, counted)
    exported(4, 2, folder)
    monkeypatch.undo()
    return calls[0]


@pytest.mark.skipif(not atomic.FOLDERS_SWAP_ATOMICALLY, reason="this system cannot exchange folders atomically")
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_export_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(
    when, references, tmp_path, monkeypatch
) -> None:
    steps = count_steps(tmp_path, monkeypatch)
    assert steps >= 4
    outcomes = set()
    for killed_at in range(1, steps + 1):
        folder = prepared(tmp_path / f"{when}-{killed_at}")
        calls = [0]
        for step in STEPS:
            real = getattr(atomic, step)

            def dies(*args, _real=real, _calls=calls, _at=killed_at, **kwargs):
                _calls[0] += 1
                if _calls[0] == _at and when == "before":
                    raise KeyboardInterrupt
                result = _real(*args, **kwargs)
                if _calls[0] == _at and when == "after":
                    raise KeyboardInterrupt
                return result

            monkeypatch.setattr(atomic, step, dies)
        try:
            exported(4, 2, folder)
            outcomes.add("finished")
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        now = contents(folder)
        assert now in (references["old"], references["new"]), f"killed {when} step {killed_at}: files disagree"
        outcomes.add("old" if now == references["old"] else "new")
        assert (folder / "README.md").read_text() == "the user's notes"
        assert (folder / "extra" / "tokenizer.json").read_text() == "{}"
        exported(4, 2, folder)  # the next export cleans up whatever the killed one left beside the folder
        assert contents(folder) == references["new"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{folder.name}.")) == []
    assert {"old", "new"} <= outcomes


def test_an_export_to_a_new_folder_and_without_an_atomic_exchange_still_writes_both_files(
    references, tmp_path, monkeypatch
) -> None:
    exported(4, 2, tmp_path / "fresh")
    assert contents(tmp_path / "fresh") == references["new"]
    (tmp_path / "made").mkdir()
    assert (tmp_path / "fresh").stat().st_mode == (tmp_path / "made").stat().st_mode  # not mkdtemp's 0o700
    monkeypatch.setattr(atomic, "_renameat2", None)
    exported(2, 1, tmp_path / "fresh")
    assert contents(tmp_path / "fresh") == references["old"]


def test_an_export_to_a_path_that_is_a_file_is_a_checkpoint_error(tmp_path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(peftkit.CheckpointError, match="it is a file, not a folder"):
        exported(2, 1, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a folder"
