"""The fidelity suite: does each method show its paper's effect, in the paper's direction?

    python benchmarks/fidelity.py --profile smoke        # minutes; what `make test` exercises
    python benchmarks/fidelity.py --profile cpu          # ~2 h on 2 CPU cores; nohup it, rerun to resume
    python benchmarks/fidelity.py --profile gpu --budget-s 420 --pack-results out.tar.gz  # one device window
    python benchmarks/fidelity.py --profile gpu --unpack-results out.tar.gz  # merge what a window brought back
    python benchmarks/fidelity.py --profile cpu --list   # the cells and their state (--budget-s: their estimates)
    python benchmarks/fidelity.py --profile cpu --summary  # rebuild the report from finished cells
    python benchmarks/fidelity.py --profile warm --only 'products/mile-backbone/*'  # MILE from weights/ (~25 min)

A declared matrix of experiments (:data:`VARIANTS` × the profile's seeds). Each *cell* is a
pretrain (``mlsctl pretrain`` of a shipped quick recipe, with the variant's and the profile's
overrides and ``seed=S``) followed by its evaluation, every stage an ``mlsctl`` command in its own
process:

* fmnist-scenes: dense k-NN segmentation (``mlsctl eval knn-seg``, all training scenes as memory,
  k=30) of ``random`` (the untrained architecture, seed S), ``dino``, ``cribo-global``,
  ``cribo-cross-view`` and ``cribo`` (CrIBo's Table 5: global loss only, + cross-view object loss,
  + cross-image object loss); reported as mIoU and as foreground/background IoU (all item classes
  merged, which moves first at small budgets);
* fmnist-scenes, SOVE against DINO under the same budget: ``sove`` (9 judges per concept, with the
  patch loss), the judges ablation ``sove-1judge`` / ``sove-3judges`` (SOVE's Table 8: more CLS
  judges help) and ``sove-no-patch`` (without the non-parametric MIM loss); these, ``dino`` and
  ``random`` are also measured by image k-NN (``mlsctl eval knn``, k = 10 and 20, labels: the class
  of each scene's largest item, by mask pixels);
* fmnist-scenes, MLS against its MoCo-v2 baseline under the same budget: ``mocov2`` (λ = 0),
  ``mls`` (k = 20), the k ablation ``mls-k1`` / ``mls-k5`` / ``mls-k40`` and ``mls-one-queue``
  (pseudo-labels from ``Q_z`` instead of ``Q_g``); these and ``random-linear`` (their untrained
  ViT) are measured by knn-seg, image k-NN and the multi-label linear probe (``mlsctl eval linear
  --multi-label``, mAP over the item classes of ``scenes.jsonl``, its lr × wd sweep on a held-out
  20 % of the training scenes);
* fmnist-products: image-set retrieval (``mlsctl eval retrieval``, query sets of 4 photos) of
  ``mile``: AR@10 of MILE set embeddings against the single-image baselines (max-pairwise and
  mean-pooled CLS, on the trained teacher and on the backbone the run started from) at 0, 25 and
  50 % noise; and of ``mile-backbone``, MILE fine-tuned from the project's backbone in ``weights/``
  (as the paper starts from DINOv2), in the profiles that list it (``warm``, ``gpu``).

The ``warm`` profile starts every listed method from that backbone (``backbone``: the backbone
itself, evaluated as it is); a cell that reads a weights file records the file's SHA-256 in its
spec, so a retrained backbone makes new cells.

Context refinement and its Multi-Similarity baseline (Recall@K on fmnist-products in the SOP
layout, blocks × neighbours, 3 seeds) are the suite's sibling ``benchmarks/refine_fidelity.py``,
with the same conventions (profiles, resumable stages, one ``mlsctl`` process per stage, a report).

Profiles fix the data, the model and the number of steps (schedules depend only on the data size
and batch, so a profile trains the same everywhere). Results go to
``benchmarks/results/fidelity/<profile>/``: one JSON per cell (its metrics, the commands, device,
torch/timm versions, commit and wall time of every stage) and ``summary.md`` / ``summary.json`` /
``summary.png`` (mean ± std over seeds, the claims and whether each holds). Runs, data and cached
features live in ``--work`` (default ``fidelity-work/<profile>``).

Calibration (issue 22, item 7) comes first: ``random``, ``dino`` and ``supervised`` (the supervised
ceiling: the DINO recipe's ViT trained on the training masks by ``benchmarks/supervised_ceiling.py``,
for the same steps, evaluated by the same commands), with the claims "DINO >= random + 5 mIoU points"
and "the ceiling >= 10 points above both".

``--budget-s S`` (a device window): the pending cells run in order while each one's estimate fits
the time left (the data build counts); a cell's estimate is the longest wall time a finished cell of
the same variant and declaration took on this device (``timing`` in the cell records, keyed by
:func:`device_description`), else the profile's declared ``estimates``. A stage still running at the
deadline gets SIGTERM (mlsctl stops as on Ctrl-C: a pretrain finishes its step and saves it as a
checkpoint), the report and ``progress.json`` (each cell done or pending, why, its estimate) are
written and the suite exits 0. ``--pack-results FILE`` writes the records and the report into one
archive (a device gives back a few files only); ``--unpack-results FILE`` merges one here. See
docs/reproduction.md.

Finished cells are reused (a cell whose declared spec changed is run again); an interrupted cell
resumes: a run with a checkpoint continues with ``--resume``, one without starts again, features
and results are only ever written atomically. Kill the suite at any moment and run the same
command again. The suite never tunes an evaluation to a method: every variant of a benchmark goes
through the same command with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import fnmatch
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlsctl import atomic  # noqa: E402
from mlsctl.data.fmnist import fmnist_source  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "fidelity"
BACKBONE = "weights/dino_fmnist_backbone.safetensors"  # the project's own pretrained backbone (weights/README.md)
FMNIST = fmnist_source()  # $FMNIST_DIR or the Debian package's folder


# ------------------------------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class Variant:
    benchmark: str  # scenes | products
    name: str
    recipe: Optional[str]  # a shipped recipe; None: no training (the random init of `arch_of`)
    overrides: tuple[str, ...] = ()
    arch_of: Optional[str] = None  # random: the recipe whose architecture is drawn at random
    image_knn: bool = False  # also image k-NN on the scenes' largest items
    linear: bool = False  # also the multi-label linear probe (mAP over the scenes' item classes)
    trainer: str = "pretrain"  # pretrain: `mlsctl pretrain RECIPE`; supervised: benchmarks/supervised_ceiling.py
    weights: Optional[str] = None  # no training: the evaluations of this weights file (a profile's starting point)
    starts_from: Optional[str] = None  # a weights file the training starts from (model.weights), relative to REPO

    @property
    def needs_its_profile(self) -> bool:
        """Whether the variant reads a weights file, whose architecture only a profile that lists it has."""
        return self.weights is not None or self.starts_from is not None

    @property
    def method(self) -> str:
        if self.trainer == "supervised":
            return "supervised"
        return (self.recipe or self.arch_of or "").split("_")[0]


VARIANTS = (
    Variant("scenes", "random", None, arch_of="dino_fmnist_quick", image_knn=True),
    Variant("scenes", "dino", "dino_fmnist_quick", image_knn=True),
    # the warm profile's starting point, evaluated as it is: the backbone of weights/
    Variant("scenes", "backbone", None, weights="weights/dino_fmnist_backbone.safetensors", image_knn=True),
    # the supervised ceiling: the DINO recipe's ViT, trained on the training masks (same steps and crops)
    Variant("scenes", "supervised", "dino_fmnist_quick", image_knn=True, trainer="supervised"),
    Variant("scenes", "cribo-global", "cribo_fmnist_quick", ("method.cross_view_loss=false", "method.cross_image_loss=false")),
    Variant("scenes", "cribo-cross-view", "cribo_fmnist_quick", ("method.cross_image_loss=false",)),
    Variant("scenes", "cribo", "cribo_fmnist_quick"),
    Variant("products", "mile", "mile_fmnist_quick"),
    # MILE fine-tuned from the backbone in weights/, as the paper starts from DINOv2 (issue 22, items 8 and 9)
    Variant("products", "mile-backbone", "mile_fmnist_backbone", starts_from=BACKBONE),
    Variant("scenes", "sove", "sove_fmnist_quick", image_knn=True),
    Variant("scenes", "sove-1judge", "sove_fmnist_quick", ("method.cls_supports=0",), image_knn=True),
    Variant("scenes", "sove-3judges", "sove_fmnist_quick", ("method.cls_supports=2",), image_knn=True),
    Variant("scenes", "sove-no-patch", "sove_fmnist_quick", ("method.patch_loss=false",), image_knn=True),
    Variant("scenes", "random-linear", None, arch_of="mls_fmnist_quick", image_knn=True, linear=True),
    Variant("scenes", "mocov2", "mocov2_fmnist_quick", image_knn=True, linear=True),
    Variant("scenes", "mls", "mls_fmnist_quick", image_knn=True, linear=True),
    Variant("scenes", "mls-k1", "mls_fmnist_quick", ("method.k=1",), image_knn=True, linear=True),
    Variant("scenes", "mls-k5", "mls_fmnist_quick", ("method.k=5",), image_knn=True, linear=True),
    Variant("scenes", "mls-k40", "mls_fmnist_quick", ("method.k=40",), image_knn=True, linear=True),
    Variant("scenes", "mls-one-queue", "mls_fmnist_quick", ("method.label_queue=z",), image_knn=True, linear=True),
)
VARIANT_BENCHMARK = {v.name: v.benchmark for v in VARIANTS}
CALIBRATION = ("random", "dino", "supervised")  # item 7 of issue 22: is the benchmark able to tell methods apart?
CALIBRATION_MARGIN = 0.05  # DINO over random init, mIoU (fractions)
CEILING_MARGIN = 0.10  # the supervised ceiling over the better of DINO and random init: what "well above" means here
# the rows of a products table: the set score and the backbone it is computed on (trained: the run's teacher;
# start: what the run started from)
PRODUCT_ROWS = (("mile", "trained"), ("max-pairwise", "trained"), ("mean-cls", "trained"), ("max-pairwise", "start"),
                ("mean-cls", "start"))
PRODUCT_VARIANTS = {"mile": "MILE trained from scratch", "mile-backbone": f"MILE fine-tuned from {BACKBONE}"}
SCENE_VARIANTS = ("random", "backbone", "dino", "supervised", "cribo-global", "cribo-cross-view", "cribo", "sove", "sove-1judge", "sove-3judges",
                  "sove-no-patch", "random-linear", "mocov2", "mls", "mls-k1", "mls-k5", "mls-k40", "mls-one-queue")

TINY_VIT = ("model.img_size=32", "model.patch_size=8", "model.timm_kwargs.embed_dim=32", "model.timm_kwargs.depth=2",
            "model.timm_kwargs.num_heads=2")


# the gpu profile's ViT: ~9.9 M parameters, 12x12 patches on a 96 px scene (products: 8x8 on 64 px photos)
GPU_VIT = ("model.patch_size=8", "model.timm_kwargs.embed_dim=320", "model.timm_kwargs.depth=8",
           "model.timm_kwargs.num_heads=5")
# the training loop on one GPU: crops made on the GPU from images decoded once (data.augment, data.decode_size and
# data.cache: issue 22, item 1), bf16, metrics read rarely (each read waits for the GPU)
GPU_LOOP = ("train.precision=bf16", "data.augment=gpu", "data.cache=memory", "data.workers=8",
            "train.log_every=50", "train.bank_health_every=0")


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: tuple[int, ...]
    scenes_data: tuple[str, ...]  # mlsctl data fmnist-scenes options
    products_data: tuple[str, ...]  # mlsctl data fmnist-products options
    scenes_overrides: tuple[str, ...]  # every scenes recipe (dino, cribo)
    products_overrides: tuple[str, ...]
    knn_seg: tuple[str, ...] = ("--fraction", "1/1", "--k", "30")
    image_knn: tuple[str, ...] = ("--k", "10", "20")
    linear: tuple[str, ...] = ()  # eval linear options (its lr x wd sweep on a held-out 20 % by default)
    method_overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (method, overrides) of its recipes only
    retrieval: tuple[str, ...] = ("--query-size", "4", "--noise", "0", "0.25", "0.5")
    jobs: int = 1
    # the variants a run without --only selects, in this order (None: all of VARIANTS); --only picks from all
    variants: Optional[tuple[str, ...]] = None
    # declared wall seconds of one cell per variant (training and evaluations, process starts included): what
    # --budget-s plans with until a finished cell of the variant has measured it on this device
    estimates: tuple[tuple[str, float], ...] = ()
    # the device the estimates were measured on (a prefix of device_description()); on another one they are
    # stretched by OTHER_DEVICE_MARGIN, so that a slower card does not start cells the deadline then stops
    estimates_device: Optional[str] = None
    # the variants whose first-seed cells calibrate the benchmark (issue 22, item 7): while one of them is
    # pending, --budget-s hands out no other cell (a method's cell on a benchmark the calibration may yet
    # change would be wasted device time)
    calibration: tuple[str, ...] = ()
    about: str = ""


PROFILES = {
    "smoke": Profile(
        "smoke", seeds=(0,),
        scenes_data=("--n-train", "16", "--n-val", "4", "--size", "32"),
        products_data=("--n-train", "8", "--n-eval", "4", "--photos", "4", "--gallery-photos", "2", "--size", "32"),
        scenes_overrides=(*TINY_VIT, "data.global_crops.size=32", "optim.batch_size=8", "optim.epochs=4",
                          "optim.warmup_epochs=1", "train.checkpoint_every=2", "train.log_every=1",
                          "train.bank_health_every=0"),
        method_overrides=(("dino", ("method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16")),
                          ("cribo", ("method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16")),
                          ("sove", ("method.hidden_dim=32", "method.bottleneck_dim=16")),
                          ("mls", ("method.proj_hidden_dim=32", "method.proj_dim=16", "method.queue_size=64")),
                          ("mocov2", ("method.proj_hidden_dim=32", "method.proj_dim=16", "method.queue_size=64"))),
        linear=("--epochs", "5", "--lr", "0.1", "--wd", "0"),
        products_overrides=(*TINY_VIT, "data.global_crops.size=32", "data.local_crops.size=16", "optim.batch_size=4",
                            "optim.epochs=4", "train.checkpoint_every=2", "train.log_every=1", "method.set_length=2",
                            "method.cross_heads=2", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"),
        knn_seg=("--fraction", "1/1", "--k", "5"),
        image_knn=("--k", "5"),
        retrieval=("--query-size", "2", "--noise", "0", "0.5"),
        # measured on the 2-core CPU shared with other work (mlsctl's start, ~5 s a process, dominates)
        estimates=(("random", 25), ("dino", 40), ("supervised", 30), ("cribo-global", 45), ("cribo-cross-view", 45),
                   ("cribo", 45), ("mile", 40), ("sove", 45), ("sove-1judge", 45), ("sove-3judges", 45),
                   ("sove-no-patch", 45), ("random-linear", 35), ("mocov2", 55), ("mls", 55), ("mls-k1", 55),
                   ("mls-k5", 55), ("mls-k40", 55), ("mls-one-queue", 55)),
        about="a tiny ViT (width 32) for 8 steps on 16 scenes and 8 objects: proves the suite, measures nothing"),
    "cpu": Profile(
        "cpu", seeds=(0, 1, 2),
        scenes_data=(), products_data=(),
        scenes_overrides=("optim.epochs=8", "train.checkpoint_every=50"),
        products_overrides=("optim.epochs=8", "train.checkpoint_every=50"),
        # the cells of b008ad1 on this 2-core CPU, rounded up (supervised: not measured yet, as dino)
        estimates=(("random", 70), ("dino", 300), ("supervised", 300), ("cribo-global", 420), ("cribo-cross-view", 380),
                   ("cribo", 380), ("mile", 380), ("sove", 500), ("sove-1judge", 480), ("sove-3judges", 560),
                   ("sove-no-patch", 950), ("random-linear", 270), ("mocov2", 850), ("mls", 680), ("mls-k1", 670),
                   ("mls-k5", 360), ("mls-k40", 340), ("mls-one-queue", 760)),
        about="the quick recipes (ViT width 128, depth 4, patch 8) for 8 epochs: 496 steps of 32 scenes (fmnist-scenes, "
              "2,000 train / 500 val) and 496 steps of 16 sets of 4 photos (fmnist-products, 1,000 objects); 3 seeds"),
    "gpu": Profile(
        "gpu", seeds=(0, 1, 2),
        scenes_data=("--n-train", "2000", "--n-val", "500", "--size", "96"), products_data=(),
        scenes_overrides=(*GPU_VIT, "model.img_size=96", *GPU_LOOP, "data.decode_size=96", "optim.batch_size=256",
                          "optim.epochs=300",
                          "optim.warmup_epochs=30", "train.checkpoint_every=300"),
        products_overrides=(*GPU_VIT, "model.img_size=64", *GPU_LOOP, "data.decode_size=64", "optim.batch_size=64",
                            "optim.epochs=40", "optim.warmup_epochs=4", "train.checkpoint_every=100"),
        # calibration first (item 7), then the headline claims (item 8); the ablations by --only
        variants=("random", "dino", "supervised", "cribo-global", "cribo-cross-view", "cribo", "sove", "sove-1judge",
                  "sove-3judges", "mocov2", "mls", "random-linear", "mile", "mile-backbone"),
        # Measured in the first window (profile gpu-700, one H200): 700 steps trained in 35.5 s (DINO) and 16.2 s (the
        # ceiling); each evaluation ~30 s; a cell's wall time random 34 s, DINO 81 s, ceiling 57 s. At 2,100 steps:
        # DINO ~190 s, ceiling ~110 s; the other methods from DINO's time and their cost per step on the CPU.
        estimates_device="NVIDIA H200",
        calibration=CALIBRATION,
        estimates=(("random", 35), ("dino", 190), ("supervised", 110), ("cribo-global", 240), ("cribo-cross-view", 250),
                   ("cribo", 250), ("mile", 200), ("mile-backbone", 200), ("sove", 250), ("sove-1judge", 245),
                   ("sove-3judges", 245), ("sove-no-patch", 240), ("random-linear", 60), ("mocov2", 260), ("mls", 270),
                   ("mls-k1", 270),
                   ("mls-k5", 270), ("mls-k40", 270), ("mls-one-queue", 270)),
        about="one H200 in windows of ~8 minutes (benchmarks/fidelity.py --budget-s, scripts/device_window.sh): a ViT "
              "of width 320, depth 8, 5 heads, patch 8 (~9.9 M parameters) at batch 256, bf16, crops made on the GPU; "
              "300 epochs of 2,000 scenes (2,100 steps; 3x the first calibration's budget, which failed: see "
              "docs/reproduction.md) and 40 epochs of 1,000 objects in sets of 4 (600 steps of 64 sets); calibration "
              "(random init, DINO, supervised ceiling) first, then the headline claims; 3 seeds"),
}
# Warm start (issue 22, item 9): every scenes method fine-tuned from the backbone in weights/ against DINO continued
# from it, for the same steps, on this CPU; `backbone` is the starting point itself, `random` its architecture;
# `mile-backbone`: MILE's recipe from the backbone for 2 epochs of the 1,000 training objects (124 steps of 16 sets).
WARM_VIT = (*GPU_VIT, "model.img_size=96", "model.weights=" + str(REPO / BACKBONE))
PROFILES["warm"] = Profile(
    "warm", seeds=(0, 1, 2), scenes_data=(), products_data=(),
    # bf16 for the scenes cells, as the backbone was trained (about 2.5x faster than fp32 on a CPU with bf16
    # instructions: docs/performance.md); the products cells ran in fp32 before, and stay so
    scenes_overrides=(*WARM_VIT, "optim.epochs=2", "optim.lr=5e-5", "optim.min_lr=1e-6", "optim.warmup_epochs=0",
                      "train.checkpoint_every=25", "train.precision=bf16"),
    products_overrides=("optim.epochs=2", "train.checkpoint_every=25"),
    variants=("random", "backbone", "mile-backbone", "dino", "cribo", "sove", "mocov2", "mls"),
    # measured on this 2-core CPU (2026-12-05): mile-backbone 424-527 s a cell (fp32, ~3.5 s per step of 16 sets);
    # a scenes cell in bf16 ~150-170 s of training and ~5 minutes with its evaluations, random and backbone
    # (evaluations only) ~150 s
    estimates=(("random", 180), ("backbone", 180), ("mile-backbone", 550), ("dino", 360), ("cribo", 360),
               ("sove", 360), ("mocov2", 360), ("mls", 360)),
    about="warm start: every scenes method fine-tuned from weights/dino_fmnist_backbone.safetensors (ViT width 320, "
          "depth 8, patch 8) for 2 epochs of 2,000 scenes (124 steps of 32, lr 5e-5, bf16) against DINO continued from it; "
          "the backbone itself and its random init evaluated alike; MILE fine-tuned from it on fmnist-products for 2 "
          "epochs of 1,000 objects (124 steps of 16 sets of 4 photos); 3 seeds")

# The first calibration window's budget (2026-12-04): 100 epochs of 2,000 scenes, 700 steps. DINO was not 5 mIoU
# points above random and the ceiling not 10 above both, so the budget was changed once, for every method: `gpu`.
PROFILES["gpu-700"] = dataclasses.replace(
    PROFILES["gpu"], name="gpu-700",
    scenes_overrides=tuple(o.replace("optim.epochs=300", "optim.epochs=100").replace("optim.warmup_epochs=30",
                                                                                     "optim.warmup_epochs=10")
                           .replace("train.checkpoint_every=300", "train.checkpoint_every=100")
                           for o in PROFILES["gpu"].scenes_overrides),
    about="the first calibration window's budget (superseded by gpu): the gpu profile's ViT for 100 epochs of 2,000 "
          "scenes (700 steps); calibration only")


@dataclass
class Cell:
    profile: Profile
    variant: Variant
    seed: int
    work: Path  # the profile's work folder

    @property
    def id(self) -> str:
        return f"{self.variant.benchmark}/{self.variant.name}/{self.seed}"

    @property
    def folder(self) -> Path:
        return self.work / "cells" / self.variant.benchmark / self.variant.name / f"seed{self.seed}"

    @property
    def run(self) -> Path:
        return self.folder / "run"

    @property
    def timing_path(self) -> Path:
        return self.folder / "timing.json"  # wall seconds of every stage so far, stopped ones included

    @property
    def result_path(self) -> Path:
        return RESULTS / self.profile.name / "cells" / f"{self.variant.benchmark}-{self.variant.name}-seed{self.seed}.json"

    def overrides(self) -> list[str]:
        data = self.work / "data"
        own = dict(self.profile.method_overrides).get(self.variant.method, ())
        if self.variant.benchmark == "scenes":
            return [f"data.root={data / 'fmnist-scenes' / 'train' / 'images'}", *self.profile.scenes_overrides, *own,
                    *self.variant.overrides, f"seed={self.seed}"]
        start = [f"model.weights={REPO / self.variant.starts_from}"] if self.variant.starts_from else []
        return [f"data.root={data / 'fmnist-products' / 'train'}", *self.profile.products_overrides, *start,
                *self.variant.overrides, f"seed={self.seed}"]

    def spec(self) -> dict:
        """What the cell computes; a finished cell is reused while this stays the same."""
        here = str(REPO) + os.sep  # the checkout's place is not what a cell computes
        overrides = [o.replace(here, "") for o in self.overrides() if not o.startswith("data.root=")]
        spec = {"variant": self.variant.name, "benchmark": self.variant.benchmark, "recipe": self.variant.recipe,
                "arch_of": self.variant.arch_of, "overrides": overrides,
                "data": list(self.profile.scenes_data if self.variant.benchmark == "scenes" else self.profile.products_data),
                "eval": list(self.profile.knn_seg if self.variant.benchmark == "scenes" else self.profile.retrieval)}
        if self.variant.image_knn:
            spec["image_knn"] = list(self.profile.image_knn)
        if self.variant.linear:
            spec["linear"] = list(self.profile.linear)
        read = [o.split("=", 1)[1] for o in overrides if o.startswith("model.weights=")]
        read += [self.variant.weights] if self.variant.weights else []
        if read:  # a retrained backbone under the same name is another cell
            spec["weights_sha256"] = [_file_sha256(REPO / path) for path in read]
        return spec

    def spec_sha(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    """The SHA-256 of a file the cell reads, or a sentence naming it when it is missing."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the cells that start from it need it (git checkout {BACKBONE})")
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _sha256_of(path: Path, mtime_ns: int, size: int) -> str:  # once per version of the file
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def variant_sha(spec: dict) -> str:
    """What a cell computes apart from its seed: cells of one variant with equal ``variant_sha`` cost the same."""
    same = {**spec, "overrides": [o for o in spec["overrides"] if not o.startswith("seed=")]}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


