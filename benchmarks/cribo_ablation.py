"""Does CrIBo learn what the paper says? The loss ablation of its Table 5 on fmnist-scenes, at the
budget of the quick recipes (same ViT, crops, batch, steps and optimiser for every model).

Trains (or resumes, or reuses when finished) with the CLI:

* ``runs/dino_fmnist_quick`` — recipes/dino_fmnist_quick.yaml;
* ``runs/cribo_fmnist_quick-global_only`` — CrIBo's global loss only;
* ``runs/cribo_fmnist_quick-cross_view`` — global + cross-view object loss;
* ``runs/cribo_fmnist_quick`` — all three losses (recipes/cribo_fmnist_quick.yaml);

then embeds the train and val scenes (dense) with each teacher and with a random init of the same
architecture, runs `mlsctl eval knn-seg` (1/1, every labelled patch, k=30) for each, and draws the
bootstrapping-ratio curve of the full run (paper Fig. 6). Writes
benchmarks/results/cribo_ablation.json and benchmarks/results/cribo_bootstrap_ratio.png.

    python benchmarks/cribo_ablation.py [--data data/fmnist-scenes]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from mlsctl import atomic

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = [
    ("dino", "recipes/dino_fmnist_quick.yaml", [], "runs/dino_fmnist_quick"),
    ("cribo: global loss only", "recipes/cribo_fmnist_quick.yaml",
     ["method.cross_view_loss=false", "method.cross_image_loss=false"], "runs/cribo_fmnist_quick-global_only"),
    ("cribo: + cross-view object loss", "recipes/cribo_fmnist_quick.yaml", ["method.cross_image_loss=false"],
     "runs/cribo_fmnist_quick-cross_view"),
    ("cribo: + cross-image object loss (full)", "recipes/cribo_fmnist_quick.yaml", [], "runs/cribo_fmnist_quick"),
]


def mlsctl(*args: str) -> str:
    command = [sys.executable, "-m", "mlsctl", *args]
    print("$ mlsctl " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        sys.exit(f"mlsctl {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def train(recipe: str, overrides: list[str], run: Path) -> None:
    if (run / "summary.json").is_file():
        return
    resume = ["--resume"] if any((run / "checkpoints").glob("step-*/state.json")) else ["--overwrite"]
    mlsctl("pretrain", recipe, *overrides, "--out", str(run), *resume)


def knn_seg(run: Path, data: Path, tag: str, random_init: bool = False) -> dict:
    feats = Path("features") / "cribo_ablation" / tag
    extra = ["--random-init"] if random_init else []
    for split in ("train", "val"):
        mlsctl("embed", str(data / split / "images"), "--run", str(run), *extra, "--dense", "--out", str(feats / split))
    out = RESULTS / "cribo_ablation_knn_seg" / f"{tag}.json"
    mlsctl("eval", "knn-seg", "--train", str(feats / "train"), "--train-masks", str(data / "train" / "masks"),
           "--val", str(feats / "val"), "--val-masks", str(data / "val" / "masks"), "--fraction", "1/1",
           "--out", str(out))
    return json.loads(out.read_text())["results"][0]


def ratio_curve(run: Path, out: Path) -> list[list[float]]:
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["bootstrap_ratio"]) for r in rows if "bootstrap_ratio" in r]
    width, height, pad = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = max(0.05, max(v for _, v in points) * 1.1)
    last = points[-1][0]
    draw.line([(pad, pad // 2), (pad, height - pad), (width - pad // 2, height - pad)], fill="black")
    xy = [(pad + (width - 1.5 * pad) * s / last, height - pad - (height - 1.5 * pad) * v / top) for s, v in points]
    draw.line(xy, fill=(200, 40, 40), width=2)
    draw.text((pad + 6, pad // 2), f"bootstrapping ratio (max {top / 1.1:.3f})", fill="black")
    draw.text((width - 3 * pad, height - pad + 8), f"step (0..{last})", fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = height - pad - (height - 1.5 * pad) * frac
        draw.text((4, y - 6), f"{top * frac:.2f}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return [[s, round(v, 4)] for s, v in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/fmnist-scenes")
    args = parser.parse_args()
    data = Path(args.data)
    mlsctl("data", "fmnist-scenes", "--out", str(data))
    rows = []
    for name, recipe, overrides, run in VARIANTS:
        train(recipe, overrides, Path(run))
    result = knn_seg(Path(VARIANTS[0][3]), data, "random", random_init=True)
    rows.append({"model": "random init (same ViT)", "run": None, "miou": result["miou"]})
    print(f"random init: mIoU {100 * result['miou']:.1f}", flush=True)
    for name, recipe, overrides, run in VARIANTS:
        result = knn_seg(Path(run), data, Path(run).name)
        summary = json.loads((Path(run) / "summary.json").read_text())
        rows.append({"model": name, "run": run, "recipe": recipe, "overrides": overrides, "miou": result["miou"],
                     "iou_per_class": result["iou_per_class"], "steps": summary["steps"],
                     "train_seconds": summary["seconds"], "images_per_s": summary["images_per_s"]})
        print(f"{name}: mIoU {100 * result['miou']:.1f}", flush=True)
    full = Path(VARIANTS[-1][3])
    curve = ratio_curve(full, RESULTS / "cribo_bootstrap_ratio.png")
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    timing = {k: sum(m.get(k, 0.0) for m in metrics) for k in ("time/clustering", "time/retrieval", "time/bank",
                                                               "time/step")}
    share = (timing["time/clustering"] + timing["time/retrieval"] + timing["time/bank"]) / timing["time/step"]
    payload = {"benchmark": "cribo_ablation", "data": str(data), "protocol": "eval knn-seg 1/1, k=30, T=0.02, all patches",
               "budget": "the quick recipes: 744 steps of 32 scenes, 64 px views, ViT w128 d4 p8, CPU",
               "results": rows, "bootstrap_ratio": curve,
               "cribo_time_share_of_logged_steps": round(share, 4), "timing_sums_s": timing}
    atomic.write_json(RESULTS / "cribo_ablation.json", payload)
    print(f"CrIBo's own operations: {100 * share:.1f}% of the logged steps' time")
    print(f"wrote {RESULTS / 'cribo_ablation.json'} and {RESULTS / 'cribo_bootstrap_ratio.png'}")


if __name__ == "__main__":
    main()
