"""The evaluations' exact nearest-neighbour search: torch on the GPU against faiss-cpu, on the same memory.

    python benchmarks/gpu_search.py [--memory 1000000] [--queries 20000] [--dim 384] [--k 30]

A knn-seg-sized problem (unit-norm random patches as the memory, others as queries): faiss's
``IndexFlatIP`` on every CPU core against :func:`mlsctl.evaluate.knn.exact_search` on the memory's
device (CUDA where there is one). Reports the share of queries whose k neighbours are identical and
in the same order (ties aside, scores agree to float32 rounding), the largest score difference and
the time of each (median of ``--repeats``, the GPU synchronised, the index build and the copy of
the memory to the GPU excluded from both). JSON to ``benchmarks/results/gpu_search.json`` (``--out``).
Needs faiss-cpu on the machine (on a device: ``WITH_FAISS=1 bash scripts/device_wheels.sh``, and
carry ``.whl`` without ``.fmnist``: this benchmark makes its own data).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mlsctl import atomic  # noqa: E402
from mlsctl.evaluate.knn import exact_search  # noqa: E402


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_search.json")
    options = parser.parse_args(argv)
    import faiss

    generator = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(options.memory, options.dim, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(options.queries, options.dim, generator=generator), dim=1)
    index = faiss.IndexFlatIP(options.dim)
    index.add(memory.numpy())
    faiss_s, (faiss_scores, faiss_ids) = timed(lambda: index.search(queries.numpy(), options.k), options.repeats,
                                               lambda: None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_device = memory.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    exact_search(on_device, queries[:64], options.k)  # warm-up: kernels, allocator
    torch_s, (scores, ids) = timed(lambda: exact_search(on_device, queries, options.k), options.repeats, sync)
    same = (ids.numpy() == faiss_ids).all(axis=1)
    result = {
        "memory": options.memory, "queries": options.queries, "dim": options.dim, "k": options.k,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "faiss_threads": faiss.omp_get_max_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "faiss": faiss.__version__,
        "faiss_seconds": round(faiss_s, 4), "torch_seconds": round(torch_s, 4),
        "faiss_over_torch": round(faiss_s / torch_s, 2),
        "identical_neighbour_lists": round(float(same.mean()), 6),
        "max_score_difference": float((scores - torch.from_numpy(faiss_scores)).abs().max()),
    }
    atomic.write_json(options.out, result)
    for key, value in result.items():
        print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