def cells_of(profile: Profile, work: Path, only: list[str]) -> list[Cell]:
    """The selected cells in the order they run: seed by seed, the profile's variants (or those of
    ``--only``, taken from every variant) in the profile's order, then the others in :data:`VARIANTS`' order.
    A variant that evaluates or starts from a weights file (``backbone``, ``mile-backbone``) runs only in
    a profile that lists it: the file's architecture is that profile's."""
    by_name = {v.name: v for v in VARIANTS}
    order = [by_name[name] for name in profile.variants or ()]
    if only or profile.variants is None:
        order += [v for v in VARIANTS if v not in order and not v.needs_its_profile]
    cells = [Cell(profile, v, s, work) for s in profile.seeds for v in order]
    if only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.id, pattern) for pattern in only)]
    return cells


# ------------------------------------------------------------------------------------------ running


def _die_with_parent() -> None:
    """Children get SIGTERM when the suite dies (even by SIGKILL): they stop and say what they
    saved, and never hold a run folder's lock for a rerun."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


STOP_GRACE_S = 30.0  # after SIGTERM at the deadline, how long a stage may take to stop before SIGKILL
MLSCTL = [sys.executable, "-m", "mlsctl"]  # how a stage starts mlsctl
CLOCK = time.monotonic  # the clock of deadlines (--budget-s)


class OutOfTime(Exception):
    """A stage was stopped at the suite's deadline (--budget-s); its cell stays resumable in --work."""


