"""Time of the batched device augmentation (mlsctl.data.device_augment) for one DINO batch.

A batch of ``--batch`` images, decoded and resized to 256 x 256 uint8, each cropped 2 x 224 (global1,
global2) + 10 x 96 (local) as ``dino_in1k`` does, DINO photometric pipeline: ms per batch of
crop_resize, photometric and normalize (the device's time, synchronised around each stage), and the
CPU time a loader worker spends drawing one image's parameters (sample_crop + draw_photometric for
its 12 crops). Prints a table and writes benchmarks/results/device_augment.json.

    python benchmarks/device_augment.py [--device cuda] [--batch 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from mlsctl import atomic
from mlsctl.data.device_augment import blur_kernel_size, crop_resize, draw_photometric, normalize, photometric
from mlsctl.data.multicrop import sample_crop

RESULTS = Path(__file__).resolve().parent / "results"
FRAME = 256
# recipes/dino_in1k.yaml: 2 global crops of 224 px at scale (0.25, 1), 10 local crops of 96 px at (0.05, 0.25)
CROPS = [("global1", 224, (0.25, 1.0)), ("global2", 224, (0.25, 1.0))] + [("local", 96, (0.05, 0.25))] * 10


def draw_batch(batch: int, seed: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per crop size: image index, boxes, flips and photometric parameters of every crop, as workers draw them."""
    generator = torch.Generator().manual_seed(seed)
    drawn: dict[int, list] = {}
    for image in range(batch):
        for role, size, scale in CROPS:
            crop = sample_crop(FRAME, FRAME, scale, generator=generator)
            drawn.setdefault(size, []).append((image, crop.box, crop.flip, draw_photometric("dino", role, generator)))
    return {size: (torch.tensor([c[0] for c in crops]), torch.tensor([c[1] for c in crops], dtype=torch.float32),
                   torch.tensor([c[2] for c in crops]), torch.stack([c[3] for c in crops]))
            for size, crops in drawn.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    drawn = draw_batch(args.batch, seed=0)
    draw_ms_per_image = (time.perf_counter() - t0) * 1e3 / args.batch
    images = torch.randint(0, 256, (args.batch, 3, FRAME, FRAME), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).to(device)
    drawn = {size: tuple(t.to(device) for t in tensors) for size, tensors in drawn.items()}

    stages = {"crop_resize": 0.0, "photometric": 0.0, "normalize": 0.0}
    warmup = 3
    for step in range(warmup + args.steps):
        for size, (index, boxes, flips, params) in drawn.items():
            synchronise()
            t0 = time.perf_counter()
            crops = crop_resize(images, index, boxes, flips, size)
            synchronise()
            t1 = time.perf_counter()
            crops = photometric(crops, params, blur_kernel_size(size))
            synchronise()
            t2 = time.perf_counter()
            normalize(crops)
            synchronise()
            t3 = time.perf_counter()
            if step >= warmup:
                stages["crop_resize"] += t1 - t0
                stages["photometric"] += t2 - t1
                stages["normalize"] += t3 - t2
    ms = {name: seconds * 1e3 / args.steps for name, seconds in stages.items()}
    ms["total"] = sum(ms.values())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "batch": args.batch, "frame": FRAME,
        "crops_per_image": [f"{role} {size}px scale {scale}" for role, size, scale in CROPS],
        "ms_per_batch": {name: round(value, 3) for name, value in ms.items()},
        "images_per_s": round(args.batch / (ms["total"] / 1e3), 1),
        "worker_draw_ms_per_image": round(draw_ms_per_image, 3),
        "steps": args.steps,
    }
    print(f"device augmentation on {result['device']}, batch {args.batch} x (2 x 224 + 10 x 96) from {FRAME} px uint8")
    for name, value in ms.items():
        print(f"  {name:12s} {value:9.2f} ms / batch")
    print(f"  = {result['images_per_s']} images/s; workers draw one image's parameters in {draw_ms_per_image:.3f} ms")
    RESULTS.mkdir(exist_ok=True)
    atomic.write_json(RESULTS / "device_augment.json", result)


if __name__ == "__main__":
    main()
