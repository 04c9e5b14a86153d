"""No host-device synchronisation in a training step whose metrics are not logged, beyond what
each method needs (issue 22: values stay on the device and are read only where metrics are logged).

On CUDA the host queues kernels and runs ahead; an operation that reads a device value on the host
(``float``/``int``/``bool``/``.item()`` of a tensor, ``nonzero``, boolean-mask indexing, ...) or
``torch.cuda.synchronize`` makes it wait for the queue, stalling the GPU. On the CPU nothing waits,
so the ops that would are counted instead (a :class:`TorchDispatchMode`), in the loop's
``_train_one_step`` of each registered method (tests/test_contract.py's tiny cases) on its steps
that are not logged, with CUDA's deferred checks (the finite-loss watch, the banks' finite check).
Not counted: data loading (its own stage), the optimiser (fused on CUDA) and ``F.one_hot``, whose
value checks run on the CPU only. Not visible here: copies from host memory to the device, and ops
whose CUDA kernel alone reads values on the host (``bincount``); docs/gpu.md lists those the step
avoids.
"""

from __future__ import annotations

import collections
import json
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, write_recipe
from test_contract import CASES

# The ops that wait for the device on CUDA (what they are called for a Python read of a tensor,
# `nonzero`, `masked_select`, ...). Boolean-mask indexing (`x[mask]`, `x[mask] = v`) is recognised
# by its index: it calls nonzero.
SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.is_nonzero.default", "aten.equal.default", "aten.unique_consecutive.default",
           "aten._unique2.default", "aten.repeat_interleave.Tensor", "aten.bincount.default"}

