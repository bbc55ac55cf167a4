"""Write plan/presets/*.yaml: Qwen2.5-VL layouts per (model, sequence length, nodes, GPU), chosen by `mmpl plan`.

Every preset is examples/recipes/mmprolong-7b.yaml (the MMProLong optimizer, schedule and task mix) with the
model, the packed length (samples drawn from length/4 to length, as 32K-128K at 128K), ~4M tokens per step and
the cheapest layout that fits: the smallest tp·pp·cp keeping dp within the batch, the least recompute that
fits (model.recompute=auto), pp=1 before pipelines, small tp before cp, at most HEADROOM of the usable memory;
the ViT is frozen only when nothing fits with it trained.
`python -m megatron_mmpl.plan.generate [--out DIR]` (in a checkout: it reads the recipe) rewrites the files and
INDEX.md (also listing what is refused).
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import os
import sys
from dataclasses import replace

import yaml

from megatron_mmpl.config.load import from_dict
from megatron_mmpl.models.qwen25vl.spec import ModelSpec
from megatron_mmpl.plan.command import PRESET_DIR
from megatron_mmpl.plan.memory import GiB, Hardware, PlanError, plan_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPE = os.path.join(REPO, "examples", "recipes", "mmprolong-7b.yaml")
GPUS = {"h100": 80.0, "h200": 140.0}  # GiB per GPU as the driver reports it (H100 80GB, H200 141GB)
NODES = (1, 2, 4, 8, 16, 32)
TOKENS_PER_STEP = 4 * 1024**2  # ProLong/MMProLong: ~4M tokens per optimizer step
HEADROOM = 0.97  # presets use at most this share of the planner's usable memory (room for estimate error)
GRID = {  # model preset -> packed lengths
    "qwen25vl-7b": (32768, 65536, 131072, 262144, 524288),
    "qwen25vl-32b": (131072,),
    "qwen25vl-72b": (131072,),
}
DEFAULT = ("mmprolong-7b", "qwen25vl-7b", 131072, 4, "h100")  # the MMProLong run as the default 7B preset


def preset_name(model: str, seq: int, nodes: int, gpu: str) -> str:
    return f"{model}-{seq // 1024}k-{nodes}n-{gpu}"


@functools.cache
def _recipe() -> dict:
    with open(RECIPE) as f:
        return yaml.safe_load(f)


def base_config(model: str, seq: int, name: str) -> dict:
    """The recipe's keys (only those: presets stay valid as the schema grows) with this model and length."""
    raw = copy.deepcopy(_recipe())
    raw["run_dir"] = f"runs/{name}"
    raw["model"]["hf_config"] = model
    raw["checkpoint"]["load"] = f"checkpoints/{model}-mcore"
    raw["data"].update(max_seq_len=seq, max_len=seq, min_len=seq // 4, micro_batch_size=1,
                       global_batch_size=max(1, TOKENS_PER_STEP // seq))
    return raw


def with_layout(raw: dict, cfg, model_settings: dict) -> dict:
    """`raw` with the layout fields of the chosen `cfg` and the recompute settings its plan resolved."""
    raw = copy.deepcopy(raw)
    p, m = cfg.parallel, cfg.model
    raw["parallel"].update(tp=p.tp, pp=p.pp, cp=p.cp, sequence_parallel=p.sequence_parallel)
    if p.first_stage_layers is not None:
        raw["parallel"]["first_stage_layers"] = p.first_stage_layers
    raw["model"].update({k: v for k, v in model_settings.items() if v is not None})  # null: the schema's default
    if m.freeze_vision:
        raw["model"]["freeze_vision"] = True
    raw["data"]["global_batch_size"] = cfg.data.global_batch_size
    return raw


def _pp_choices(layers: int, world: int):
    for pp in (1, 2, 4, 8, 16):
        if pp <= layers and pp <= world:
            even = layers // pp
            if pp == 1:
                yield pp, None, 0
            else:  # stage 0 also runs the ViT: offer it fewer LM layers, even split first
                for first in range(even, 0, -1):
                    if (layers - first) % (pp - 1) == 0 and (layers - first) // (pp - 1) >= first:
                        yield pp, (None if first * pp == layers else first), even - first


def search(model: str, seq: int, nodes: int, gpu: str, name: str):
    """(config dict, plan) of the preferred fitting layout, or (None, reason)."""
    shape = ModelSpec.of(model)
    hw = Hardware(nodes=nodes, gpus_per_node=8, gpu_mem_gib=GPUS[gpu])
    world = hw.world_size
    target_rows = max(1, TOKENS_PER_STEP // seq)
    candidates = []
    grid = itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16, 32, 64), _pp_choices(shape.layers, world))
    for tp, cp, (pp, first, fewer) in grid:
        mp = tp * cp * pp
        if world % mp:
            continue
        dp = world // mp
        # model.recompute=auto: the planner picks the least recompute that fits each layout
        candidates.append(((dp > target_rows, mp, pp, fewer, tp, cp), tp, cp, pp, first, "auto", dp))
    candidates.sort(key=lambda c: c[0])
    raw = base_config(model, seq, name)
    base = from_dict(raw)
    closest, reason = None, "no layout divides the world size"
    for freeze_vision in (False, True):
        for _, tp, cp, pp, first, recompute, dp in candidates:
            cfg = replace(
                base,
                parallel=replace(base.parallel, tp=tp, cp=cp, pp=pp, first_stage_layers=first,
                                 sequence_parallel=tp > 1),
                # the ViT recomputed whole (every block, or chunked): a partial count of blocks (auto's choice in
                # `mmpl train`) fills the memory to the planner's budget and leaves no HEADROOM
                model=replace(base.model, recompute=recompute, recompute_num_layers=1, freeze_vision=freeze_vision,
                              vit_recompute_blocks=shape.vision.depth),
                data=replace(base.data, global_batch_size=max(target_rows, dp)),
            )
            try:
                plan = plan_config(cfg, hw, name=name, shape=shape)
            except PlanError as e:
                reason = reason if closest else str(e)
                continue
            if plan.fits and plan.peak.total <= HEADROOM * hw.budget_bytes:
                settings = dict(plan.model_settings)
                if settings["vit_recompute_blocks"] == shape.vision.depth:
                    settings["vit_recompute_blocks"] = None  # every block: the schema's default, not written
                return with_layout(raw, cfg, settings), plan
            if not plan.fits and (closest is None or plan.peak.total < closest.peak.total):
                closest, reason = plan, (f"tp{tp} pp{pp} cp{cp} recompute={recompute} freeze_vision="
                                         f"{str(freeze_vision).lower()} {plan.refusal}")
    return None, f"nothing fits on {nodes}x8 {gpu.upper()}; closest: {reason}"


def render(name: str, model: str, seq: int, nodes: int, gpu: str, raw: dict, plan) -> str:
    frozen = " ViT frozen (no layout fits with it trained)." if raw["model"].get("freeze_vision") else ""
    head = [
        f"# {model}, {seq // 1024}K packed rows on {nodes} node(s) x 8 {gpu.upper()} ({GPUS[gpu]:g} GiB).{frozen}",
        "# Generated by megatron_mmpl/plan/generate.py from examples/recipes/mmprolong-7b.yaml; edit those, not this.",
        f"# plan: nodes={nodes} gpus=8 gpu_mem={GPUS[gpu]:g}",
        f"# mmpl plan: tp{plan.tp} pp{plan.pp} cp{plan.cp} dp{plan.dp} recompute={plan.recompute}, peak "
        f"{plan.peak.total / GiB:.1f} of {plan.hardware.budget_bytes / GiB:.1f} GiB; "
        f"{plan.tokens_per_step / 1e6:.2f}M tokens/step, {plan.train_steps} steps",
        f"# Launch: PRESET={name} sbatch --nodes={nodes} --gpus-per-node=8 launch/slurm/train.sbatch",
    ]
    return "\n".join(head) + "\n" + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False)


