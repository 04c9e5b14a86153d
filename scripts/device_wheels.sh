#!/usr/bin/env bash
# Downloads into .whl/ (here, with network) the wheels of the Python packages mlsctl needs that the lent GPU
# machines lack, for their Python (CPython 3.12, manylinux x86_64); scripts/device_fidelity.sh installs them
# there without network. Prints their total size: the working tree sent to a device must stay under 64 MiB.
#
#   bash scripts/device_wheels.sh            # then carry .whl/ (it is git-ignored) with the device command
#
# The device image has torch, timm, accelerate, peft, safetensors, pillow, tqdm, typer, pyyaml, matplotlib,
# scipy and numpy. Of what pyproject.toml asks for it lacks faiss-cpu, pytorch-metric-learning, fastapi, uvicorn
# and python-multipart. Only pytorch-metric-learning (~0.1 MiB: the Multi-Similarity loss and Recall@K) is
# carried by default. faiss-cpu (~18 MiB) is not: on CUDA, eval knn-seg and eval knn search with torch on the GPU,
# and since weights/ holds the 20 MB backbone, faiss + Fashion-MNIST + the tree would pass the 64 MiB a device
# receives. WITH_FAISS=1 adds it (galleries, knn-seg monitors, refinement's neighbours). fastapi, uvicorn and
# python-multipart only serve `mlsctl serve`, which no device run uses.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
# versions pyproject.toml accepts (faiss-cpu>=1.8,<2; pytorch-metric-learning>=2.5,<3), as this repository's
# tests run them
wheels=(pytorch-metric-learning==2.9.0)
[ "${WITH_FAISS:-0}" = 1 ] && wheels+=(faiss-cpu==1.15.1)
mkdir -p .whl
# only the wheels listed: one left from another version or a WITH_FAISS=1 run would make pip refuse the set on the
# device (two versions of one package) or push the transfer past 64 MiB
for present in .whl/*.whl; do
  [ -e "$present" ] || continue
  keep=0
  for wheel in "${wheels[@]}"; do
    name="${wheel%%==*}"; version="${wheel##*==}"
    case "$(basename "$present")" in "${name//-/_}-${version}-"*) keep=1 ;; esac
  done
  [ "$keep" = 1 ] || { echo "removing $present (not listed)"; rm -f "$present"; }
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
for wheel in "${wheels[@]}"; do
  name="${wheel%%==*}"
  version="${wheel##*==}"
  if ! compgen -G ".whl/${name//-/_}-${version}-*.whl" >/dev/null; then
    echo "error: pip did not leave a wheel of $wheel in .whl/" >&2
    exit 1
  fi
done
du -b .whl/*.whl | awk '{ printf "%8.1f MiB  %s\n", $1 / 1048576, $2; total += $1 } END { printf "%8.1f MiB  in .whl/ in all\n", total / 1048576 }'