def run_stage(command: list[str], cwd: Path, log: Path, threads: int, deadline: Optional[float] = None,
              timing: Optional[Path] = None) -> float:
    """Run ``command`` (output appended to ``log``) and return its wall seconds; raises on failure.

    ``deadline`` (a ``time.monotonic()`` value): at that moment the process gets SIGTERM (mlsctl stops
    as on Ctrl-C: a pretrain finishes its step and saves it as a checkpoint), SIGKILL
    :data:`STOP_GRACE_S` later, and :class:`OutOfTime` is raised. ``timing``: a JSON file whose
    ``seconds`` accumulates the wall time of every stage of a cell, stopped ones included."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    stopped = False
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=cwd, stdout=handle, stderr=handle, env=env,
                                   preexec_fn=_die_with_parent)
        try:
            process.wait(timeout=None if deadline is None else max(0.0, deadline - CLOCK()))
        except subprocess.TimeoutExpired:
            stopped = True
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if process.poll() is None:  # the suite itself is stopping (Ctrl-C): its stage stops too
                process.send_signal(signal.SIGTERM)
                process.wait()
    seconds = time.perf_counter() - started
    if timing is not None:
        spent = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
        atomic.write_json(timing, {"seconds": round(spent + seconds, 2)})
    if stopped:
        raise OutOfTime(f"{stage_name(command)} stopped at the deadline after {seconds:.0f}s")
    if process.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{stage_name(command)} exited with {process.returncode}: {tail[0]} (see {log})")
    return seconds


def stage_name(command: list[str]) -> str:
    """``mlsctl pretrain``, ``mlsctl eval``, or the script a stage runs."""
    if command[:len(MLSCTL)] == MLSCTL:
        args = command[len(MLSCTL):]
        return "mlsctl " + " ".join(args[:2] if args[:1] == ["eval"] else args[:1])
    return Path(command[1]).name if len(command) > 1 else command[0]


def mlsctl(args: list[str], cwd: Path, log: Path, threads: int, deadline: Optional[float] = None,
           timing: Optional[Path] = None) -> float:
    """Run ``mlsctl ARGS`` as :func:`run_stage` does; returns wall seconds; raises on failure."""
    return run_stage([*MLSCTL, *args], cwd, log, threads, deadline, timing)


def build_data(profile: Profile, work: Path, fmnist: Path, threads: int, deadline: Optional[float] = None) -> None:
    data = work / "data"

    def build(name: str, options: tuple[str, ...]) -> None:
        mlsctl(["data", name, "--out", str(data / name), "--source", str(fmnist), *options], work,
               work / f"data-{name}.log", threads, deadline)

    # the two at once: each builds in one process (about 50 s one after the other in the first device window)
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(build, "fmnist-scenes", profile.scenes_data),
                       pool.submit(build, "fmnist-products", profile.products_data)]:
            future.result()
    for split in ("train", "val"):
        largest_item_labels(data / "fmnist-scenes" / split)


def largest_item_labels(split: Path) -> Path:
    """``SPLIT/largest-item.csv``: each scene's label for image k-NN (the class covering the most
    pixels of its mask), as ``mlsctl data fmnist-scenes`` writes ``labels.csv``; written once."""
    from mlsctl.data.fmnist import largest_item_labels as write_labels

    out = split / "largest-item.csv"
    if not out.is_file():
        atomic.write_text(out, write_labels(split).read_text())
    return out


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def commit() -> str:
    if os.environ.get("MLSCTL_COMMIT"):  # a device's copy (scripts/device_prepare.sh): its .git may be stale
        return os.environ["MLSCTL_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        # the suite's own results are not the code: a clone that only wrote results is not dirty
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)benchmarks/results"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # a packed copy (fidelity_pack.py) says its commit in COMMIT
        return (REPO / "COMMIT").read_text().strip() if (REPO / "COMMIT").is_file() else "unknown"


def train(cell: Cell, threads: int, deadline: Optional[float] = None) -> Optional[float]:
    """Train the cell's run: start, resume after an interruption, or nothing when complete."""
    from mlsctl.runs import Run

    run = Run(cell.run)
    if (run.root / "summary.json").is_file() and run.teacher_weights_path.is_file():
        return None
    if cell.variant.trainer == "supervised":  # a run folder of its own (config.yaml, teacher.safetensors); restarts
        scenes = cell.work / "data" / "fmnist-scenes" / "train"
        command = [sys.executable, str(REPO / "benchmarks" / "supervised_ceiling.py"), cell.variant.recipe,
                   *cell.overrides(), "--masks", str(scenes / "masks"), "--out", str(run.root)]
        return run_stage(command, cell.folder, cell.folder / "cell.log", threads, deadline, cell.timing_path)
    args = ["pretrain", cell.variant.recipe, *cell.overrides(), "--out", str(run.root)]
    if run.latest() is not None:
        args.append("--resume")
    elif run.root.exists():
        args.append("--overwrite")  # our own run, stopped before its first checkpoint
    return mlsctl(args, cell.folder, cell.folder / "cell.log", threads, deadline, cell.timing_path)


