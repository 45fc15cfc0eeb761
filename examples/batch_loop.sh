#!/usr/bin/env bash
# Batch work: one merge per run folder, two ways. Makes its own tiny runs in a temporary folder.
#   bash examples/batch_loop.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
merge="$here/../merge.py"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 - "$here" <<'PY'
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from tiny import tiny_state
for run in ("run-a", "run-b", "run-c"):
    for step in (1, 2, 3):
        Path(run).mkdir(exist_ok=True)
        save_file(tiny_state(10 * ord(run[-1]) + step), f"{run}/step-{step}.safetensors")
Path("run-c/step-2.safetensors").write_bytes(b"not a checkpoint")  # one broken run: the loop goes on
PY

echo "1) a shell loop: exit code 2 marks bad input; --skip-existing makes reruns cheap"
mkdir -p out
for d in run-*/; do
  python3 "$merge" --method sma --models "$d" --output "out/$(basename "$d").safetensors" --quiet --skip-existing \
    || echo "failed: $d (exit $?)"
done

echo "2) a jobs file: one merge per line, a summary at the end, a JSON line per job"
for d in run-*/; do echo "--method ema --alpha 0.5 --models $d --output out/ema-$(basename "$d").safetensors"; done > jobs.txt
python3 "$merge" --jobs jobs.txt --quiet --json || echo "some jobs failed (exit $?)"
ls out
