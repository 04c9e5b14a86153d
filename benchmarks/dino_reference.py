"""Our DINO beside lightly's on identical inputs: the same images, backbone, head sizes, batch and
schedules, trained for the same steps; does training move the same way?

    pip install --no-deps --target /tmp/lightly-site lightly==1.6.0 lightning-utilities
    PYTHONPATH=/tmp/lightly-site python benchmarks/dino_reference.py              # ~20 min on 2 CPU cores
    PYTHONPATH=/tmp/lightly-site python benchmarks/dino_reference.py --epochs 1 --n-train 640 --n-val 200  # smoke

lightly (MIT licence) is a reference here, not a dependency: its ``DINOLoss``, ``DINOProjectionHead``,
``DINOTransform``, ``update_momentum`` and ``cosine_schedule`` run in a training loop of ten lines
below. Data: Fashion-MNIST items (the Debian package dataset-fashion-mnist), each 28 px item padded
to 32 px RGB, in class folders: ``--n-train`` from the train split, ``--n-val`` from t10k. An easy
data set on purpose: if DINO is sound, k-NN on its teacher's CLS features should move the same way
in both implementations.

Both sides: timm ``vit_small_patch16_224`` at width 128, depth 4, 4 heads, patch 4, 32 px (2.5 M
parameters with the head); head 1024 → 256 → 1024 prototypes, weight-normed last layer with gain 1;
2 global crops of 32 px at scale 0.4–1, no local crops, DINO's photometric pipeline; batch 32; AdamW,
lr 5e-4 after a linear warm-up of 0.3 epoch then cosine to 1e-5, weight decay 0.04 → 0.1 (cosine; none
on biases and norms); teacher momentum 0.996 → 1 (cosine); teacher temperature 0.04, student 0.1,
centre momentum 0.9; gradients clipped at 3. Ours is ``mlsctl pretrain dino_fmnist_quick`` with
overrides, in its own process. What differs: lightly clips the global gradient norm (ours each
parameter's, as DINO's code), draws its crops with torchvision's transforms (ours with
:mod:`mlsctl.data.multicrop`: the same distributions) and initialises its head its own way.

Measured: the loss and the teacher's entropy (of its centred, sharpened output, the mean over a batch)
every 50 steps, and k-NN top-1 (k = 20, T = 0.07, ``mlsctl eval knn``) of each teacher's backbone on
the validation items, beside the same architecture randomly initialised. Writes
``benchmarks/results/dino_reference.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlsctl.threads import prepare_environment  # noqa: E402

prepare_environment()  # the reference trains in this process: threads as mlsctl's own (no OpenMP spinning)

import torch  # noqa: E402

from mlsctl import atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dino_reference.json"
ARCH = {"arch": "vit_small_patch16_224", "img_size": 32, "patch_size": 4,
        "timm_kwargs": {"depth": 4, "embed_dim": 128, "num_heads": 4}}
OUT_DIM, HIDDEN, BOTTLENECK, BATCH, LR, MIN_LR, WARMUP_EPOCHS = 1024, 1024, 256, 32, 5e-4, 1e-5, 0.3
OURS = ["model.img_size=32", "model.patch_size=4", "data.global_crops.size=32", "data.global_crops.scale=[0.4,1.0]",
        "data.local_crops.count=0", f"method.out_dim={OUT_DIM}", f"method.hidden_dim={HIDDEN}",
        f"method.bottleneck_dim={BOTTLENECK}", f"optim.batch_size={BATCH}", f"optim.lr={LR}", "optim.scale_lr=false",
        f"optim.min_lr={MIN_LR}", f"optim.warmup_epochs={WARMUP_EPOCHS}", "optim.weight_decay=0.04",
        "optim.weight_decay_end=0.1", "optim.clip_grad=3.0", "method.teacher_temp=0.04",
        "method.warmup_teacher_temp_epochs=0", "method.momentum_teacher=0.996", "method.momentum_teacher_end=1.0",
        "train.log_every=50", "train.bank_health_every=0", "train.checkpoint_every=100000"]


def make_items(folder: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Fashion-MNIST items as 32 px RGB PNGs in class folders: train/ (train split), val/ (t10k)."""
    import numpy as np
    from PIL import Image

    from mlsctl.data.fmnist import CLASSES, fmnist_source, load_split

    if (folder / "done").is_file():
        return folder
    for split, n, name in (("train", n_train, "train"), ("test", n_val, "val")):
        images, labels = load_split(fmnist_source(), split)
        for i in np.random.default_rng(seed).permutation(len(images))[:n]:
            target = folder / name / CLASSES[labels[i]].replace("/", "-")
            target.mkdir(parents=True, exist_ok=True)
            item = np.pad(images[i], 2)
            Image.fromarray(np.stack([item] * 3, -1)).save(target / f"{i:05d}.png")
    (folder / "done").write_text("")
    return folder


def save_backbone(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path),
              metadata={"arch": ARCH["arch"], "model": json.dumps(ARCH), "format": "timm"})


