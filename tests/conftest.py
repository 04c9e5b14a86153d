"""Shared fixtures: tiny generated images, a tiny recipe, and a runner for the CLI."""

from __future__ import annotations

import copy
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _work_in_a_folder_of_its_own(tmp_path_factory, monkeypatch):
    """Every test runs in an empty working folder: a command's default outputs (``results/``,
    ``features/``, ``runs/``) land there, never in the checkout (five tests left 45 result files
    and 90 feature folders in it before)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _signal_handlers_left_as_found():
    """A test that leaves Ctrl-C's or SIGTERM's handler changed fails, and the handler is put back: a
    later test in the same process would else see another handler than Python's (a test of the stops
    failed so in one full run, 2026-12-06)."""
    import signal

    stops = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.getsignal(signum) for signum in stops}
    yield
    changed = [signum for signum in stops if signal.getsignal(signum) is not before[signum]]
    for signum in changed:
        signal.signal(signum, before[signum])
    assert not changed, f"the test left the handler of {', '.join(signal.Signals(s).name for s in changed)} changed"

TINY_RECIPE = {
    "description": "tiny test recipe",
    "seed": 0,
    "data": {
        "root": None,
        "global_crops": {"count": 2, "size": 32, "scale": [0.4, 1.0]},
        "local_crops": {"count": 2, "size": 16, "scale": [0.1, 0.4]},
        "photometric": "dino",
        "workers": 0,
    },
    "model": {
        "arch": "vit_small_patch16_224",
        "img_size": 32,
        "patch_size": 8,
        "drop_path_rate": 0.0,
        "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    },
    "optim": {
        "batch_size": 4, "epochs": 2, "lr": 1e-3, "scale_lr": False, "min_lr": 1e-5, "warmup_epochs": 1,
        "weight_decay": 0.04, "weight_decay_end": 0.1, "clip_grad": 3.0, "freeze_last_layer_epochs": 1,
    },
    "train": {"precision": "fp32", "checkpoint_every": 3, "log_every": 1, "bank_health_every": 4},
    "method": {
        "name": "dino", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "teacher_temp": 0.05,
        "warmup_teacher_temp_epochs": 1, "momentum_teacher": 0.99, "monitor_bank_size": 20,
    },
}


def make_images(root: Path, n: int, size=(48, 40), seed: int = 0) -> Path:
    """``n`` smooth random RGB images (PNG), some in a sub-folder."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(low).resize(size, Image.BILINEAR)
        folder = root / ("sub" if i % 3 == 0 else ".")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images", 16)


def tiny_recipe(images_root: Path, **sections) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"]["root"] = str(images_root)
    for key, value in sections.items():
        section, _, leaf = key.partition("__")
        if leaf:
            recipe[section][leaf] = value
        else:
            recipe[section] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path: Path, images: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(images))


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


_FORK_SERVER = []


def forked(target, *args) -> multiprocessing.Process:
    """``target(*args)`` started in a process of its own, forked from a server process that imported torch, faiss and
    mlsctl once (multiprocessing's forkserver, one per test process): for the tests that kill a process or serve,
    without the interpreter start and imports (2-5 s on this 2-core machine) of a fresh ``python``. The process
    is as a fresh one would be where the tests look: :func:`cli_env`'s environment of now (TMPDIR read afresh) and
    Python's default start method for the processes it starts (a forkserver's child inherits ``forkserver``: its
    loader workers were then children of a second forkserver, which outlived a SIGKILL, and inherited none of
    the run's files, which hid a bug in closing them; a review, 2026-12-07). ``target`` must be a module-level
    function; the process is returned started. Left running at the end of the session, it is killed."""
    from multiprocessing import forkserver
    from unittest import mock

    if not _FORK_SERVER:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "faiss", "mlsctl.cli", "mlsctl.gallery"])
        with mock.patch.dict(os.environ, cli_env()):
            forkserver.ensure_running()
        _FORK_SERVER.append(context)
    process = _FORK_SERVER[0].Process(target=_as_a_fresh_process, args=(cli_env(), target, args))
    process.start()
    return process