def random_run(cell: Cell) -> Path:
    """A run folder holding only the config of ``arch_of`` (seed S): what `--random-init` draws from."""
    from mlsctl import config

    run = cell.run
    if not (run / "config.yaml").is_file():
        recipe = config.load_recipe(cell.variant.arch_of, cell.overrides())
        run.mkdir(parents=True, exist_ok=True)
        config.save_recipe(recipe, run / "config.yaml")
    return run


def model_args(cell: Cell) -> list[str]:
    """How an evaluation names the cell's model: its run, or the random init of ``arch_of``."""
    if cell.variant.weights is not None:
        return ["--weights", str(REPO / cell.variant.weights)]
    if cell.variant.recipe is None:
        return ["--run", str(random_run(cell)), "--random-init", "--seed", str(cell.seed)]
    return ["--run", str(cell.run)]


def utc_now() -> str:
    """A cell record's time: UTC, said so, so that records of a device and of here compare."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def record_time(text: Optional[str]) -> float:
    """Seconds since the epoch of a record's ``started``/``finished`` (:func:`utc_now`; records written
    before 2026-12-06 carry no zone and were written in UTC too); 0 for none or one that cannot be read."""
    import calendar

    try:
        return calendar.timegm(time.strptime((text or "").removesuffix(" UTC"), "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return 0.0


def evaluate(cell: Cell, threads: int, deadline: Optional[float] = None) -> tuple[dict, float]:
    """The cell's evaluation through the same mlsctl command for every variant; its results JSON."""
    out = cell.folder / "eval.json"
    data = cell.work / "data"
    seconds = 0.0
    if not out.is_file():
        if cell.variant.benchmark == "scenes":
            scenes = data / "fmnist-scenes"
            model = model_args(cell)
            args = ["eval", "knn-seg", "--train", str(scenes / "train" / "images"), "--train-masks",
                    str(scenes / "train" / "masks"), "--val", str(scenes / "val" / "images"), "--val-masks",
                    str(scenes / "val" / "masks"), *model, *cell.profile.knn_seg, "--out", str(out)]
        else:
            products = data / "fmnist-products"
            args = ["eval", "retrieval", "--gallery", str(products / "gallery"), "--query", str(products / "query"),
                    "--run", str(cell.run), *cell.profile.retrieval, "--seed", "0", "--out", str(out)]
        seconds = mlsctl(args, cell.folder, cell.folder / "cell.log", threads, deadline, cell.timing_path)
    result = json.loads(out.read_text())
    knn_out = cell.folder / "eval-knn.json"
    if cell.variant.image_knn:
        if not knn_out.is_file():
            scenes = data / "fmnist-scenes"
            model = model_args(cell)
            args = ["eval", "knn", "--train", str(scenes / "train" / "images"), "--val", str(scenes / "val" / "images"),
                    "--train-labels", str(scenes / "train" / "largest-item.csv"), "--val-labels",
                    str(scenes / "val" / "largest-item.csv"), *model, *cell.profile.image_knn, "--out", str(knn_out)]
            seconds += mlsctl(args, cell.folder, cell.folder / "cell.log", threads, deadline, cell.timing_path)
        result["image_knn"] = json.loads(knn_out.read_text())
    linear_out = cell.folder / "eval-linear.json"
    if cell.variant.linear:
        if not linear_out.is_file():
            scenes = data / "fmnist-scenes"
            model = model_args(cell)
            args = ["eval", "linear", "--train", str(scenes / "train" / "images"), "--val", str(scenes / "val" / "images"),
                    "--multi-label", "--train-labels", str(scenes / "train" / "scenes.jsonl"), "--val-labels",
                    str(scenes / "val" / "scenes.jsonl"), *model, *cell.profile.linear, "--out", str(linear_out)]
            seconds += mlsctl(args, cell.folder, cell.folder / "cell.log", threads, deadline, cell.timing_path)
        result["linear"] = json.loads(linear_out.read_text())
    # the cached features, kept until here: eval knn and linear read the global features of knn-seg's dense cache
    shutil.rmtree(cell.folder / "features", ignore_errors=True)
    return result, seconds


def metrics_of(cell: Cell, result: dict) -> dict:
    """The numbers the summary compares, from an evaluation's JSON."""
    from mlsctl.evaluate.segmentation import foreground_background_iou

    if cell.variant.benchmark == "scenes":
        first = result["results"][0]
        fg = foreground_background_iou(first["runs"][0]["confusion"])
        metrics = {"miou": first["miou"], "foreground_iou": fg["foreground_iou"], "binary_miou": fg["binary_miou"],
                   "iou_per_class": first["iou_per_class"]}
        for row in result.get("image_knn", {}).get("results", []):
            metrics[f"knn_top1@{row['k']}"] = row["top1"]
        if "linear" in result:
            metrics["linear_map"] = result["linear"]["results"]["mAP"]
        return metrics
    return {f"{r['method']}@{r['backbone']}/noise{r['noise']:g}": r["AR@10"] for r in result["results"]}


def run_cell(cell: Cell, threads: int, rerun: bool, deadline: Optional[float] = None) -> dict:
    previous = json.loads(cell.result_path.read_text()) if cell.result_path.is_file() else None
    if previous and previous.get("spec_sha") == cell.spec_sha() and not rerun:
        return {**previous, "reused": True}
    marker = cell.folder / "spec.json"
    started_as = json.loads(marker.read_text()).get("spec_sha") if marker.is_file() else None
    if rerun or (started_as is not None and started_as != cell.spec_sha()):
        shutil.rmtree(cell.folder, ignore_errors=True)  # asked for, or the declaration changed: start again
    cell.folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():  # the cell's first start: the code it started with
        atomic.write_json(marker, {"spec_sha": cell.spec_sha(), "spec": cell.spec(), "commit": commit()})
    started_at_commit = json.loads(marker.read_text()).get("commit")  # None: a cell started before this was kept
    started = utc_now()
    seconds = {"train": 0.0, "eval": 0.0}
    if cell.variant.recipe is not None:
        seconds["train"] = train(cell, threads, deadline) or 0.0
    result, seconds["eval"] = evaluate(cell, threads, deadline)
    summary = json.loads((cell.run / "summary.json").read_text()) if (cell.run / "summary.json").is_file() else {}
    import timm
    import torch

    record = {
        "cell": cell.id, "profile": cell.profile.name, "spec": cell.spec(), "spec_sha": cell.spec_sha(),
        "metrics": metrics_of(cell, result),
        "steps": summary.get("steps"), "resumed_from": summary.get("resumed_from"),
        "device": device_description(), "torch": torch.__version__, "timm": timm.__version__, "commit": commit(),
        # the code may change while a cell runs: the commit its first start saw and the one its training ended at
        # (the run's summary.json); "commit" is the one at the record's writing
        "commit_at_start": started_at_commit, "trained_at_commit": summary.get("commit"),
        "started": started, "finished": utc_now(),
        "seconds_this_session": {k: round(v, 1) for k, v in seconds.items()},
        "train_seconds_total": summary.get("seconds"),
        # what --budget-s plans this variant with on this device: every stage's wall time, in every session
        "timing": {"device": device_description(), "variant_sha": variant_sha(cell.spec()),
                   "seconds": json.loads(cell.timing_path.read_text())["seconds"] if cell.timing_path.is_file()
                   else round(sum(seconds.values()), 1)},
    }
    atomic.write_json(cell.result_path, record)
    return record


