"""benchmarks/train_throughput.py: a failed loop keeps its log and does not stop the other measures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.timm_kwargs.embed_dim=32", "model.timm_kwargs.depth=1", "model.timm_kwargs.num_heads=2",
        "optim.batch_size=4", "model.img_size=32", "data.global_crops.size=32", "data.local_crops.size=16",
        "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16", "method.monitor_bank_size=16",
        "data.workers=0", "train.bank_health_every=0"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_throughput", None)


def test_a_failed_loop_is_recorded_and_the_other_measures_still_run(bench, tmp_path: Path, monkeypatch, capsys):
    def fake_loop(name, overrides, images, steps, warmup, work, timeout, log):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("the loop's own output\n")
        if "data.augment=cpu" in overrides:
            raise RuntimeError(f"mlsctl pretrain logged no interval (see {log})")
        return 9.0, 0.25

    monkeypatch.setattr(bench, "measure_model", lambda recipe, steps, warmup: 10.0)
    monkeypatch.setattr(bench, "measure_loop", fake_loop)
    monkeypatch.setattr(bench, "make_images", lambda folder, *args: folder.mkdir(parents=True))
    out = tmp_path / "tp.json"
    code = bench.main(["--recipe", "dino_fmnist_quick", "--rounds", "2", "--steps", "1", "--warmup", "1",
                       "--out", str(out)])
    assert code == 1
    row = json.loads(out.read_text())["recipes"]["dino_fmnist_quick"]
    assert row["loop-gpu"] == [9.0, 9.0] and row["loop-gpu/model"] == 0.9
    assert row["loop-gpu data wait"] == [0.25, 0.25] and "loop-cpu data wait" not in row
    assert row["loop-cpu"] == [] and row["median"]["loop-cpu"] is None
    assert len(row["failed"]) == 2 and all("loop-cpu" in line for line in row["failed"])
    logs = sorted(p.name for p in (tmp_path / "tp-logs").iterdir())
    assert logs == [f"dino_fmnist_quick-loop-{a}-round{r}.log" for a in ("cpu", "gpu") for r in (1, 2)]
    assert "FAILED round 1 loop-cpu" in capsys.readouterr().out


def test_a_stop_keeps_the_json_of_what_was_measured(bench, tmp_path: Path, monkeypatch):
    """A review (2026-12-06): a device window's timeout sent SIGTERM before the JSON, written only at the end,
    existed, so a window cut short brought back no throughput at all."""
    import os
    import signal

    calls = []

    def fake_loop(name, overrides, images, steps, warmup, work, timeout, log):
        calls.append(name)
        if len(calls) == 2:  # the second loop: the window's timeout arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return 9.0, 0.25

    monkeypatch.setattr(bench, "measure_model", lambda recipe, steps, warmup: 10.0)
    monkeypatch.setattr(bench, "measure_loop", fake_loop)
    monkeypatch.setattr(bench, "make_images", lambda folder, *args: folder.mkdir(parents=True))
    out = tmp_path / "tp.json"
    before = signal.getsignal(signal.SIGTERM)
    assert bench.main(["--recipe", "dino_fmnist_quick", "--rounds", "3", "--steps", "1", "--warmup", "1",
                       "--augment", "gpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["stopped"] == "stopped by a signal"
    row = record["recipes"]["dino_fmnist_quick"]
    assert row["model"] == [10.0] and row["loop-gpu"] == [9.0] and row["loop-gpu/model"] == 0.9
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_loop_log_holds_the_command_and_the_runs_metrics(bench, tmp_path: Path):
    images = bench.make_images(tmp_path / "images", 8, (32, 32), "PNG")
    log = tmp_path / "logs" / "loop.log"
    value, waited = bench.measure_loop("dino_fmnist_quick", [*TINY, "data.augment=cpu", "data.cache=none"], images,
                                       1, 1, tmp_path / "work", 300, log)
    assert value > 0 and 0 <= waited <= 1
    text = log.read_text()
    assert text.startswith("$ ") and " pretrain dino_fmnist_quick " in text.splitlines()[0]
    assert '"images_per_s"' in text.split("metrics.jsonl")[-1]  # the run's records, appended


@pytest.fixture(scope="module")
def host_sync():
    spec = importlib.util.spec_from_file_location("host_sync", REPO / "benchmarks" / "host_sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_sync_counts_the_warnings_of_steps_that_are_not_logged_by_their_line(host_sync):
    import warnings
    from types import SimpleNamespace

    modes = []

    def step(t, number):
        if modes and modes[-1] == "warn":
            warnings.warn(host_sync.SYNC_WARNING)  # what torch raises in sync debug mode "warn"
        return number

    counter = host_sync.SyncCounter(step, modes.append)
    quiet, logged = (SimpleNamespace(method=SimpleNamespace(logged=flag)) for flag in (False, True))
    assert [counter(quiet, 0), counter(logged, 1), counter(quiet, 2)] == [0, 1, 2]
    assert modes == ["warn", "default", "warn", "default"] and counter.per_step == [1, 1]
    ((site, count),) = counter.sites.items()
    assert count == 2 and site.startswith("tests/test_train_throughput.py:") and site.endswith("(step)"), site


def test_host_sync_runs_a_recipe_through_the_loop_and_skips_without_cuda(host_sync, tmp_path: Path, monkeypatch):
    from conftest import make_images

    images = make_images(tmp_path / "images", 14)
    modes = []
    result = host_sync.measure("dino_fmnist_quick", str(images), tmp_path, [*TINY, "train.log_every=3", "train.precision=fp32"], modes.append,
                               steps=3)  # the first 12 of 14 images; fp32: Accelerate's state is per process
    assert result["steps"] == 3 and result["steps_not_logged"] == 2 and result["syncs"] == 0, result
    assert modes == ["warn", "default"] * 2
    monkeypatch.setattr(sys, "argv", ["host_sync.py", "--out", str(tmp_path / "h.json")])
    assert host_sync.main() == 0 and json.loads((tmp_path / "h.json").read_text()) == {"skipped": "no CUDA device"}


def test_a_recipe_in_fp16_is_refused_up_front_without_cuda(bench, tmp_path: Path):
    # dino_in1k trains in fp16: without --device-suite on a CPU its loops failed one by one after the model's step
    with pytest.raises(SystemExit, match="dino_in1k trains in fp16, which needs a CUDA GPU; add --override"):
        bench.main(["--recipe", "dino_in1k", "--images", "2", "--rounds", "1", "--out", str(tmp_path / "t.json")])
