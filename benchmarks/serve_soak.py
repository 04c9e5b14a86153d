"""`mlsctl serve` under a long mixed load, and under the costliest requests its limits let through.

    python benchmarks/serve_soak.py --run RUN --photos DIR [--seconds 60] [--clients 8] [--objects 100000]
    python benchmarks/serve_soak.py --run RUN --memory

Everything runs on 127.0.0.1 and is bounded in count and time.

**Soak** (default): the gallery holds ``--objects`` synthetic set latents of the run's width
(IVF-PQ, as ``benchmarks/serve.py``), served by ``mlsctl serve`` with its default limits. ``--clients``
clients, each on its own keep-alive connection, send for ``--seconds`` (at most ``--max-requests``
each) a mix of searches (2 photos, 3 in 4 requests) and adds (1 photo into one of the client's own
10 objects, with the token of the server's token file); photos are the image files under ``--photos``.
Reported: p50/p99 latency (all, searches, adds), requests/s, failed requests, lost adds (photos
acknowledged by a 200 and missing from ``GET /objects/ID`` — and from the gallery read from disk
after the server stopped), and the server's peak RSS. Writes benchmarks/results/serve_soak.json.

**Memory** (``--memory``): first the peak memory of decoding one pixel of each image mode (a fresh
process per mode, 36 MP images), against ``mlsctl.serve.BYTES_PER_PIXEL``; then a server with the
default limits (decode budget 1 GiB, 64 MiB bodies, 20 MiB photos), its idle RSS, and its peak RSS
for each of the costliest requests that pass the limits — 3 RGB photos of 88 MP (the pixels a
request may hold), one RGBA and one 32-bit float photo at the decode budget's edge, 63 photos of
1 MiB of noise (the body a request may send) — alone, then 8 at once. Writes
benchmarks/results/serve_memory.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsctl import atomic  # noqa: E402
from mlsctl.gallery import Gallery, IndexSettings, load_set_model, write_gallery  # noqa: E402
from search import clustered  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# a request the server answered with 2xx, as its log says it: "DATE TIME METHOD PATH STATUS MSms"
ANSWERED = re.compile(r"\S+ \S+ [A-Z]+ .* 2\d\d \d+\.\dms")


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join((f"--{boundary}\r\nContent-Disposition: form-data; name=\"photos\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, port: int, token: str | None = None):
        self.port, self.token = port, token
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, method: str, path: str, files=None) -> tuple[int, dict, float]:
        body, headers = None, {}
        if files is not None:
            body, headers["Content-Type"] = multipart(files)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        t0 = time.perf_counter()
        for attempt in range(2):  # a keep-alive connection the server closed: reconnect once
            try:
                self.connection.request(method, path, body=body, headers=headers)
                answer = self.connection.getresponse()
                data = answer.read()
                return answer.status, json.loads(data or b"{}"), time.perf_counter() - t0
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlsctl serve GALLERY ARGS`` on 127.0.0.1, with its memory read from /proc."""

    def __init__(self, gallery: Path, run: Path, *args: str, log: Path):
        self.port = free_port()
        self.gallery = gallery
        self.log = open(log, "w")
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.process = subprocess.Popen([sys.executable, "-m", "mlsctl", "serve", str(gallery), "--run", str(run),
                                         "--port", str(self.port), *args], stderr=self.log, stdout=self.log, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server ended: {Path(log).read_text()[-2000:]}")
            try:
                if Client(self.port).send("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        token_file = gallery / ".mlsctl.token"
        self.token = token_file.read_text().strip() if token_file.exists() else None

    def status(self, field: str) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self.log.close()


def synthetic_gallery(run: Path, folder: Path, objects: int) -> Path:
    model = load_set_model(run, device="cpu")  # its metadata only: the server it measures holds the GPU
    manifest = {"kind": "mlsctl-gallery", "source": "synthetic",
                "model": {"run": str(Path(run).resolve()), "step": model.step, "fingerprint": model.fingerprint,
                          "attend": model.attend, "dim": model.dim, "resolution": model.resolution,
                          "set_model": model.kind},
                "preprocessing": model.preprocessing()}
    latents = clustered(objects, torch.Generator().manual_seed(0), dim=model.dim)
    settings = IndexSettings("ivfpq", nprobe=64) if objects >= 10_000 else IndexSettings()
    write_gallery(folder, [f"obj{i:07d}" for i in range(objects)], latents * 5, [4] * objects, settings, manifest)
    return folder


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------- soak
def soak(args) -> dict:
    photos = sorted(p for p in args.photos.rglob("*.png"))[:400]
    if len(photos) < 4:
        raise SystemExit(f"--photos {args.photos} holds fewer than 4 PNG files")
    blobs = [(p.name, p.read_bytes()) for p in photos]
    work = Path(tempfile.mkdtemp(prefix="mlsctl-soak-"))
    server = None
    try:
        gallery = synthetic_gallery(args.run, work / "g", args.objects)
        server = Server(gallery, args.run, log=work / "serve.log")
        warm = Client(server.port)
        for i in range(5):
            warm.send("POST", "/search?k=10", files=blobs[2 * i:2 * i + 2])
        idle_rss = server.status("VmRSS")
        server.reset_peak()
        deadline = time.time() + args.seconds
        records: list[tuple[str, int, float]] = []
        acknowledged: dict[str, int] = {}
        errors: list[str] = []
        lock = threading.Lock()
        rss_samples = []
        sampling = True

        def sample():
            while sampling:
                try:
                    rss_samples.append(server.status("VmRSS"))
                except (OSError, KeyError):
                    return
                time.sleep(0.5)

        def client(c: int) -> None:
            rng = random.Random(c)
            connection = Client(server.port, server.token)
            for _ in range(args.max_requests):
                if time.time() >= deadline:
                    return
                if rng.random() < 0.75:
                    i = rng.randrange(len(blobs) - 1)
                    kind, path, files = "search", "/search?k=10", blobs[i:i + 2]
                else:
                    obj = f"soak-c{c}-{rng.randrange(10)}"
                    kind, path, files = "add", f"/objects/{obj}/photos", [blobs[rng.randrange(len(blobs))]]
                try:
                    status, answer, seconds = connection.send("POST", path, files=files)
                except OSError as exc:
                    status, answer, seconds = 0, {"error": f"{type(exc).__name__}: {exc}"}, float("nan")
                with lock:
                    records.append((kind, status, seconds))
                    if status != 200:
                        errors.append(f"{kind} {status}: {answer.get('error')}")
                    elif kind == "add":
                        acknowledged[obj] = acknowledged.get(obj, 0) + 1

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        sampling = False
        peak_rss = server.status("VmHWM")
        checker = Client(server.port)
        served = {obj: checker.send("GET", f"/objects/{obj}")[1].get("photos", 0) for obj in acknowledged}
        server.stop()
        server = None
        on_disk = Gallery(gallery)
        stored = {obj: (on_disk.count(obj) if obj in on_disk.row_of else 0) for obj in acknowledged}
        # what the log says beyond its two start lines, a line per answered request and the stop line:
        # failed requests, anything else the server had to say
        log_lines = [line for line in (work / "serve.log").read_text().splitlines()[2:]
                     if not ANSWERED.fullmatch(line) and not line.startswith("interrupted: ")]
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def ms(values, q):
        return round(1000 * float(np.percentile(values, q)), 1) if values else None

    latency = {kind: [seconds for k, _, seconds in records if kind in ("all", k) and not math.isnan(seconds)]
               for kind in ("all", "search", "add")}
    lost_served = sum(max(0, n - served[o]) for o, n in acknowledged.items())
    lost_stored = sum(max(0, n - stored[o]) for o, n in acknowledged.items())
    row = {"clients": args.clients, "seconds": round(wall, 1), "objects": args.objects, "photos_per_search": 2,
           "photos_per_add": 1, "run": str(args.run), "requests": len(records),
           "searches": sum(r[0] == "search" for r in records), "adds": sum(r[0] == "add" for r in records),
           "requests_per_s": round(len(records) / wall, 1), "failed_requests": len(errors), "failures": errors[:10],
           "lost_adds": {"acknowledged_photos": sum(acknowledged.values()), "missing_from_the_server": lost_served,
                         "missing_from_disk_after_stop": lost_stored},
           "latency_ms": {kind: {"p50": ms(values, 50), "p99": ms(values, 99), "max": ms(values, 100)}
                          for kind, values in latency.items()},
           "rss_mb": {"idle": round(idle_rss), "peak": round(peak_rss), "samples_max": round(max(rss_samples, default=0))},
           "server_log_lines": len(log_lines), "machine": machine()}
    print(f"{args.clients} clients for {wall:.0f} s against {args.objects:,} objects: {len(records)} requests "
          f"({row['requests_per_s']} /s), {len(errors)} failed, {lost_served} + {lost_stored} adds lost; latency p50 "
          f"{row['latency_ms']['all']['p50']} ms, p99 {row['latency_ms']['all']['p99']} ms (search p50/p99 "
          f"{row['latency_ms']['search']['p50']}/{row['latency_ms']['search']['p99']}, add "
          f"{row['latency_ms']['add']['p50']}/{row['latency_ms']['add']['p99']}); RSS idle {row['rss_mb']['idle']} MB, "
          f"peak {row['rss_mb']['peak']} MB")
    return row


# ---------------------------------------------------------------------------------------- memory
DECODE_PROBE = """
import sys
sys.path.insert(0, {repo!r})
from mlsctl.data.images import decode_rgb
from mlsctl.features import Preprocessing
data = open(sys.argv[1], "rb").read()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
pixels = Preprocessing(64, "square").pixels(decode_rgb(data))
print(status("VmHWM") - before)
"""


def image_bytes(mode: str, side: int, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("P" if mode == "P+t" else mode, (side, side))
    if mode == "P+t":
        image.info["transparency"] = 0
    options = {"compression": "tiff_deflate"} if fmt == "TIFF" else ({"quality": 50} if fmt == "JPEG" else {})
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode_table(work: Path, side: int = 6000) -> list[dict]:
    rows = []
    for mode, fmt in (("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("P+t", "PNG"), ("RGB", "PNG"), ("RGB", "JPEG"),
                      ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF")):
        path = work / f"{mode.replace(';', '').replace('+', '')}.{fmt.lower()}"
        path.write_bytes(image_bytes(mode, side, fmt))
        grown = int(subprocess.run([sys.executable, "-c", DECODE_PROBE.format(repo=str(REPO)), str(path)],
                                   capture_output=True, text=True, check=True, timeout=300).stdout)
        from PIL import Image

        from mlsctl.serve import decode_bytes

        with Image.open(path) as img:
            budgeted = decode_bytes(img.mode, img.info, img.format)
        measured = grown / side ** 2
        rows.append({"mode": mode, "format": fmt, "measured_bytes_per_pixel": round(measured, 2),
                     "budgeted_bytes_per_pixel": budgeted, "within": measured <= budgeted})
        print(f"decode {mode:>4} {fmt:<4}: {measured:5.2f} bytes/pixel measured, {budgeted} budgeted", flush=True)
    return rows


def memory(args) -> dict:
    from mlsctl.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from mlsctl.serve import BYTES_PER_PIXEL, MAX_REQUEST_PIXELS, Limits

    limits = Limits()
    work = Path(tempfile.mkdtemp(prefix="mlsctl-memory-"))
    server = None
    try:
        table = decode_table(work)
        gallery = synthetic_gallery(args.run, work / "g", 1000)
        budget = limits.decode_budget_bytes
        side_88 = int(math.isqrt(min(DEFAULT_MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS // 3)))
        edge = {mode: int(math.isqrt((budget - 2**20) // BYTES_PER_PIXEL[mode])) for mode in ("RGBA", "F")}
        noise = np.random.default_rng(0).integers(0, 256, (600, 580, 3), dtype=np.uint8)
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="PNG")
        cases = {
            f"3 RGB photos of {side_88}² ({3 * side_88 ** 2 / 1e6:.0f} MP: the pixels of a request)":
                [(f"rgb{i}.png", image_bytes("RGB", side_88, "PNG")) for i in range(3)],
            f"1 RGBA photo of {edge['RGBA']}² (at the decode budget's edge)":
                [("rgba.png", image_bytes("RGBA", edge["RGBA"], "PNG"))],
            f"1 float photo of {edge['F']}² (at the decode budget's edge)":
                [("float.tiff", image_bytes("F", edge["F"], "TIFF"))],
            f"63 noise photos of {len(buffer.getvalue()) / 2**20:.2f} MiB (the body of a request)":
                [(f"noise{i}.png", buffer.getvalue()) for i in range(63)],
        }
        server = Server(gallery, args.run, log=work / "serve.log")
        client = Client(server.port)
        for _ in range(3):
            client.send("POST", "/search", files=[("w.png", image_bytes("RGB", 64, "PNG"))])
        idle = server.status("VmRSS")
        results = []
        for name, files in cases.items():
            server.reset_peak()
            before = server.status("VmRSS")
            status, answer, seconds = client.send("POST", "/search", files=files)
            peak = server.status("VmHWM")
            results.append({"request": name, "status": status, "seconds": round(seconds, 2),
                            "rss_before_mb": round(before), "peak_mb": round(peak), "peak_over_idle_mb": round(peak - idle),
                            "error": answer.get("error")})
            print(f"{name}: {status} in {seconds:.1f} s, peak RSS {peak:.0f} MB (+{peak - idle:.0f} over idle)", flush=True)
        worst = max(results, key=lambda r: r["peak_mb"])
        files = cases[worst["request"]]
        server.reset_peak()
        answers = []

        def send():
            answers.append(Client(server.port).send("POST", "/search", files=files)[0])

        threads = [threading.Thread(target=send) for _ in range(8)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak = server.status("VmHWM")
        concurrent = {"request": f"8 at once: {worst['request']}", "statuses": sorted(answers), "seconds": round(wall, 1),
                      "peak_mb": round(peak), "peak_over_idle_mb": round(peak - idle)}
        print(f"{concurrent['request']}: {sorted(answers)} in {wall:.1f} s, peak RSS {peak:.0f} MB "
              f"(+{peak - idle:.0f} over idle)", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    bound = idle + (limits.decode_budget_bytes + 2 * limits.body_budget_bytes) / 2**20
    return {"limits": {"decode_budget_mb": limits.decode_budget_bytes / 2**20, "max_request_mb": limits.max_request_bytes / 2**20,
                       "max_upload_mb": limits.max_upload_bytes / 2**20, "body_budget_mb": limits.body_budget_bytes / 2**20,
                       "max_request_pixels": MAX_REQUEST_PIXELS},
            "decode_bytes_per_pixel": table, "idle_rss_mb": round(idle), "requests": results, "concurrent": concurrent,
            "documented_bound_mb": round(bound), "within_bound": max([r["peak_mb"] for r in results] + [concurrent["peak_mb"]]) <= bound,
            "run": str(args.run), "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a MILE run")
    parser.add_argument("--photos", type=Path, help="a folder of PNG photos to search and add with (soak)")
    parser.add_argument("--memory", action="store_true", help="measure RSS under the costliest requests instead")
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=5000, help="per client")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.memory:
        row = memory(args)
        out = args.out or RESULTS / "serve_memory.json"
    else:
        if args.photos is None:
            parser.error("--photos DIR is needed for the soak")
        row = soak(args)
        out = args.out or RESULTS / "serve_soak.json"
    atomic.write_json(out, row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