# ------------------------------------------------------------------------------------------ the budget


def is_done(cell: Cell) -> bool:
    return cell.result_path.is_file() and json.loads(cell.result_path.read_text()).get("spec_sha") == cell.spec_sha()


def measured_seconds(cell: Cell, device: str) -> Optional[float]:
    """The longest recorded wall time of a finished cell of the same variant and declaration (any seed) on
    ``device``, from the profile's cell records (``timing``; records older than it: their sessions' seconds)."""
    found = []
    wanted = variant_sha(cell.spec())
    for path in (RESULTS / cell.profile.name / "cells").glob(f"{cell.variant.benchmark}-{cell.variant.name}-seed*.json"):
        record = json.loads(path.read_text())
        if record.get("device") != device or variant_sha(record["spec"]) != wanted:
            continue
        timing = record.get("timing")
        found.append(float(timing["seconds"]) if timing else float(sum(record["seconds_this_session"].values())))
    return max(found) if found else None


def estimate(cell: Cell, device: str) -> tuple[float, str]:
    """Wall seconds the cell is expected to take, and where the figure comes from."""
    measured = measured_seconds(cell, device)
    if measured is not None:
        return measured, "measured"
    declared = dict(cell.profile.estimates).get(cell.variant.name)
    if declared is None:
        raise SystemExit(f"error: profile {cell.profile.name} declares no estimate for variant {cell.variant.name} and "
                         f"no finished cell of it on {device} measured one; add it to the profile's estimates")
    on = cell.profile.estimates_device
    if on is not None and not device.startswith(on):
        return float(declared) * OTHER_DEVICE_MARGIN, f"declared for {on}, x{OTHER_DEVICE_MARGIN:g} here"
    return float(declared), "declared"


OTHER_DEVICE_MARGIN = 1.4  # an H100 has 70 % of an H200's memory bandwidth; these small models wait on it and on launches


class Planner:
    """Hands out the pending cells in order, each only while its estimate fits the time left (``budget_s``
    None: no limit); thread-safe for --jobs > 1. Remembers why a cell was left for a later run.

    The calibration gate (a profile's ``calibration``, issue 22 item 7): while a calibration cell of the
    profile's first seed is not done — selected in this run or not — no other cell of its benchmark is
    handed out, and once they are all done, those cells run only where :func:`calibration_failure` finds
    nothing. A worker asking while calibration cells run elsewhere waits for them."""

    def __init__(self, cells: list[Cell], budget_s: Optional[float], device: str):
        self.queue = list(cells)
        self.deadline = None if budget_s is None else CLOCK() + budget_s
        self.device = device
        self.estimates: dict[str, tuple[float, str]] = {}  # of the cells considered, when they were
        self.left_for_later: dict[str, str] = {}
        self.condition = threading.Condition()
        self.running: set[str] = set()
        profile, work = (cells[0].profile, cells[0].work) if cells else (None, None)
        self.gated = set() if profile is None else {VARIANT_BENCHMARK[name] for name in profile.calibration}
        # the calibration cells not done yet, whether this run selected them or not, and those it runs again
        # (--rerun): the others are judged on their new records
        queued = {c.id for c in cells}
        self.calibration = set() if profile is None else {
            c.id for c in calibration_cells(profile, work) if not is_done(c) or c.id in queued}
        self.calibration_failed = None if self.calibration or profile is None else calibration_failure(profile, work)

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - CLOCK()

    def _waits(self, cell: Cell) -> bool:
        return bool(self.calibration) and cell.variant.benchmark in self.gated and cell.id not in self.calibration

    def next(self) -> Optional[Cell]:
        """The first pending cell whose estimate fits the time left; those before it never will (time only
        runs out), so they are left for a later run. Cells behind the calibration gate stay queued while a
        calibration cell may still finish in this run."""
        with self.condition:
            while True:
                waiting = False
                for cell in list(self.queue):
                    if self._waits(cell):
                        waiting = True
                        continue
                    self.queue.remove(cell)
                    if self.calibration_failed and cell.variant.benchmark in self.gated:
                        self.left_for_later[cell.id] = f"not run: {self.calibration_failed}"
                        continue
                    if self.deadline is not None:
                        # estimated now: a cell of the same variant that finished in this run has measured it
                        seconds, source = self.estimates[cell.id] = estimate(cell, self.device)
                        left = self.seconds_left()
                        if seconds > left:
                            self.left_for_later[cell.id] = (f"did not fit: {source} estimate {seconds:.0f}s, "
                                                            f"{max(0.0, left):.0f}s left")
                            continue
                    self.running.add(cell.id)
                    return cell
                if waiting and self.calibration & self.running:  # a calibration cell runs elsewhere: wait for it
                    self.condition.wait(timeout=5.0)
                    continue
                for cell in self.queue:  # the calibration cannot finish in this run
                    self.left_for_later[cell.id] = (f"waits for the calibration ({', '.join(sorted(self.calibration))} "
                                                    f"not done): it may change the benchmark")
                self.queue.clear()
                return None

    def finished(self, cell: Cell) -> None:
        """``cell`` is done: once every calibration cell is, the calibration is judged."""
        with self.condition:
            self.running.discard(cell.id)
            if cell.id in self.calibration:
                self.calibration.discard(cell.id)
                if not self.calibration:
                    self.calibration_failed = calibration_failure(cell.profile, cell.work)
            self.condition.notify_all()

    def given_up(self, cell: Cell) -> None:
        """``cell`` failed or was stopped at the deadline: a calibration cell among them stays not done."""
        with self.condition:
            self.running.discard(cell.id)
            self.condition.notify_all()


def calibration_cells(profile: Profile, work: Path) -> list[Cell]:
    """The cells that calibrate ``profile``'s benchmark: its calibration variants, first seed."""
    by_name = {v.name: v for v in VARIANTS}
    return [Cell(profile, by_name[name], profile.seeds[0], work) for name in profile.calibration]


def calibration_state(profile: Profile, work: Path) -> str:
    """``none`` (the profile calibrates nothing), ``pending``, ``passed`` or ``failed: why``."""
    if not profile.calibration:
        return "none"
    if not all(is_done(cell) for cell in calibration_cells(profile, work)):
        return "pending"
    failure = calibration_failure(profile, work)
    return "passed" if failure is None else f"failed: {failure}"


def calibration_failure(profile: Profile, work: Path) -> Optional[str]:
    """Why the finished calibration of ``profile`` (its first seed) does not let the methods be compared, or
    None where it does (or the profile has none): DINO at least CALIBRATION_MARGIN mIoU above the random
    init, the supervised ceiling at least CEILING_MARGIN above both (issue 22, item 7). Where it fails, the
    benchmark or the budget is wrong, not the methods: change it once, for every method alike."""
    if not profile.calibration:
        return None
    miou = {}
    for cell in calibration_cells(profile, work):
        if not is_done(cell):
            return None
        miou[cell.variant.name] = json.loads(cell.result_path.read_text())["metrics"]["miou"]
    reasons = []
    if miou["dino"] - miou["random"] < CALIBRATION_MARGIN:
        reasons.append(f"DINO {100 * miou['dino']:.1f} is not {100 * CALIBRATION_MARGIN:.0f} mIoU points above the "
                       f"random init {100 * miou['random']:.1f}")
    if miou["supervised"] - max(miou["dino"], miou["random"]) < CEILING_MARGIN:
        reasons.append(f"the supervised ceiling {100 * miou['supervised']:.1f} is not {100 * CEILING_MARGIN:.0f} points "
                       f"above both")
    if not reasons:
        return None
    return ("the calibration failed (" + "; ".join(reasons) + "): change the benchmark or the budget, once, for "
            "every method alike (issue 22, item 7; docs/reproduction.md)")


