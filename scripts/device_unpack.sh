#!/usr/bin/env bash
# Brings in what a device window sent back (the folder its $OUT was copied to):
#   fidelity-<profile>.tar.gz  merged into benchmarks/results/fidelity/<profile>/ (cell records replace those
#                              of the same cells; the report is rebuilt from every record)
#   throughput.json or train_throughput_*.json (benchmarks/train_throughput.py)
#                              copied to benchmarks/results/train_throughput_<device>.json
#   throughput-logs.tar.gz     each loop's output and metrics, and host_sync.json (benchmarks/host_sync.py), into
#                              benchmarks/results/device/throughput-logs-<window>/
#   host_sync.json, cell-logs-<profile>.tar.gz, window.log, fidelity-<profile>.log (scripts/device_fidelity.sh)
#                              copied to benchmarks/results/device/window-<window>/
#   backbone-run.tar.gz        the backbone run's recipe, metrics, log and knn-seg results, into
#                              benchmarks/results/device/window-<window>/backbone-run/
#   backbone.safetensors[.part*] (scripts/device_window.sh): the command that puts it in weights/ is printed
# <window> is the UTC time the window started, from the first line of its window.log (else now). A dry
# run (profile smoke, on a CPU) goes to benchmarks/results/dry-run/ instead, which git ignores.
#
#   bash scripts/device_unpack.sh FOLDER
set -euo pipefail
folder="${1:?give the folder the files of a device window were copied to}"
cd "$(dirname "$0")/.."
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"  # the venv's (make venv), else python3
found=0
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
root=benchmarks/results/device
if [ -e "$folder/window.log" ]; then
  first=$(head -n 1 "$folder/window.log")
  case "$first" in "window started "*) stamp=$(echo "$first" | cut -d' ' -f3) ;; esac
  case "$first" in *"profile smoke") root=benchmarks/results/dry-run ;; esac
fi
[ -e "$folder/fidelity-smoke.tar.gz" ] && root=benchmarks/results/dry-run
mkdir -p "$root"
# the file name benchmarks/train_throughput.py gives a device's JSON
destination='import json, re, sys
device = json.load(open(sys.argv[1]))["device"]
print("benchmarks/results/train_throughput_" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ".json")'
# exit 0 when the first JSON holds at least as many measured values as the second
measured='import json, sys
def count(path):
    recipes = json.load(open(path)).get("recipes", {})
    return sum(len(v) for row in recipes.values() for k, v in row.items()
               if isinstance(v, list) and (k == "model" or k.startswith("loop-")) and "/" not in k and " " not in k)
sys.exit(0 if count(sys.argv[1]) >= count(sys.argv[2]) else 1)'
for archive in "$folder"/fidelity-*.tar.gz; do
  [ -e "$archive" ] || continue
  profile="$(basename "$archive" .tar.gz)"
  profile="${profile#fidelity-}"
  "$python" benchmarks/fidelity.py --profile "$profile" --unpack-results "$archive"
  found=1
done
for json in "$folder"/throughput.json "$folder"/train_throughput_*.json; do
  [ -e "$json" ] || continue
  dest="$("$python" -c "$destination" "$json")"
  [ "$root" = benchmarks/results/device ] || dest="$root/$(basename "$dest")"
  found=1
  # a window that measured less than the file here (stopped early, its loops failed) keeps the file here
  if [ -e "$dest" ] && ! "$python" -c "$measured" "$json" "$dest"; then
    kept="$root/window-$stamp/$(basename "$json")"
    mkdir -p "$(dirname "$kept")"; cp "$json" "$kept"
    echo "throughput: $json measured less than $dest, which is kept; the window's JSON is in $kept"
    continue
  fi
  cp "$json" "$dest"
  echo "throughput: $json -> $dest"
done
if [ -e "$folder/throughput-logs.tar.gz" ]; then
  dest="$root/throughput-logs-$stamp"
  mkdir -p "$dest"
  tar xzf "$folder/throughput-logs.tar.gz" -C "$dest" --strip-components=1
  echo "throughput logs: $dest"
  found=1
fi
dest="$root/window-$stamp"
for file in "$folder"/host_sync.json "$folder"/cell-logs-*.tar.gz "$folder"/window.log "$folder"/fidelity-*.log; do
  [ -e "$file" ] || continue  # host_sync.json also travels in throughput-logs.tar.gz, when the window got there
  mkdir -p "$dest"
  cp "$file" "$dest/"
  echo "$(basename "$file"): $dest/"
  case "$(basename "$file")" in window.log|fidelity-*.log) ;; *) found=1 ;; esac
done
if [ -e "$folder/backbone-run.tar.gz" ]; then
  mkdir -p "$dest/backbone-run"
  tar xzf "$folder/backbone-run.tar.gz" -C "$dest/backbone-run"
  echo "backbone run (recipe, metrics, knn-seg): $dest/backbone-run/"
  found=1
fi
if compgen -G "$folder/backbone.safetensors.part*" >/dev/null; then
  echo "backbone weights in parts: python scripts/backbone_weights.py --join $folder/backbone weights/dino_fmnist_backbone.safetensors"
  found=1
elif [ -e "$folder/backbone.safetensors" ]; then
  echo "backbone weights: cp $folder/backbone.safetensors weights/dino_fmnist_backbone.safetensors"
  found=1
fi
if [ "$found" = 0 ]; then
  echo "error: $folder holds no fidelity-*.tar.gz, throughput JSON or backbone weights" >&2
  exit 1
fi
