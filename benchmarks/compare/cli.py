"""`peftkit compare`: command-line options, experiment overrides, and the run from end to end.

``peftkit/cli.py`` wires the subcommand to :func:`configure_parser` and :func:`run`; this module also runs
on its own: ``python -m peftkit_benchmarks.compare.cli --steps 3 --seeds 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

import yaml
from peftkit_benchmarks.compare import data, peers, tasks
from peftkit_benchmarks.compare.experiment import (
    DEFAULT_EXPERIMENT,
    Experiment,
    ExperimentError,
    experiment_for_task,
    load_experiment,
)
from peftkit_benchmarks.compare.task_config import SHIPPED_TASKS, TaskError
from pydantic import ValidationError


def seeds_option(value: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` names them."""
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,5,7), not {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return list(range(count))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fine-tune a real pretrained model with full fine-tuning and PEFT methods under the same budget, "
        "on a shipped task or your own data (docs/benchmarks.md), and report the task's metric, trainable parameters, checkpoint size, memory, step time and latency side by side."
    )
    parser.add_argument(
        "--experiment", metavar="PATH", help=f"experiment YAML file or shipped name (default: {DEFAULT_EXPERIMENT})"
    )
    parser.add_argument(
        "--task",
        choices=list(SHIPPED_TASKS),
        help="run the shipped experiment for this task (with --experiment: replace its task)",
    )
    parser.add_argument(
        "--methods",
        metavar="ARM,...|all",
        help="arms to run, by name; `all`: every arm of the file (default: the file's default_arms, else all)",
    )
    parser.add_argument("--steps", type=int, metavar="N", help="training steps per arm (overrides the file)")
    parser.add_argument("--seeds", type=seeds_option, metavar="N|LIST", help="seed count (3) or list (0,5,7)")
    parser.add_argument("--train-size", type=int, metavar="N", help="training examples (overrides the file)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 = autocast compute with fp32 weights and optimizer state",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads per worker (default: torch's)")
    parser.add_argument(
        "--eval-split",
        choices=["test", "validation"],
        default="test",
        help="score on the held-out test split (default) or on validation, for tuning an experiment",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        dest="extra_arms",
        metavar="NAME=SPEC[:LR]",
        help="add an arm from a peftkit spec file (YAML or JSON) without editing the experiment; LR defaults to the "
        "learning rate of the experiment's first adapter arm (repeatable)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="redo every run, discarding those kept in OUT/runs by an earlier invocation",
    )
    parser.add_argument("--list", action="store_true", help="list the shipped experiments and their arms, and exit")
    parser.add_argument("--peer", choices=["peft"], help="also run HF PEFT's LoRA on each LoRA arm's spec")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any experiment field by its dotted path, e.g. --set budget.latency_repeats=3 "
        "--set arms.1.lr=2e-3 (VALUE is read as YAML)",
    )
    parser.add_argument("--out", type=Path, default=Path("compare-out"), help="output folder (default: compare-out)")


def set_dotted(raw: dict, assignment: str) -> None:
    """Apply ``a.b.0.c=VALUE`` to the experiment's plain-data form (list items by index)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ExperimentError(f"--set {assignment!r}: write KEY=VALUE, e.g. budget.steps=10")
    *parents, last = key.split(".")
    node = raw
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    except (KeyError, IndexError, ValueError, TypeError):
        raise ExperimentError(f"--set {assignment!r}: {key!r} is not a field of this experiment") from None


def resolve_experiment(args: argparse.Namespace) -> Experiment:
    """The experiment file with the command line's overrides applied (and validated again)."""
    if args.experiment:
        experiment = load_experiment(args.experiment)
    else:
        experiment = load_experiment(experiment_for_task(args.task) if args.task else DEFAULT_EXPERIMENT)
    raw = experiment.model_dump(mode="json")
    if args.task and args.experiment:  # the shipped task's data, with the file's sizes
        kept = ("train_size", "max_length", "split_seed", "eval_size")
        raw["task"] = {"name": args.task, **{key: raw["task"][key] for key in kept}}
    if args.steps is not None:
        raw["budget"]["steps"] = args.steps
    if args.seeds is not None:
        raw["budget"]["seeds"] = args.seeds
    if args.train_size is not None:
        raw["task"]["train_size"] = args.train_size
    for override in args.overrides:
        set_dotted(raw, override)
    wanted = None
    if args.methods and args.methods.strip() != "all":
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    elif not args.methods and raw.get("default_arms"):
        wanted = raw["default_arms"]
    if wanted is not None:
        known = [arm["name"] for arm in raw["arms"]]
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise ExperimentError(f"--methods: no arm named {unknown} in {experiment.name}; arms: {known}")
        raw["arms"] = [arm for arm in raw["arms"] if arm["name"] in wanted]
        raw["default_arms"] = None
    raw["arms"] += [arm_from_file(option, raw["arms"]) for option in args.extra_arms]
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as error:
        raise ExperimentError(f"{experiment.name} with the command-line overrides: {error}") from None
    if args.peer == "peft":
        if peers.peft_available():
            twins = peers.peer_arms(experiment.arms)
            if not twins:
                print("--peer peft: no arm with a single LoRA adapter to mirror; nothing added", file=sys.stderr)
            experiment = experiment.model_copy(update={"arms": [*experiment.arms, *twins]})
        else:
            print(
                "--peer peft: the `peft` package is not installed, so its arms are skipped "
                "(pip install peft to include them)",
                file=sys.stderr,
            )
    return experiment


def arm_from_file(option: str, arms: list[dict]) -> dict:
    """``NAME=SPEC[:LR]`` as an arm: the spec file read (and validated) by peftkit, the learning rate given or the
    experiment's first adapter arm's (said on stderr, since it was not written down)."""
    import peftkit

    name, sep, rest = option.partition("=")
    if not sep or not name or not rest:
        raise ExperimentError(
            f"--arm {option!r}: write NAME=SPEC.yaml or NAME=SPEC.yaml:LR, e.g. lora16=lora16.yaml:5e-4"
        )
    path, lr = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon:
        with contextlib.suppress(ValueError):  # else the colon is part of the path
            path, lr = head, float(tail)
    try:
        spec = peftkit.Spec.from_file(path).to_dict()
    except (peftkit.PeftkitError, OSError) as error:
        raise ExperimentError(f"--arm {option!r}: {error}") from None
    if lr is None:
        adapter_arms = [arm for arm in arms if arm.get("spec") is not None]
        if not adapter_arms:
            raise ExperimentError(
                f"--arm {option!r}: the experiment has no adapter arm to take a learning rate from; add :LR"
            )
        lr = adapter_arms[0]["lr"]
        print(
            f"peftkit compare: --arm {name}: learning rate {lr:g}, from arm {adapter_arms[0]['name']!r}",
            file=sys.stderr,
        )
    return {"name": name, "lr": lr, "spec": spec}


def list_experiments() -> str:
    """The shipped experiments, their tasks and arms (* marks the arms a run without --methods trains)."""
    from peftkit_benchmarks.compare.experiment import builtin_experiments

    lines = []
    for name in builtin_experiments():
        experiment = load_experiment(name)
        defaults = set(experiment.default_arms or [arm.name for arm in experiment.arms])
        arms = ", ".join(f"{arm.name}{'*' if arm.name in defaults else ''}" for arm in experiment.arms)
        task = experiment.task
        lines += [f"{name}: {experiment.description}", f"  task {task.name} ({task.kind}); arms: {arms}"]
    lines.append("* trained by default; --methods all trains every arm, --arm NAME=SPEC[:LR] adds one")
    return "\n".join(lines)


def check_device(device: str) -> str | None:
    """Why ``device`` cannot be used, or None."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})"
    if not (device == "cpu" or device.startswith("cuda")):
        return f"--device {device}: use cpu or cuda[:index]"
    return None


def run(args: argparse.Namespace) -> int:
    from peftkit_benchmarks.compare import plots, report, runner, webpage

    if args.list:
        print(list_experiments())
        return 0
    try:
        experiment = resolve_experiment(args)
        task = tasks.load_task(experiment.task).describe()  # bad data is refused here, before any arm trains
    except (ExperimentError, data.MissingDataPackage, TaskError) as error:
        print(f"peftkit compare: {error}", file=sys.stderr)
        return 2
    problem = check_device(args.device)
    if problem:
        print(f"peftkit compare: {problem}", file=sys.stderr)
        return 2
    options = runner.RunOptions(
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        out=args.out,
        eval_split=args.eval_split,
        fresh=args.fresh,
    )
    command = "peftkit compare " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "compare")
    try:
        raw = runner.run_experiment(experiment, options)
    except runner.WorkerFailed as error:
        print(f"peftkit compare: {error}", file=sys.stderr)
        return 1
    env = report.environment(args.device, args.dtype, args.threads, command, raw["omp_wait_policy"])
    env["eval_split"] = args.eval_split
    result = report.build_report(experiment, raw, env, task)
    paths = report.write(result, args.out)
    paths["html"] = webpage.write_html(result, args.out)
    pngs = plots.write_plots(result, args.out)
    print()
    print(report.markdown(result))
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), *pngs]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftkit compare")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