def metrics_line(metrics: dict, limit: int = 400) -> str:
    """A finished cell's metrics on one line of the log (a window's log comes back even where its archive
    does not)."""
    shown = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if isinstance(value, (int, float)))
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def write_progress(profile: Profile, cells: list[Cell], planner: Optional[Planner], stopped: dict[str, str],
                   failed: dict[str, str]) -> dict:
    """``RESULTS/<profile>/progress.json``: the selected cells, done or pending (and why), with their estimates."""
    rows = []
    for cell in cells:
        if is_done(cell):
            state, why = "done", ""
        elif cell.id in failed:
            state, why = "failed", failed[cell.id]
        elif cell.id in stopped:
            state, why = "pending", stopped[cell.id]
        else:
            state = "pending"
            why = (planner.left_for_later.get(cell.id, "not started") if planner else "not started")
        row = {"cell": cell.id, "state": state, "why": why,
               "resumable": not is_done(cell) and (cell.run / "checkpoints").is_dir()}
        if planner is not None and planner.deadline is not None:  # what the next run will plan with
            seconds, source = planner.estimates[cell.id] if state == "done" and cell.id in planner.estimates \
                else estimate(cell, planner.device)
            row["estimate_s"], row["estimate_from"] = round(seconds, 1), source
        rows.append(row)
    progress = {"profile": profile.name, "device": planner.device if planner else None,
                "written": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": rows}
    atomic.write_json(RESULTS / profile.name / "progress.json", progress)
    return progress


# ------------------------------------------------------------------------------------------ the report


def _mean_std(values: list[float]) -> tuple[float, float]:
    import numpy as np

    array = np.array(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(profile: Profile, records: list[dict]) -> dict:
    """Mean ± std over seeds per (variant, metric), and the claims."""
    by_variant: dict[str, dict[str, list[float]]] = {}
    seeds: dict[str, list[int]] = {}
    for r in records:
        variant = r["spec"]["variant"]
        seeds.setdefault(variant, []).append(int(r["cell"].rsplit("/", 1)[1]))
        for key, value in r["metrics"].items():
            if isinstance(value, (int, float)):
                by_variant.setdefault(variant, {}).setdefault(key, []).append(float(value))
    table = {v: {k: dict(zip(("mean", "std"), _mean_std(vals)), n=len(vals)) for k, vals in metrics.items()}
             for v, metrics in by_variant.items()}

    read: set[str] = set()  # the variants the next claim's values were read from
    entries: list[dict] = []  # the table entries (mean, std, n) read for the next claim, in order

    def mean(variant: str, key: str) -> Optional[float]:
        read.add(variant)
        entry = table.get(variant, {}).get(key, {})
        entries.append(entry)
        return entry.get("mean")

    claims = []

    def claim(text: str, values: list[Optional[float]], holds, margin=lambda a, b: a - b, deciding=None) -> None:
        """``holds`` decides the claim; ``margin`` says by how much, signed in the claim's direction (positive
        where it holds; for "a > b", a - b): the chart draws it. ``deciding(values)`` names the pairs of values
        whose gaps decide it (default: the two values of a two-value claim; an order a < b < c: each neighbour
        pair; "c is the best": c and the best of the others), for the seed-spread check."""
        ready = all(v is not None for v in values)
        pairs = (deciding(values) if deciding else [(0, 1)] if len(values) == 2 else None) if ready else None
        claims.append({"claim": text, "holds": bool(holds(*values)) if ready else None,
                       "values": [None if v is None else 100 * v for v in values], "variants": sorted(read),
                       "margin": 100 * margin(*values) if ready else None,
                       "within_seed_spread": within_seed_spread(values, pairs) if ready else None})
        read.clear()
        entries.clear()

    def within_seed_spread(values: list[float], pairs) -> Optional[bool]:
        """For a claim comparing means over several seeds each: is any gap that decides it no larger than the
        larger of that pair's two standard deviations? None where that does not apply (one seed, derived values,
        a threshold claim)."""
        if not pairs or len(entries) != len(values) or [e.get("mean") for e in entries] != list(values) \
                or min(e.get("n", 0) for e in entries) < 2:
            return None
        return any(abs(values[i] - values[j]) <= max(entries[i]["std"], entries[j]["std"]) for i, j in pairs)

    def neighbours(values):  # an order a < b < c ...: each gap between neighbours decides it
        return [(i, i + 1) for i in range(len(values) - 1)]

    # calibration first: if DINO is not clearly above random or the ceiling not well above both, the benchmark or
    # the budget is wrong, not the methods (issue 22, item 7)
    claim(f"Calibration: DINO >= random init + {100 * CALIBRATION_MARGIN:.0f} mIoU points on fmnist-scenes",
          [mean("dino", "miou"), mean("random", "miou")], lambda a, b: a - b >= CALIBRATION_MARGIN,
          lambda a, b: a - b - CALIBRATION_MARGIN)
    claim(f"Calibration: the supervised ceiling is well above both (>= {100 * CEILING_MARGIN:.0f} mIoU points over the better "
          f"of DINO and random init)", [mean("supervised", "miou"), mean("dino", "miou"), mean("random", "miou")],
          lambda a, b, c: a - max(b, c) >= CEILING_MARGIN, lambda a, b, c: a - max(b, c) - CEILING_MARGIN)
    for key, label in (("miou", "mIoU"), ("foreground_iou", "foreground IoU")):
        order = [mean(v, key) for v in ("cribo-global", "cribo-cross-view", "cribo")]
        claim(f"CrIBo Table 5 order on fmnist-scenes {label}: global only < + cross-view < + cross-image", order,
              lambda a, b, c: a < b < c, lambda a, b, c: min(b - a, c - b), neighbours)
        claim(f"CrIBo > DINO on fmnist-scenes {label}", [mean("cribo", key), mean("dino", key)], lambda a, b: a > b)
        claim(f"DINO > random init on fmnist-scenes {label}", [mean("dino", key), mean("random", key)], lambda a, b: a > b)
    knn = f"knn_top1@{max((int(k.split('@')[1]) for v in table.values() for k in v if k.startswith('knn_top1@')), default=20)}"
    knn_label = f"image k-NN top-1 (k={knn.split('@')[1]}, largest item)"
    claim(f"SOVE > DINO on fmnist-scenes {knn_label}", [mean("sove", knn), mean("dino", knn)], lambda a, b: a > b)
    claim("SOVE > DINO on fmnist-scenes mIoU", [mean("sove", "miou"), mean("dino", "miou")], lambda a, b: a > b)
    claim(f"SOVE Table 8: more CLS judges help, 1 < 3 < 9 judges, {knn_label}",
          [mean(v, knn) for v in ("sove-1judge", "sove-3judges", "sove")], lambda a, b, c: a < b < c,
          lambda a, b, c: min(b - a, c - b), neighbours)
    claim("SOVE: the patch loss helps dense k-NN, mIoU with > without",
          [mean("sove", "miou"), mean("sove-no-patch", "miou")], lambda a, b: a > b)
    claim(f"DINO > random init on fmnist-scenes {knn_label}", [mean("dino", knn), mean("random", knn)],
          lambda a, b: a > b)
    for key, label in (("linear_map", "multi-label linear mAP"), ("miou", "mIoU"), (knn, knn_label)):
        claim(f"MLS > MoCo-v2 on fmnist-scenes {label}", [mean("mls", key), mean("mocov2", key)], lambda a, b: a > b)
    claim("MoCo-v2 > random init on fmnist-scenes multi-label linear mAP",
          [mean("mocov2", "linear_map"), mean("random-linear", "linear_map")], lambda a, b: a > b)
    claim("MLS k ablation (paper: k=20 best of 1, 5, 20, 40), multi-label linear mAP",
          [mean(v, "linear_map") for v in ("mls-k1", "mls-k5", "mls", "mls-k40")],
          lambda a, b, c, d: c > max(a, b, d), lambda a, b, c, d: c - max(a, b, d),
          lambda v: [(2, max((0, 1, 3), key=lambda i: v[i]))])
    claim("MLS: labels from Q_g (two queues) beat labels from Q_z (one queue), multi-label linear mAP",
          [mean("mls", "linear_map"), mean("mls-one-queue", "linear_map")], lambda a, b: a > b)
    for variant, (name, start) in (("mile", ("MILE", "its random init")),
                                   ("mile-backbone", ("MILE from the backbone", "the backbone it started from"))):
        for baseline in ("max-pairwise@trained", "mean-cls@trained", "max-pairwise@start", "mean-cls@start"):
            score, model = baseline.split("@")
            claim(f"{name} > {score} of {'the trained backbone' if model == 'trained' else start}, AR@10 on "
                  "fmnist-products", [mean(variant, "mile@trained/noise0"), mean(variant, f"{baseline}/noise0")],
                  lambda a, b: a > b)

        def drop(score: str, noise: float, variant=variant) -> Optional[float]:
            clean, noisy = mean(variant, f"{score}/noise0"), mean(variant, f"{score}/noise{noise:g}")
            return None if clean is None or noisy is None else clean - noisy

        noise = max((float(k.rsplit("noise", 1)[1]) for k in table.get(variant, {})), default=0.0)
        if noise:
            for baseline in ("max-pairwise@trained", "mean-cls@trained"):
                claim(f"{name}: its AR@10 falls less than {baseline.split('@')[0]}'s from 0 to {noise:.0%} noise",
                      [drop("mile@trained", noise), drop(baseline, noise)], lambda a, b: a < b, lambda a, b: b - a)
    return {"profile": profile.name, "about": profile.about, "seeds": sorted({s for v in seeds.values() for s in v}),
            "cells": len(records), "table": table, "claims": claims,
            "provenance": sorted({(r["device"], r["commit"], r["torch"]) for r in records}),
            "train_hours": round(sum((r.get("train_seconds_total") or 0) for r in records) / 3600, 2)}


def _pct(entry: Optional[dict]) -> str:
    if not entry:
        return "–"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}" if entry["n"] > 1 else f"{100 * entry['mean']:.1f}"


def markdown(summary: dict) -> str:
    table = summary["table"]
    # a profile that lists its variants (warm) shows those and what was measured; the others show every variant
    planned = PROFILES[summary["profile"]].variants if summary["profile"] in PROFILES else None

    def listed(variant: str) -> bool:
        return planned is None or variant in planned or variant in table

    lines = [f"# Fidelity suite, profile `{summary['profile']}`", "", summary["about"], "",
             f"{summary['cells']} cells, seeds {summary['seeds']}, {summary['train_hours']} h of training in all; "
             f"mean ± std over seeds (%).", ""]
    if all(listed(v) for v in CALIBRATION):
        lines += ["## Calibration: can the benchmark tell a method from none? (issue 22, item 7)", "",
                  "Random init, DINO and the supervised ceiling (the same ViT trained on the training masks, "
                  "benchmarks/supervised_ceiling.py) through the same evaluations.", "",
                  "| variant | seeds | mIoU | foreground IoU | image k-NN top-1 k=10 | k=20 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for variant in CALIBRATION:
            row = table.get(variant, {})
            lines.append(f"| {variant} | {row.get('miou', {}).get('n', 0)} | {_pct(row.get('miou'))} | "
                         f"{_pct(row.get('foreground_iou'))} | {_pct(row.get('knn_top1@10'))} | "
                         f"{_pct(row.get('knn_top1@20'))} |")
        lines += [""]
        for c in summary["claims"]:
            if c["claim"].startswith("Calibration"):
                verdict = {True: "holds", False: "**does not hold**", None: "not measured yet"}[c["holds"]]
                lines.append(f"- {c['claim']}: {verdict}")
        lines += [""]
    lines += ["## fmnist-scenes: dense k-NN segmentation (all training scenes as memory)", "",
              "| variant | seeds | mIoU | foreground IoU | fg/bg mIoU | image k-NN top-1 k=10 | k=20 | multi-label linear mAP |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant in filter(listed, SCENE_VARIANTS):
        row = table.get(variant, {})
        n = row.get("miou", {}).get("n", 0)
        lines.append(f"| {variant} | {n} | {_pct(row.get('miou'))} | {_pct(row.get('foreground_iou'))} | "
                     f"{_pct(row.get('binary_miou'))} | {_pct(row.get('knn_top1@10'))} | {_pct(row.get('knn_top1@20'))} | "
                     f"{_pct(row.get('linear_map'))} |")
    for variant, about in PRODUCT_VARIANTS.items():
        mile = table.get(variant, {})
        if not mile:
            continue
        noises = sorted({k.rsplit("noise", 1)[1] for k in mile}, key=float)
        seeds = max(entry["n"] for entry in mile.values())
        lines += ["", f"## fmnist-products: image-set retrieval, AR@10 — `{variant}`: {about}, {seeds} seed(s)", "",
                  "| score | backbone | " + " | ".join(f"{float(n):.0%} noise" for n in noises) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in noises) + " |"]
        for method, backbone in PRODUCT_ROWS:
            cells = [_pct(mile.get(f"{method}@{backbone}/noise{n}")) for n in noises]
            if any(c != "–" for c in cells):
                lines.append(f"| {method} | {backbone} | " + " | ".join(cells) + " |")
    shown = [c for c in summary["claims"] if c["holds"] is not None or planned is None
             or set(c.get("variants", ())) <= set(planned)]
    lines += ["", "## Claims (the paper's direction, never its numbers)", ""]
    if any(c.get("within_seed_spread") for c in shown):
        lines += ["\"within the seed spread\": the two means differ by no more than the larger of their standard "
                  "deviations over seeds, so the direction is not established.", ""]
    lines += ["| claim | holds | values (%) |", "| --- | --- | --- |"]
    for c in shown:
        verdict = verdict_of(c).replace("no", "**no**") if c["holds"] is False else verdict_of(c)
        lines.append(f"| {c['claim']} | {verdict} | {', '.join('–' if v is None else f'{v:.1f}' for v in c['values'])} |")
    if len(shown) < len(summary["claims"]):
        lines += ["", f"{len(summary['claims']) - len(shown)} claims on variants this profile does not run are left "
                      "out (summary.json lists every claim)."]
    lines += ["", "Provenance (device, commit, torch): " + "; ".join(", ".join(p) for p in summary["provenance"]), ""]
    return "\n".join(lines)


def verdict_of(claim: dict) -> str:
    """A claim's verdict in words: yes, no, not measured yet, or yes/no "(within the seed spread)"."""
    verdict = {True: "yes", False: "no", None: "not measured yet"}[claim["holds"]]
    if claim["holds"] is not None and claim.get("within_seed_spread"):
        verdict += " (within the seed spread)"
    return verdict


def claims_panel(axis, claims: list[dict]) -> None:
    """The measured claims as horizontal bars of their margin (points, signed in the claim's direction: right of
    zero it holds), green where it holds, red where not, pale where a gap that decides it is within the seed spread."""
    colours = {(True, False): "tab:green", (False, False): "tab:red", (True, True): "#b7e4b7", (False, True): "#f2b8b8"}
    limit = max([abs(c["margin"]) for c in claims] + [1.0])
    for row, c in enumerate(claims):
        axis.barh(row, c["margin"], color=colours[(bool(c["holds"]), bool(c.get("within_seed_spread")))],
                  edgecolor="grey", linewidth=0.5)
        axis.text(1.01, row, f"{verdict_of(c)}, {c['margin']:+.2f}", va="center", fontsize=7.5,
                  transform=axis.get_yaxis_transform())
    axis.set_yticks(range(len(claims)), [c["claim"] for c in claims], fontsize=7.5)
    axis.invert_yaxis()
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xscale("symlog", linthresh=1.0)  # margins of 0.01 and of 20 points on one axis
    axis.set_xlim(-limit * 1.1, limit * 1.1)
    ticks = [t for t in (-100, -10, -1, 0, 1, 10, 100) if abs(t) <= limit * 1.1]
    axis.set_xticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    axis.set_xlabel("margin in the claim's direction (points; > 0: holds; a linear scale within ±1, logarithmic beyond)")
    axis.set_title("claims measured: green holds, red does not, pale = a deciding gap is within the seed spread",
                   fontsize=10)


def chart(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    variants = [v for v in SCENE_VARIANTS if v in table]
    measured = [c for c in summary["claims"] if c["holds"] is not None and c.get("margin") is not None]
    drawn = [v for v in PRODUCT_VARIANTS if table.get(v)]
    # a top panel for the scenes cells and one for the products cells, where there are any; a lone panel is
    # narrower, unless the claims' labels below need the width
    width_in = 18 if variants and drawn else (12 if measured else 7.5)
    claims_in = 0.9 + 0.25 * len(measured) if measured else 0.0
    figure = plt.figure(figsize=(width_in, 5.2 + claims_in), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[5.2, claims_in]) if measured else (figure, None)
    if variants and drawn:
        left, right = top.subplots(1, 2, width_ratios=[2.2, 1])
    else:
        left, right = (top.subplots(1, 1), None) if variants else (None, top.subplots(1, 1))
    if measured:
        claims_panel(bottom.subplots(1, 1), measured)
    metrics = (("miou", "mIoU"), ("foreground_iou", "foreground IoU"), ("knn_top1@20", "image k-NN top-1 (k=20)"),
               ("linear_map", "multi-label linear mAP"))
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics if variants else ()):
        means = [100 * table[v][key]["mean"] if key in table[v] else float("nan") for v in variants]  # nan: no bar
        stds = [100 * table[v][key]["std"] if key in table[v] else 0.0 for v in variants]
        left.bar([x + (i - 1.5) * width for x in range(len(variants))], means, width, yerr=stds, capsize=2, label=label)
    if variants:
        left.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        left.set_ylabel("IoU or top-1 (%)")
        left.set_title("fmnist-scenes: dense k-NN segmentation and image k-NN")
        left.legend(fontsize=8)
    styles = ("-o", "-s", "-^", ":s", ":^")
    for variant, colour in zip(drawn, ("tab:blue", "tab:orange")):
        mile = table[variant]
        noises = sorted({float(k.rsplit("noise", 1)[1]) for k in mile})
        for (method, backbone), style in zip(PRODUCT_ROWS, styles):
            keys = [f"{method}@{backbone}/noise{n:g}" for n in noises]
            if all(k in mile for k in keys):
                means = [100 * mile[k]["mean"] for k in keys]
                right.errorbar([100 * n for n in noises], means, yerr=[100 * mile[k]["std"] for k in keys], fmt=style,
                               color=colour if len(drawn) > 1 else None, capsize=3,
                               label=(f"{variant}: " if len(drawn) > 1 else "") + f"{method} ({backbone})")
    if drawn:
        right.set_xlabel("query photos replaced by random ones (%)")
        right.set_ylabel("AR@10 (%)")
        right.set_title("fmnist-products, image-set retrieval" + (f": {drawn[0]}" if len(drawn) == 1 else ""))
        right.legend(fontsize=7 if len(drawn) > 1 else 8)
    top.suptitle(f"fidelity suite, profile {summary['profile']}: mean ± std over seeds {summary['seeds']}")
    atomic.write_with(out, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def write_report(profile: Profile) -> dict:
    folder = RESULTS / profile.name
    records = [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]
    summary = summarise(profile, records)
    atomic.write_json(folder / "summary.json", summary)
    atomic.write_text(folder / "summary.md", markdown(summary))
    if records:
        chart(summary, folder / "summary.png")
    return summary


# ------------------------------------------------------------------------------------------ results in one archive


PACKED = ("cells/*.json", "summary.json", "summary.md", "summary.png", "progress.json")


def pack_results(profile: Profile, out: Path) -> int:
    """Write the profile's results (cell records, report, progress) into the tar.gz ``out``, under
    ``<profile>/``; returns the number of files packed. A device window gives back a few files only."""
    import tarfile

    folder = RESULTS / profile.name
    files = sorted({path for pattern in PACKED for path in folder.glob(pattern) if path.is_file()})
    if not files:
        raise SystemExit(f"error: {folder} holds no results to pack; run cells first")

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in files:
                tar.add(path, arcname=f"{profile.name}/{path.relative_to(folder).as_posix()}", recursive=False)

    atomic.write_with(out, write)
    return len(files)


def unpack_results(profile: Profile, archive: Path, work: Optional[Path] = None) -> tuple[list[str], dict[str, str]]:
    """Merge an archive of :func:`pack_results` into ``RESULTS/<profile>/``: its cell records replace
    those of the same cells (the report is then rebuilt from every record). A record is not merged where
    the cell is declared otherwise here now (its spec_sha differs: the archive was made before a change of
    the suite) or where the record here finished later (windows unpacked out of order). Returns the
    cells merged and, for those left out, why."""
    import tarfile

    if not archive.is_file():
        raise SystemExit(f"error: {archive} is not a file; give the archive --pack-results wrote")
    cells = RESULTS / profile.name / "cells"
    merged, skipped = [], {}
    by_name = {v.name: v for v in VARIANTS}
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        others = sorted({m.name.split("/", 1)[0] for m in members} - {profile.name})
        if others:
            raise SystemExit(f"error: {archive} holds results of profile {', '.join(others)}, not {profile.name}; "
                             f"give --profile {others[0]}")
        for member in members:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[1] == "cells" and parts[2].endswith(".json")
                    and not parts[2].startswith(".")):
                continue  # the report and progress are rebuilt here, from every record
            record = json.loads(tar.extractfile(member).read())
            if record.get("profile") != profile.name or "spec_sha" not in record:
                raise SystemExit(f"error: {member.name} in {archive} is not a cell record of profile {profile.name}")
            variant = by_name.get(record.get("spec", {}).get("variant"))
            if variant is None:
                skipped[record["cell"]] = "its variant is not declared here"
                continue
            here = Cell(profile, variant, int(record["cell"].rsplit("/", 1)[1]), work or Path("fidelity-work") / profile.name)
            try:
                current = here.spec_sha()
            except SystemExit as exc:  # a weights file the cell reads is missing here
                skipped[record["cell"]] = f"cannot be checked here ({exc})"
                continue
            if current != record["spec_sha"]:
                skipped[record["cell"]] = "declared otherwise here now (another spec_sha): run the cell again"
                continue
            local = cells / parts[2]
            if local.is_file():
                kept = json.loads(local.read_text())
                if kept.get("spec_sha") == record["spec_sha"] and record_time(kept.get("finished")) > record_time(
                        record.get("finished")):
                    skipped[record["cell"]] = f"the record here finished later ({kept.get('finished')})"
                    continue
            atomic.write_json(local, record)
            merged.append(record["cell"])
    return merged, skipped


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--work", type=Path, help="runs, data and features [default: fidelity-work/<profile>]")
    parser.add_argument("--fmnist", type=Path, default=FMNIST, help="Fashion-MNIST IDX files (dataset-fashion-mnist)")
    parser.add_argument("--only", nargs="*", default=[], help="cells to run, as patterns of their ids (scenes/cribo/*)")
    parser.add_argument("--jobs", type=int, help="cells run at once [default: the profile's]")
    parser.add_argument("--rerun", action="store_true", help="run the selected cells again even when finished")
    parser.add_argument("--budget-s", type=float,
                        help="run only the pending cells whose estimate fits in this many seconds (data included), "
                             "stop a cell still running at the end (SIGTERM; it resumes next time) and exit 0")
    parser.add_argument("--deadline-epoch", type=float, metavar="UNIX_TIME",
                        help="with or without --budget-s, end by this time (seconds since the epoch): a device script "
                             "passes its own deadline, so the suite's start and imports count too")
    parser.add_argument("--list", action="store_true", help="list the cells and their state, run nothing")
    parser.add_argument("--calibration-state", action="store_true",
                        help="print the profile's calibration state (none, pending, passed, failed: why), run nothing")
    parser.add_argument("--summary", action="store_true", help="only rebuild the report from finished cells")
    parser.add_argument("--pack-results", type=Path, metavar="FILE.tar.gz",
                        help="at the end, write the profile's results (cell records, report) into this archive")
    parser.add_argument("--unpack-results", type=Path, metavar="FILE.tar.gz",
                        help="only merge an archive of --pack-results into the results and rebuild the report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the reports go [default: %(default)s]")
    options = parser.parse_args(argv)
    RESULTS = options.results.resolve()
    profile = PROFILES[options.profile]
    work = (options.work or Path("fidelity-work") / profile.name).resolve()
    cells = cells_of(profile, work, options.only)
    if options.budget_s is not None and options.budget_s <= 0:
        raise SystemExit(f"error: --budget-s must be positive, got {options.budget_s:g}")
    if options.unpack_results is not None:
        merged, skipped = unpack_results(profile, options.unpack_results.resolve(), work)
        write_report(profile)
        print(f"merged {len(merged)} cell records from {options.unpack_results} into {RESULTS / profile.name}: "
              f"{', '.join(merged) or 'none'}")
        for cell_id, why in skipped.items():
            print(f"not merged: {cell_id}: {why}")
        return 0
    if options.calibration_state:
        print(calibration_state(profile, work))
        return 0
    failures: dict[str, str] = {}
    stopped: dict[str, str] = {}
    planner = None
    if options.list:
        device = device_description() if options.budget_s is not None else None
        for cell in cells:
            state = "done" if is_done(cell) else "resumable" if cell.run.exists() else "to do"
            extra = "" if device is None or state == "done" else "  {:.0f}s ({})".format(*estimate(cell, device))
            print(f"{cell.id:32s} {state}{extra}")
        return 0
    if not options.summary:
        if profile.estimates_device is not None:
            import torch

            if not torch.cuda.is_available():  # its evaluation-only cells would finish on the CPU and count as done
                raise SystemExit(f"error: profile {profile.name} runs on a CUDA GPU ({profile.estimates_device}), and "
                                 f"torch sees none here; use --profile smoke for a dry run")
        jobs = options.jobs or profile.jobs
        threads = max(1, (os.cpu_count() or 1) // jobs)
        started = time.perf_counter()
        pending = [c for c in cells if options.rerun or not is_done(c)]
        device = device_description()  # (CUDA's start)
        budget_s = options.budget_s
        if options.deadline_epoch is not None:  # now, after the imports and CUDA's start: they count against it
            left = max(0.001, options.deadline_epoch - time.time())
            budget_s = left if budget_s is None else min(budget_s, left)
        planner = Planner(pending, budget_s, device)
        budget = "" if budget_s is None else f", within {budget_s:.0f}s"
        print(f"fidelity suite, profile {profile.name}: {len(cells)} cells ({len(cells) - len(pending)} done), "
              f"{jobs} at a time{budget}; work in {work}", flush=True)
        for cell in cells:
            if cell not in pending:
                print(f"{cell.id}: reused", flush=True)
        try:
            build_data(profile, work, options.fmnist.resolve(), threads, planner.deadline)
        except OutOfTime as exc:
            print(f"data: {exc}; no cell started", flush=True)
            planner.queue.clear()
        except RuntimeError as exc:
            raise SystemExit(f"error: the data could not be built: {exc}") from None

        pack_lock = threading.Lock()

        def worker() -> None:
            while (cell := planner.next()) is not None:
                try:
                    record = run_cell(cell, threads, options.rerun, planner.deadline)
                except OutOfTime as exc:
                    planner.given_up(cell)
                    stopped[cell.id] = f"{exc}; resumes from its last checkpoint in {work}"
                    print(f"{cell.id}: {exc}", flush=True)
                    continue
                except Exception as exc:  # one failed cell does not stop the others; the rerun retries it
                    planner.given_up(cell)
                    failures[cell.id] = str(exc)
                    print(f"{cell.id}: FAILED: {exc}", flush=True)
                    continue
                planner.finished(cell)
                print(f"{cell.id}: done in {sum(record['seconds_this_session'].values()):.0f}s; "
                      f"{metrics_line(record['metrics'])}", flush=True)
                if options.pack_results is not None:  # at once: a window cut later still brings this cell back
                    try:
                        with pack_lock:
                            pack_results(profile, options.pack_results.resolve())
                    except (OSError, SystemExit) as exc:  # the record is written; the pack at the end tries again
                        print(f"{cell.id}: could not pack the results into {options.pack_results} ({exc})", flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(worker) for _ in range(jobs)]:
                future.result()
        done = sum(is_done(c) for c in cells)
        print(f"{done} of {len(cells)} cells finished in {time.perf_counter() - started:.0f}s", flush=True)
        if failures:
            print("failed: " + ", ".join(failures) + "; run the same command again to retry", flush=True)
    summary = write_report(profile)
    print(markdown(summary))
    print(f"report: {RESULTS / profile.name}/summary.md, summary.json, summary.png")
    if not options.summary:
        print(progress_table(write_progress(profile, cells, planner, stopped, failures)))
    if options.pack_results is not None:
        count = pack_results(profile, options.pack_results.resolve())
        print(f"packed {count} files of {RESULTS / profile.name} into {options.pack_results}")
    return 1 if failures else 0


def progress_table(progress: dict) -> str:
    lines = [f"cells of profile {progress['profile']}:"]
    for row in progress["cells"]:
        estimate_text = f" (estimate {row['estimate_s']:.0f}s, {row['estimate_from']})" if "estimate_s" in row else ""
        why = f": {row['why']}" if row["why"] else ""
        lines.append(f"  {row['cell']:32s} {row['state']}{why}{estimate_text}")
    done = sum(r["state"] == "done" for r in progress["cells"])
    pending = len(progress["cells"]) - done
    lines.append(f"{done} done, {pending} pending" + ("; run the same command again to go on" if pending else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
