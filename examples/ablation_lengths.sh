#!/usr/bin/env bash
# A toy reproduction of MMProLong's finding (i): with the same token budget, training on a balanced spread of lengths
# reads long documents at least as well as training only at the target length — also beyond the training window.
#   one pool of visual-needle documents (quickstart task) -> two arms from the same init (same model seed; the
#   model is built before any data is read), same steps, same packed rows of WINDOW tokens:
#     balanced:    data.recipe=balanced    (equal token share per length bucket: <=64, <=128, <=192, <=256)
#     target-only: data.recipe=target:256  (every sample from the longest bucket: 251-256 tokens, a row each)
#   -> export each -> `mmpl eval needle` on a length x depth grid up to 4x WINDOW (as trained, and with YaRN)
#   -> `mmpl eval report` over both arms: table + heat-maps + accuracy vs length.
# Whatever comes out is reported; docs/ABLATIONS.md holds a measured run.
#
# Knobs (environment): MMPL_ABLATION_DIR (runs/ablation_lengths), MMPL_ABLATION_STEPS (300), MMPL_ABLATION_DOCS
# (training documents per target length, 150), MMPL_ABLATION_PER_CELL (eval documents per grid cell, 8),
# MMPL_ABLATION_LENGTHS (64,128,256,512,1024), MMPL_ABLATION_DEPTHS (0,0.1,...,1.0), MMPL_ABLATION_ROPE
# ("none yarn:4": the RoPE settings each arm is evaluated with), MMPL_ABLATION_SEED (model init and data order,
# 1234), MMPL_ABLATION_DEVICE (auto).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/install.sh
. "$root/tools/activate.sh"

out="${MMPL_ABLATION_DIR:-runs/ablation_lengths}"
steps="${MMPL_ABLATION_STEPS:-300}"
docs="${MMPL_ABLATION_DOCS:-150}"
per_cell="${MMPL_ABLATION_PER_CELL:-8}"
lengths="${MMPL_ABLATION_LENGTHS:-64,128,256,512,1024}"
depths="${MMPL_ABLATION_DEPTHS:-0,0.1,...,1.0}"
ropes="${MMPL_ABLATION_ROPE:-none yarn:4}"
device="${MMPL_ABLATION_DEVICE:-auto}"
seed="${MMPL_ABLATION_SEED:-1234}"
window=256
start=$(date +%s)
say() { printf '\n[ablation %5ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

rm -rf "$out"
say "1/4 one pool of visual-needle documents, 2-37 pages (targets 46..256 tokens), buckets 64/128/192/256"
mmpl data synth --kind needle --out "$out/data" --targets 46,52,64,96,128,192,256 --per-target "$docs" \
  --bucket-edges 64,128,192,256 --seed 1

for arm in balanced target-only; do
  recipe=balanced
  [ "$arm" = target-only ] && recipe="target:$window"
  say "2/4 train arm $arm (data.recipe=$recipe): $steps steps, rows of $window tokens, model seed $seed"
  mmpl train --config examples/recipes/quickstart.yaml "run_dir=$out/$arm" "data.shards=$out/data" "seed=$seed" \
    "data.seed=$seed" "data.recipe=$recipe" "data.max_len=$window" "data.max_seq_len=$window" \
    "schedule.train_steps=$steps" "checkpoint.interval=$steps"
  python - "$out/$arm" <<'EOF'
import glob, sys, torch
common = sorted(glob.glob(f"{sys.argv[1]}/checkpoints/iter_*/common.pt"))[-1]
ts = torch.load(common, weights_only=False)["train_state"]
print(f"[ablation] {sys.argv[1]}: {ts['step']} steps, {ts['consumed_tokens']:,} tokens trained")
EOF
  mmpl convert mcore-to-hf --ckpt "$out/$arm/checkpoints" --out "$out/$arm/hf"
done

for arm in balanced target-only; do
  for rope in $ropes; do
    say "3/4 evaluate $arm, RoPE $rope: lengths $lengths x depths $depths, $per_cell documents a cell"
    mmpl eval needle --model "$out/$arm/hf" --lengths "$lengths" --depths "$depths" --per-cell "$per_cell" \
      --seed 7 --trained-len "$window" --rope-scaling "$rope" --device "$device" --no-progress \
      --json "$out/$arm/evals/needle_${rope/:/}.json"
  done
done

say "4/4 report over both arms"
mmpl eval report --run "$out/balanced" --run "$out/target-only" --out "$out/report"
echo "total $(( $(date +%s) - start )) s; report: $out/report/report.md"
