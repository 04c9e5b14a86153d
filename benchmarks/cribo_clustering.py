"""Time and peak memory of CrIBo's joint-space clustering on this machine.

Input as in the paper's COCO setting: a batch of 32 images, 196 tokens per view (two views), D=384,
K=32 and K=64 clusters, 5 clustering iterations (5 Sinkhorn scalings each). Each K runs in a fresh
process; peak memory is the growth of the process's peak RSS over its RSS just before the call
(inputs included in the baseline). Goal: ≤ 0.5 s and ≤ 300 MB at K=32 (a reference implementation
takes ~5.9 s and 1.8 GB here). Prints a table, writes benchmarks/results/cribo_clustering.json.

    python benchmarks/cribo_clustering.py [--ks 32 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(k: int, repeats: int, batch: int, tokens: int, dim: int) -> dict:
    import torch

    from mlsctl.methods.cribo.ops import joint_clustering, patch_positions

    torch.manual_seed(0)
    z = torch.randn(batch, 2 * tokens, dim)
    side = int(tokens ** 0.5)
    boxes = torch.tensor([[0.0, 0.0, 224.0, 224.0]]).repeat(batch, 1)
    flips = torch.zeros(batch, dtype=torch.bool)
    positions = torch.cat([patch_positions(boxes, flips, (side, side)),
                           patch_positions(boxes * 0.8 + 20, flips, (side, side))], 1)
    before = _rss_mb()
    joint_clustering(z, positions, k, generator=torch.Generator().manual_seed(0))  # first call: allocator warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        joint_clustering(z, positions, k, generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    return {"k": k, "batch": batch, "tokens_per_view": tokens, "dim": dim, "iterations": 5,
            "seconds_median": round(statistics.median(times), 4), "seconds_all": [round(t, 4) for t in times],
            "peak_extra_mb": round(peak - before, 1), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "cribo_clustering.json"))
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.repeats, args.batch, args.tokens, args.dim)))
        return
    rows = []
    for k in args.ks:
        done = subprocess.run([sys.executable, __file__, "--child", str(k), "--repeats", str(args.repeats),
                               "--batch", str(args.batch), "--tokens", str(args.tokens), "--dim", str(args.dim)],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"K={k:3d}  {row['seconds_median']:.3f} s (median of {args.repeats})  peak +{row['peak_extra_mb']:.0f} MB",
              flush=True)
    payload = {"benchmark": "cribo_clustering", "machine": platform.platform(),
               "goal": "K=32: <= 0.5 s and <= 300 MB", "results": rows}
    from mlsctl import atomic

    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
