"""Throughput of `mlsctl embed` against the bare backbone forward pass, measured in one run.

For each model (default: timm's ViT-S/16 at 224 px with random weights, and the architecture of
the quick demo recipe at 96 px), on the same images, batch size, resolution and thread count:

* embed: images/s of :func:`mlsctl.features.embed_folder` — listing, decoding, preprocessing,
  forward, fp16 conversion, writing the parts, assembling the shards and the manifest — into a
  fresh folder (the model is built beforehand, as the CLI does before it starts);
* forward: images/s of the backbone alone on a fixed random batch (no data, no output).

Forward and embed are measured alternately (forward, embed, forward, ...; 3 embeds by default);
each embed is compared with the mean of the forward passes around it, and the median ratio is
reported, since this machine's speed drifts. The ratio embed / forward is the share of the model's speed the command keeps (goal ≥ 0.9).
Prints a table and writes benchmarks/results/embed_throughput.json.

    python benchmarks/embed_throughput.py [--images data/fmnist-scenes/val/images] [--batch-size 64]
        [--workers 0 1] [--dense]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mlsctl import atomic
from mlsctl.features import embed_folder
from mlsctl.models.backbone import Backbone
from mlsctl.models.source import model_choice

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "vit_small_patch16_224@224": dict(arch="vit_small_patch16_224", img_size=224, patch_size=16, timm_kwargs={},
                                      images=256, forward_s=6.0),
    "quick-demo-vit@96": dict(arch="vit_small_patch16_224", img_size=96, patch_size=8,
                              timm_kwargs={"embed_dim": 128, "depth": 4, "num_heads": 4}, images=500, forward_s=2.0),
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


def subset(images: Path, limit: int, tmp: Path) -> Path:
    """The first ``limit`` images of ``images`` as symlinks in a fresh folder."""
    from mlsctl.data.images import find_images

    folder = tmp / "images"
    folder.mkdir()
    for path in find_images(images)[:limit]:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="data/fmnist-scenes/val/images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dense", action="store_true", help="also store dense maps")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved forward/embed measurements (median ratio)")
    parser.add_argument("--out", default=str(RESULTS / "embed_throughput.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        spec = MODELS[name]
        torch.manual_seed(0)
        backbone = Backbone(spec["arch"], img_size=spec["img_size"], patch_size=spec["patch_size"],
                            timm_kwargs=spec["timm_kwargs"])
        model = model_choice(backbone, name, "benchmark", None, spec["img_size"])
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                images = subset(Path(args.images), spec["images"], Path(tmp))
                options = dict(dense=args.dense, batch_size=args.batch_size, workers=workers, progress=False,
                               say=lambda _: None)
                embed_folder(images, Path(tmp) / "warm", model, **options)  # page cache, allocator
                forward = [forward_throughput(backbone, args.batch_size, spec["img_size"], spec["forward_s"])]
                embeds, ratios = [], []
                for repeat in range(args.repeats):
                    t0 = time.perf_counter()
                    summary = embed_folder(images, Path(tmp) / f"feats{repeat}", model, **options)
                    embeds.append((summary.rows + len(summary.skipped)) / (time.perf_counter() - t0))
                    forward.append(forward_throughput(backbone, args.batch_size, spec["img_size"], spec["forward_s"]))
                    ratios.append(embeds[-1] / ((forward[-2] + forward[-1]) / 2))
            rows.append({"model": name, "resolution": spec["img_size"], "batch_size": args.batch_size,
                         "workers": workers, "dense": args.dense, "images": summary.rows,
                         "embed_images_per_s": [round(x, 2) for x in embeds],
                         "forward_images_per_s": [round(x, 2) for x in forward],
                         "ratios": [round(x, 3) for x in ratios], "ratio": round(statistics.median(ratios), 3)})
            r = rows[-1]
            print(f"{name:28s} workers={workers}  embed {statistics.median(embeds):8.1f} img/s   forward "
                  f"{statistics.median(forward):8.1f} img/s   ratio {r['ratio']:.3f} (median of {r['ratios']})",
                  flush=True)
    payload = {
        "benchmark": "embed_throughput",
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "torch": torch.__version__},
        "images": args.images,
        "goal": "ratio >= 0.9",
        "results": rows,
    }
    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
