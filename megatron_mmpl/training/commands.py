"""`mmpl train --config recipe.yaml [section.field=value ...]`: one process, or one per rank under torchrun."""

from __future__ import annotations

import argparse
import os
import warnings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train (or resume) from a YAML recipe",
        description="Train from a YAML recipe with section.field=value overrides. Single process, or under "
                    "torchrun / srun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the env).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  mmpl train --config examples/recipes/quickstart.yaml schedule.train_steps=50\n"
               "  torchrun --nproc_per_node 8 -m megatron_mmpl.cli train --config examples/recipes/mmprolong-7b.yaml",
    )
    p.add_argument("--config", default=None, help="YAML recipe (examples/recipes/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. parallel.tp=2 optim.lr=2e-5")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--check", action="store_true",
                   help="run every check that needs no GPU work (config, layout, data, checkpoint) and exit")
    p.add_argument("--help-config", action="store_true", help="list every config field with its documentation")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_train)


def _train(args) -> int:

    # megatron-core warns on import that TE/apex are absent (expected on CPU and without the `te` extra).
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")

    from megatron_mmpl.config import dump_yaml, field_docs, load_config

    if args.help_config:
        for name, doc in field_docs().items():
            print(f"{name:34s} {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from megatron_mmpl.training.train import CollectiveFailed, preflight, train

    if args.check:
        _, _, (kind, path) = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        print(f"config ok; start: {kind}{f' from {path}' if path else ''}")
        return 0
    try:
        result = train(cfg)
    except CollectiveFailed:  # a peer is hung or gone: the groups cannot be torn down cleanly; the process exits
        raise
    except BaseException:
        _leave_groups()
        raise
    _leave_groups()  # a caller in the same process may train again
    if int(os.environ.get("RANK", "0")) == 0:
        how = "stopped by signal" if result.stopped_by_signal else "done"
        last = result.losses.get(result.step)
        print(f"[mmpl train] {how} at step {result.step}"
              + (f", loss {last:.4f}" if last is not None else "")
              + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return 0


def _leave_groups() -> None:
    import torch.distributed as dist

    from megatron_mmpl.parallel.process_groups import destroy_parallel

    if dist.is_initialized():
        destroy_parallel()
