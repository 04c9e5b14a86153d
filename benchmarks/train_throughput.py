"""Training throughput on this machine: the loop (`mlsctl pretrain`) against the model step alone.

For each recipe, images/s of

* ``model``: the model step alone — forward, backward, optimiser and EMA on batches already on the
  training device (two batches of the recipe's own crops, made once by the cpu path and finished on
  the device, then cycled), in the recipe's precision;
* ``loop-cpu`` / ``loop-gpu``: the whole training loop, ``mlsctl pretrain`` in its own process with
  ``data.augment=cpu`` (loader workers make the crops) or ``gpu`` (workers decode, the crops are
  made on the device): images/s of the logged intervals after the warm-up steps, and the share of
  their time the loop waited for its loader (``<measure> data wait`` in the JSON, from
  ``metrics.jsonl``'s ``data_wait_share``: near 0 the data keeps up, and a loop below the model
  step loses its time elsewhere);

measured alternately, ``--rounds`` times (model, loop-cpu, loop-gpu, then loop-cpu, loop-gpu,
model, ...: the order turns every round), never one batch of runs after another, so that a machine's
drift or the load of other jobs falls on all of them alike. Each round pairs its loops with its own
model measure: the table gives each measure's median over rounds and ``loop / model``, the median of
the rounds' ratios (each ratio in the JSON). Issue 22's goal: ``loop >= 0.9 x model`` for
``dino_in1k``.

Recipes at the scale of the machine: on CUDA ``dino_in1k`` (ViT-S/16, 2 x 224 + 10 x 96 crops,
batch 256, bf16, on random 320 x 256 JPEGs it writes to a temporary folder with all cores) and
``dino_fmnist_quick`` with the fidelity suite's gpu-profile overrides (ViT width 320, depth 8,
batch 256, bf16, on random 96 x 96 PNGs) — or anywhere with ``--device-suite``; elsewhere
``dino_fmnist_quick`` as shipped. ``--budget-s``
stops starting measures that would not fit (a loop still running at the end is stopped).

    python benchmarks/train_throughput.py                                  # the defaults of this machine
    python benchmarks/train_throughput.py --recipe dino_in1k --augment cpu gpu --steps 30 --warmup 10
    python benchmarks/train_throughput.py --recipe dino_fmnist_quick --augment cpu --steps 4 --warmup 2 \\
        --override model.timm_kwargs.embed_dim=32 model.timm_kwargs.depth=2 model.timm_kwargs.num_heads=2

JSON to ``benchmarks/results/train_throughput_<device>.json`` (``--out``) and a table; each loop's output
and metrics in ``<out>-logs/`` beside it. A loop that fails is listed under its recipe's ``failed`` and the
other measures still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mlsctl.threads import prepare_environment  # noqa: E402

prepare_environment()  # the model measure runs here: the threads as in the loops (mlsctl pretrain does this)

import torch  # noqa: E402

from mlsctl import atomic, config, methods  # noqa: E402
from mlsctl.errors import UserError  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MEASURES = ("model", "loop-cpu", "loop-gpu")


def gpu_scale() -> dict[str, tuple[tuple[str, ...], tuple[int, int], str]]:
    """Recipe → (overrides, generated image size (w, h), image format) at the scale of one big GPU."""
    from fidelity import PROFILES

    quick = tuple(o for o in PROFILES["gpu"].scenes_overrides if not o.startswith("data.augment="))
    workers = max(1, (os.cpu_count() or 2) - 2)
    return {
        "dino_in1k": (("optim.batch_size=256", "train.precision=bf16", f"data.workers={workers}", "data.decode_size=256",
                       "data.cache=none", "train.log_every=10", "train.bank_health_every=0"), (320, 256), "JPEG"),
        "dino_fmnist_quick": (quick, (96, 96), "PNG"),
    }


def write_image(args: tuple[Path, int, tuple[int, int], str]) -> None:
    """One random image: smooth colour fields with noise (decodes like a photo rather than like pure noise)."""
    import numpy as np
    from PIL import Image

    path, seed, (width, height), kind = args
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                                         Image.BICUBIC)
    pixels = np.clip(np.asarray(low, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, kind, **({"quality": 90} if kind == "JPEG" else {}))


def make_images(folder: Path, count: int, size: tuple[int, int], kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if kind == "JPEG" else ".png"
    jobs = [(folder / f"{i:06d}{suffix}", i, size, kind) for i in range(count)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write_image, jobs, chunksize=64))
    return folder


def device_slug() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu-{os.cpu_count()}-cores"


def measure_model(recipe, steps: int, warmup: int) -> float:
    """Images/s of the model step alone on batches already on the device (the recipe's crops, made once):
    forward, backward, the method's end of step (DINO's centre), the recipe's gradient clipping, the
    optimiser and the EMA — the loop's step without its data, logging and checkpoints."""
    from mlsctl.data.images import ImageFolder
    from mlsctl.data.loader import StepBatchSampler, make_loader
    from mlsctl.schedules import Schedule
    from mlsctl.train import ema_update, param_groups
    from mlsctl.train.optim import clip_gradients

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method_cls = methods.method_class(recipe.method.name)
    folder = ImageFolder(recipe.data.root, "data.root")
    dataset, collate = method_cls.build_dataset(recipe, folder)
    batch_size = recipe.optim.batch_size
    sampler = StepBatchSampler(len(dataset), batch_size, seed=0, total_steps=2)
    on_device = getattr(dataset, "on_device", lambda batch: batch)  # the dataset's last stage, done here once
    batches = [on_device(b.to(device)) for b in make_loader(dataset, sampler, recipe.data.workers, collate_fn=collate)]
    torch.manual_seed(0)
    method = method_cls(recipe, Schedule(max(1, len(dataset) // batch_size), recipe.optim.epochs)).to(device)
    method.logged = False  # as the loop's steps that are not logged: no timings, no synchronisation for them
    for bank in method.banks().values():  # as pretrain does: the banks live on the training device
        bank.to(device)
    optimizer = torch.optim.AdamW(param_groups(method), lr=1e-4, fused=device.type == "cuda")
    trainable = [p for group in optimizer.param_groups for p in group["params"]]  # as the loop clips them
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp16_or_bf16": torch.bfloat16,
                 "auto": torch.bfloat16 if device.type == "cuda" else None}.get(recipe.train.precision)
    autocast = torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None)
    started = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast:
            out = method.training_step(batches[i % len(batches)], i)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        method.end_step(i)
        clip_gradients(trainable, recipe.optim.clip_grad, recipe.optim.clip_grad_mode, None)
        optimizer.step()
        ema_update(method.ema_pairs(), 0.996)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del method, optimizer, batches, out
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the loops that follow run in their own processes, on the same GPU
    return steps * batch_size / seconds


def measure_loop(recipe_name: str, overrides: list[str], images: Path, steps: int, warmup: int, work: Path,
                 timeout: float, log: Path) -> tuple[float, Optional[float]]:
    """Images/s of `mlsctl pretrain` after its warm-up steps, and the share of that time it waited for
    data (None from a loop that does not log it): one epoch over (warm-up + steps) batches of
    ``images`` (links), logged every ``warmup`` steps and at the last; the run's final checkpoint (after
    the last log) is not counted. The run's output goes to ``log`` (kept: it comes back from a device),
    and its metrics.jsonl is appended there."""
    recipe = config.load_recipe(recipe_name, overrides)
    batch = recipe.optim.batch_size
    total = warmup + steps
    subset = work / "images"
    shutil.rmtree(work, ignore_errors=True)
    subset.mkdir(parents=True)
    files = sorted(images.iterdir())
    for i in range(total * batch):
        (subset / f"{i:07d}{files[i % len(files)].suffix}").symlink_to(files[i % len(files)])
    # one override per key, the last one given (pretrain refuses a key typed twice; a profile sets epochs too)
    composed = config.parse_overrides([*overrides, f"data.root={subset}", "optim.epochs=1", "optim.warmup_epochs=0",
                                       f"train.log_every={warmup}", f"train.checkpoint_every={total}"])
    args = [sys.executable, "-m", "mlsctl", "pretrain", recipe_name, *composed.values(), "--out", str(work / "run")]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        handle.flush()
        process = subprocess.Popen(args, stdout=handle, stderr=handle, env=env)
        try:
            process.wait(timeout=timeout)
        except KeyboardInterrupt:  # this benchmark is stopped: its loop with it
            process.kill()
            process.wait()
            raise
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # it finishes its step and stops; a device window cannot wait long
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise TimeoutError(f"mlsctl pretrain ran past the budget (see {log})") from None
    if process.returncode:
        tail = (log.read_text().strip().splitlines() or [""])[-1]
        raise RuntimeError(f"mlsctl pretrain exited with {process.returncode}: {tail} (see {log})")
    metrics = work / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    with open(log, "a") as handle:
        handle.write(f"== {metrics} ({len(lines)} lines)\n" + "".join(line + "\n" for line in lines))
    records = [json.loads(line) for line in lines]
    logged = sorted((r["step"], r["images_per_s"], r.get("data_wait_share")) for r in records if "images_per_s" in r)
    # each logged interval: the steps since the previous log, at its images/s; those after the warm-up count
    intervals = [(step - previous, ips, wait) for (previous, *_), (step, ips, wait) in zip([(0, None, None), *logged],
                                                                                          logged)
                 if previous >= warmup]
    if not intervals:
        raise RuntimeError(f"mlsctl pretrain logged no interval after its {warmup} warm-up steps: images/s at steps "
                           f"{[step for step, *_ in logged]} of {total}, {len(records)} records (see {log})")
    seconds = [n * batch / ips for n, ips, _ in intervals]
    # the share of those seconds the loop waited for its loader (metrics.jsonl's data_wait_share)
    waited = (sum(s * wait for s, (_, _, wait) in zip(seconds, intervals)) / sum(seconds)
              if all(wait is not None for *_, wait in intervals) else None)
    return sum(n for n, *_ in intervals) * batch / sum(seconds), waited


def augment_overrides(augment: str) -> list[str]:
    """The overrides that select a data path (``data.cache: memory`` belongs to the gpu path)."""
    return ["data.augment=cpu", "data.cache=none"] if augment == "cpu" else ["data.augment=gpu"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", help="a recipe to measure (repeatable) [default: this machine's]")
    parser.add_argument("--device-suite", action="store_true",
                        help="dino_in1k and dino_fmnist_quick at one big GPU's scale (the default on CUDA)")
    parser.add_argument("--augment", nargs="+", choices=("cpu", "gpu"), default=["cpu", "gpu"],
                        help="the loops to measure: data.augment=cpu and/or gpu [default: both]")
    parser.add_argument("--steps", type=int, default=30, help="measured steps of each measure [default: 30]")
    parser.add_argument("--warmup", type=int, default=10, help="steps before measuring [default: 10]")
    parser.add_argument("--rounds", type=int, default=3, help="times each measure is taken, alternately [default: 3]")
    parser.add_argument("--images", type=int, default=2560, help="random images generated per image size [default: 2560]")
    parser.add_argument("--override", nargs="*", default=[], help="KEY=VALUE for every recipe (after this machine's)")
    parser.add_argument("--budget-s", type=float, help="start no measure that would not end within this many seconds")
    parser.add_argument("--out", type=Path, help="the JSON [default: benchmarks/results/train_throughput_<device>.json]")
    parser.add_argument("--logs", type=Path, help="each loop's output [default: OUT's name with -logs, beside it]")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    if options.steps < 1 or options.warmup < 1:
        raise SystemExit(f"error: --steps ({options.steps}) and --warmup ({options.warmup}) must be at least 1")
    cuda = torch.cuda.is_available()
    scale = gpu_scale() if cuda or options.device_suite else {}
    recipes = options.recipe or (list(scale) if scale else ["dino_fmnist_quick"])
    out = options.out or RESULTS / f"train_throughput_{device_slug()}.json"
    measures = ["model", *(f"loop-{a}" for a in options.augment)]
    paths = {f"loop-{a}": augment_overrides(a) for a in options.augment}
    logs = options.logs or out.with_name(out.stem + "-logs")  # each loop's output (a device's comes back)
    tmp = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    results: dict[str, dict] = {}
    try:
        plans = {}
        for name in recipes:
            overrides, size, kind = scale.get(name, ((), (96, 96), "PNG"))
            images = tmp / f"images-{size[0]}x{size[1]}-{kind.lower()}"
            if not images.is_dir():
                make_images(images, options.images, size, kind)
            overrides = [*overrides, *options.override, "optim.freeze_last_layer_epochs=0"]
            for path in paths.values():  # one sentence now rather than a failed loop later
                recipe = config.load_recipe(name, [*overrides, f"data.root={images}", *path])
                if recipe.train.precision == "fp16" and not cuda:
                    raise SystemExit(f"error: {name} trains in fp16, which needs a CUDA GPU; add --override "
                                     f"train.precision=bf16 (or fp32), or --device-suite")
            plans[name] = (overrides, images)
            results[name] = {"overrides": overrides, **{m: [] for m in measures}}
        print(f"images ready in {time.perf_counter() - started:.0f}s; measuring {', '.join(measures)} of "
              f"{', '.join(recipes)}, {options.rounds} rounds", flush=True)

        def save(stopped: str = "") -> None:  # after every measure: a window cut short keeps what was measured
            write_record(out, results, measures, options, cuda, started, stopped)

        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            stopped = run_rounds(plans, measures, paths, options, results, tmp, logs, started, save)
        except KeyboardInterrupt:  # SIGTERM (a device window's timeout) or Ctrl-C: what was measured is written
            stopped = "stopped by a signal"
        finally:
            signal.signal(signal.SIGTERM, previous)
    except UserError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stopped:
        print(f"stopped: {stopped}", flush=True)
    write_record(out, results, measures, options, cuda, started, stopped)
    print(f"\n{'recipe':20} {'model':>10} " + " ".join(f"{m:>10} {m + '/model':>15}" for m in measures[1:]))
    for name, row in results.items():
        cells = [_number(row["median"]["model"], 10, 1)]
        cells += [f"{_number(row['median'][m], 10, 1)} {_number(row[m + '/model'], 15, 3)}" for m in measures[1:]]
        print(f"{name:20} " + " ".join(cells))
    print(f"images/s, median of up to {options.rounds} rounds; loop/model: the median of the rounds' ratios; "
          f"written to {out}; the loops' logs in {logs}")
    failed = [line for row in results.values() for line in row.get("failed", [])]
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else 0


def _number(value: Optional[float], width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def write_record(out: Path, results: dict, measures: list[str], options, cuda: bool, started: float,
                 stopped: str) -> None:
    """The JSON of what was measured so far (medians and each round's loop/model ratio), atomically."""
    for row in results.values():
        row["median"] = {m: statistics.median(row[m]) if row[m] else None for m in measures}
        for measure in measures[1:]:  # the ratio of each round (a loop and the model measured beside it)
            pairs = [round(loop / model, 3) for loop, model in zip(row[measure], row["model"])]
            row[f"{measure}/model per round"] = pairs
            row[f"{measure}/model"] = statistics.median(pairs) if pairs else None
    record = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores",
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "steps": options.steps, "warmup": options.warmup, "rounds": options.rounds, "stopped": stopped or None,
              "seconds": round(time.perf_counter() - started, 1), "recipes": results}
    atomic.write_json(out, record)


def run_rounds(plans: dict, measures: list[str], paths: dict[str, list[str]], options, results: dict, tmp: Path,
               logs: Path, started: float, save=lambda stopped="": None) -> str:
    """Each measure of each recipe in turn, ``options.rounds`` times; returns why it stopped early, or "".
    A loop that fails is recorded under its recipe's ``failed`` (with its log in ``logs``) and the other
    measures go on: one broken data path does not cost a device window the rest."""
    durations: dict[tuple[str, str], float] = {}
    for round_index in range(options.rounds):
        turn = round_index % len(measures)
        for name, (overrides, images) in plans.items():
            for measure in measures[turn:] + measures[:turn]:
                left = math.inf if options.budget_s is None else options.budget_s - (time.perf_counter() - started)
                if left <= 0 or durations.get((name, measure), 0.0) > left:
                    return f"round {round_index + 1}, {name} {measure} would not end within --budget-s"
                begun = time.perf_counter()
                if measure == "model":
                    # the crops of the cpu path, made once: the model step alone, without any augmentation
                    recipe = config.load_recipe(name, [*overrides, f"data.root={images}", *augment_overrides("cpu")])
                    value = measure_model(recipe, options.steps, options.warmup)
                else:
                    log = logs / f"{name}-{measure}-round{round_index + 1}.log"
                    try:
                        value, waited = measure_loop(name, [*overrides, *paths[measure]], images, options.steps,
                                             options.warmup, tmp / f"{name}-{measure}", left, log)
                    except TimeoutError as exc:
                        return str(exc)
                    except RuntimeError as exc:
                        results[name].setdefault("failed", []).append(f"round {round_index + 1} {measure}: {exc}")
                        durations[(name, measure)] = time.perf_counter() - begun
                        print(f"round {round_index + 1} {name:20} {measure:9} FAILED: {exc}", flush=True)
                        continue
                durations[(name, measure)] = time.perf_counter() - begun
                results[name][measure].append(round(value, 2))
                note = ""
                if measure != "model":
                    results[name].setdefault(f"{measure} data wait", []).append(
                        None if waited is None else round(waited, 3))
                    note = "" if waited is None else f", {waited:.0%} waiting for data"
                print(f"round {round_index + 1} {name:20} {measure:9} {value:10.1f} images/s "
                      f"({durations[(name, measure)]:.0f}s{note})", flush=True)
                save()
    return ""


if __name__ == "__main__":
    sys.exit(main())
