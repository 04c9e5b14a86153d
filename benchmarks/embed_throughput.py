"""Throughput of `mlsctl embed` against the bare backbone forward pass, measured in one run.

For each model (default: timm's ViT-S/16 at 224 px with random weights, and the architecture of
the quick demo recipe at 96 px), on the same images, batch size, resolution and thread count:

* embed: images/s of :func:`mlsctl.features.embed_folder` — listing, decoding, preprocessing,
  forward, fp16 conversion, writing the parts, assembling the shards and the manifest — into a
  fresh folder (the model is built beforehand, as the CLI does before it starts);
* forward: images/s of the backbone alone on a fixed random batch (no data, no output).

The ratio embed / forward is the share of the model's speed the command keeps (goal ≥ 0.9).
Prints a table and writes benchmarks/results/embed_throughput.json.

    python benchmarks/embed_throughput.py [--images data/fmnist-scenes/val/images] [--batch-size 64]
        [--workers 0 1] [--dense]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mlsctl.features import embed_folder
from mlsctl.models.backbone import Backbone
from mlsctl.models.source import _choice

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "vit_small_patch16_224@224": dict(arch="vit_small_patch16_224", img_size=224, patch_size=16, timm_kwargs={}),
    "quick-demo-vit@96": dict(arch="vit_small_patch16_224", img_size=96, patch_size=8,
                              timm_kwargs={"embed_dim": 128, "depth": 4, "num_heads": 4}),
}


def forward_throughput(backbone: Backbone, batch_size: int, resolution: int, seconds: float) -> float:
    batch = torch.randn(batch_size, 3, resolution, resolution)
    with torch.inference_mode():
        backbone(batch)  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            backbone(batch)
            done += batch_size
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="data/fmnist-scenes/val/images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dense", action="store_true", help="also store dense maps")
    parser.add_argument("--out", default=str(RESULTS / "embed_throughput.json"))
    args = parser.parse_args()
    images = Path(args.images)
    rows = []
    for name in args.models:
        spec = MODELS[name]
        torch.manual_seed(0)
        backbone = Backbone(spec["arch"], img_size=spec["img_size"], patch_size=spec["patch_size"],
                            timm_kwargs=spec["timm_kwargs"])
        model = _choice(backbone, name, "benchmark", None, spec["img_size"])
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                embed_folder(images, Path(tmp) / "warm", model, dense=args.dense, batch_size=args.batch_size,
                             workers=workers, progress=False, say=lambda _: None)  # page cache, allocator
                forward_before = forward_throughput(backbone, args.batch_size, spec["img_size"], 8.0)
                t0 = time.perf_counter()
                summary = embed_folder(images, Path(tmp) / "feats", model, dense=args.dense,
                                       batch_size=args.batch_size, workers=workers, progress=False,
                                       say=lambda _: None)
                embed_s = time.perf_counter() - t0
                forward_after = forward_throughput(backbone, args.batch_size, spec["img_size"], 8.0)
            embed_ips = (summary.rows + len(summary.skipped)) / embed_s
            forward_ips = (forward_before + forward_after) / 2
            rows.append({"model": name, "resolution": spec["img_size"], "batch_size": args.batch_size,
                         "workers": workers, "dense": args.dense, "images": summary.rows,
                         "embed_images_per_s": round(embed_ips, 2), "forward_images_per_s": round(forward_ips, 2),
                         "forward_before_after": [round(forward_before, 2), round(forward_after, 2)],
                         "ratio": round(embed_ips / forward_ips, 3)})
            r = rows[-1]
            print(f"{name:28s} workers={workers}  embed {r['embed_images_per_s']:8.1f} img/s   forward "
                  f"{r['forward_images_per_s']:8.1f} img/s   ratio {r['ratio']:.3f}", flush=True)
    payload = {
        "benchmark": "embed_throughput",
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "torch": torch.__version__},
        "images": str(images),
        "goal": "ratio >= 0.9",
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
