"""The ``peftkit`` command line: ``plan``, ``validate``, ``methods``, ``train``, ``from-peft``, ``to-peft``, ``merge``,
``compare``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from peftkit.errors import PeftkitError


def _plan(args: argparse.Namespace) -> int:
    from peftkit.lifecycle.attach import plan
    from peftkit.spec import Spec
    from peftkit.zoo import build_model

    spec = Spec.from_file(args.spec)
    model = build_model(args.model, meta=not args.materialise)
    print(plan(model, spec))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from peftkit.spec import Spec

    spec = Spec.from_file(args.spec)
    print(spec.to_yaml() if args.dump else f"{args.spec}: valid ({sum(map(len, spec.adapters.values()))} entries)")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from peftkit.registry import broken_plugins, get_method, known_methods

    for name in known_methods():
        method = get_method(name)
        caps = method.capabilities
        types = ", ".join(t.__name__ for t in caps.module_types)
        print(
            f"{name:12s} site={caps.site} mergeable={caps.mergeable} identity_at_init={caps.identity_at_init} "
            f"adapts: {types}  ({method.__module__})"
        )
    for name, reason in sorted(broken_plugins().items()):  # listed, not fatal: the others work
        print(f"{name:12s} BROKEN: {reason}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftkit.training.config import TrainConfig
    from peftkit.training.loop import train

    config = TrainConfig.from_file(args.config)
    result = train(config, Path(args.config).resolve().parent, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, rank 0 speaks for all
        print(f"trained {result.steps} steps (resumed from {result.resumed_from}); adapters in {result.adapters}")
    return 0


def _from_peft(args: argparse.Namespace) -> int:
    from peftkit.interop.peft import from_peft
    from peftkit.io import save
    from peftkit.zoo import load_model

    model = from_peft(load_model(args.model, pretrained=args.pretrained), args.source, adapter_name=args.adapter)
    save(model, args.output)
    print(f"{args.source} (HF PEFT) -> {args.output} (peftkit: adapter.safetensors + spec.json)")
    return 0


def _to_peft(args: argparse.Namespace) -> int:
    from peftkit.interop.peft import to_peft
    from peftkit.io import load
    from peftkit.zoo import load_model

    model = load(load_model(args.model, pretrained=args.pretrained), args.source)
    to_peft(model, args.output, adapter_name=args.adapter)
    print(f"{args.source} (peftkit) -> {args.output} (HF PEFT: adapter_config.json + adapter_model.safetensors)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from peftkit.interop.serving import adapter_format, export_merged

    names = [n for n in args.adapters.split(",") if n] if args.adapters else None
    output = export_merged(args.base, args.adapter, args.output, names=names, untie=args.untie)
    print(f"{args.base} + {args.adapter} ({adapter_format(args.adapter)}) merged -> {output} (plain transformers)")
    return 0


def _merge_parser(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser(
        "merge", help="merge an adapter folder into its base model and write a plain transformers folder for serving"
    )
    merge.add_argument("base", help="the base model: a local transformers folder with config.json and weights")
    merge.add_argument("adapter", help="a peftkit (peftkit.save) or HF PEFT (save_pretrained) adapter folder")
    merge.add_argument("output", help="the new folder to write (must not exist)")
    merge.add_argument(
        "--adapters", default=None, help="comma-separated adapter names of a peftkit folder to merge (default: all)"
    )
    merge.add_argument(
        "--untie",
        action="store_true",
        help="an adapter on a tied embedding/LM head gets its own copy of the weight (otherwise refused)",
    )
    merge.set_defaults(handler=_merge)


def _conversion_parser(subparsers: argparse._SubParsersAction, name: str, handler, source: str, output: str) -> None:
    command = subparsers.add_parser(name, help=f"convert a {source} checkpoint folder into a {output} one")
    command.add_argument("source", help=f"{source} checkpoint folder")
    command.add_argument("output", help=f"{output} checkpoint folder to write")
    command.add_argument(
        "--model", required=True, help="the base model: a zoo name or a local transformers folder (config.json)"
    )
    command.add_argument("--pretrained", action="store_true", help="load the folder's weights, not random ones")
    command.add_argument("--adapter", default="default", help="the adapter's name (default: default)")
    command.set_defaults(handler=handler)


def _compare_parser(subparsers: argparse._SubParsersAction) -> None:
    compare = subparsers.add_parser(
        "compare", help="fine-tune with full fine-tuning and each method side by side, and report the trade-off"
    )
    try:
        from peftkit_benchmarks.compare import cli as compare_cli
    except ImportError as error:
        message = f"the compare harness (peftkit_benchmarks) is not installed: {error}; reinstall peftkit"
        compare.set_defaults(handler=lambda _args: _fail(message))
        return
    compare_cli.configure_parser(compare)
    compare.set_defaults(handler=compare_cli.run)


def _fail(message: str) -> int:
    print(f"peftkit: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="peftkit: composable parameter-efficient fine-tuning. Docs: README.md and docs/."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    plan = subparsers.add_parser("plan", help="dry run: which module gets which adapter, with parameter counts")
    plan.add_argument("spec", help="spec file (.yaml, .yml or .json)")
    plan.add_argument(
        "--model",
        required=True,
        help="a zoo name (gpt2-tiny, llama-tiny, bert-tiny, roberta-tiny, mlp, llama-7b-shape) "
        "or a folder/file with a transformers config.json",
    )
    plan.add_argument("--materialise", action="store_true", help="build real weights instead of the meta device")
    plan.set_defaults(handler=_plan)

    validate = subparsers.add_parser("validate", help="check a spec file and report every problem")
    validate.add_argument("spec")
    validate.add_argument("--dump", action="store_true", help="print the validated spec with defaults filled in")
    validate.set_defaults(handler=_validate)

    methods = subparsers.add_parser("methods", help="list the registered methods and their capabilities")
    methods.set_defaults(handler=_methods)

    train = subparsers.add_parser(
        "train", help="train a spec's adapters from a YAML training config, resuming from its last checkpoint"
    )
    train.add_argument("config", help="training config (.yaml); see docs/training.md")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    train.set_defaults(handler=_train)

    _conversion_parser(subparsers, "from-peft", _from_peft, "HF PEFT", "peftkit")
    _conversion_parser(subparsers, "to-peft", _to_peft, "peftkit", "HF PEFT")
    _merge_parser(subparsers)
    _compare_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PeftkitError as error:
        return _fail(str(error))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
