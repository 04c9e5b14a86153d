"""Write tests/data/runs-c1cc6ba/<method>/: one tiny run of every method made with the code of
commit c1cc6ba (before the restore/registry refactor), for tests/test_old_runs.py.

Run it with the OLD code first on the path and nothing of the new tree's tests::

    git worktree add /tmp/before26 c1cc6ba
    PYTHONPATH=/tmp/before26 python tests/data/make_old_runs.py

It trains each method for 2 steps (epoch 1 of a tiny recipe, the recipes of tests/test_contract.py)
in a temporary folder, with the old checkout's own test helpers (its tests/conftest.py and
per-method test modules) for the data and recipes, prunes each run to what loading reads (config,
state, summary, teacher, the last checkpoint) and stores ``expected.safetensors``: the teacher
backbone's output (old ``mlsctl.load_backbone``) on ``torch.manual_seed(0); torch.randn(2, 3, 32, 32)``;
for refine, the refiner's (old ``mlsctl.refine.apply.load_refiner``) on :func:`refine_input`.
The training data stays out of the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import mlsctl

OLD = Path(mlsctl.__file__).resolve().parent.parent
sys.path.insert(0, str(OLD / "tests"))  # the old checkout's conftest and test helpers

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import make_images, tiny_recipe, write_recipe  # noqa: E402
from mlsctl import config  # noqa: E402

COMMIT = subprocess.run(["git", "-C", str(OLD), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
DEST = Path(__file__).resolve().parent / f"runs-{COMMIT or 'old'}"
TRAIN = {"checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1, "bank_health_every": 0}
TINY_VIT = {"depth": 1, "mlp_ratio": 2.0}  # on top of conftest's embed_dim 32, 2 heads, patch 8, img 32
DROP = {"optimizer.pt", "rng.pt"}  # resume state: loading weights, teacher and banks reads neither
ONE_EPOCH = {"epochs": 1, "warmup_epochs": 0, "freeze_last_layer_epochs": 0}  # 2 steps in every case


def _dino(data: Path) -> dict:
    raw = tiny_recipe(make_images(data / "images", 8, size=(32, 32)))
    raw["method"]["monitor_bank_size"] = 8
    return raw


def _cribo(data: Path) -> dict:
    raw = tiny_recipe(make_images(data / "images", 8, size=(32, 32)),
                      data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = {"name": "cribo", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_clusters": 4,
                     "bank_images": 2, "warmup_teacher_temp_epochs": 0}
    return raw


def _mile(data: Path) -> dict:
    rng = np.random.default_rng(0)
    for o in range(4):
        colour = rng.uniform(0, 255, 3)
        for k in range(2):
            pixels = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            (data / "train" / f"obj{o}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(data / "train" / f"obj{o}" / f"{k}.png")
    raw = tiny_recipe(data / "train", data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]},
                      optim__batch_size=2)
    raw["method"] = {"name": "mile", "set_length": 2, "cross_heads": 2, "out_dim": 64, "hidden_dim": 64,
                     "bottleneck_dim": 32, "warmup_teacher_temp_epochs": 0}
    return raw


def _sove(data: Path) -> dict:
    from test_sove import SOVE_METHOD

    raw = tiny_recipe(make_images(data / "images", 8, size=(32, 32)),
                      data__local_crops={"count": 2, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = dict(SOVE_METHOD)
    return raw


def _mls(data: Path) -> dict:
    from test_mls import mls_recipe

    return mls_recipe(make_images(data / "images", 8, size=(32, 32)))


def _ms(data: Path) -> dict:
    from test_ms import _class_images, _ms_recipe

    images = _class_images(data / "images", 4, 4)
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    labels = data / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{f},{f.split('/')[0]}\n" for f in files))
    return _ms_recipe(images, labels_file=str(labels))


def _refine(data: Path):
    from test_refine import _clusters, _folder

    x, y = _clusters(n_classes=8, per_class=4)
    feats = _folder(data / "feats", x, y)
    overrides = [f"data.root={feats}", "method.blocks=2", "method.neighbours=4", "method.zero_init=false",
                 "optim.batch_size=16"] + [f"optim.{k}={v}" for k, v in ONE_EPOCH.items()] \
        + [f"train.{k}={v}" for k, v in TRAIN.items()]
    path = OLD / "recipes" / "refine.yaml"
    return config.load_recipe(str(path), overrides), str(path)


CASES = {"dino": _dino, "cribo": _cribo, "mile": _mile, "sove": _sove, "mls": _mls, "ms": _ms, "refine": _refine}
KEEP = {"config.yaml", "state.json", "summary.json", "teacher.safetensors"}


def fixed_input() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def refine_input() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2, 16), torch.randn(2, 4, 16)


def make(name: str, tmp: Path) -> Path:
    from safetensors.torch import save_file

    from mlsctl.train import pretrain

    made = CASES[name](tmp / "data")
    if isinstance(made, dict):
        made["train"].update(TRAIN)
        made["optim"].update(ONE_EPOCH)
        made["model"].setdefault("timm_kwargs", {}).update(TINY_VIT)
        path = write_recipe(tmp / f"{name}.yaml", made)
        recipe, source = config.load_recipe(str(path)), str(path)
    else:
        recipe, source = made
    run = tmp / "runs" / name
    summary = pretrain(recipe, run, resume=False, recipe_source=source)
    assert summary.steps == 2, (name, summary.steps)
    out = DEST / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in sorted(run.iterdir()):
        if item.name in KEEP:
            shutil.copy2(item, out / item.name)
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())
    shutil.copytree(checkpoints[-1], out / "checkpoints" / checkpoints[-1].name, ignore=lambda _, names: DROP & set(names))
    if (run / "teacher.safetensors").is_file():
        with torch.no_grad():
            output = mlsctl.load_backbone(out)(fixed_input())
        save_file({"output": output.contiguous()}, str(out / "expected.safetensors"))
    else:  # refine: the run's refiner as `mlsctl refine apply` reads it, on fixed features
        from mlsctl.refine.apply import load_refiner

        x, neighbours = refine_input()
        with torch.no_grad():
            output = load_refiner(out).refiner(x, neighbours)
        save_file({"output": output.contiguous()}, str(out / "expected.safetensors"))
    return out


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = make(name, Path(tmp) / name)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"{name}: {out} {size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
