"""The ``peftkit`` command line: ``plan``, ``validate``, ``methods`` and ``compare``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from peftkit.errors import PeftkitError


def _plan(args: argparse.Namespace) -> int:
    from peftkit.attach import plan
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
    from peftkit.registry import get_method, known_methods

    for name in known_methods():
        method = get_method(name)
        caps = method.capabilities
        types = ", ".join(t.__name__ for t in caps.module_types)
        print(
            f"{name:12s} site={caps.site} mergeable={caps.mergeable} identity_at_init={caps.identity_at_init} "
            f"adapts: {types}  ({method.__module__})"
        )
    return 0


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
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__)
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
