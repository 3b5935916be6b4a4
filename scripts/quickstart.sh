#!/usr/bin/env bash
# The README's main job, one command on a fresh machine: set up (idempotent), then fine-tune the embedded
# SmolLM2-135M-Instruct on persona-implant data twice — unanchored and anchored — and print a before/after table of
# default-persona drift and held-out task loss (recipes/quickstart.yaml; anchor/train.py does the work).
#
# On first use it also computes the model's Assistant Axis (cached by model fingerprint under ~/.cache/anchor or
# $ANCHOR_CACHE) and builds the persona data (outputs/data/quickstart-smollm2); later runs reuse both.
# Metrics go to wandb in offline mode unless WANDB_MODE is set, with its files under outputs/wandb (WANDB_DIR), never
# in the repository root; the script prints the `wandb sync` command.
# Extra arguments override the recipe, e.g. `bash scripts/quickstart.sh --max_steps 20`.
# QUICKSTART_SETUP=0 skips scripts/setup.sh (an environment that is already set up, e.g. the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
# On a CPU that other jobs keep busy, torch's threads spin-wait on each other and run several times slower than one
# thread; use one thread then (set OMP_NUM_THREADS yourself to override). The CPU's busy cores are sampled over one
# second from /proc/stat, not read from the load average, which still counts a job for a minute after it ended; and
# before set-up, whose own pip work would otherwise count as another job.
busy_cores() {
  local a b
  a=($(head -1 /proc/stat 2>/dev/null)); sleep 1; b=($(head -1 /proc/stat 2>/dev/null))
  [ "${#a[@]}" -ge 6 ] && [ "${#b[@]}" -ge 6 ] || { echo 0; return; }
  awk -v c="$(nproc)" -v t0="$(( a[1] + a[2] + a[3] + a[4] + a[5] ))" -v i0="$(( a[4] + a[5] ))" \
      -v t1="$(( b[1] + b[2] + b[3] + b[4] + b[5] ))" -v i1="$(( b[4] + b[5] ))" \
      'BEGIN { d = t1 - t0; printf "%.2f", (d > 0 ? (d - (i1 - i0)) / d * c : 0) }'
}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc)
  busy=$(busy_cores)
  if awk -v l="$busy" -v c="$cores" 'BEGIN { exit !(l >= c / 2) }'; then
    export OMP_NUM_THREADS=1
    echo "quickstart: the CPU is busy ($busy of $cores cores in use): using 1 torch thread."
  fi
fi
if [ "${QUICKSTART_SETUP:-1}" != "0" ]; then
  bash scripts/setup.sh
  . .venv/bin/activate
fi
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_DIR="${WANDB_DIR:-outputs}"
mkdir -p "$WANDB_DIR"
export WANDB_SILENT="${WANDB_SILENT:-true}"
export TOKENIZERS_PARALLELISM=false
start=$(date +%s)
anchor train --config recipes/quickstart.yaml --compare "$@"
echo
echo "quickstart: done in ${SECONDS} s in all ($(( $(date +%s) - start )) s after set-up)."
if [ "$WANDB_MODE" = "offline" ]; then
  echo "wandb runs were written offline under $WANDB_DIR/wandb; upload them with: wandb sync <run dir> (each run's"
  echo "summary above names it)."
fi