def train_lightly(train: Path, out: Path, epochs: int, seed: int) -> list[dict]:
    """lightly's DINO parts in a plain loop; the teacher's backbone saved in mlsctl's timm layout."""
    import timm
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            kwargs = ARCH["timm_kwargs"]
            self.backbone = timm.create_model(ARCH["arch"], pretrained=False, num_classes=0, img_size=32,
                                              patch_size=4, drop_path_rate=0.0, **kwargs)
            self.head = DINOProjectionHead(kwargs["embed_dim"], HIDDEN, BOTTLENECK, OUT_DIM, freeze_last_layer=-1,
                                           norm_last_layer=True)

        def forward(self, x):
            return self.head(self.backbone(x))

    torch.manual_seed(seed)
    student, teacher = Model(), Model()
    teacher.load_state_dict(student.state_dict())  # weight_norm modules cannot be deep-copied
    deactivate_requires_grad(teacher)
    data = ImageFolder(str(train), transform=DINOTransform(global_crop_size=32, global_crop_scale=(0.4, 1.0),
                                                           n_local_views=0))
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=0)
    criterion = DINOLoss(output_dim=OUT_DIM, warmup_teacher_temp=0.04, teacher_temp=0.04,
                         warmup_teacher_temp_epochs=0, student_temp=0.1, center_momentum=0.9)
    decayed = [p for p in student.parameters() if p.requires_grad and p.ndim > 1]
    exempt = [p for p in student.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": exempt, "weight_decay": 0.0}], lr=LR)
    total, warm = epochs * len(loader), max(1, int(WARMUP_EPOCHS * len(loader)))
    records, step = [], 0
    for epoch in range(epochs):
        for views, _ in loader:
            lr = LR * (step + 1) / warm if step < warm else \
                MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = cosine_schedule(step, total, 0.04, 0.1)
            update_momentum(student, teacher, cosine_schedule(step, total, 0.996, 1.0))
            teacher_out = [teacher(v) for v in views[:2]]
            loss = criterion(teacher_out, [student(v) for v in views], epoch=epoch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == total:
                with torch.no_grad():
                    p = torch.softmax((teacher_out[0] - criterion.center) / 0.04, dim=-1)
                    entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
                value = float(loss.detach())
                records.append({"step": step, "loss": round(value, 4), "teacher_entropy": round(entropy, 4)})
                print(f"lightly step {step}/{total} loss {value:.4f} teacher entropy {entropy:.3f}", flush=True)
    save_backbone(teacher.backbone.state_dict(), out / "teacher.safetensors")
    return records


def mlsctl(args: list[str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write("$ mlsctl " + " ".join(args) + "\n")
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "mlsctl", *args], stdout=handle, stderr=subprocess.STDOUT,
                              cwd=REPO)
    if done.returncode:
        raise SystemExit(f"error: mlsctl {args[0]} failed (exit {done.returncode}); see {log}")


def train_ours(train: Path, out: Path, epochs: int, seed: int, log: Path) -> list[dict]:
    mlsctl(["pretrain", "dino_fmnist_quick", f"data.root={train}", f"optim.epochs={epochs}", f"seed={seed}", *OURS,
            "--out", str(out), "--overwrite"], log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "loss": round(r["loss"], 4), "teacher_entropy": round(r["teacher_entropy"], 4)}
            for r in rows if "loss" in r]


def knn_top1(items: Path, model: list[str], out: Path, log: Path) -> float:
    mlsctl(["eval", "knn", "--train", str(items / "train"), "--val", str(items / "val"), *model, "--k", "20",
            "--out", str(out)], log)
    result = json.loads(out.read_text())
    row = next(r for r in result["results"] if r["k"] == 20)
    return round(100 * row["top1"], 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of both trainings [default: 3]")
    parser.add_argument("--n-train", type=int, default=10000, help="training items [default: 10000]")
    parser.add_argument("--n-val", type=int, default=2000, help="validation items [default: 2000]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "fidelity-work" / "dino-reference")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    try:
        import lightly
    except ImportError:
        raise SystemExit("error: lightly is not installed; pip install --no-deps --target /tmp/lightly-site "
                         "lightly==1.6.0 lightning-utilities and run with PYTHONPATH=/tmp/lightly-site") from None
    work = options.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "mlsctl.log"
    items = make_items(work / f"items-{options.n_train}-{options.n_val}", options.n_train, options.n_val)
    started = time.perf_counter()
    curves, seconds = {}, {}
    begun = time.perf_counter()
    curves["lightly"] = train_lightly(items / "train", work / "lightly", options.epochs, options.seed)
    seconds["lightly"] = round(time.perf_counter() - begun, 1)
    begun = time.perf_counter()
    curves["mlsctl"] = train_ours(items / "train", work / "mlsctl", options.epochs, options.seed, log)
    seconds["mlsctl"] = round(time.perf_counter() - begun, 1)
    knn = {"random init": knn_top1(items, ["--run", str(work / "mlsctl"), "--random-init", "--seed", str(options.seed)],
                                   work / "knn-random.json", log),
           "lightly": knn_top1(items, ["--weights", str(work / "lightly" / "teacher.safetensors")],
                               work / "knn-lightly.json", log),
           "mlsctl": knn_top1(items, ["--run", str(work / "mlsctl")], work / "knn-mlsctl.json", log)}
    steps = curves["mlsctl"][-1]["step"] if curves["mlsctl"] else 0
    record = {"what": "DINO, mlsctl beside lightly on identical inputs (Fashion-MNIST items, 32 px)",
              "lightly": lightly.__version__, "torch": torch.__version__, "device": f"CPU, {platform.machine()}",
              "epochs": options.epochs, "steps": steps, "n_train": options.n_train, "n_val": options.n_val,
              "seed": options.seed, "seconds": seconds, "knn_top1_k20": knn, "curves": curves,
              "total_seconds": round(time.perf_counter() - started, 1)}
    atomic.write_json(options.out, record)
    print(f"\n{'':14} {'k-NN top-1 (k=20)':>18} {'final loss':>11} {'teacher entropy':>16}")
    for name in ("random init", "lightly", "mlsctl"):
        last = (curves.get(name) or [{}])[-1]
        print(f"{name:14} {knn[name]:17.2f}% {last.get('loss', float('nan')):11.4f} "
              f"{last.get('teacher_entropy', float('nan')):16.3f}")
    print(f"ln K = {math.log(OUT_DIM):.3f}; {steps} steps of {BATCH}; written to {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
