"""`mmpl` — one entry point: data, train, convert, eval, plan (benchmarks are scripts in benchmarks/).

Each subcommand lives in its package as `<package>/commands.py` with `register(subparsers)`; heavy imports stay
inside the handlers, so `mmpl --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megatron_mmpl.errors import user_message

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
    """Run a subcommand's handler; an expected failure (errors.user_message) becomes one `error:` line and exit 2,
    a bug keeps its traceback; --debug shows every traceback. Under torchrun a failure raised before the process
    group exists is the same on every rank, so only rank 0 prints it; a later one prints on its rank, tagged."""
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        msg = None if getattr(args, "debug", False) else user_message(e)
        if msg is None:
            raise
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"mmpl {command}: error: {msg}", file=sys.stderr)
        elif _group_initialized():
            print(f"mmpl {command}: error (rank {rank}): {msg}", file=sys.stderr)
        return 2


def _group_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args, args.command)


if __name__ == "__main__":
    sys.exit(main())