def generate() -> tuple[dict[str, str], list[str]]:
    """{file name: text} of every preset, and INDEX.md lines."""
    files, index = {}, [
        "# Launch presets",
        "",
        "Generated by `python -m megatron_mmpl.plan.generate`; each file passes `mmpl plan --preset <name>` with at "
        f"least {100 - round(HEADROOM * 100)} % of the usable memory to spare.",
        "Refused combinations are listed with the planner's reason (not shipped).",
        "",
        "| preset | nodes x GPU | tp pp cp dp | recompute | ViT | peak / usable GiB | tokens/step | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    refused = []
    jobs = [(preset_name(m, s, n, g), m, s, n, g) for m, seqs in GRID.items() for s in seqs
            for g in GPUS for n in NODES]
    jobs.insert(0, DEFAULT)
    for name, model, seq, nodes, gpu in jobs:
        raw, plan = search(model, seq, nodes, gpu, name)
        if raw is None:
            refused.append(f"- `{name}`: {plan}")
            continue
        files[f"{name}.yaml"] = render(name, model, seq, nodes, gpu, raw, plan)
        vit = "frozen" if raw["model"].get("freeze_vision") else "trained"
        index.append(f"| {name} | {nodes} x 8 {gpu.upper()} | {plan.tp} {plan.pp} {plan.cp} {plan.dp} | "
                     f"{plan.recompute} | {vit} | {plan.peak.total / GiB:.1f} / {plan.hardware.budget_bytes / GiB:.1f}"
                     f" | {plan.tokens_per_step / 1e6:.2f}M | {plan.train_steps} |")
    index += ["", "## Refused", ""] + (refused or ["(none)"])
    files["INDEX.md"] = "\n".join(index) + "\n"
    return files, refused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=PRESET_DIR)
    args = p.parse_args(argv)
    if not os.path.isfile(RECIPE):
        print(f"generate: {RECIPE} not found; run this from a checkout (presets are built from that recipe)",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    files, refused = generate()
    for old in os.listdir(args.out):  # drop presets this grid no longer produces (hand-written tiny.yaml stays)
        if old.startswith(tuple(GRID)) and old.endswith(".yaml") and old not in files:
            os.remove(os.path.join(args.out, old))
    for fname, text in files.items():
        with open(os.path.join(args.out, fname), "w") as f:
            f.write(text)
    print(f"wrote {len(files) - 1} presets and INDEX.md to {args.out}; refused {len(refused)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
