"""What a run records while it trains: ``metrics.jsonl`` (one line per logged step, and the bank
health and monitor lines between them), the trackers of ``train.log_with`` (Accelerate's
``log_with``, the same names and steps), the progress bar and train.log's step lines; and the
checks that stop a run that diverged or whose banks received non-finite vectors or look
collapsed."""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mlsctl import atomic, dist
from mlsctl.errors import UserError
from mlsctl.runs import metrics_record

log = logging.getLogger("mlsctl")
progress_log = logging.getLogger("mlsctl.progress")
RECENT_LOGGED = 10  # logged steps whose mean loss the run's last line and summary.json give beside the last one


class StepOutputs:
    """The :class:`~mlsctl.methods.base.StepOutput` of an optimiser step's micro-batches, kept on
    the device until logged: the loss, its terms and the metrics are their means over the
    micro-batches, the method's timings (``time/...``) their sums."""

    def __init__(self, count: int):
        self.count = count
        self.sums: dict[str, float | torch.Tensor] = {}

    def add(self, out) -> None:
        values = {"loss": out.loss.detach(), **{f"loss/{k}": v for k, v in out.terms.items()}, **out.metrics}
        for key, value in values.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def _mean(self, key: str):
        value = self.sums[key]
        if self.count == 1 or key.startswith("time/"):
            return value
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            # a number a method keeps on the device (methods.base.metric_value): divided as a Python
            # float is (CUDA would multiply by the reciprocal); called only where metrics are read
            value = float(value)
        return value / self.count

    def loss(self):
        return self._mean("loss")

    def scalars(self) -> dict[str, float]:
        return {key: float(self._mean(key)) for key in self.sums}

    def method_seconds(self) -> float:
        """This process's seconds in the method's own timed operations during the step."""
        return sum(float(v) for k, v in self.sums.items() if k.startswith("time/"))


@dataclass
class Step:
    """One optimiser step as the loop ran it: what its records are made of."""
    step: int  # counted from 0; the records name it by the steps done, step + 1
    outputs: StepOutputs
    lr: float
    weight_decay: float
    momentum: Optional[float]  # the teacher's EMA momentum; None for a method without a teacher
    grad_norm: torch.Tensor  # before clipping, on the device
    seconds: float  # compute only: waiting for data is not counted
    waited: float = 0.0  # seconds the step waited for the data loader's batches


class LossWatch:
    """The first step whose loss was not finite, kept on the device and read only where metrics
    are logged and before a checkpoint (no host synchronisation per step on a GPU; on a CPU it is
    free, and the run stops at once)."""

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.at_once = device.type != "cuda"

    def see(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), step, self.first_bad_step)
        if self.at_once:
            check_finite(self.first_bad_step)

    def check(self, banks: dict) -> None:
        check_finite(self.first_bad_step, banks)


def check_finite(first_bad_step: torch.Tensor, banks: Optional[dict] = None) -> None:
    """Stop when a loss was not finite (``first_bad_step`` >= 0) or a bank received non-finite vectors."""
    bad = int(first_bad_step)
    if bad >= 0:
        raise UserError(f"the loss became NaN or infinite at step {bad}: training diverged; lower optim.lr, raise "
                        f"optim.warmup_epochs or use train.precision=fp32", exit_code=1)
    for bank in (banks or {}).values():
        bank.raise_if_nonfinite()


def bank_health(banks: dict, step: int, warned: set[tuple[str, str]]) -> dict:
    """Health indicators of every bank (on a sample, see :mod:`mlsctl.bank_health`) for
    metrics.jsonl; warns in one line, once per bank and level, when it looks partly collapsed and
    when it looks collapsed."""
    from mlsctl.bank_health import COLLAPSED, PARTIAL, bank_health as measure

    record = {}
    for name, bank in banks.items():
        if bank.written < 2:
            continue
        health = measure(bank, name, step, sample=1024, duplicates_on_sample=True)
        record.update(health.metrics())
        status = health.status
        if status in (PARTIAL, COLLAPSED) and (name, status) not in warned:
            warned.add((name, status))
            looks = "collapsed" if status == COLLAPSED else "partly collapsed"
            log.warning(f"memory bank '{name}' looks {looks} at step {step}: {'; '.join(health.status_reasons())} "
                        f"(see docs/bank-health.md)")
    return record


def tracker_config(recipe) -> dict:
    """The recipe as flat ``section.key`` → number/text/bool, what trackers take as hyper-parameters."""
    import dataclasses

    flat = {}

    def walk(prefix: str, value) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", recipe)
    return flat


