"""Wall time of one-shot commands against `python -c "import torch, timm"`, interleaved in one run.

A command that searches a gallery in under a millisecond should cost little more than starting
Python with the libraries it needs. For each checkout given with ``--repo`` (default: this one),
this times, in fresh processes, as a user runs them (the ``mlsctl`` console script:
``from mlsctl.cli import main; main()``):

* ``search``: ``mlsctl search --set A B --index GALLERY`` (a MILE run's set model, 8 objects);
* ``embed``: ``mlsctl embed FOLDER --run RUN --out FEATS --overwrite`` of a folder of one image;
* ``bank``: ``mlsctl bank inspect RUN`` of a DINO run with a monitor bank;
* ``help``: ``mlsctl --help``;

beside ``python -c "import torch, timm"`` (the floor: every one of them needs both). The rounds
interleave everything (baseline, then each command of each checkout, the order rotated every
round), so the load of this shared machine falls on all of them alike; the table gives the
median wall seconds and the ratio of each median to the baseline's (goal: ≤ 1.6 for search, embed
and bank inspect), and the same for CPU seconds (user + system of the process, less disturbed by
other work on the machine than wall time).

The artefacts are tiny and generated (no download): 8 objects of 4 photos (64 px, one colour
each), a MILE run of 2 steps with the architecture of the demo's MILE model
(recipes/mile_fmnist_backbone.yaml without its starting weights: a ViT of width 320, depth 8,
patch 8), its gallery, and a DINO run of 4 steps (recipes/dino_fmnist_quick.yaml, bank of 64).
They are made once with this checkout's code and kept in ``--work`` (default: a temporary
folder, removed afterwards).

    python benchmarks/oneshot.py [--rounds 7] [--repo before=/path/to/main --repo after=.] [--work DIR]

Prints a table and writes benchmarks/results/oneshot.json (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
CONSOLE = "import sys; from mlsctl.cli import main; sys.argv[0] = 'mlsctl'; sys.exit(main())"
BASELINE = "import torch, timm"


def mlsctl(repo: Path, *args: str, cwd: Path) -> None:
    """Run ``mlsctl ARGS`` from ``repo``'s code; fail loudly."""
    result = subprocess.run([sys.executable, "-c", CONSOLE, *args], cwd=cwd, env=environment(repo),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"mlsctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def environment(repo: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def prepare(work: Path) -> None:
    """The artefacts, made with this checkout's code (skipped when ``work`` already holds them)."""
    import numpy as np
    from PIL import Image

    if (work / "ready").is_file():
        return
    rng = np.random.default_rng(0)
    for o in range(8):
        colour = rng.uniform(0, 255, 3)
        for k in range(4):
            pixels = np.clip(colour + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            folder = work / "objects" / f"obj{o}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{k}.png")
    (work / "one").mkdir(exist_ok=True)
    shutil.copy(work / "objects" / "obj0" / "0.png", work / "one" / "0.png")
    print("preparing: a MILE run, its gallery and a DINO run (a minute) ...", file=sys.stderr, flush=True)
    mlsctl(REPO, "pretrain", str(REPO / "recipes" / "mile_fmnist_backbone.yaml"), "model.weights=null",
           "data.root=objects", "optim.epochs=1", "optim.batch_size=4", "--out", "run_mile", cwd=work)
    mlsctl(REPO, "index", "build", "objects", "--run", "run_mile", "--out", "gallery", cwd=work)
    mlsctl(REPO, "pretrain", str(REPO / "recipes" / "dino_fmnist_quick.yaml"), "data.root=objects",
           "optim.epochs=1", "optim.batch_size=8", "method.monitor_bank_size=64", "--out", "run_dino", cwd=work)
    (work / "ready").write_text("")


def commands(work: Path) -> dict[str, list[str]]:
    return {
        "search": ["search", "--set", "objects/obj1/0.png", "objects/obj1/1.png", "--index", "gallery"],
        "embed": ["embed", "one", "--run", "run_mile", "--out", "features-one", "--overwrite"],
        "bank": ["bank", "inspect", "run_dino"],
        "help": ["--help"],
    }


def timed(argv: list[str], env: dict, cwd: Path, expect: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0 or (expect is not None and expect not in result.stdout):
        raise SystemExit(f"{' '.join(argv[3:]) or argv[-1]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return seconds, cpu


EXPECT = {"search": "obj1", "embed": "wrote 1 rows", "bank": "cls", "help": "search"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repo", action="append", default=None, metavar="LABEL=PATH",
                        help="a checkout whose mlsctl is timed (repeat to compare) [default: this one]")
    parser.add_argument("--work", default=None, help="folder for the artefacts (kept) [default: a temporary one]")
    parser.add_argument("--out", default=str(RESULTS / "oneshot.json"))
    args = parser.parse_args()

    repos = {}
    for item in args.repo or [f"this={REPO}"]:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "mlsctl" / "cli" / "__init__.py").is_file():
            parser.error(f"--repo {item}: give LABEL=PATH of an mlsctl checkout")
        repos[label] = Path(path).resolve()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="oneshot-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepare(work)
        jobs = {"baseline": ([sys.executable, "-c", BASELINE], environment(REPO), None)}
        for label, repo in repos.items():
            for name, argv in commands(work).items():
                jobs[f"{name}@{label}"] = ([sys.executable, "-c", CONSOLE, *argv], environment(repo), EXPECT[name])
        for argv, env, expect in jobs.values():  # warm the file cache; not counted
            timed(argv, env, work, expect)
        times: dict[str, list[float]] = {name: [] for name in jobs}
        cpu: dict[str, list[float]] = {name: [] for name in jobs}
        names = list(jobs)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                argv, env, expect = jobs[name]
                wall, used = timed(argv, env, work, expect)
                times[name].append(wall)
                cpu[name].append(used)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    base, base_cpu = statistics.median(times["baseline"]), statistics.median(cpu["baseline"])
    rows = {name: {"median_s": round(statistics.median(v), 3), "ratio": round(statistics.median(v) / base, 2),
                   "median_cpu_s": round(statistics.median(cpu[name]), 3),
                   "cpu_ratio": round(statistics.median(cpu[name]) / base_cpu, 2),
                   "seconds": [round(x, 3) for x in v], "cpu_seconds": [round(x, 3) for x in cpu[name]]}
            for name, v in times.items()}
    print(f"\n{'command':24} {'wall s':>7} {'ratio':>6} {'CPU s':>7} {'ratio':>6}   (ratio: ÷ python -c \"{BASELINE}\")")
    for name, row in rows.items():
        print(f"{name:24} {row['median_s']:7.2f} {row['ratio']:6.2f} {row['median_cpu_s']:7.2f} {row['cpu_ratio']:6.2f}")
    from mlsctl import atomic

    atomic.write_json(args.out, {
        "benchmark": "oneshot", "rounds": args.rounds, "baseline": f'python -c "{BASELINE}"',
        "repos": {k: str(v) for k, v in repos.items()}, "results": rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_after": list(os.getloadavg())},
        "environment": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                        if k in os.environ},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
