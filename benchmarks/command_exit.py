"""How long a command takes to end: Python's own exit (every module torn down one by one) against
`mlsctl`'s (:func:`mlsctl.cli.run`: atexit handlers, streams flushed, then out at once), measured
in one run.

For each command, both ways run alternately (`--repeats` times each) as fresh processes on the same
inputs: a tiny run is trained first in a temporary folder, then `mlsctl recipes` (no torch),
`mlsctl bank inspect RUN` (torch loaded) and `mlsctl pretrain` of 4 steps (torch, timm, Accelerate,
a model trained). Reports the median wall time of each way and their difference. Prints a table and
writes benchmarks/results/command_exit.json.

    python benchmarks/command_exit.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlsctl import atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WAYS = {"python's exit": "from mlsctl.cli import main; main()", "mlsctl's exit": "from mlsctl.cli import run; run()"}


def _seconds(code: str, args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['mlsctl', *sys.argv[1:]]; {code}", *args],
                   cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MLSCTL_COMMIT": "benchmark"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_images, tiny_recipe, write_recipe

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        recipe = write_recipe(work / "tiny.yaml", tiny_recipe(make_images(work / "images", 8)))
        _seconds(WAYS["mlsctl's exit"], ["pretrain", str(recipe), "--out", str(work / "run")], work)
        commands = {"recipes": lambda i: ["recipes"],
                    "bank inspect": lambda i: ["bank", "inspect", str(work / "run")],
                    "pretrain (4 steps)": lambda i: ["pretrain", str(recipe), "--out", str(work / f"run-{i}")]}
        rows = []
        for name, args in commands.items():
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for i in range(options.repeats):
                for way, code in WAYS.items():
                    times[way].append(_seconds(code, args(f"{i}-{len(times[way])}-{way[0]}"), work))
            medians = {way: statistics.median(values) for way, values in times.items()}
            rows.append({"command": name, **{f"{way} s": round(v, 3) for way, v in medians.items()},
                         "saved s": round(medians["python's exit"] - medians["mlsctl's exit"], 3)})
    print(f"{'command':<20} {'python exit s':>14} {'mlsctl exit s':>14} {'saved s':>8}")
    for row in rows:
        slow, fast = row["python's exit s"], row["mlsctl's exit s"]
        print(f"{row['command']:<20} {slow:>14.2f} {fast:>14.2f} {row['saved s']:>8.2f}")
    atomic.write_json(RESULTS / "command_exit.json", {
        "benchmark": "command_exit", "repeats": options.repeats, "machine": platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows})
    print(f"wrote {RESULTS / 'command_exit.json'}")


if __name__ == "__main__":
    main()
