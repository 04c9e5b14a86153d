#!/usr/bin/env bash
# One device window of the fidelity suite, in one command, without network (see docs/reproduction.md):
#
#   BUDGET_S=500 OUT=/path/to/out bash scripts/device_fidelity.sh     # on the GPU machine (timeout_s BUDGET_S + 70)
#   PROFILE=smoke BUDGET_S=120 bash scripts/device_fidelity.sh        # the dry run, on any CPU
#   bash scripts/device_fidelity.sh --only 'scenes/*/0'                # arguments go to benchmarks/fidelity.py
#
# Prepared here first with scripts/device_prepare.sh, and carried with the command (both are git-ignored):
#   .whl/     wheels of the packages the device lacks (pytorch-metric-learning; faiss-cpu only with
#             WITH_FAISS=1, see scripts/device_wheels.sh: nothing on CUDA needs it); those that are missing
#             there are installed into $SITE, /tmp/site by default (no index, no network)
#   .fmnist/  the four Fashion-MNIST IDX .gz files the data is generated from (FMNIST_DIR to read others)
#
# It generates fmnist-scenes and fmnist-products, runs `benchmarks/fidelity.py --profile $PROFILE
# --deadline-epoch <this script's start + BUDGET_S>` (the cells that fit, in order, calibration first and
# nothing else until it holds; a cell still running at the end is stopped and runs again, whole, in a later
# window; the clock starts with this script) and writes to $OUT (default ./device-out), each finished
# cell's record at once:
#   fidelity-<profile>.tar.gz   the profile's results (cell records, report, progress): merge it here with
#                               python benchmarks/fidelity.py --profile <profile> --unpack-results FILE
#   fidelity-<profile>.log      what the suite printed
#   cell-logs-<profile>.tar.gz  every stage's log (data, training, evaluation) of this window
# It ends within BUDGET_S + ~45 s (a stopped stage gets 30 s to stop, then the report) and prints a short
# table last. Exit status: the suite's (0 also when the budget left cells pending; 1 when a cell failed).
set -euo pipefail
started=$SECONDS
cd "$(dirname "$0")/.."
repo="$PWD"
BUDGET_S="${BUDGET_S:-500}"
deadline=$(( $(date +%s) + BUDGET_S ))
PROFILE="${PROFILE:-gpu}"
OUT="${OUT:-$repo/device-out}"
FMNIST_DIR="${FMNIST_DIR:-$repo/.fmnist}"
python="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

for name in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  if [ ! -f "$FMNIST_DIR/$name" ]; then
    echo "error: $FMNIST_DIR/$name is missing; run scripts/device_prepare.sh here and carry .fmnist with the command" >&2
    exit 2
  fi
done

# the wheels of .whl/ whose package is not installed here
site=${SITE:-/tmp/site}
missing=()
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  name="$(basename "$wheel" | cut -d- -f1)"
  if ! "$python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
    missing+=("$wheel")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${#missing[@]} wheels into $site: ${missing[*]}"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${missing[@]}"
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 MLSCTL_DEBUG=1  # tracebacks come back
[ -f .whl/COMMIT ] && export MLSCTL_COMMIT="$(cat .whl/COMMIT)"  # what the records name (scripts/device_prepare.sh)
"$python" - <<'PY'
import timm, torch

try:  # not carried by default (scripts/device_wheels.sh): on CUDA the evaluations search with torch
    import faiss
    found = f"faiss {faiss.__version__}"
except ImportError:
    found = "faiss: absent"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU: the CPU"
print(f"torch {torch.__version__}, timm {timm.__version__}, {found}; {gpu}", flush=True)
PY

left=$((BUDGET_S - (SECONDS - started)))
if [ "$left" -le 0 ]; then
  echo "error: BUDGET_S=$BUDGET_S was spent before the suite could start" >&2
  exit 2
fi
archive="$OUT/fidelity-$PROFILE.tar.gz"
set +e
"$python" benchmarks/fidelity.py --profile "$PROFILE" --fmnist "$FMNIST_DIR" --deadline-epoch "$deadline" \
  --pack-results "$archive" "$@" > "$OUT/fidelity-$PROFILE.log" 2>&1
status=$?
set -e
work="fidelity-work/$PROFILE"
if [ -d "$work" ]; then
  (cd "$work" && find . -name '*.log' -print0 | tar --null -czf "$OUT/cell-logs-$PROFILE.tar.gz" -T -)
fi
tail -n 5 "$OUT/fidelity-$PROFILE.log"

# the short table: every cell's state and numbers, then the calibration claims
"$python" - "$PROFILE" "$status" "$((SECONDS - started))" <<'PY'
import json, sys
from pathlib import Path

profile, status, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
folder = Path("benchmarks/results/fidelity") / profile
progress = json.loads((folder / "progress.json").read_text()) if (folder / "progress.json").is_file() else {"cells": []}
cells = {p.stem: json.loads(p.read_text()) for p in (folder / "cells").glob("*.json")}
print(f"\n{'cell':28} {'state':8} {'mIoU':>6} {'fg IoU':>6} {'seconds':>8}  note")
for row in progress["cells"]:
    benchmark, variant, seed = row["cell"].split("/")
    record = cells.get(f"{benchmark}-{variant}-seed{seed}", {})
    metrics = record.get("metrics", {})
    miou = f"{100 * metrics['miou']:.1f}" if "miou" in metrics else "-"
    fg = f"{100 * metrics['foreground_iou']:.1f}" if "foreground_iou" in metrics else "-"
    took = f"{record['timing']['seconds']:.0f}" if row["state"] == "done" and "timing" in record else \
        (f"~{row['estimate_s']:.0f}" if "estimate_s" in row else "-")
    print(f"{row['cell']:28} {row['state']:8} {miou:>6} {fg:>6} {took:>8}  {row['why'][:70]}")
if (folder / "summary.json").is_file():
    for claim in json.loads((folder / "summary.json").read_text())["claims"]:
        if claim["claim"].startswith("Calibration"):
            verdict = {True: "holds", False: "DOES NOT HOLD", None: "not measured yet"}[claim["holds"]]
            print(f"{claim['claim']}: {verdict}")
done = sum(r["state"] == "done" for r in progress["cells"])
print(f"{done} of {len(progress['cells'])} cells done; suite exit status {status}; {seconds}s in all")
PY
ls -l "$OUT"
exit "$status"
