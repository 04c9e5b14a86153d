"""`mlsctl serve` under load: latency of ``POST /search`` with 2 uploaded photos, and throughput.

    python benchmarks/serve.py --run RUN --photos DIR [--objects 100000] [--requests 200] [--clients 4]

RUN is a MILE run (the quick recipe's model is what the issue asks for); the gallery holds
``--objects`` synthetic set latents of the run's width (clustered as in ``benchmarks/search.py``),
written as a real gallery of that run's model (IVF-PQ), so that every request pays what a user's
does: upload, decode, the forward pass of two photos, the set encoder, the index search. Photos are
the image files under ``--photos`` (e.g. data/fmnist-products/query), two per request.

Reports p50/p95 latency of sequential requests and the requests per second of ``--clients``
concurrent clients (each sending ``--requests`` / clients requests), and the throughput of
``mlsctl search --sets`` (``--requests`` query sets of the same photo pairs in one call against the
same gallery: sets per second once the model is loaded, and the whole call's wall time); writes
benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsctl import atomic  # noqa: E402
from mlsctl.gallery import IndexSettings, load_set_model, write_gallery  # noqa: E402
from search import clustered  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join((f"--{boundary}\r\nContent-Disposition: form-data; name=\"photos\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, files: list[tuple[str, bytes]]) -> float:
    body, kind = multipart(files)
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": kind})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        json.loads(answer.read())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a MILE run")
    parser.add_argument("--photos", type=Path, required=True, help="a folder of photos to query with")
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()
    # absolute: the query sets of `search --sets` are read relative to their file, in a temporary folder
    photos = sorted(p.resolve() for p in args.photos.rglob("*.png"))[:400]
    if len(photos) < 2:
        parser.error(f"--photos {args.photos} holds {len(photos)} PNG files; give a folder of at least 2")
    pairs = [[(p.name, p.read_bytes()) for p in photos[i:i + 2]] for i in range(0, len(photos) - 1, 2)]
    model = load_set_model(args.run, device="cpu")  # its metadata only: the server it measures holds the GPU
    work = Path(tempfile.mkdtemp(prefix="mlsctl-serve-"))
    process = None
    try:
        manifest = {"kind": "mlsctl-gallery", "source": "synthetic",
                    "model": {"run": str(Path(args.run).resolve()), "step": model.step, "fingerprint": model.fingerprint,
                              "attend": model.attend, "dim": model.dim, "resolution": model.resolution,
                              "set_model": model.kind},
                    "preprocessing": model.preprocessing()}
        latents = clustered(args.objects, torch.Generator().manual_seed(0), dim=model.dim)
        write_gallery(work / "g", [f"obj{i:07d}" for i in range(args.objects)], latents * 5, [4] * args.objects,
                      IndexSettings("ivfpq", nprobe=64), manifest)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        process = subprocess.Popen([sys.executable, "-m", "mlsctl", "serve", str(work / "g"), "--run", str(args.run),
                                    "--port", str(port)], stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        url = f"http://127.0.0.1:{port}/search?k=10"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        for pair in pairs[:5]:  # warm-up
            post(url, pair)
        sequential = [post(url, pairs[i % len(pairs)]) for i in range(args.requests)]
        per_client = args.requests // args.clients
        done: list[float] = []

        def client(offset: int) -> None:
            for i in range(per_client):
                done.append(post(url, pairs[(offset + i) % len(pairs)]))

        threads = [threading.Thread(target=client, args=(c * 37,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        sets_file = work / "sets.jsonl"
        sets_file.write_text("".join(json.dumps({"id": f"q{i}", "photos": [str(photos[(2 * i) % len(photos)]),
                                                                           str(photos[(2 * i + 1) % len(photos)])]}) + "\n"
                                     for i in range(args.requests)))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "mlsctl", "search", "--sets", str(sets_file), "--index",
                                 str(work / "g"), "-k", "10"], capture_output=True, text=True, env=env, check=True)
        sets_wall = time.perf_counter() - t0
        answered = len(result.stdout.strip().splitlines())
        said = result.stderr.strip().splitlines()[-1]  # "searched N sets in S s (R sets/s)"
        sets_seconds = float(said.split(" in ")[1].split("s")[0])
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    row = {"objects": args.objects, "width": model.dim, "photos_per_request": 2, "run": str(args.run),
           "p50_ms": 1000 * statistics.median(sequential), "p95_ms": 1000 * float(np.percentile(sequential, 95)),
           "clients": args.clients, "concurrent_requests": len(done), "requests_per_s": len(done) / wall,
           "concurrent_p50_ms": 1000 * statistics.median(done),
           "search_sets": {"sets": answered, "photos_per_set": 2, "seconds_searching": sets_seconds,
                           "sets_per_s": answered / sets_seconds, "call_wall_s": sets_wall},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    print(f"/search with 2 photos against {args.objects:,} objects: p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms; "
          f"{args.clients} clients: {row['requests_per_s']:.1f} requests/s (p50 {row['concurrent_p50_ms']:.1f} ms)")
    print(f"mlsctl search --sets: {answered} sets of 2 photos, {row['search_sets']['sets_per_s']:.1f} sets/s once loaded; "
          f"the whole call {sets_wall:.1f} s (imports and model load included)")
    atomic.write_json(args.out, row)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
