#!/usr/bin/env bash
# Prepares, here, everything a device window of the fidelity suite needs besides the repository, and says how
# much the device will receive (its limit: 64 MiB for the working tree with what is carried):
#   .whl/     the wheels the device lacks (scripts/device_wheels.sh)
#   .fmnist/  the four Fashion-MNIST IDX files (~30 MiB; all four are needed: fmnist-scenes and fmnist-products
#             draw their items from the whole train split, their validation/evaluation items from t10k),
#             copied from the Debian package dataset-fashion-mnist (installed with apt-get when missing)
# Both are git-ignored: carry them with the device command (carry: [".whl", ".fmnist"]).
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir="${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
if [ ! -f "$source_dir/${files[0]}" ] && [ "$source_dir" = /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)
fi
mkdir -p .fmnist
for name in "${files[@]}"; do
  if [ ! -f "$source_dir/$name" ]; then
    echo "error: $source_dir/$name is missing; install the Debian package dataset-fashion-mnist or set FMNIST_DIR" >&2
    exit 1
  fi
  cmp -s "$source_dir/$name" ".fmnist/$name" || cp "$source_dir/$name" ".fmnist/$name"
done
bash scripts/device_wheels.sh
# the commit the device's copy is of (its records name it; the copy's .git may be another commit's): prepare
# again after committing, right before the window
# (the suite's form, benchmarks/fidelity.py commit(): 12 hex digits, +dirty for changes besides its results)
sha=$(git rev-parse --short=12 HEAD)
[ -n "$(git status --porcelain --untracked-files=no -- . ':(exclude)benchmarks/results')" ] && sha="$sha+dirty"
echo "$sha" > .whl/COMMIT
echo "the device's records will name commit $sha (.whl/COMMIT)"
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -bc 2>/dev/null | awk '$2 == "total" { s += $1 } END { print s }')
fmnist=$(du -bc .fmnist/* | tail -1 | cut -f1)
whl=$(du -bc .whl/*.whl | tail -1 | cut -f1)
awk -v t="$tree" -v f="$fmnist" -v w="$whl" 'BEGIN {
  printf "the device receives: working tree %.1f MiB + .fmnist %.1f MiB + .whl %.1f MiB = %.1f MiB (limit 64 MiB)\n",
    t / 1048576, f / 1048576, w / 1048576, (t + f + w) / 1048576
  if (t + f + w > 62 * 1048576) {  # 2 MiB below the limit: a file written meanwhile would make the call refused
    print "error: over 62 MiB; remove untracked files (git status) or carry less" > "/dev/stderr"; exit 1 } }'
