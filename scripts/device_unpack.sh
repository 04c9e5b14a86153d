#!/usr/bin/env bash
# Brings in what a device window sent back (the folder its $OUT was copied to):
#   fidelity-<profile>.tar.gz  merged into benchmarks/results/fidelity/<profile>/ (cell records replace those
#                              of the same cells; the report is rebuilt from every record)
#   throughput.json or train_throughput_*.json (benchmarks/train_throughput.py)
#                              copied to benchmarks/results/train_throughput_<device>.json
#   throughput-logs.tar.gz     each loop's output and metrics, and host_sync.json (benchmarks/host_sync.py), into
#                              benchmarks/results/device/throughput-logs-<date>/
#   host_sync.json, cell-logs-<profile>.tar.gz, window.log
#                              copied to benchmarks/results/device/window-<date>/
#   backbone.safetensors.part* (scripts/device_window.sh): the command that joins them is printed
#
#   bash scripts/device_unpack.sh FOLDER
set -euo pipefail
folder="${1:?give the folder the files of a device window were copied to}"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
found=0
# the file name benchmarks/train_throughput.py gives a device's JSON
destination='import json, re, sys
device = json.load(open(sys.argv[1]))["device"]
print("benchmarks/results/train_throughput_" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ".json")'
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
  cp "$json" "$dest"
  echo "throughput: $json -> $dest"
  found=1
done
if [ -e "$folder/throughput-logs.tar.gz" ]; then
  dest="benchmarks/results/device/throughput-logs-$(date +%Y-%m-%d)"
  mkdir -p "$dest"
  tar xzf "$folder/throughput-logs.tar.gz" -C "$dest" --strip-components=1
  echo "throughput logs: $dest"
  found=1
fi
dest="benchmarks/results/device/window-$(date +%Y-%m-%d)"
for file in "$folder"/host_sync.json "$folder"/cell-logs-*.tar.gz "$folder"/window.log; do
  [ -e "$file" ] || continue  # host_sync.json also travels in throughput-logs.tar.gz, when the window got there
  mkdir -p "$dest"
  cp "$file" "$dest/"
  echo "$(basename "$file"): $dest/"
  [ "$(basename "$file")" = window.log ] || found=1
done
if compgen -G "$folder/backbone.safetensors.part*" >/dev/null; then
  echo "backbone weights in parts: python scripts/backbone_weights.py --join $folder/backbone DEST.safetensors"
  found=1
fi
if [ "$found" = 0 ]; then
  echo "error: $folder holds no fidelity-*.tar.gz, throughput JSON or backbone parts" >&2
  exit 1
fi
