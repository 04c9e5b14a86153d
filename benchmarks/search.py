"""Image-set search as users get it: the library call beside the bare index, adds, opening, retraining.

    python benchmarks/search.py [--sizes 10000 100000 1000000] [--queries 200] [--open-dim 1024]

The set embedding is excluded everywhere (``benchmarks/serve.py`` measures it through the server).
Galleries are real gallery folders (:func:`mlsctl.gallery.write_gallery`, IVF-PQ, width 384) of
random but not structureless latents: each is a random "category" centre (n / 100 of them) plus
noise (cosine ≈ 0.7 to its centre); each query is a gallery latent plus noise (cosine ≈ 0.9), as
photos of one object are. Uniform random vectors on the sphere have no meaningful neighbours.

1. **End to end vs bare index**, per size, interleaved in one run: ``Gallery.search`` (what
   ``mlsctl search`` and ``mlsctl serve`` call) against ``search_index`` on the same in-memory
   index and memory-mapped rows, median ms per query set; recall@10 of the gallery against exact
   search (a full scan of the normalised latents). Goal at 1M: ≤ 1.2× the bare time, ≤ 10 ms,
   recall@10 ≥ 0.95.
2. **One add** (``Gallery.append`` of one new object, files flushed to disk and committed) at each
   size: median of 20. Goal: the same at 10k and at 1M.
3. **Opening** a gallery of 1M × ``--open-dim`` (fp16 rows) in a fresh process: seconds, and the
   resident memory beside the index's own size.
4. **Growing**: 20% more objects from clusters the IVF quantiser never saw; recall@10 of the new
   objects before and after ``Gallery.retrain`` (what ``mlsctl index retrain`` runs).
5. **Set-against-gallery cost** (10k objects, |I| = 1..8 photos): MILE compares one latent per
   object, the single-image baseline |I|² photos per object.

Prints tables and writes benchmarks/results/search.json (one run; this machine is noisy: compare
the ratios measured within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsctl import atomic  # noqa: E402
from mlsctl.gallery import Gallery, IndexSettings, search_index, write_gallery  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 384
MANIFEST = {"kind": "mlsctl-gallery", "model": {"run": "/benchmark", "step": 0, "fingerprint": "0" * 64}}


def clustered(n: int, generator: torch.Generator, dim: int = DIM, shift: float = 0.0) -> torch.Tensor:
    centres = F.normalize(torch.randn(max(1, n // 100), dim, generator=generator) + shift, dim=1)
    owner = torch.randint(0, len(centres), (n,), generator=generator)
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):
        block = slice(start, start + 100_000)
        noise = torch.randn(len(owner[block]), dim, generator=generator) / dim ** 0.5
        out[block] = F.normalize(centres[owner[block]] + noise, dim=1)
    return out


def exact_top(unit: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row ids of the exact top k (a blockwise scan of the normalised rows)."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(unit), 200_000):
        block = np.asarray(unit[start:start + 200_000], dtype=np.float32)
        scores = queries @ block.T
        merged_scores = np.concatenate([best_scores, scores], 1)
        merged_rows = np.concatenate([best_rows, np.arange(start, start + len(block))[None].repeat(len(queries), 0)], 1)
        order = np.argsort(-merged_scores, 1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_rows = np.take_along_axis(merged_rows, order, 1)
    return best_rows


def recall(found: list[list[str]], truth: np.ndarray, names: list[str]) -> float:
    return float(np.mean([len(set(f) & {names[i] for i in t}) / len(t) for f, t in zip(found, truth)]))


def search_benchmark(sizes: list[int], n_queries: int, nprobe: int, refine: int, work: Path) -> list[dict]:
    rows = []
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        latents = clustered(n, generator)
        names = [f"obj{i:07d}" for i in range(n)]
        sources = torch.randint(0, n, (n_queries,), generator=generator)
        queries = F.normalize(latents[sources] + 0.5 * torch.randn(n_queries, DIM, generator=generator) / DIM ** 0.5, dim=1)
        settings = IndexSettings("ivfpq", nprobe=nprobe, refine=refine)
        folder = work / f"g{n}"
        t0 = time.perf_counter()
        write_gallery(folder, names, latents, [1] * n, settings, MANIFEST)
        build_s = time.perf_counter() - t0
        del latents
        gallery = Gallery(folder)
        unit_queries = queries.numpy()
        gallery.search(queries[0], 10)  # warm-up: the index and the pages of the rows
        search_index(gallery.index, gallery.unit, unit_queries[:1], 10, gallery.settings)
        library, bare = [], []
        for q in range(n_queries):  # interleaved: the two share the machine's state
            t0 = time.perf_counter()
            search_index(gallery.index, gallery.unit, unit_queries[q:q + 1], 10, gallery.settings)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gallery.search(queries[q], 10)
            library.append(time.perf_counter() - t0)
        found = [[o for o, _ in row] for row in gallery.search_many(queries, 10)]
        truth = exact_top(gallery.unit, unit_queries, 10)
        adds = []
        new = clustered(20, generator)
        for i in range(20):
            t0 = time.perf_counter()
            gallery.append([f"new{i}"], new[i:i + 1], [1])
            adds.append(time.perf_counter() - t0)
        row = {"objects": n, "dim": DIM, "queries": n_queries, "nlist": gallery.settings.nlist, "m": gallery.settings.m,
               "nprobe": nprobe, "refine": refine, "build_s": round(build_s, 1),
               "library_ms_median": 1000 * statistics.median(library), "bare_index_ms_median": 1000 * statistics.median(bare),
               "ratio": statistics.median(library) / statistics.median(bare),
               "library_ms_p95": 1000 * float(np.percentile(library, 95)),
               "recall_at_10": recall(found, truth, names), "add_ms_median": 1000 * statistics.median(adds)}
        rows.append(row)
        print(f"{n:>9,} objects: Gallery.search {row['library_ms_median']:6.2f} ms, bare index "
              f"{row['bare_index_ms_median']:6.2f} ms (x{row['ratio']:.2f}), recall@10 {row['recall_at_10']:.3f}, "
              f"one add {row['add_ms_median']:.2f} ms, build {build_s:.0f} s", flush=True)
        shutil.rmtree(folder)
    return rows


OPEN_PROBE = """
import json, sys, time


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


