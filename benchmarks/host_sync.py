"""Host-device synchronisations of the training step on CUDA, measured (issue 22, item 4).

Runs ``mlsctl pretrain`` in this process for each recipe, with ``torch.cuda.set_sync_debug_mode("warn")``
on during the steps whose metrics are not logged, and counts the warnings torch raises there ("called a
synchronizing CUDA operation") by the innermost line of mlsctl's code on their stack (else the innermost
line outside torch). ``tests/test_host_sync.py`` checks the same on the CPU by counting the aten ops that
would wait for the device; this sees what that cannot: copies from host memory, CUDA kernels that read
values on the host, library code. Logged steps synchronise on purpose (their metrics, their timings) and
are not counted.

    python benchmarks/host_sync.py --scenes DATA/fmnist-scenes/train/images \\
        --products DATA/fmnist-products/train --out host_sync.json        # on a CUDA machine

Without CUDA it says so and writes ``{"skipped": ...}`` (the device window's CPU dry run).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYNC_WARNING = "called a synchronizing CUDA operation"
# recipe -> the data it trains on; each for one epoch at most, crops on the device, bf16
RECIPES = {"dino_fmnist_quick": "scenes", "cribo_fmnist_quick": "scenes", "sove_fmnist_quick": "scenes",
           "mls_fmnist_quick": "scenes", "mile_fmnist_quick": "products"}
SETTINGS = ("optim.epochs=1", "optim.warmup_epochs=0", "train.log_every=10", "train.checkpoint_every=100000",
            "train.bank_health_every=0", "data.augment=gpu", "train.precision=bf16", "data.workers=4")


def sync_site(stack: list[traceback.FrameSummary]) -> str:
    """Where a synchronisation comes from: the innermost frame in mlsctl's package, else the innermost
    one outside torch, as ``path:line (function)`` relative to the repository."""
    package = REPO / "mlsctl"
    ours = [f for f in stack if Path(f.filename).resolve().is_relative_to(package)]
    outside = [f for f in stack if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
    frame = (ours or outside or stack)[-1]
    path = Path(frame.filename).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return f"{shown}:{frame.lineno} ({frame.name})"


class SyncCounter:
    """Wraps the loop's ``_train_one_step``: on steps that are not logged, counts the sync warnings
    raised while ``debug_mode`` is on (CUDA's "warn"), by :func:`sync_site`."""

    def __init__(self, train_one_step, set_debug_mode):
        self.train_one_step, self.set_debug_mode = train_one_step, set_debug_mode
        self.sites: collections.Counter = collections.Counter()
        self.per_step: list[int] = []

    def __call__(self, t, step):
        if t.method.logged:
            return self.train_one_step(t, step)
        found = 0

        def show(message, category, filename, lineno, file=None, line=None):
            nonlocal found
            if SYNC_WARNING in str(message):
                found += 1
                self.sites[sync_site(traceback.extract_stack()[:-1])] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            self.set_debug_mode("warn")
            try:
                return self.train_one_step(t, step)
            finally:
                self.set_debug_mode("default")
                self.per_step.append(found)


def first_entries(root: Path, count: int, folder: Path) -> Path:
    """``folder`` with links to the first ``count`` entries of ``root`` (images, or objects' folders)."""
    folder.mkdir(parents=True)
    for entry in sorted(root.iterdir())[:count]:
        (folder / entry.name).symlink_to(entry.resolve())
    return folder


def measure(recipe_name: str, data_root: str, work: Path, overrides: list[str], set_debug_mode=None,
            steps: int = 20) -> dict:
    """One recipe's run of ``steps`` steps (an epoch of the first ``steps`` batches of ``data_root``), its
    steps that are not logged counted (``set_debug_mode``: CUDA's)."""
    import torch

    from mlsctl import config
    from mlsctl.train import loop

    batch = config.load_recipe(recipe_name, [*SETTINGS, *overrides]).optim.batch_size
    data_root = first_entries(Path(data_root), steps * batch, work / f"{recipe_name}-data")
    recipe = config.load_recipe(recipe_name, [f"data.root={data_root}", *SETTINGS, *overrides])
    counter = SyncCounter(loop._train_one_step, set_debug_mode or torch.cuda.set_sync_debug_mode)
    loop._train_one_step = counter
    started = time.perf_counter()
    try:
        summary = loop.pretrain(recipe, work / f"{recipe_name}-run", recipe_source=recipe_name)
    finally:
        loop._train_one_step = counter.train_one_step
    steps = counter.per_step
    return {"steps": summary.steps, "steps_not_logged": len(steps), "syncs": sum(steps),
            "syncs_per_step_max": max(steps, default=0), "sites": dict(counter.sites.most_common()),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", help="training images of fmnist-scenes (DINO, CrIBo, SOVE, MLS)")
    parser.add_argument("--products", help="training objects of fmnist-products (MILE)")
    parser.add_argument("--recipe", action="append", help="only these recipes (repeatable) [default: all five]")
    parser.add_argument("--steps", type=int, default=20, help="steps of each run (every 10th is logged)")
    parser.add_argument("--override", nargs="*", default=[], help="KEY=VALUE for every recipe")
    parser.add_argument("--out", default="host_sync.json")
    options = parser.parse_args()
    import torch

    from mlsctl import atomic

    out = Path(options.out)
    if not torch.cuda.is_available():
        print("host_sync: needs CUDA (torch.cuda.set_sync_debug_mode); nothing measured")
        atomic.write_json(out, {"skipped": "no CUDA device"})
        return 0
    roots = {"scenes": options.scenes, "products": options.products}
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": list(SETTINGS),
                     "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.recipe or list(RECIPES):
            root = roots[RECIPES.get(name, "scenes")]
            if root is None:
                print(f"{name}: skipped (no --{RECIPES.get(name, 'scenes')})")
                continue
            try:
                results["recipes"][name] = measure(name, root, Path(tmp), options.override,
                                                     steps=options.steps)
            except Exception as exc:  # noqa: BLE001 - one recipe failing leaves the others measured
                results["recipes"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc()}  # a window's failure, placed
            atomic.write_json(out, results)  # after every recipe, whole: a window cut short keeps the others
    print(f"{'recipe':22s} {'steps':>6s} {'syncs':>6s} {'max/step':>8s}  where")
    for name, r in results["recipes"].items():
        if "error" in r:
            print(f"{name:22s} FAILED: {r['error'][:200]}")
            continue
        sites = "; ".join(f"{site} x{n}" for site, n in list(r["sites"].items())[:4]) or "-"
        print(f"{name:22s} {r['steps_not_logged']:6d} {r['syncs']:6d} {r['syncs_per_step_max']:8d}  {sites}")
    print(f"(steps whose metrics are not logged; written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