def _as_a_fresh_process(environment: dict, target, args: tuple) -> None:
    """The body of a :func:`forked` process: ``target(*args)`` under ``environment``."""
    import tempfile

    os.environ.clear()
    os.environ.update(environment)
    tempfile.tempdir = None
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, not the forkserver
    target(*args)


@pytest.fixture(autouse=True, scope="session")
def _no_forked_process_outlives_the_tests():
    """A :func:`forked` process still running (a test failed before stopping it) is killed at the end: multiprocessing
    would else wait for it at exit, and the test run with it."""
    import signal

    yield
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.join(5)


class ForkedMlsctl:
    """``mlsctl ARGS`` in a :func:`forked` process through the program's entry point (``mlsctl.cli.run``, as
    ``python -m mlsctl``), its stdout and stderr written to ``log``, ``environ`` added to its environment; answers
    as :class:`subprocess.Popen` does where the tests use it (``pid``, ``poll``, ``wait``, ``returncode``,
    ``send_signal``, ``terminate``)."""

    def __init__(self, args: list[str], log: str | Path = os.devnull, **environ: str):
        self.args = ["mlsctl", *args]
        self._process = forked(_mlsctl_into, list(args), str(log), environ)
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # ended meanwhile, as Popen.send_signal allows
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def _mlsctl_into(args: list[str], log: str, environ: dict) -> None:
    """The body of :class:`ForkedMlsctl`'s process."""
    from mlsctl.cli import run

    os.environ.update(environ)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["mlsctl", *args]
    run()


def kill_when(args: list[str], ready, timeout: float = 240) -> ForkedMlsctl:
    """Start ``mlsctl *args`` (:class:`ForkedMlsctl`), send SIGKILL as soon as ``ready()`` holds (or at ``timeout``),
    and return the finished process (its ``returncode`` -SIGKILL unless it ended first)."""
    import signal
    import time

    process = ForkedMlsctl(args)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None and not ready():
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    return process


def full_disk_at_the_second_checkpoint(monkeypatch, run: Path) -> None:
    """The second checkpoint of the run in ``run`` fails as a full disk does (ENOSPC): a run the machine stops
    after a checkpoint."""
    import errno

    from mlsctl.train import checkpoint

    real_save, saves = checkpoint.save_checkpoint, []

    def full_disk_at_the_second(run_, step, *args, **kwargs):
        saves.append(step)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints" / ".step.tmp"))
        return real_save(run_, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk_at_the_second)