import numpy as np, torch
from mlsctl.gallery import Gallery
before = rss_mb()
t0 = time.perf_counter()
g = Gallery(sys.argv[1])
opened = time.perf_counter()
g.search(torch.from_numpy(np.asarray(g.unit[0], dtype=np.float32)), 10)
print(json.dumps({"open_s": opened - t0, "first_search_s": time.perf_counter() - opened,
                  "rss_after_imports_mb": before, "rss_after_open_and_search_mb": rss_mb(), "objects": len(g)}))
"""


def open_benchmark(n: int, dim: int, work: Path) -> dict:
    """Open in a fresh process (nothing cached in it), resident memory from /proc (VmRSS)."""
    generator = torch.Generator().manual_seed(7)
    names = [f"obj{i:07d}" for i in range(n)]
    folder = work / f"open{dim}"
    t0 = time.perf_counter()
    write_gallery(folder, names, clustered(n, generator, dim), [1] * n, IndexSettings("ivfpq"), MANIFEST, "fp16")
    build_s = time.perf_counter() - t0
    probe = json.loads(subprocess.run([sys.executable, "-c", OPEN_PROBE, str(folder)], capture_output=True, text=True,
                                      check=True).stdout)
    sizes = {("index.faiss" if p.suffix == ".faiss" else p.name): p.stat().st_size / 2**20
             for p in folder.rglob("*") if p.is_file()}  # the row files live in the gallery's version folder
    row = {"objects": n, "dim": dim, "storage": "fp16", "build_s": round(build_s, 1), **probe,
           "rss_added_by_gallery_mb": probe["rss_after_open_and_search_mb"] - probe["rss_after_imports_mb"],
           "file_mb": {k: round(v, 1) for k, v in sizes.items()}}
    print(f"open {n:,} x {dim}: {probe['open_s']:.2f} s; resident memory +{row['rss_added_by_gallery_mb']:.0f} MB "
          f"(index.faiss {sizes.get('index.faiss', 0):.0f} MB, latents.bin {sizes.get('latents.bin', 0):.0f} MB on disk)",
          flush=True)
    return row


def growth_benchmark(n: int, nprobe: int, work: Path) -> dict:
    generator = torch.Generator().manual_seed(11)
    old = clustered(n, generator)
    names = [f"old{i}" for i in range(n)]
    folder = work / "grow"
    write_gallery(folder, names, old, [1] * n, IndexSettings("ivfpq", nprobe=nprobe), MANIFEST)
    gallery = Gallery(folder)
    extra = n // 5
    new = clustered(extra, generator, shift=2.0)  # centres in a region the quantiser did not see
    new_names = [f"new{i}" for i in range(extra)]
    gallery.append(new_names, new, [1] * extra)
    names += new_names
    queries = F.normalize(new[:200] + 0.5 * torch.randn(200, DIM, generator=generator) / DIM ** 0.5, dim=1)
    truth = exact_top(gallery.unit, queries.numpy(), 10)
    before = recall([[o for o, _ in r] for r in gallery.search_many(queries, 10)], truth, names)
    share = gallery.added_since_training()
    t0 = time.perf_counter()
    gallery.retrain()
    retrain_s = time.perf_counter() - t0
    after = recall([[o for o, _ in r] for r in gallery.search_many(queries, 10)], truth, names)
    print(f"grown by {extra:,} objects of unseen clusters ({100 * share:.0f}% since training): recall@10 of their "
          f"queries {before:.3f} -> {after:.3f} after retrain ({retrain_s:.0f} s), nprobe {nprobe}", flush=True)
    shutil.rmtree(folder)
    return {"objects": n, "added": extra, "share_since_training": share, "nprobe": nprobe, "recall_before": before,
            "recall_after_retrain": after, "retrain_s": retrain_s}


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
        rows.append({"set_size": size, "objects": n_objects, "mile_similarities": n_objects,
                     "single_image_similarities": size * size * n_objects, "mile_ms": timings["mile"],
                     "single_image_ms": timings["single_image"]})
        print(f"|I|={size}:  MILE {n_objects:,} similarities {timings['mile']:.2f} ms   single-image "
              f"{size * size * n_objects:,} similarities {timings['single_image']:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=256)
    parser.add_argument("--refine", type=int, default=10)
    parser.add_argument("--open-objects", type=int, default=1_000_000)
    parser.add_argument("--open-dim", type=int, default=1024)
    parser.add_argument("--grow-objects", type=int, default=100_000)
    parser.add_argument("--set-objects", type=int, default=10_000)
    parser.add_argument("--work", type=Path, help="where galleries are built [default: a temporary folder]")
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    parser.add_argument("--only-open", action="store_true", help="only the opening measurement")
    args = parser.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, torch {torch.get_num_threads()} threads")
    work = Path(tempfile.mkdtemp(prefix="mlsctl-search-", dir=args.work))
    try:
        search_rows = search_benchmark(args.sizes, args.queries, args.nprobe, args.refine, work)
        open_row = open_benchmark(args.open_objects, args.open_dim, work) if args.open_objects else None
        shutil.rmtree(work / f"open{args.open_dim}", ignore_errors=True)
        growth = growth_benchmark(args.grow_objects, 32, work) if args.grow_objects else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    set_rows = set_benchmark(args.set_objects, [1, 2, 4, 8], repeats=20)
    payload = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__,
                           "torch": torch.__version__},
               "goal": "Gallery.search at 1M (width 384, IVF-PQ): <= 1.2x the bare index time, <= 10 ms, recall@10 >= 0.95",
               "search": search_rows, "open": open_row, "growth": growth, "set_search": set_rows}
    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