class Records:
    """metrics.jsonl, the trackers, the progress bar and the step lines of train.log, from the
    steps the loop ran (process 0 writes; every process takes part in the means)."""

    def __init__(self, run, recipe, accelerator, method, start_step: int, interactive: bool):
        from tqdm import tqdm

        self.train, self.accelerator, self.method = recipe.train, accelerator, method
        self.is_main = accelerator.is_main_process
        self.total_steps = method.schedule.total_steps
        self.throughput_units = type(method).throughput_units(recipe)  # such as sets/s besides images_per_s
        self.unit = type(method).speed_unit(short=True)
        self.bar = tqdm(total=self.total_steps, initial=start_step, desc=recipe.method.name, unit="step",
                        dynamic_ncols=True, disable=not (self.is_main and interactive), file=sys.stderr)
        if self.train.log_with:
            accelerator.init_trackers(run.root.name, config=tracker_config(recipe))
        self.file = open(run.metrics_path, "a") if self.is_main else None
        self.last_time = time.perf_counter()
        self.images_since, self.loss = 0, None  # the last logged loss
        self.recent = collections.deque(maxlen=RECENT_LOGGED)  # the losses of this session's last logged steps
        self.waited_since = 0.0  # seconds waiting for data since the last logged step
        self.warned: set[tuple[str, str]] = set()  # (bank, status) already reported: partly collapsed, collapsed
        self.shown: dict[str, str] = {}  # the monitor's last k-NN top-1 in the progress bar

    def stepped(self, images: int, waited: float = 0.0) -> None:
        if self.is_main:
            self.bar.update(1)
        self.images_since += images
        self.waited_since += waited

    def health(self, done: int, monitor, step: Step) -> dict:
        """Bank health every ``train.bank_health_every`` steps and the monitor's measures every
        ``train.monitor.every`` (process 0; the monitor is None on the others)."""
        health, every = {}, self.train.bank_health_every
        if self.is_main and every and done % every == 0:
            health = bank_health(self.method.banks(), done, self.warned)
        if monitor is not None and done % self.train.monitor.every == 0:
            health.update(monitor(self.method.teacher_backbone(), self.accelerator.device))
            self.shown["knn"] = f"{100 * health['monitor/knn_top1']:.1f}%"
            self.bar.set_postfix(loss=f"{float(step.outputs.loss()):.4f}", **self.shown, refresh=False)
            progress_log.info(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in health.items()
                                                              if k.startswith("monitor/")))
        return health

    def write_health(self, done: int, step: Step, health: dict) -> None:
        """The health of a step that is not logged, on a line of its own."""
        self.file.write(json.dumps({"step": done, "epoch": self.method.schedule.epoch(step.step), **health}) + "\n")
        if self.train.log_with:
            self.accelerator.log(health, step=done)

    def write_step(self, done: int, step: Step, health: dict) -> None:
        """A logged step: its loss terms and metrics, averaged over micro-batches and processes (every
        process calls this), the schedules' values, throughput, bank fill, health and timings."""
        now = time.perf_counter()
        scalars = dist.mean_over_processes(step.outputs.scalars())
        self.loss = scalars["loss"]
        self.recent.append(self.loss)
        record = {"step": done, "epoch": self.method.schedule.epoch(step.step),
                  **{k: scalars[k] for k in scalars if k.startswith("loss")}}
        record.update({"lr": step.lr, "weight_decay": step.weight_decay,
                       **({"momentum": step.momentum} if step.momentum is not None else {}),
                       "grad_norm": float(step.grad_norm),
                       "images_per_s": self.images_since / max(now - self.last_time, 1e-9),
                       # the share of the interval this process waited for its loader: near 0, data keeps up
                       "data_wait_share": self.waited_since / max(now - self.last_time, 1e-9)})
        record.update({key: per * record["images_per_s"] for key, per in self.throughput_units.items()})
        record.update({f"bank_fill/{name}": bank.fill for name, bank in self.method.banks().items()})
        record.update(health)
        record.update({k: v for k, v in scalars.items() if not k.startswith("loss")})
        # seconds of this step; a method's own timings (time/...) leave the rest as time/other
        method_seconds = step.outputs.method_seconds()
        record.update({"time/step": step.seconds, "time/other": step.seconds - method_seconds})
        if any(k.startswith("time/") for k in scalars):  # the share of the method's own operations
            record["time/method_share"] = method_seconds / max(step.seconds, 1e-9)
        self.images_since, self.waited_since, self.last_time = 0, 0.0, now
        if self.is_main:
            self.bar.set_postfix(loss=f"{self.loss:.4f}", **self.shown, refresh=False)
            self.file.write(json.dumps(record) + "\n")
            if self.train.log_with:  # the same names and steps as metrics.jsonl
                self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            self.file.flush()
            progress_log.info(f"step {done}/{self.total_steps} loss {self.loss:.4f} lr {step.lr:.3g} "
                              f"{record['images_per_s']:.1f} {self.unit}")

    def recent_loss(self) -> Optional[float]:
        """The mean loss of this session's last :data:`RECENT_LOGGED` logged steps; None where fewer than two
        were logged (the last loss alone is one batch's: Multi-Similarity's is 0 on a batch it mines nothing in)."""
        return sum(self.recent) / len(self.recent) if len(self.recent) > 1 else None

    def sync(self) -> None:
        """metrics.jsonl on disk before a checkpoint is."""
        if self.file is not None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.bar.close()
        if self.train.log_with:
            self.accelerator.end_training()
        if self.file is not None:
            self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """--resume: metrics.jsonl cut back to the checkpoint's step, so that the resumed run writes
    the lines an uninterrupted one would. A torn last line (a kill while it was written) goes; a
    line that is not a record anywhere else is kept as it is, with a warning — it is not ours to
    delete, and ``mlsctl plot`` names it until it is removed."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        record = metrics_record(line)
        if record is not None:
            if record["step"] <= step:
                kept.append(line)
        elif number < len(lines):
            log.warning(f"{path} line {number} is not a metrics record; kept as it is (remove it: mlsctl plot "
                        f"refuses the file while it is there)")
            kept.append(line)
    atomic.write_text(path, "".join(k + "\n" for k in kept))