def run_cli(*args: str, cwd: Path | None = None, check: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mlsctl", *args], capture_output=True, text=True, cwd=cwd,
                            env=cli_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"mlsctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def cli(*args: str, cwd: Path | None = None, capsys=None) -> tuple[int, str, str]:
    """``mlsctl ARGS`` in this process, through the real entry point (``mlsctl.cli.main``): (exit
    code, stdout, stderr), the output read from pytest's ``capsys``. Much faster than
    :func:`run_cli` (no interpreter start, torch already imported); use run_cli for signals,
    resource limits and several processes."""
    import signal

    from mlsctl.cli import main

    old_argv, old_cwd, old_sigterm = sys.argv, os.getcwd(), signal.getsignal(signal.SIGTERM)
    sys.argv = ["mlsctl", *args]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        if capsys is not None:
            capsys.readouterr()
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        signal.signal(signal.SIGTERM, old_sigterm)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def in_process(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """:func:`cli` answering as :func:`run_cli` does (``returncode``, ``stdout``, ``stderr``), for the tests of commands
    that need no signal, resource limit or second process: each run_cli starts an interpreter that imports torch
    again, 3.5 s on this 2-core machine. Its stderr holds what a fresh process's would (a review, 2026-12-07, found
    an exact-stderr test blind to stray lines): the ``mlsctl`` logger's notes, which pytest's handlers on the root
    logger would take from Python's last-resort handler, and warnings, under Python's default filters; and the
    command sees cli_env's ``HF_HUB_OFFLINE=1`` (without it a test of "no model given" asked the Hub)."""
    import contextlib
    import io
    import logging
    import warnings
    from unittest import mock

    out, err = io.StringIO(), io.StringIO()
    last_resort = logging.StreamHandler(err)  # a fresh process's: the message alone, warnings and above
    last_resort.setLevel(logging.WARNING)
    root = logging.getLogger()
    pytests = root.handlers[:]
    root.handlers = [last_resort]

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(), \
                mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
            warnings.resetwarnings()  # Python's defaults: DeprecationWarning and its kin ignored, the rest shown once
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            warnings.showwarning = show
            code, _, _ = cli(*args, cwd=cwd)
    finally:
        root.handlers = pytests
    if check and code != 0:
        raise AssertionError(f"mlsctl {' '.join(args)} failed ({code}):\n{out.getvalue()}\n{err.getvalue()}")
    return subprocess.CompletedProcess(["mlsctl", *args], code, out.getvalue(), err.getvalue())


def cli_ok(capsys, *args: str, cwd: Path | None = None) -> tuple[str, str]:
    """:func:`cli` that must succeed: (stdout, stderr)."""
    code, out, err = cli(*args, cwd=cwd, capsys=capsys)
    assert code == 0, f"mlsctl {' '.join(args)} failed ({code}):\n{out}\n{err}"
    return out, err


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """One complete tiny run (2 epochs of 4 steps), shared by the tests of several modules."""
    tmp = tmp_path_factory.mktemp("run")
    images = make_images(tmp / "images", 16)
    recipe = write_recipe(tmp / "tiny.yaml", tiny_recipe(images))
    in_process("pretrain", str(recipe), "--out", str(tmp / "run"), check=True)
    return tmp / "run", recipe


def tiny_model(seed: int = 0, img_size: int = 32):
    """A ModelChoice over a tiny randomly initialised ViT (width 32, patch 8)."""
    from mlsctl.models.backbone import Backbone
    from mlsctl.models.source import model_choice

    torch.manual_seed(seed)
    backbone = Backbone("vit_small_patch16_224", img_size=img_size, patch_size=8,
                        timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    return model_choice(backbone, "tiny test ViT", "test", None, img_size)


def write_feature_folder(path: Path, files: list[str], global_: torch.Tensor, dense: torch.Tensor | None = None,
                         input_root: Path | None = None, fingerprint: str = "f" * 64) -> Path:
    """A feature folder written straight from the documented format (one shard), without a model."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {"global": global_.half().contiguous(), "row": torch.arange(len(files))}
    if dense is not None:
        tensors["dense"] = dense.half().contiguous()
    save_file(tensors, str(path / "shard-00000-of-00001.safetensors"))
    manifest = {
        "kind": "mlsctl-features", "format_version": 1, "mlsctl_version": "test",
        "input_root": str(input_root or path), "files": files, "skipped": [],
        "shards": [{"file": "shard-00000-of-00001.safetensors", "rows": len(files)}],
        "model": {"source": "test", "arch": "none", "fingerprint": fingerprint},
        "preprocessing": {"resize": "square", "resolution": 32}, "dtype": "float16", "normalization": "none",
        "dim": global_.shape[1], "grid": list(dense.shape[1:3]) if dense is not None else None,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_litter(path: Path) -> None:
    """A file browser's litter at ``path``: a ``._NAME`` file as macOS writes it (AppleDouble's header: by its name
    alone it may be the user's), any other litter name with a byte in it."""
    from mlsctl.atomic import APPLE_DOUBLE_HEADER

    path.write_bytes(APPLE_DOUBLE_HEADER + bytes(24) if path.name.startswith("._") else b"x")


def as_killed_at(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as a kill right after the checkpoint of ``step`` leaves it: later
    checkpoints, summary.json and teacher.safetensors gone."""
    import shutil

    from mlsctl.runs import Run

    shutil.copytree(run_dir, copy)
    for checkpoint in Run(copy).checkpoints():
        if checkpoint.step > step:
            shutil.rmtree(checkpoint.path)
    for name in ("summary.json", "teacher.safetensors"):
        (copy / name).unlink()
    return copy


# ``python -m mlsctl`` on 2 processes, for the tests that compare what 2 and 1 processes compute: torch.distributed.run,
# what ``accelerate launch --num_processes 2`` becomes on a machine without GPUs
# (:func:`mlsctl.launch.relaunch_for_accelerate_on_cpu`), started directly. Accelerate's command line imports timm,
# torchvision and transformers before it starts anything, and the relaunch imports torch once more: 15 s for
# `accelerate launch --num_processes 2 -m mlsctl --help` on this 2-core machine against 3.4 s through torchrun, paid by
# every such test. `accelerate launch` itself is started by test_features' two-process embed and test_hardening's stop
# tests (test_12_*).
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlsctl"]


def pretrain_on_two_processes_and_one(tmp_path: Path, raw: dict, batch: int) -> dict[int, Path]:
    """``raw`` trained by 2 processes of ``optim.batch_size`` ``batch`` (:data:`TWO_PROCESSES`) and by 1 process of
    twice that, each with a checkpoint after every step: the run folders, by number of processes (and their stderr
    in TMP/stderr1.txt and TMP/stderr2.txt). The one-process run trains in the test process (:func:`in_process`:
    no interpreter start and torch import, ~4 s a test)."""
    runs = {}
    for processes in (2, 1):
        recipe = copy.deepcopy(raw)
        recipe["optim"]["batch_size"] = batch * (3 - processes)
        recipe["train"].update(checkpoint_every=1, keep_checkpoints=4)
        out = tmp_path / f"run{processes}"
        args = ["pretrain", str(write_recipe(tmp_path / f"r{processes}.yaml", recipe)), "--out", str(out)]
        if processes == 2:
            result = subprocess.run([*TWO_PROCESSES, *args], capture_output=True, text=True, env=cli_env(),
                                    timeout=300, cwd=REPO)
        else:
            result = in_process(*args, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        (tmp_path / f"stderr{processes}.txt").write_text(result.stderr)  # what the console showed, for the caller
        runs[processes] = out
    return runs


def sigkill_then_resume(recipe: Path, tmp_path: Path, total_steps: int) -> tuple[Path, Path]:
    """``recipe`` trained uninterrupted into TMP/full (in this process), and into TMP/killed by another process
    killed with SIGKILL once ten metrics lines are written, then resumed (in this process); returns (full, killed)
    for the caller to compare. Fails when the run ended before the kill or had no checkpoint yet."""
    import signal

    from mlsctl.runs import Run

    in_process("pretrain", str(recipe), "--out", str(tmp_path / "full"), check=True)
    killed = tmp_path / "killed"
    metrics_path = killed / "metrics.jsonl"
    process = kill_when(["pretrain", str(recipe), "--out", str(killed)],
                        lambda: metrics_path.is_file() and len(metrics_path.read_text().splitlines()) >= 10)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    stopped_at = Run(killed).latest().step
    assert 0 < stopped_at < total_steps
    result = in_process("pretrain", str(recipe), "--out", str(killed), "--resume", check=True)
    assert f"resuming {killed} from step {stopped_at}" in result.stderr
    return tmp_path / "full", killed


def write_fake_fmnist(source: Path) -> Path:
    """Synthetic Fashion-MNIST IDX files in ``source``: items are filled squares whose brightness
    encodes the split, labels cycle 0..9."""
    source.mkdir(parents=True, exist_ok=True)
    for stem, n, value in (("train", 50, 200), ("t10k", 30, 120)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 4:24, 6:22] = value
        write_idx(source / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(source / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return source


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    return write_fake_fmnist(tmp_path / "fmnist")


@pytest.fixture(scope="session")
def mile_run(tmp_path_factory):
    """A tiny MILE run on 6 objects of 3 photos (2 gallery + 1 query each)."""
    tmp = tmp_path_factory.mktemp("mile")
    rng = np.random.default_rng(0)
    for o in range(6):
        colour = rng.uniform(0, 255, 3)
        for k in range(3):
            pixels = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            for part in (("train",), ("gallery",) if k < 2 else ("query",)):
                folder = tmp / part[0] / f"obj{o}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    raw = tiny_recipe(tmp / "train", data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]},
                      optim__batch_size=2, optim__epochs=1)
    raw["method"] = {"name": "mile", "set_length": 2, "cross_heads": 2, "out_dim": 64, "hidden_dim": 64,
                     "bottleneck_dim": 32, "warmup_teacher_temp_epochs": 0}
    recipe = write_recipe(tmp / "mile.yaml", raw)
    in_process("pretrain", str(recipe), "--out", str(tmp / "run"), check=True)
    return tmp
