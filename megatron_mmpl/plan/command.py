"""`mmpl plan --preset P [--nodes N --gpus G --gpu-mem GiB] [key=value ...]`: will this run fit, and how long is it.

A preset is a megatron_mmpl/plan/presets/<name>.yaml (package data, so an installed `mmpl` finds it from any
directory; launch/presets links to it in a checkout) or any recipe path; its first lines may carry the hardware it
was planned for as `# plan: nodes=N gpus=G gpu_mem=GiB`, which the flags override. Exit 0 when it fits, 1 when
refused (the reason is printed).
"""

from __future__ import annotations

import glob
import os
import re
import sys

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
_HEADER = re.compile(r"^#\s*plan:\s*(.*)$")


def preset_path(spec: str) -> str:
    """A path as given, else the shipped preset <spec>.yaml."""
    if os.path.isfile(spec):
        return spec
    path = os.path.join(PRESET_DIR, f"{spec}.yaml")
    if os.path.isfile(path):
        return path
    known = ", ".join(sorted(preset_names())) or f"none found in {PRESET_DIR}"
    raise FileNotFoundError(f"--preset {spec!r} is neither a file nor a shipped preset (known: {known})")


def preset_names() -> list[str]:
    return [os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(PRESET_DIR, "*.yaml"))]


def read_hardware(path: str) -> dict[str, float]:
    """The `# plan: nodes=N gpus=G gpu_mem=GiB` header of a preset ({} when absent)."""
    out: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            m = _HEADER.match(line.strip())
            if m:
                for item in m.group(1).split():
                    key, _, value = item.partition("=")
                    if key in ("nodes", "gpus", "gpu_mem"):
                        out[key] = float(value) if key == "gpu_mem" else int(value)
    return out


def plan_preset(spec: str, overrides=(), nodes=None, gpus=None, gpu_mem=None):
    """Load a preset, apply overrides, and plan it on its header's hardware (flags win)."""
    from megatron_mmpl.config.load import load_config
    from megatron_mmpl.plan.memory import Hardware, plan_config

    path = preset_path(spec)
    head = read_hardware(path)
    hw = Hardware(
        nodes=int(nodes or head.get("nodes", 1)),
        gpus_per_node=int(gpus or head.get("gpus", 8)),
        gpu_mem_gib=float(gpu_mem or head.get("gpu_mem", 80.0)),
    )
    name = os.path.basename(path).removesuffix(".yaml")
    return plan_config(load_config(path, list(overrides)), hw, name=name)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory, tokens per step and steps of a preset; refuses what "
                                           "cannot fit", description=__doc__.splitlines()[0])
    p.add_argument("--preset", help="a shipped preset name (see --all) or a recipe YAML path")
    p.add_argument("--nodes", type=int, help="nodes (default: the preset's `# plan:` header, else 1)")
    p.add_argument("--gpus", type=int, help="GPUs per node (default: header, else 8)")
    p.add_argument("--gpu-mem", type=float, help="memory per GPU in GiB (default: header, else 80)")
    p.add_argument("--all", action="store_true", help="plan every shipped preset, one line each")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=handle)


def handle(args) -> int:
    from megatron_mmpl.config.load import ConfigError
    from megatron_mmpl.plan.memory import PlanError, format_plan

    if args.all:
        return _plan_all(args)
    if not args.preset:
        print("mmpl plan: give --preset NAME|PATH or --all", file=sys.stderr)
        return 2
    try:
        plan = plan_preset(args.preset, args.overrides, args.nodes, args.gpus, args.gpu_mem)
    except (PlanError, ConfigError) as e:
        print(f"mmpl plan: refused: {str(e).removeprefix('config error: ')}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    return 0 if plan.fits else 1


def _plan_all(args) -> int:
    from megatron_mmpl.config.load import ConfigError
    from megatron_mmpl.plan.memory import GiB, PlanError

    bad = 0
    for name in sorted(preset_names()):
        try:
            plan = plan_preset(name, args.overrides, args.nodes, args.gpus, args.gpu_mem)
        except (PlanError, ConfigError) as e:
            print(f"{name:40s} REFUSED {e}")
            bad += 1
            continue
        hw = plan.hardware
        state = "ok" if plan.fits else f"REFUSED {plan.refusal}"
        bad += not plan.fits
        print(f"{name:40s} {hw.nodes:>2}x{hw.gpus_per_node} {hw.gpu_mem_gib:>4g}GiB tp{plan.tp} pp{plan.pp} "
              f"cp{plan.cp} dp{plan.dp} {plan.recompute:9s} {plan.peak.total / GiB:6.1f}GiB "
              f"{plan.tokens_per_step / 1e6:5.2f}M tok/step {plan.train_steps:>6} steps  {state}")
    return 1 if bad else 0
