"""Seconds and peak memory of `eval knn-seg` on fmnist-scenes, against the bare faiss search.

For each training fraction: the full evaluation as `mlsctl eval knn-seg` runs it (memory building,
search, label transfer, upsampling, confusion matrix; ``--runs`` runs for fractions below 1), and
the bare faiss search of the same queries (every val patch, in the same batches) against the same
memories — the reference: what any implementation of the protocol on faiss, Hummingbird's
included, must spend. The overhead of everything else is eval / search - 1 (goal < 25%).

Each measure runs in a fresh child process (so its peak RSS is its own) that first prepares its
threads as every `mlsctl` command does (mlsctl/threads.py; a checkout without that module runs
with the environment as it is), then times eval and search alternately (``--pairs`` times). With
several ``--repo LABEL=PATH`` (checkouts timed in turn, e.g. before and after a change) the
children alternate between them, ``--rounds`` times; ``--load N`` keeps N busy processes (one core
each) running meanwhile, as other jobs of a shared machine would. The table gives the medians and
the median of the per-pair ratios eval / search.

Needs dense features of the train and val scenes, e.g. from `make demo`:

    python benchmarks/knn_seg.py [--train features/demo/backbone-train --val features/demo/backbone-val]
    python benchmarks/knn_seg.py --fractions 1/8 --runs 1 --load 1 --repo before=../main --repo after=.

Prints a table and writes benchmarks/results/knn_seg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def child(args) -> None:
    try:  # what every mlsctl command does before it imports torch or faiss
        from mlsctl.threads import prepare_environment
    except ImportError:  # a checkout from before mlsctl/threads.py
        prepare_environment = None
    if prepare_environment is not None:
        prepare_environment()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from mlsctl.evaluate import knn_seg
    from mlsctl.features import Features

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train = knn_seg.FeatureMasks(Features(args.train), Path(args.train_masks), "train features")
    val = knn_seg.FeatureMasks(Features(args.val), Path(args.val_masks), "val features")
    fraction = Fraction(args.child)
    settings = knn_seg.Settings(runs=args.runs, memory_size=args.memory_size)
    names = knn_seg.class_names(Path(args.train_masks))
    n = len(train)
    queries = [F.normalize(d.reshape(-1, d.shape[-1]), dim=1).numpy()
               for _, d in val.features.iter_dense(batch=settings.query_batch)]

    def evaluate() -> tuple[float, dict]:
        t0 = time.perf_counter()
        result = knn_seg.knn_segmentation(train, val, [fraction], settings, names=names)
        return time.perf_counter() - t0, result

    def bare_search(outcome: dict, num_classes: int) -> float:
        """The same memories, the same queries, in the same batches: the searches alone."""
        seconds = 0.0
        for run in outcome["runs"]:
            seed = run["seed"]
            rows = knn_seg.training_rows(n, fraction, seed)
            per_image = None if settings.memory_size is None else max(1, settings.memory_size // len(rows))
            memory = knn_seg.build_memory(train.pairs(rows), num_classes, per_image=per_image,
                                          ignore_index=settings.ignore_index,
                                          generator=torch.Generator().manual_seed(seed))
            index = knn_seg.build_index(memory.features)
            k = min(settings.k, len(memory.features))
            for q in queries:
                t = time.perf_counter()
                index.search(np.ascontiguousarray(q, dtype=np.float32), k)
                seconds += time.perf_counter() - t
        return seconds

    evals, searches, outcome, result = [], [], None, None
    for _ in range(args.pairs):  # eval, search, eval, search, ...
        seconds, result = evaluate()
        outcome = result["results"][0]
        evals.append(seconds)
        searches.append(bare_search(outcome, result["num_classes"]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    print(json.dumps({
        "fraction": outcome["fraction"], "train_images": outcome["train_images"], "runs": len(outcome["runs"]),
        "memory_patches": outcome["runs"][0]["memory_patches"], "miou": outcome["miou"],
        "miou_std": outcome["miou_std"], "eval_s": [round(x, 3) for x in evals],
        "bare_search_s": [round(x, 3) for x in searches],
        "ratios": [round(e / b, 3) for e, b in zip(evals, searches)],
        "search_inside_eval_s": round(sum(r["seconds"]["search"] for r in outcome["runs"]), 3),
        "peak_rss_mb": round(peak_mb, 1), "rss_after_imports_mb": round(baseline_mb, 1),
        "val_queries": int(sum(len(q) for q in queries)), "threads": threads,
    }))


def busy_processes(count: int) -> list[subprocess.Popen]:
    """``count`` processes that keep one core each busy (other jobs of a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="features/demo/backbone-train")
    parser.add_argument("--val", default="features/demo/backbone-val")
    parser.add_argument("--train-masks", default="data/fmnist-scenes/train/masks")
    parser.add_argument("--val-masks", default="data/fmnist-scenes/val/masks")
    parser.add_argument("--fractions", nargs="+", default=["1/1", "1/8", "1/64", "1/128"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-size", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=1, help="eval/search pairs per child [default: 1]")
    parser.add_argument("--rounds", type=int, default=3, help="children per fraction and checkout [default: 3]")
    parser.add_argument("--repo", action="append", default=None, metavar="LABEL=PATH",
                        help="a checkout whose mlsctl is timed (repeat to compare) [default: this one]")
    parser.add_argument("--load", type=int, default=0, help="busy processes running meanwhile [default: 0]")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "knn_seg.json"))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    repos = {}
    for item in args.repo or [f"this={REPO}"]:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "mlsctl" / "evaluate" / "knn_seg.py").is_file():
            parser.error(f"--repo {item}: give LABEL=PATH of an mlsctl checkout")
        repos[label] = Path(path).resolve()
    paths = [str(Path(p).resolve()) for p in (args.train, args.val, args.train_masks, args.val_masks)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # the busy processes are stopped on the way out
    load = busy_processes(args.load)
    rows = []
    try:
        for fraction in args.fractions:
            done: dict[str, list[dict]] = {label: [] for label in repos}
            for round_ in range(args.rounds):
                for label, repo in (list(repos.items()) if round_ % 2 == 0 else list(repos.items())[::-1]):
                    command = [sys.executable, __file__, "--child", fraction, "--train", paths[0], "--val", paths[1],
                               "--train-masks", paths[2], "--val-masks", paths[3], "--runs", str(args.runs),
                               "--pairs", str(args.pairs)]
                    if args.memory_size:
                        command += ["--memory-size", str(args.memory_size)]
                    env = dict(os.environ, PYTHONPATH=str(repo))
                    finished = subprocess.run(command, capture_output=True, text=True, env=env)
                    if finished.returncode:
                        sys.exit(finished.stderr)
                    done[label].append(json.loads(finished.stdout.strip().splitlines()[-1]))
            for label, children in done.items():
                first = children[0]
                evals = [x for c in children for x in c["eval_s"]]
                searches = [x for c in children for x in c["bare_search_s"]]
                ratios = [x for c in children for x in c["ratios"]]
                row = {"repo": label, "fraction": first["fraction"], "train_images": first["train_images"],
                       "runs": first["runs"], "memory_patches": first["memory_patches"], "miou": first["miou"],
                       "miou_std": first["miou_std"], "eval_s": statistics.median(evals),
                       "bare_search_s": statistics.median(searches), "ratio": statistics.median(ratios),
                       "overhead": round(statistics.median(ratios) - 1, 3), "pairs": ratios,
                       "peak_rss_mb": max(c["peak_rss_mb"] for c in children),
                       "rss_after_imports_mb": first["rss_after_imports_mb"], "val_queries": first["val_queries"],
                       "threads": first["threads"], "children": children}
                rows.append(row)
                print(f"{label:>8} fraction {row['fraction']:>6}  runs {row['runs']}  memory {row['memory_patches']:>7}  "
                      f"eval {row['eval_s']:7.2f}s  bare search {row['bare_search_s']:7.2f}s  eval/search "
                      f"{row['ratio']:5.2f} (pairs {', '.join(f'{r:.2f}' for r in ratios)})  peak RSS "
                      f"{row['peak_rss_mb']:.0f} MB  mIoU {100 * row['miou']:.1f}  {row['threads']}", flush=True)
    finally:
        for process in load:
            process.kill()
            process.wait()

    payload = {"benchmark": "knn_seg", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "load_processes": args.load},
               "train": args.train, "val": args.val, "repos": {k: str(v) for k, v in repos.items()},
               "settings": {"k": 30, "temperature": 0.02, "runs": args.runs, "memory_size": args.memory_size,
                            "index": "flat", "pairs": args.pairs, "rounds": args.rounds},
               "goal": "overhead < 0.25", "results": rows}
    sys.path.insert(0, str(REPO))
    from mlsctl import atomic

    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
