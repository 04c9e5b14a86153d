"""The one training loop, for every method.

Read top to bottom, :func:`pretrain` does: set up Accelerate and the run directory → build the
data and the method → optimiser (AdamW, Adam or SGD) with parameter groups → restore a checkpoint (``--resume``)
or initial weights (``--init-from``) → for each step: set the scheduled learning rate and weight
decay, run the method's ``training_step`` and back-propagate for each of the step's micro-batches
(``optim.accumulate_steps``, 1 by default; the banks' writes held until the last one), end the
method's step, clip, freeze the last layer early on, step the optimiser, update the EMA teachers,
log, checkpoint.

A step is an optimiser step: schedules, the steps of an epoch, the logged ``step`` and
checkpoints count them, and checkpoints are written only between steps, never in the middle of an
accumulation (docs/accumulation.md).

Exact resume: everything that decides the next step is in the checkpoint or is a pure function of
the step (see :mod:`mlsctl.data.loader` and :mod:`mlsctl.schedules`): weights and buffers, banks,
optimizer and grad-scaler state, every process's RNG states. ``metrics.jsonl`` is cut back to the
checkpoint's step before continuing, so a run killed at any moment and resumed writes the same
loss sequence as an uninterrupted one (``tests/test_train.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mlsctl import __version__, atomic, config as config_lib, dist, methods, provenance
from mlsctl.data.images import ImageFolder, SkipLog
from mlsctl.data.loader import make_loader
from mlsctl.errors import Interrupted, UserError
from mlsctl.locks import FolderLock
from mlsctl.runs import Checkpoint, Run
from mlsctl.schedules import Schedule, cosine
from mlsctl.train import checkpoint, optim, run_dir, setup

log = logging.getLogger("mlsctl")
progress_log = logging.getLogger("mlsctl.progress")


@dataclass
class RunSummary:
    run: Path
    steps: int
    images_per_s: float
    final_loss: Optional[float]
    seconds: float
    already_complete: bool = False


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill
    atomic.write_text(path, "".join(k + "\n" for k in kept))


# ------------------------------------------------------------------------------------------------ the loop


def pretrain(recipe, out: str | Path, *, resume: bool = False, init_from: Optional[str] = None,
             overwrite: bool = False, recipe_source: str = "recipe") -> RunSummary:
    run = Run(out)
    recipe = config_lib.absolute_paths(recipe)  # config.yaml is read from any working directory
    method_cls = methods.method_class(recipe.method.name)
    setup.check_recipe(recipe, method_cls, recipe_source)
    if resume and init_from:
        raise UserError("--resume continues a run exactly and --init-from starts a new one from weights; use one")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; use one")
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"--out {run.root} is a file; choose a folder")
    if overwrite:
        run_dir.check_nothing_precious_inside(run.root, recipe, method_cls, recipe_source, init_from)

    # Everything is validated before --out is touched: data, model, weights.
    accelerator = setup.make_accelerator(recipe, run.root.absolute())
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    for key, message in method_cls.check_training(recipe, world, accelerator.device.type):
        raise UserError(f"{recipe_source}: '{key}' {message}")
    setup.seed_everything(recipe.seed + rank)
    folder = method_cls.open_data(recipe)
    dataset, collate_fn = method_cls.build_dataset(recipe, folder)
    probe = method_cls.batch_sampler(recipe, dataset, world_size=world, rank=rank)
    schedule = Schedule(probe.steps_per_epoch, recipe.optim.epochs)
    torch.manual_seed(recipe.seed)  # identical initial weights on every process
    method = method_cls(recipe, schedule).to(accelerator.device)
    for name, bank in method.banks().items():
        bank.to(accelerator.device)
        bank.name = name
    optim.check_ema_pairs(method.ema_pairs())
    setup.speed_up(method, recipe, accelerator.device)
    groups = optim.param_groups(method, recipe.optim.decay_biases_and_norms)
    optimizer = optim.build_optimizer(recipe.optim, groups, fused=accelerator.device.type == "cuda")
    monitor = None
    if recipe.train.monitor.every and is_main:  # its images are read (and checked) before --out is touched
        from mlsctl.monitor import Monitor

        monitor = Monitor(recipe.train.monitor, recipe.model.img_size, recipe.model.patch_size)
    initialised = checkpoint.load_initial_weights(method, init_from) if init_from and not resume else None

    lock = FolderLock(run.root, "run")
    resume_from = dist.on_main(lambda: run_dir.open_run_dir(run, recipe, folder, lock, resume=resume, overwrite=overwrite,
                                                     init_from=init_from))
    try:
        setup.setup_logging(run, is_main, rank, sys.stderr.isatty())
        if is_main:
            for line in folder.scan.notes("data.root"):
                log.warning(line)
        if initialised:
            log.info(f"initialised {initialised}")
        summary = _train(run, recipe, accelerator, folder, dataset, collate_fn, schedule, method, optimizer, groups,
                         Checkpoint(Path(resume_from)) if resume_from else None, monitor)
    except KeyboardInterrupt:
        message = run_dir.interrupted(run, resume_from is None, is_main)
        raise Interrupted(message if is_main else "") from None
    except BaseException as exc:
        if is_main and resume_from is None and run.latest() is None:
            run_dir.undo_start(run)
        if isinstance(exc, OSError) and exc.filename is None:  # a write to an open file (metrics.jsonl, train.log)
            raise OSError(exc.errno, exc.strerror, str(run.root)) from exc
        raise
    finally:
        setup.close_logging()
        if is_main:
            lock.release()
    return summary


def _train(run: Run, recipe, accelerator, folder: ImageFolder, dataset, collate_fn, schedule: Schedule, method,
           optimizer, groups, resume_from: Optional[Checkpoint], monitor=None) -> RunSummary:
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    interactive = sys.stderr.isatty()
    total_steps = schedule.total_steps
    trainable = [p for g in groups for p in g["params"]]
    last_layer = method.last_layer_parameters()
    if is_main and not run.images_path.is_file():
        atomic.write_text(run.images_path, "".join(f"{path}\n" for path in folder.relpaths()))

    start_step, rng_state = 0, None
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, method, optimizer, accelerator)
        start_step, rng_state = state["step"], state["rng"]
        if is_main:
            _truncate_metrics(run.metrics_path, start_step)

    model, optimizer = accelerator.prepare(method, optimizer)
    accumulate = recipe.optim.accumulate_steps
    batch_global = recipe.optim.batch_size * world * accumulate  # the images of one optimiser step
    throughput_units = type(method).throughput_units(recipe)  # such as sets/s besides images_per_s
    peak_lr = recipe.optim.lr * (batch_global / 256 if recipe.optim.scale_lr else 1.0)
    warmup_steps = schedule.steps(recipe.optim.warmup_epochs)
    freeze_steps = schedule.steps(recipe.optim.freeze_last_layer_epochs)

    if is_main:
        n_params = sum(p.numel() for p in trainable)
        precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
        log.info(f"mlsctl {__version__} | {recipe.method.name} on {len(folder)} images from {folder.root} | "
                 f"{world} process{'es' if world > 1 else ''} on {accelerator.device} ({precision}) | "
                 f"{n_params / 1e6:.2f}M trainable parameters")
        made = (f" ({recipe.optim.batch_size} x {world} process{'es' if world > 1 else ''} x {accumulate} "
                f"accumulated micro-batches)" if accumulate > 1 else "")
        log.info(f"{schedule.steps_per_epoch} steps/epoch x {recipe.optim.epochs} epochs = {total_steps} steps of "
                 f"{batch_global} images{made} | peak lr {peak_lr:.3g} | run: {run.root}")
    if start_step >= total_steps:
        if is_main:
            log.info(f"{run.root} is already complete ({start_step} steps); nothing to do")
        return RunSummary(run.root, start_step, 0.0, None, 0.0, already_complete=True)
    if start_step:
        log.info(f"resuming {run.root} from step {start_step}")

    sampler = type(method).batch_sampler(recipe, dataset, world_size=world, rank=rank, start_step=start_step,
                                         total_steps=total_steps)
    loader = make_loader(dataset, sampler, recipe.data.workers, pin_memory=accelerator.device.type == "cuda",
                         collate_fn=collate_fn)
    if rng_state is not None:
        checkpoint.set_rng_state(rng_state)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc=recipe.method.name, unit="step", dynamic_ncols=True,
               disable=not (is_main and interactive), file=sys.stderr)
    skips = SkipLog(folder.root)
    if recipe.train.log_with:
        accelerator.init_trackers(run.root.name, config=_tracker_config(recipe))
    metrics_file = open(run.metrics_path, "a") if is_main else None
    started = last_time = time.perf_counter()
    images_since, loss_value, step = 0, None, start_step
    on_device = getattr(dataset, "on_device", None)  # the dataset's last stage, on the training device
    # The first step whose loss was not finite, kept on the device and read only where metrics are
    # logged and before a checkpoint (no host synchronisation per step on a GPU).
    first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
    warned: set[tuple[str, str]] = set()  # (bank, status) already reported: partly collapsed, collapsed
    shown: dict[str, str] = {}  # the monitor's last k-NN top-1 in the progress bar
    model.train()
    batches = iter(loader)  # accumulate micro-batches per step (StepBatchSampler)
    banks = list(method.banks().values())
    try:
        for step in range(start_step, total_steps):
            lr = cosine(step, total_steps, peak_lr, recipe.optim.min_lr, warmup_steps)
            weight_decay = cosine(step, total_steps, recipe.optim.weight_decay, recipe.optim.weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group["apply_weight_decay"]:
                    group["weight_decay"] = weight_decay

            # forward and backward of each micro-batch; gradients add up (each loss divided by
            # accumulate: their mean), DDP synchronises them on the last one only; the banks read
            # as at the start of the step and are written after its last micro-batch
            optimizer.zero_grad(set_to_none=True)
            for bank in banks:
                bank.hold()
            step_out, step_seconds = _StepOutputs(accumulate), 0.0
            for micro in range(accumulate):
                batch = next(batches)
                skips.extend(batch.skipped)
                micro_started = time.perf_counter()  # compute only: waiting for data is not counted
                batch = batch.to(accelerator.device)
                if on_device is not None:
                    batch = on_device(batch)
                method.micro_batch = (micro, accumulate)
                with accelerator.no_sync(model) if micro < accumulate - 1 else contextlib.nullcontext():
                    out = model(batch, step)
                    loss = out.loss.detach()
                    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
                    if accelerator.device.type != "cuda":  # free on a CPU: stop at once
                        _check_finite(first_bad_step)
                    accelerator.backward(out.loss / accumulate if accumulate > 1 else out.loss)
                step_out.add(out)
                del out, batch
                step_seconds += time.perf_counter() - micro_started
            micro_started = time.perf_counter()
            method.micro_batch = (0, 1)
            method.end_step(step)
            for bank in banks:
                bank.release()
            if accelerator.scaler is not None:
                accelerator.unscale_gradients()
            grad_norm = optim.clip_gradients(trainable, recipe.optim.clip_grad, recipe.optim.clip_grad_mode, accelerator)
            if step < freeze_steps:
                for p in last_layer:
                    p.grad = None
            optimizer.step()
            momentum = method.ema_momentum(step)
            optim.ema_update(method.ema_pairs(), momentum)
            step_seconds += time.perf_counter() - micro_started
            if is_main:
                bar.update(1)

            done = step + 1
            images_since += batch_global
            logged = done % recipe.train.log_every == 0 or done == total_steps
            saved = done % recipe.train.checkpoint_every == 0 or done == total_steps
            if logged or saved:
                _check_finite(first_bad_step, method.banks())
            health = {}
            if is_main and recipe.train.bank_health_every and done % recipe.train.bank_health_every == 0:
                health = _bank_health(method.banks(), done, warned)
            if monitor is not None and done % recipe.train.monitor.every == 0:
                health.update(monitor(method.teacher_backbone(), accelerator.device))
                shown["knn"] = f"{100 * health['monitor/knn_top1']:.1f}%"
                bar.set_postfix(loss=f"{float(step_out.loss()):.4f}", **shown, refresh=False)
                progress_log.info(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in health.items()
                                                                  if k.startswith("monitor/")))
            if health and not (done % recipe.train.log_every == 0 or done == total_steps):
                metrics_file.write(json.dumps({"step": done, "epoch": schedule.epoch(step), **health}) + "\n")
                if recipe.train.log_with:
                    accelerator.log(health, step=done)
            if logged:
                now = time.perf_counter()
                # loss terms and metrics of the global batch: averaged over micro-batches and processes
                scalars = step_out.scalars()
                scalars = dist.mean_over_processes(scalars)
                loss_value = scalars["loss"]
                record = {"step": done, "epoch": schedule.epoch(step), **{k: scalars[k] for k in scalars if k.startswith("loss")}}
                record.update({"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "grad_norm": float(grad_norm),
                               "images_per_s": images_since / max(now - last_time, 1e-9)})
                record.update({key: per * record["images_per_s"] for key, per in throughput_units.items()})
                record.update({f"bank_fill/{name}": bank.fill for name, bank in method.banks().items()})
                record.update(health)
                record.update({k: v for k, v in scalars.items() if not k.startswith("loss")})
                # seconds of this step; a method's own timings (time/...) leave the rest as time/other
                method_seconds = step_out.method_seconds()
                record.update({"time/step": step_seconds, "time/other": step_seconds - method_seconds})
                if any(k.startswith("time/") for k in scalars):  # the share of the method's own operations
                    record["time/method_share"] = method_seconds / max(step_seconds, 1e-9)
                images_since, last_time = 0, now
                if is_main:
                    bar.set_postfix(loss=f"{loss_value:.4f}", **shown, refresh=False)
                    metrics_file.write(json.dumps(record) + "\n")
                    if recipe.train.log_with:  # the same names and steps as metrics.jsonl
                        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
                    metrics_file.flush()
                    progress_log.info(f"step {done}/{total_steps} loss {loss_value:.4f} lr {lr:.3g} "
                                      f"{record['images_per_s']:.1f} img/s")
            if saved:
                if metrics_file is not None:
                    os.fsync(metrics_file.fileno())
                checkpoint.save_checkpoint(run, done, method, optimizer, accelerator, recipe, recipe.train.keep_checkpoints)
    finally:
        bar.close()
        if recipe.train.log_with:
            accelerator.end_training()
        if metrics_file is not None:
            metrics_file.close()

    elapsed = time.perf_counter() - started
    steps_run = total_steps - start_step
    throughput = steps_run * batch_global / max(elapsed, 1e-9)
    all_skips = dist.all_gather_object(skips.reasons)
    if is_main:
        merged = SkipLog(folder.root)
        for reasons in all_skips:
            merged.reasons.update(reasons)
        if merged.summary():
            log.warning(merged.summary())
        checkpoint.export_teacher(method, run)
        if world > 1 and method.banks():
            log.info(f"memory banks identical on all {world} processes (checked at every checkpoint)")
        summary = {"steps": total_steps, "resumed_from": start_step, "seconds": round(elapsed, 2),
                   "images_per_s": round(throughput, 2), "final_loss": loss_value, "processes": world,
                   "skipped_files": len(merged.reasons), "finished": provenance.now(),
                   "device": provenance.device_name(accelerator.device),
                   "precision": "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
                   "mlsctl_version": __version__, "commit": provenance.commit(), "torch_version": torch.__version__}
        atomic.write_json(run.summary_path, summary)
        log.info(f"done: {steps_run} steps in {elapsed:.0f}s ({throughput:.1f} images/s), final loss {loss_value:.4f}; "
                 f"run in {run.root}")
    dist.barrier()
    return RunSummary(run.root, total_steps, throughput, loss_value, elapsed)


class _StepOutputs:
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
        return value if self.count == 1 or key.startswith("time/") else value / self.count

    def loss(self):
        return self._mean("loss")

    def scalars(self) -> dict[str, float]:
        return {key: float(self._mean(key)) for key in self.sums}

    def method_seconds(self) -> float:
        """This process's seconds in the method's own timed operations during the step."""
        return sum(float(v) for k, v in self.sums.items() if k.startswith("time/"))


def _check_finite(first_bad_step: torch.Tensor, banks: Optional[dict] = None) -> None:
    """Stop when a loss was not finite (``first_bad_step`` >= 0) or a bank received non-finite vectors."""
    bad = int(first_bad_step)
    if bad >= 0:
        raise UserError(f"the loss became NaN or infinite at step {bad}: training diverged; lower optim.lr, raise "
                        f"optim.warmup_epochs or use train.precision=fp32", exit_code=1)
    for bank in (banks or {}).values():
        bank.raise_if_nonfinite()


def _tracker_config(recipe) -> dict:
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


def _bank_health(banks: dict, step: int, warned: set[tuple[str, str]]) -> dict:
    """Health indicators of every bank (on a sample, see :mod:`mlsctl.bank_health`) for
    metrics.jsonl; warns in one line, once per bank and level, when it looks partly collapsed and
    when it looks collapsed."""
    from mlsctl.bank_health import COLLAPSED, PARTIAL, bank_health

    record = {}
    for name, bank in banks.items():
        if bank.written < 2:
            continue
        health = bank_health(bank, name, step, sample=1024, duplicates_on_sample=True)
        record.update(health.metrics())
        status = health.status
        if status in (PARTIAL, COLLAPSED) and (name, status) not in warned:
            warned.add((name, status))
            looks = "collapsed" if status == COLLAPSED else "partly collapsed"
            log.warning(f"memory bank '{name}' looks {looks} at step {step}: {'; '.join(health.status_reasons())} "
                        f"(see docs/bank-health.md)")
    return record


