"""Seconds and peak memory of `eval knn-seg` on fmnist-scenes, against the bare faiss search.

For each training fraction, in a fresh child process (so its peak RSS is its own): the full
evaluation as `mlsctl eval knn-seg` runs it (memory building, search, label transfer,
upsampling, confusion matrix; 5 runs for fractions below 1), then the bare faiss search of the
same queries (every val patch, in the same batches) against the same memories. The overhead of
everything else is eval / search - 1 (goal < 25%).

Needs dense features of the train and val scenes, e.g. from `make demo`:

    python benchmarks/knn_seg.py [--train features/demo/trained-train --val features/demo/trained-val]

Prints a table and writes benchmarks/results/knn_seg.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(args) -> None:
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
    t0 = time.perf_counter()
    result = knn_seg.knn_segmentation(train, val, [fraction], settings, names=knn_seg.class_names(Path(args.train_masks)))
    eval_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    outcome = result["results"][0]

    # the bare search: same memories, same queries, same batches
    n = len(train)
    num_classes = result["num_classes"]
    queries = [F.normalize(d.reshape(-1, d.shape[-1]), dim=1).numpy()
               for _, d in val.features.iter_dense(batch=settings.query_batch)]
    search_s = 0.0
    for run in outcome["runs"]:
        seed = run["seed"]
        rows = knn_seg.training_rows(n, fraction, seed)
        per_image = None if settings.memory_size is None else max(1, settings.memory_size // len(rows))
        memory = knn_seg.build_memory(train.pairs(rows), num_classes, per_image=per_image,
                                      ignore_index=settings.ignore_index, generator=torch.Generator().manual_seed(seed))
        index = knn_seg.build_index(memory.features)
        k = min(settings.k, len(memory.features))
        for q in queries:
            t = time.perf_counter()
            index.search(np.ascontiguousarray(q, dtype=np.float32), k)
            search_s += time.perf_counter() - t
    print(json.dumps({
        "fraction": outcome["fraction"], "train_images": outcome["train_images"], "runs": len(outcome["runs"]),
        "memory_patches": outcome["runs"][0]["memory_patches"], "miou": outcome["miou"],
        "miou_std": outcome["miou_std"], "eval_s": round(eval_s, 3), "bare_search_s": round(search_s, 3),
        "search_inside_eval_s": round(sum(r["seconds"]["search"] for r in outcome["runs"]), 3),
        "overhead": round(eval_s / search_s - 1, 3), "peak_rss_mb": round(peak_mb, 1),
        "rss_after_imports_mb": round(baseline_mb, 1),
        "val_queries": int(sum(len(q) for q in queries)),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="features/demo/trained-train")
    parser.add_argument("--val", default="features/demo/trained-val")
    parser.add_argument("--train-masks", default="data/fmnist-scenes/train/masks")
    parser.add_argument("--val-masks", default="data/fmnist-scenes/val/masks")
    parser.add_argument("--fractions", nargs="+", default=["1/1", "1/8", "1/64", "1/128"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-size", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "knn_seg.json"))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for fraction in args.fractions:
        command = [sys.executable, __file__, "--child", fraction, "--train", args.train, "--val", args.val,
                   "--train-masks", args.train_masks, "--val-masks", args.val_masks, "--runs", str(args.runs)]
        if args.memory_size:
            command += ["--memory-size", str(args.memory_size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"fraction {row['fraction']:>6}  runs {row['runs']}  memory {row['memory_patches']:>7}  "
              f"eval {row['eval_s']:7.2f}s  bare search {row['bare_search_s']:7.2f}s  overhead "
              f"{100 * row['overhead']:5.1f}%  peak RSS {row['peak_rss_mb']:.0f} MB  mIoU {100 * row['miou']:.1f}",
              flush=True)
    import torch

    payload = {"benchmark": "knn_seg", "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
               "train": args.train, "val": args.val, "settings": {"k": 30, "temperature": 0.02, "runs": args.runs,
                                                                  "memory_size": args.memory_size, "index": "flat"},
               "goal": "overhead < 0.25", "results": rows}
    from mlsctl import atomic

    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
