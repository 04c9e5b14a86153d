"""Pack the fidelity suite into one self-contained folder for a machine without network (a GPU box).

    python benchmarks/fidelity_pack.py --out /tmp/fidelity-gpu            # then, on the GPU machine:
    bash /tmp/fidelity-gpu/run.sh [--only 'scenes/*'] [--jobs 8]           # results in $OUT or ./results

The folder holds:

* ``repo/``: this repository at ``HEAD`` (``git archive``; commit first what should run), with its
  commit in ``repo/COMMIT`` for the cell records;
* ``fashion-mnist/``: the four IDX files the benchmarks are built from (dataset-fashion-mnist);
* ``wheels/``: Python packages the target lacks, for its Python version (default: faiss-cpu at the
  version installed here, for CPython 3.12 on manylinux x86_64 — what the lent H200 machines were
  seen to miss), fetched here with ``pip download``;
* ``run.sh``: installs the wheels into ``site/`` (no index, no network), puts ``repo`` and
  ``site`` on ``PYTHONPATH`` and runs ``benchmarks/fidelity.py --profile gpu`` (or ``--profile``),
  writing the reports to ``$OUT/fidelity`` when ``$OUT`` is set (the device tool's output folder),
  else ``results/`` beside it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# mlsctl.data.fmnist.fmnist_source, read here without importing mlsctl (this script runs before it is installed)
FMNIST = Path(os.environ.get("FMNIST_DIR") or "/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")

RUN_SH = """#!/usr/bin/env bash
# Runs the fidelity suite from this folder without network; see benchmarks/fidelity_pack.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${{PYTHON:-python3}}"
if compgen -G "$here/wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$here/site" "$here"/wheels/*.whl
fi
export PYTHONPATH="$here/repo:$here/site${{PYTHONPATH:+:$PYTHONPATH}}" HF_HUB_OFFLINE=1
results="${{OUT:+$OUT/fidelity}}"
results="${{results:-$here/results}}"
"$python" "$here/repo/benchmarks/fidelity.py" --profile {profile} --fmnist "$here/fashion-mnist" --work "$here/work" \\
  --results "$results" "$@"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    parser.add_argument("--profile", default="gpu", help="the profile run.sh runs [default: gpu]")
    parser.add_argument("--fmnist", type=Path, default=FMNIST, help="Fashion-MNIST IDX files")
    parser.add_argument("--wheel", action="append", default=None,
                        help="NAME==VERSION to carry as a wheel (repeatable) [default: faiss-cpu at this version]")
    parser.add_argument("--python-version", default="3.12", help="the target's Python [default: 3.12]")
    parser.add_argument("--no-wheels", action="store_true", help="carry no wheels (the target has every package)")
    options = parser.parse_args()
    out = options.out
    if out.exists():
        print(f"error: {out} exists; choose a new folder", file=sys.stderr)
        return 2
    missing = [name for name in FILES if not (options.fmnist / name).is_file()]
    if missing:
        print(f"error: {options.fmnist} lacks {', '.join(missing)}; install dataset-fashion-mnist or give --fmnist",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    archive = out / "repo.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), "HEAD"], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(out / "repo", filter="data")
    archive.unlink()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    (out / "repo" / "COMMIT").write_text(head + "\n")
    (out / "fashion-mnist").mkdir()
    for name in FILES:
        shutil.copy(options.fmnist / name, out / "fashion-mnist" / name)
    if not options.no_wheels:
        wheels = options.wheel or [f"faiss-cpu=={importlib.metadata.version('faiss-cpu')}"]
        platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                 "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"--python-version={options.python_version}", "--implementation=cp", *platforms,
                        "-d", str(out / "wheels"), *wheels], check=True)
    (out / "run.sh").write_text(RUN_SH.format(profile=options.profile))
    (out / "run.sh").chmod(0o755)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {out} ({size / 2**20:.1f} MiB): run `bash {out}/run.sh` on the target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
