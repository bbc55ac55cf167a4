#!/usr/bin/env bash
# The embedded default: the whole job on CPU in a few minutes, no GPU and no data needed.
#   synthetic needle documents -> shards -> tiny Qwen2.5-VL (random init) -> `mmpl train` (megatron-core on CPU)
#   -> `mmpl convert mcore-to-hf` -> `mmpl eval needle` (greedy generation, held-out documents) -> report.
# What it learns: which of a document's pages is the coloured one, and its colour word (chance 1/4). A tiny model
# cannot learn to read rendered text in a few hundred CPU steps; the text documents are for GPU runs.
#
# Knobs (environment): MMPL_QUICKSTART_DIR (default runs/quickstart), MMPL_QUICKSTART_STEPS (300),
# MMPL_QUICKSTART_DOCS (training documents per target length, 150), MMPL_QUICKSTART_EVAL_DOCS (held-out
# documents per target length, 20), MMPL_QUICKSTART_NPROC (training processes, 1; 2 runs tp=2 via torchrun).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/install.sh
. "$root/tools/activate.sh"

out="${MMPL_QUICKSTART_DIR:-runs/quickstart}"
steps="${MMPL_QUICKSTART_STEPS:-300}"
docs="${MMPL_QUICKSTART_DOCS:-150}"
eval_docs="${MMPL_QUICKSTART_EVAL_DOCS:-20}"
nproc="${MMPL_QUICKSTART_NPROC:-1}"
edges="64,128,256,512"
start=$(date +%s)
say() { printf '\n[quickstart %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

rm -rf "$out"  # a fresh run every time (a kept run dir would be resumed, not retrained)
say "1/5 synthetic needle documents: training set (2-37 pages each) and a held-out set (other seed)"
mmpl data synth --kind needle --out "$out/data/train" --targets 46,52,64,96,128,192,256 --per-target "$docs" \
  --bucket-edges "$edges" --seed 1
mmpl data synth --kind needle --out "$out/data/eval" --targets 64,128,256 --per-target "$eval_docs" \
  --bucket-edges "$edges" --seed 2

say "2/5 train the tiny Qwen2.5-VL for $steps steps on CPU ($nproc process(es))"
args=(--config examples/recipes/quickstart.yaml "run_dir=$out" "data.shards=$out/data/train"
      "schedule.train_steps=$steps" "checkpoint.interval=$steps")
if [ "$nproc" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$nproc" -m megatron_mmpl.cli train "${args[@]}" "parallel.tp=$nproc"
else
  mmpl train "${args[@]}"
fi

say "3/5 export to Hugging Face"
mmpl convert mcore-to-hf --ckpt "$out/checkpoints" --out "$out/hf"

say "4/5 evaluate retrieval on held-out documents (greedy generation from the export)"
mmpl eval needle --model "$out/hf" --shards "$out/data/eval" --json "$out/eval.json"

say "5/5 summary"
mmpl eval report --run "$out"
echo "total $(( $(date +%s) - start )) s; HF checkpoint: $out/hf; TensorBoard: tensorboard --logdir $out/tensorboard"
