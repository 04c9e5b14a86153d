"""CPU time of `mlsctl eval knn-seg` on a miniature Pascal VOC, read from its folder and from its .tar.

Builds the miniature official layout of the tests (``tests/mini_datasets.py``) with ``--train``
extra training and ``--val`` extra validation images of ``--size`` (VOC-like 500x375 JPEGs by
default), the same as a plain ``.tar``, and a tiny randomly initialised ViT (width 32, patch 8)
as the model. For each form, in a fresh process each time, ``mlsctl eval knn-seg --dataset voc
--root FORM --fraction 1/1`` runs twice: *cold* (both splits embedded from the images, then the
evaluation) and *warm* (the cached features reused: reading masks, memory, search, metric). The
CPU time is the child process's user + system time (``getrusage``), wall time beside it; the
mIoU of both forms must agree. Beside it, in this process, the CPU time of opening both splits
and decoding every image and mask once (the part that differs between the two forms).

    python benchmarks/knn_seg_archive.py [--train 96 --val 48 --resolution 64 --repeats 3]

Prints a table and writes benchmarks/results/knn_seg_archive.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(REPO / "tests"))


def run_once(work: Path, root: Path, weights: Path, resolution: int, out: Path) -> dict:
    """One `eval knn-seg` in a child process: its CPU seconds, wall seconds and mIoU."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlsctl", "eval", "knn-seg", "--dataset", "voc", "--root", str(root),
                    "--weights", str(weights), "--resolution", str(resolution), "--fraction", "1/1",
                    "--out", str(out)], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    payload = json.loads(out.read_text())
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "miou": payload["results"][0]["miou"],
            "search": payload["results"][0]["runs"][0]["search"]}


def read_everything(root: Path) -> float:
    """CPU seconds (this process) to open both splits and decode every image and mask once."""
    from mlsctl.data.datasets import open_split

    started = time.process_time()
    for split in ("trainaug", "val"):
        data = open_split("voc", root, split)
        for image in data.images:
            data.tree.load_rgb(image)
            data.read_mask(image)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=96, help="extra training images")
    parser.add_argument("--val", type=int, default=48, help="extra validation images")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), help="image width and height")
    parser.add_argument("--resolution", type=int, default=64, help="input side of the tiny ViT")
    parser.add_argument("--repeats", type=int, default=3, help="cold+warm pairs per form (the median is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "knn_seg_archive.json")
    args = parser.parse_args()

    import mini_datasets as mini

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = mini.make_voc(tmp / "voc", extra=(args.train, args.val), size=tuple(args.size))
        forms = {"folder": folder, "tar": mini.make_tar(folder, tmp / "voc.tar")}
        weights = mini.write_tiny_weights(tmp / "tiny.safetensors", img_size=args.resolution)
        reading = {name: round(sorted(read_everything(root) for _ in range(args.repeats))[args.repeats // 2], 3)
                   for name, root in forms.items()}
        rows = {name: {"cold": [], "warm": []} for name in forms}
        for repeat in range(args.repeats):
            for name, root in forms.items():
                work = tmp / f"work-{name}-{repeat}"  # a fresh feature cache for each cold run
                work.mkdir()
                for phase in ("cold", "warm"):
                    rows[name][phase].append(run_once(work, root, weights, args.resolution,
                                                      work / f"{phase}.json"))
        from mlsctl.data.datasets import open_split

        sizes = {"train_images": len(open_split("voc", folder, "trainaug")),
                 "val_images": len(open_split("voc", folder, "val")),
                 "folder_mb": round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1),
                 "tar_mb": round(forms["tar"].stat().st_size / 2**20, 1)}

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    summary = {name: {phase: {"cpu_s": median([r["cpu_s"] for r in runs]), "wall_s": median([r["wall_s"] for r in runs])}
                      for phase, runs in phases.items()} for name, phases in rows.items()}
    mious = {r["miou"] for phases in rows.values() for runs in phases.values() for r in runs}
    record = {"benchmark": "eval knn-seg on a miniature Pascal VOC: folder vs .tar", **sizes,
              "image_size": list(args.size), "model": "tiny random ViT (width 32, depth 2, patch 8)",
              "resolution": args.resolution, "repeats": args.repeats, "same_miou_everywhere": len(mious) == 1,
              "miou": sorted(mious), "search": rows["folder"]["cold"][0]["search"], "median": summary, "runs": rows,
              "read_every_image_and_mask_cpu_s": reading,
              "tar_over_folder_cpu": {phase: round(summary["tar"][phase]["cpu_s"] / summary["folder"][phase]["cpu_s"], 3)
                                      for phase in ("cold", "warm")},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{sizes['train_images']} train / {sizes['val_images']} val images ({sizes['folder_mb']} MB folder, "
          f"{sizes['tar_mb']} MB tar), median of {args.repeats}:")
    print(f"{'form':8} {'cold CPU s':>11} {'cold wall s':>12} {'warm CPU s':>11} {'warm wall s':>12}")
    for name in forms:
        s = summary[name]
        print(f"{name:8} {s['cold']['cpu_s']:>11.2f} {s['cold']['wall_s']:>12.2f} {s['warm']['cpu_s']:>11.2f} "
              f"{s['warm']['wall_s']:>12.2f}")
    print(f"decoding every image and mask once, in process: folder {reading['folder']:.2f} s, tar "
          f"{reading['tar']:.2f} s CPU")
    print(f"same mIoU in every run: {record['same_miou_everywhere']}; wrote {args.out}")


if __name__ == "__main__":
    main()
