#!/usr/bin/env bash
# The README's main job: set up (idempotent), then compute the embedded model's Assistant Axis and its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
anchor axis --model smollm2 --roles 16 --questions 32 --prompts-per-role 1 --max-new-tokens 24 --out outputs/axis "$@"
echo "Open outputs/axis/report/index.html to see the persona space."
