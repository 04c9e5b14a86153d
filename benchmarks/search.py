"""Speed of image-set search, the backbone excluded.

1. Query latency against galleries of 10k, 100k and 1M random vectors (width 384, ViT-S), flat
   and IVF-PQ (``mlsctl.gallery.build_index`` / ``search_index``: faiss IVF-PQ, then the
   ``refine × k`` candidates re-ranked with exact cosines), one query set at a time (its latent:
   one vector), and the recall@10 of IVF-PQ against flat: |top-10 IVF-PQ ∩ top-10 flat| / 10.
   The gallery is random but not structureless: 1M vectors spread uniformly over the sphere have
   no meaningful neighbours (every cosine ≈ 0) and no index can beat a scan on them. Each vector
   is a random "category" centre (n / 100 of them) plus noise (cosine ≈ 0.7 to its centre), and
   each query is a gallery vector plus noise (cosine ≈ 0.9), as photos of one object are.
2. Set-against-gallery search for |I| = 1, 2, 4, 8 photos per set, query and gallery alike (10k
   objects): the number of similarity computations and the wall time of MILE (one latent against
   one latent per object: N) against the single-image baseline (every query photo against every
   photo of every object, max per object: |I|² N).

    python benchmarks/search.py [--sizes 10000 100000 1000000] [--queries 200]

Prints tables and writes benchmarks/results/search.json. Goal: under 20 ms per query set at 1M
with IVF-PQ at recall@10 >= 0.95 against flat.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsctl import atomic  # noqa: E402
from mlsctl.gallery import IndexSettings, build_index, search_index, unit_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 384


def clustered(n: int, generator: torch.Generator) -> torch.Tensor:
    centres = F.normalize(torch.randn(max(1, n // 100), DIM, generator=generator), dim=1)
    owner = torch.randint(0, len(centres), (n,), generator=generator)
    out = torch.empty(n, DIM)
    for start in range(0, n, 100_000):
        block = slice(start, start + 100_000)
        noise = torch.randn(len(owner[block]), DIM, generator=generator) / DIM ** 0.5
        out[block] = F.normalize(centres[owner[block]] + noise, dim=1)
    return out


def latency(fn, queries: torch.Tensor) -> list[float]:
    fn(queries[:1])  # warm-up
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - t0)
    return times


def index_benchmark(sizes: list[int], n_queries: int, nprobe: int, refine: int) -> list[dict]:
    rows = []
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        gallery = clustered(n, generator)
        sources = torch.randint(0, n, (n_queries,), generator=generator)
        queries = F.normalize(gallery[sources] + 0.5 * torch.randn(n_queries, DIM, generator=generator) / DIM ** 0.5, dim=1)
        flat_settings = IndexSettings("flat")
        t0 = time.perf_counter()
        flat = build_index(gallery, flat_settings)
        flat_build = time.perf_counter() - t0
        unit = unit_rows(gallery)
        flat_times = latency(lambda q: search_index(flat, unit, q, 10, flat_settings), queries)
        _, truth = search_index(flat, unit, queries, 10, flat_settings)
        ivf_settings = IndexSettings("ivfpq", nprobe=nprobe, refine=refine)
        t0 = time.perf_counter()
        ivf = build_index(gallery, ivf_settings)
        ivf_build = time.perf_counter() - t0
        ivf_times = latency(lambda q: search_index(ivf, unit, q, 10, ivf_settings), queries)
        _, found = search_index(ivf, unit, queries, 10, ivf_settings)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), found.tolist())]))
        row = {"gallery": n, "dim": DIM, "queries": n_queries,
               "flat_ms_median": 1000 * statistics.median(flat_times), "flat_build_s": flat_build,
               "ivfpq_ms_median": 1000 * statistics.median(ivf_times),
               "ivfpq_ms_p95": 1000 * float(np.percentile(ivf_times, 95)), "ivfpq_build_s": ivf_build,
               "recall_at_10": recall, "nlist": ivf_settings.nlist, "m": ivf_settings.m, "nbits": ivf_settings.nbits,
               "nprobe": nprobe, "refine": refine}
        rows.append(row)
        print(f"{n:>9,}  flat {row['flat_ms_median']:8.2f} ms  ivfpq {row['ivfpq_ms_median']:7.2f} ms "
              f"(p95 {row['ivfpq_ms_p95']:.2f})  recall@10 {recall:.3f}  nlist {ivf_settings.nlist}  "
              f"build {ivf_build:.0f} s", flush=True)
    return rows


def set_benchmark(n_objects: int, set_sizes: list[int], repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in set_sizes:
        gallery_photos = F.normalize(torch.randn(n_objects * size, DIM, generator=generator), dim=1)
        gallery_latents = F.normalize(torch.randn(n_objects, DIM, generator=generator), dim=1)
        query_photos = F.normalize(torch.randn(size, DIM, generator=generator), dim=1)
        query_latent = F.normalize(torch.randn(1, DIM, generator=generator), dim=1)
        owner = torch.arange(n_objects).repeat_interleave(size)

        def mile():
            return (query_latent @ gallery_latents.T).topk(10)

        def single_image():
            best = (query_photos @ gallery_photos.T).max(0).values
            per_object = torch.full((n_objects,), -2.0).scatter_reduce(0, owner, best, reduce="amax")
            return per_object.topk(10)

        timings = {}
        for name, fn in (("mile", mile), ("single_image", single_image)):
            fn()
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            timings[name] = 1000 * statistics.median(samples)
        row = {"set_size": size, "objects": n_objects, "mile_similarities": n_objects,
               "single_image_similarities": size * size * n_objects, "mile_ms": timings["mile"],
               "single_image_ms": timings["single_image"]}
        rows.append(row)
        print(f"|I|={size}:  MILE {n_objects:,} similarities {timings['mile']:.2f} ms   single-image "
              f"{size * size * n_objects:,} similarities {timings['single_image']:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=256)
    parser.add_argument("--refine", type=int, default=10)
    parser.add_argument("--set-objects", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    args = parser.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, torch {torch.get_num_threads()} threads")
    index_rows = index_benchmark(args.sizes, args.queries, args.nprobe, args.refine)
    set_rows = set_benchmark(args.set_objects, [1, 2, 4, 8], repeats=20)
    payload = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__,
                           "torch": torch.__version__},
               "goal": "IVF-PQ at 1M: < 20 ms per query set, recall@10 >= 0.95 against flat",
               "index": index_rows, "set_search": set_rows}
    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
