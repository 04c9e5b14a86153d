"""SOVE's judge selection: seconds per task, peak memory, and SOVE's share of a training step.

    python benchmarks/sove_judges.py                 # N=65,536, d=256, K=4,096, k=8, 4 tasks; + share
    python benchmarks/sove_judges.py --no-share      # judge building only

1. Building one step's judges (D and the scores that define Y) with
   :func:`mlsctl.methods.sove.ops.sample_judges` at the paper's sizes, in a fresh process each
   (so its peak resident memory, ``VmHWM``, is its own), beside the dense way of the authors' code
   (the whole [K, N] similarity matrix and a dense Y [K(k+1), K]) for reference. Goal: <= 0.5 s
   per task on this CPU, no [K, N] float32 matrix beyond one chunk.
2. SOVE's own operations (judge selection, votes and losses, memory updates: the ``time/`` metrics
   the method logs) as a share of the training step, from ``metrics.jsonl`` of one epoch of
   ``recipes/sove_fmnist_quick.yaml`` on fmnist-scenes (goal <= 15 %).

Part 1 alternates its three ways (ours, ours-bf16, dense; the order turns every round) for
``--rounds`` rounds of ``--repeats`` steps each, so that the load of a shared machine falls on all
of them alike; the table gives medians over rounds and the medians of the rounds' ratios.

Prints a table and writes ``benchmarks/results/sove_judges.json``. Quote ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "sove_judges.json"

from mlsctl.threads import prepare_environment  # noqa: E402

prepare_environment()  # the threads of mlsctl pretrain, here and in the children (they inherit it)


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, n: int, d: int, k_anchors: int, k: int, tasks: int, repeats: int, chunk: int) -> dict:
    """Runs in its own process: times ``repeats`` steps of ``tasks`` tasks, reports peak memory."""
    import torch
    import torch.nn.functional as F

    from mlsctl.methods.sove.ops import sample_judges, soft_labels

    memory = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    before = _rss_mib()

    def ours(generator, search=kind.partition("-")[2] or "exact"):
        return sample_judges(memory, tasks, k_anchors, k, eps=0.1, generator=generator, chunk=chunk, search=search)

    def dense(generator):  # the authors' way: one [K, N] matrix per task, a dense Y
        out = []
        for _ in range(tasks):
            perm = torch.randperm(n, generator=generator)
            anchors, pool = perm[:k_anchors], perm[k_anchors:]
            sims = memory[anchors] @ memory[pool].T  # [K, N - K]
            values, rows = sims.topk(k, dim=1)
            scores = torch.cat([torch.full((k_anchors, 1), 0.9), values.clamp(0, 1)], 1)
            out.append((memory[torch.cat([anchors[:, None], pool[rows]], 1)], soft_labels(scores)))
        return out

    fn = dense if kind == "dense" else ours
    fn(torch.Generator().manual_seed(1))  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = fn(torch.Generator().manual_seed(2 + r))
        times.append(time.perf_counter() - t0)
    times.sort()
    result = {"kind": kind, "seconds_per_step_median": times[len(times) // 2],
              "seconds_per_task": times[len(times) // 2] / tasks, "seconds_per_task_min": times[0] / tasks,
              "peak_extra_mib": _hwm_mib() - before, "threads": torch.get_num_threads()}
    if kind == "ours-bf16":  # the same draw searched exactly: how many supports agree
        exact = ours(torch.Generator().manual_seed(1 + repeats), search="exact")
        slots = out.slots[..., 1:]
        same = (slots == exact.slots[..., 1:]).all(-1)
        as_sets = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in
                                zip(slots.reshape(-1, k)[:2048], exact.slots[..., 1:].reshape(-1, k)[:2048])])
        result["agreement"] = {"anchors_with_identical_supports": float(same.float().mean()),
                               "support_set_overlap": float(as_sets.float().mean() / k),
                               "max_score_difference": float((out.scores - exact.scores).abs().max()),
                               "memory": "random unit vectors (the hardest case: near-ties everywhere)"}
    return result


def run_child(kind: str, args) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
            f"import sove_judges as b; print(json.dumps(b.child({kind!r}, {args.n}, {args.d}, {args.anchors}, {args.k}, "
            f"{args.tasks}, {args.repeats}, {args.chunk})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_share(epochs: int) -> dict:
    """One epoch of the quick recipe on fmnist-scenes; SOVE's share of each logged step."""
    from mlsctl import config
    from mlsctl.data.fmnist import build_scenes
    from mlsctl.train import pretrain

    work = Path(tempfile.mkdtemp(prefix="sove-share-"))
    build_scenes(work / "fmnist-scenes", n_train=2000, n_val=10, progress=False)
    recipe = config.load_recipe(str(REPO / "recipes" / "sove_fmnist_quick.yaml"),
                                [f"data.root={work / 'fmnist-scenes' / 'train' / 'images'}", f"optim.epochs={epochs}",
                                 "optim.warmup_epochs=0", "train.log_every=1", "train.checkpoint_every=100000"])
    pretrain(recipe, work / "run")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/method_share" in r][5:]  # past the first steps
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"steps": len(rows), "recipe": "recipes/sove_fmnist_quick.yaml", "epochs": epochs,
            "share_mean": mean("time/method_share"), "step_seconds_mean": mean("time/step"),
            "judges_seconds_mean": mean("time/judges"), "votes_seconds_mean": mean("time/votes"),
            "memory_seconds_mean": mean("time/memory"), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--anchors", type=int, default=4096)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="steps timed per child [default: 3]")
    parser.add_argument("--rounds", type=int, default=3, help="children of each way, alternately [default: 3]")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    parser.add_argument("--no-share", action="store_true", help="skip the training-step share")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT, help=f"the JSON [default: {OUT.relative_to(REPO)}]")
    args = parser.parse_args()

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "sizes": {"N": args.n, "d": args.d, "K": args.anchors, "k": args.k, "tasks": args.tasks, "chunk": args.chunk},
               "chunk_matrix_mib": args.chunk * 16384 * 4 / 2**20, "full_matrix_mib": args.anchors * args.n * 4 / 2**20}
    kinds = ["ours", "ours-bf16"] + ([] if args.no_dense else ["dense"])
    rounds: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        turn = round_ % len(kinds)
        for kind in kinds[turn:] + kinds[:turn]:
            rounds[kind].append(run_child(kind, args))
    for kind, children in rounds.items():
        steps = [c["seconds_per_step_median"] for c in children]
        results[kind] = {"kind": kind, "seconds_per_step_median": statistics.median(steps),
                         "seconds_per_task": statistics.median(steps) / args.tasks,
                         "seconds_per_task_min": min(c["seconds_per_task_min"] for c in children),
                         "peak_extra_mib": max(c["peak_extra_mib"] for c in children),
                         "threads": children[0]["threads"], "seconds_per_step_per_round": steps,
                         **({"agreement": children[0]["agreement"]} if "agreement" in children[0] else {})}
    pairs = [("ours-bf16", "ours")] + ([] if args.no_dense else [("ours", "dense"), ("ours-bf16", "dense")])
    results["ratios"] = {}
    for a, b in pairs:  # each round's two measures, taken beside each other
        per_round = [x["seconds_per_step_median"] / y["seconds_per_step_median"] for x, y in zip(rounds[a], rounds[b])]
        results["ratios"][f"{a}/{b}"] = {"median": statistics.median(per_round),
                                         "per_round": [round(r, 3) for r in per_round]}
    print(f"judges for N={args.n}, d={args.d}, K={args.anchors}, k={args.k} ({args.tasks} tasks per step), "
          f"median of {args.rounds} rounds")
    print(f"{'':<10}{'s/task':>10}{'s/step':>10}{'peak +MiB':>12}")
    for kind in kinds:
        r = results[kind]
        print(f"{kind:<10}{r['seconds_per_task']:>10.3f}{r['seconds_per_step_median']:>10.3f}{r['peak_extra_mib']:>12.0f}")
    for name, ratio in results["ratios"].items():
        print(f"time {name}: {ratio['median']:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratio['per_round'])})")
    agreement = results["ours-bf16"]["agreement"]
    print(f"bf16 search vs exact on the same draw: {100 * agreement['anchors_with_identical_supports']:.1f}% of anchors "
          f"with identical supports, {100 * agreement['support_set_overlap']:.1f}% of supports shared")
    print(f"one tile of scores: {results['chunk_matrix_mib']:.0f} MiB; a whole [K, N] matrix: {results['full_matrix_mib']:.0f} MiB")
    if not args.no_share:
        share = step_share(args.epochs)
        results["step_share"] = share
        print(f"SOVE's operations in a step of {share['recipe']}: {100 * share['share_mean']:.1f}% of "
              f"{share['step_seconds_mean']:.3f} s (judges {share['judges_seconds_mean'] * 1000:.1f} ms, votes "
              f"{share['votes_seconds_mean'] * 1000:.1f} ms, memories {share['memory_seconds_mean'] * 1000:.1f} ms; "
              f"{share['steps']} steps)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