# At most this many per step that is not logged, each inherent to the method:
INHERENT = {
    "dino": 0,
    "mls": 0,
    "mile": 0,
    # valid.nonzero(): the number of objects (clusters present in both views of an image) varies with
    # the clustering; once known, the objects are indexed by integer rows (no synchronisation)
    "cribo": 1,
    # flat_mask.nonzero(): the number of masked patches varies (a random ratio per image); patch_loss's
    # (counts > 0).nonzero(): the number of view-images with a masked patch (the loss's mean over them)
    "sove": 2,
    # pytorch-metric-learning (not ours): MultiSimilarityMiner's torch.where over all positive and
    # negative pairs (2) and over the hard ones, a varying number (2); MultiSimilarityLoss (1)
    "ms": 5,
    # the same library calls on the refined features (the unrefined loss, ms_before, only where logged)
    "refine": 5,
}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that would synchronise on CUDA, per step, outside data loading and the optimiser."""

    def __init__(self):
        super().__init__()
        self.count, self.where, self.paused = 0, collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        mask_index = (name.startswith(("aten.index.Tensor", "aten.index_put")) and
                      any(t is not None and t.dtype == torch.bool for t in (args[1] or [])))
        if not self.paused and (name in SYNCING or mask_index):
            stack = traceback.extract_stack()[:-1]
            if not any("/mlsctl/data/" in f.filename or "/torch/optim/" in f.filename for f in stack):
                self.count += 1
                ours = [f for f in stack if "/mlsctl/" in f.filename] or stack
                self.where[f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {name}"] += 1
        return func(*args, **(kwargs or {}))


def _recipe(name: str, tmp: Path):
    from mlsctl import config

    made = CASES[name](tmp / "data")
    train = {"checkpoint_every": 100, "keep_checkpoints": 1, "log_every": 100, "bank_health_every": 0}
    if isinstance(made, dict):
        made["train"].update(train)
        made["optim"]["epochs"] = 2
        path = write_recipe(tmp / f"{name}.yaml", made)
        return config.load_recipe(str(path)), str(path)
    recipe, source = made
    for key, value in train.items():
        setattr(recipe.train, key, value)
    return recipe, source


@pytest.mark.parametrize("name", list(CASES))
def test_steps_that_are_not_logged_do_not_synchronise(name, tmp_path, monkeypatch):
    from mlsctl.methods import base
    from mlsctl.train import loop, pretrain

    counts, synchronised = [], collections.defaultdict(int)  # syncing ops per step not logged; synchronize per step kind
    counter = SyncCounter()
    one_hot = torch.nn.functional.one_hot

    def one_hot_unchecked(*args, **kwargs):  # its class checks read values on the CPU only
        counter.paused = True
        try:
            return one_hot(*args, **kwargs)
        finally:
            counter.paused = False

    def record_sync(kind: str):
        def synchronize(device):
            synchronised[f"{kind}/{'logged' if current['logged'] else 'not logged'}"] += 1
        return synchronize

    current = {"logged": True}
    train_one_step = loop._train_one_step

    def counted_step(t, step):
        current["logged"] = t.method.logged
        t.watch.at_once = False  # CUDA's deferred checks
        for bank in t.banks:
            bank.defer_finite_check = True
        if t.method.logged:
            return train_one_step(t, step)
        counter.count = 0
        with counter:
            out = train_one_step(t, step)
        counts.append(counter.count)
        return out

    monkeypatch.setattr(torch.nn.functional, "one_hot", one_hot_unchecked)
    monkeypatch.setattr(loop, "_train_one_step", counted_step)
    monkeypatch.setattr(base, "synchronize", record_sync("method"))  # StepTimer's
    monkeypatch.setattr(loop, "synchronize", record_sync("loop"))

    recipe, source = _recipe(name, tmp_path)
    summary = pretrain(recipe, tmp_path / "run", resume=False, recipe_source=source)
    assert len(counts) == summary.steps - 1 >= 2, (counts, summary.steps)  # all but the last, logged
    per_step = max(counts)
    assert per_step <= INHERENT[name], f"{name}: {counts} per step: {dict(counter.where)}"

    # torch.cuda.synchronize (the timings) only on the logged step: the loop's, and the method's own
    assert not any(k.endswith("/not logged") for k in synchronised), dict(synchronised)
    assert synchronised["loop/logged"] == 2, dict(synchronised)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [summary.steps]
    timed = {k for k in lines[-1] if k.startswith("time/")} - {"time/step", "time/other", "time/method_share"}
    assert bool(timed) == (synchronised["method/logged"] > 0), (timed, dict(synchronised))


def test_methods_synchronise_only_through_the_step_timer():
    """A method times its operations with Method.timer (synchronising only on logged steps), never
    with torch.cuda.synchronize of its own."""
    offenders = [str(p.relative_to(REPO)) for folder in ("mlsctl/methods", "mlsctl/train")
                 for p in sorted((REPO / folder).rglob("*.py")) if "cuda.synchronize" in p.read_text()]
    assert not offenders, offenders


def test_device_metrics_are_the_python_numbers():
    """metric_value / metric_ratio keep on the device the float a Python read would give, and
    StepOutputs averages them over micro-batches as it averaged Python floats."""
    from mlsctl.methods.base import StepOutput, metric_ratio, metric_value
    from mlsctl.train.metrics import StepOutputs

    x = torch.tensor(0.1234567, dtype=torch.float32)
    assert metric_value(x).item() == float(x)
    assert metric_ratio(torch.tensor(7), 3).item() == 7 / 3
    assert metric_ratio(torch.tensor(5), torch.tensor(9).clamp_min(1)).item() == 5 / 9
    values = [float(torch.tensor(v, dtype=torch.float32)) for v in (0.1, 0.7, 0.35)]
    outputs, python = StepOutputs(3), StepOutputs(3)
    for v in values:
        outputs.add(StepOutput(torch.tensor(1.0), metrics={"m": metric_value(torch.tensor(v, dtype=torch.float32))}))
        python.add(StepOutput(torch.tensor(1.0), metrics={"m": v}))
    assert outputs.scalars()["m"] == python.scalars()["m"]


def test_sync_free_rewrites_give_what_they_replace():
    """SOVE's pool rows without nonzero, and CrIBo's cross-image loss over no cycle-consistent pair
    (now computed instead of skipped after a host read): the same values."""
    from mlsctl.methods.cribo.method import cross_image_object_loss
    from mlsctl.methods.sove.ops import pool_rows_without

    generator = torch.Generator().manual_seed(0)
    for n, k in ((10, 1), (10, 9), (50, 7), (200, 40)):
        for anchors in (torch.randperm(n, generator=generator)[:k], torch.arange(k), torch.arange(n - k, n)):
            in_pool = torch.ones(n, dtype=torch.bool)
            in_pool[anchors] = False
            assert torch.equal(pool_rows_without(anchors, n), in_pool.nonzero(as_tuple=True)[0])

    q1, q2 = torch.softmax(torch.randn(3, 8, generator=generator), -1), torch.softmax(torch.randn(3, 8), -1)
    s1, s2 = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    none = torch.zeros(3)
    loss = cross_image_object_loss(q1, q2, s1, s2, none, none, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and not s1.grad.any() and not s2.grad.any()
