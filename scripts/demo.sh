#!/usr/bin/env bash
# The quickstart behind `make demo`: build fmnist-scenes, pretrain the quick DINO recipe on the
# CPU, and say where the run is. Running it again reuses the scenes and the finished run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
RUN=runs/dino_fmnist_quick

echo "== 1/2 fmnist-scenes (2,000 train / 500 val scenes from real Fashion-MNIST items)"
mlsctl data fmnist-scenes --out data/fmnist-scenes

echo "== 2/2 pretrain recipes/dino_fmnist_quick.yaml"
if compgen -G "$RUN/checkpoints/step-*/state.json" > /dev/null; then
  mlsctl pretrain recipes/dino_fmnist_quick.yaml --out "$RUN" --resume
else
  mlsctl pretrain recipes/dino_fmnist_quick.yaml --out "$RUN" --overwrite
fi

python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((run / "summary.json").read_text())
k = max(1, len(rows) // 6)  # single-step losses are noisy: compare the first and last sixth
start = sum(r["loss"] for r in rows[:k]) / k
end = sum(r["loss"] for r in rows[-k:]) / k
print(f"\nrun: {run}/  (config.yaml, metrics.jsonl, train.log, checkpoints/, teacher.safetensors)")
print(f"mean loss of steps {rows[0]['step']}-{rows[k - 1]['step']}: {start:.3f}; "
      f"of steps {rows[-k]['step']}-{rows[-1]['step']}: {end:.3f} ({100 * (end - start) / start:+.1f}%); "
      f"{summary['images_per_s']:.1f} images/s")
PY
echo "demo finished in $(( $(date +%s) - start ))s"
