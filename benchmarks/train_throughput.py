"""Training throughput of a recipe on this machine, and where the time goes.

Measures, in one process and one run: images/s of the full training loop (`mlsctl pretrain`),
of the data pipeline alone (decode + multi-crop, with the recipe's workers), and of the model
step alone (forward + backward + optimiser + EMA on a fixed batch). Prints a table and writes
benchmarks/results/train_throughput.json.

    python benchmarks/train_throughput.py [--recipe recipes/dino_fmnist_quick.yaml] [--steps 40]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from mlsctl import atomic, config, methods
from mlsctl.data.images import ImageFolder
from mlsctl.data.loader import StepBatchSampler, make_loader
from mlsctl.schedules import Schedule
from mlsctl.train import ema_update, param_groups, pretrain

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/dino_fmnist_quick.yaml")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    recipe = config.load_recipe(args.recipe)
    method_cls = methods.method_class(recipe.method.name)
    folder = ImageFolder(recipe.data.root, "data.root")
    dataset, collate = method_cls.build_dataset(recipe, folder)
    batch_size = recipe.optim.batch_size
    warmup = 3

    # data only
    sampler = StepBatchSampler(len(dataset), batch_size, seed=0, total_steps=args.steps + warmup)
    loader = iter(make_loader(dataset, sampler, recipe.data.workers, collate_fn=collate))
    for _ in range(warmup):
        batch = dataset.on_device(next(loader))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(loader)
    data_ips = args.steps * batch_size / (time.perf_counter() - t0)

    # model only, on one fixed batch
    torch.manual_seed(0)
    method = method_cls(recipe, Schedule(max(1, len(dataset) // batch_size), recipe.optim.epochs))
    optimizer = torch.optim.AdamW(param_groups(method), lr=1e-4)
    for i in range(args.steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        out = method.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        ema_update(method.ema_pairs(), 0.996)
    model_ips = args.steps * batch_size / (time.perf_counter() - t0)

    # the full loop, as `mlsctl pretrain` runs it (with its checkpoints)
    n_images = (args.steps + warmup) * batch_size
    full = config.from_dict(config.to_dict(recipe), overrides=config.parse_overrides(["optim.epochs=1"]))
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "images"
        subset.mkdir()
        for i, path in enumerate(folder.files[:n_images]):
            (subset / f"{i:06d}{path.suffix}").symlink_to(path.resolve())
        full.data.root = str(subset)
        summary = pretrain(full, Path(tmp) / "run")
    result = {
        "recipe": args.recipe, "steps": args.steps, "batch_size": batch_size, "workers": recipe.data.workers,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "loop_images_per_s": round(summary.images_per_s, 2), "data_only_images_per_s": round(data_ips, 2),
        "model_only_images_per_s": round(model_ips, 2),
    }
    atomic.write_json(RESULTS / "train_throughput.json", result)
    print(f"{'measure':28} images/s")
    for key in ("loop_images_per_s", "data_only_images_per_s", "model_only_images_per_s"):
        print(f"{key:28} {result[key]:8.1f}")
    print(f"written to {RESULTS / 'train_throughput.json'}")


if __name__ == "__main__":
    main()
