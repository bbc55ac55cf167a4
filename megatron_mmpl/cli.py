"""`mmpl` — one entry point: data, train, convert, eval, plan (benchmarks are scripts in benchmarks/).

Each subcommand lives in its package as `<package>/commands.py` with `register(subparsers)`; heavy imports stay
inside the handlers, so `mmpl --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "data": "megatron_mmpl.data.commands",
    "train": "megatron_mmpl.training.commands",
    "convert": "megatron_mmpl.conversion.commands",
    "eval": "megatron_mmpl.eval.commands",
    "plan": "megatron_mmpl.plan.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def run_handler(args: argparse.Namespace, command: str) -> int:
    """Run a subcommand's handler; bad input becomes one `error:` line (tracebacks with --debug)."""
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        if getattr(args, "debug", False):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmpl {command}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args, args.command)


if __name__ == "__main__":
    sys.exit(main())
