"""Gradient accumulation (``optim.accumulate_steps``): micro-batches of the samplers, held bank
writes, the loop's optimiser steps, EMA and centre updates against one big batch, the gradients of
a loss that is a per-sample mean and of one that is not (Multi-Similarity), exact resume after an
interruption in the middle of an accumulation, and bad values (docs/accumulation.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsctl import config
from mlsctl.bank import Column, MemoryBank, load_banks
from mlsctl.data.loader import StepBatchSampler
from mlsctl.data.mperclass import MPerClassStepSampler
from mlsctl.runs import Run

from conftest import cli, cli_ok, tiny_recipe, write_recipe


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in _metrics(run)]


# ------------------------------------------------------------------------------------------ pieces


def test_micro_batches_are_the_big_batch_cut_in_order():
    big = list(StepBatchSampler(20, 4, seed=1, total_steps=6))  # 5 steps per epoch: crosses an epoch
    micro = list(StepBatchSampler(20, 2, seed=1, total_steps=6, accumulate_steps=2))
    assert len(micro) == 12 == len(StepBatchSampler(20, 2, seed=1, total_steps=6, accumulate_steps=2))
    assert [a + b for a, b in zip(micro[::2], micro[1::2])] == big
    resumed = list(StepBatchSampler(20, 2, seed=1, start_step=4, total_steps=6, accumulate_steps=2))
    assert resumed == micro[8:]  # a step's micro-batches from its first one
    # two processes x 2 micro-batches: process r's micro-batch m is slice 2r + m of the step's batch
    ranks = [list(StepBatchSampler(20, 1, world_size=2, rank=r, seed=1, total_steps=6, accumulate_steps=2))
             for r in range(2)]
    assert [ranks[0][2 * s] + ranks[0][2 * s + 1] + ranks[1][2 * s] + ranks[1][2 * s + 1] for s in range(6)] == big

    labels = np.repeat(np.arange(10), 5)
    big = list(MPerClassStepSampler(labels, 2, 8, seed=3, total_steps=7))
    micro = list(MPerClassStepSampler(labels, 2, 4, seed=3, total_steps=7, accumulate_steps=2))
    assert [a + b for a, b in zip(micro[::2], micro[1::2])] == big
    for batch in micro:  # every micro-batch is m-per-class
        _, counts = np.unique(labels[[i for _, i, _ in batch]], return_counts=True)
        assert (counts == 2).all()


def test_held_bank_writes_wait_for_release_and_equal_one_enqueue():
    def rows(start, n):
        return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 3)

    held, single = (MemoryBank(5, 3, {"image_id": Column((), torch.long)}) for _ in range(2))
    held.hold()
    held.enqueue(rows(0, 2), step=4, image_id=torch.tensor([0, 1]))
    source = rows(2, 2)
    held.enqueue(source, step=4, image_id=torch.tensor([2, 3]))
    source.fill_(-1.0)  # the caller's tensor changes after enqueue: the bank kept its own copy
    assert held.filled == 0 and held.n_written == 0  # nothing visible before release
    held.release()
    single.enqueue(rows(0, 4), step=4, image_id=torch.arange(4))
    assert all(torch.equal(a, b) for a, b in zip(held.state_dict().values(), single.state_dict().values()))
    held.hold()
    held.release()  # a step that enqueued nothing writes nothing
    assert held.n_written == 4


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "two"])
def test_bad_accumulate_steps_are_one_sentence(recipe_file, tmp_path, capsys, value):
    code, _, err = cli("pretrain", str(recipe_file), f"optim.accumulate_steps={value}", "--out", str(tmp_path / "run"),
                       capsys=capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and "'optim.accumulate_steps'" in lines[0], err
    assert ("must be >= 1" if value.lstrip("-").isdigit() else "must be an integer") in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_step_bigger_than_the_data_names_accumulate_steps(tmp_path, images, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))
    code, _, err = cli("pretrain", str(path), "optim.accumulate_steps=5", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "fewer than one global batch of 20 (4 per process x 1 processes x 5 accumulation steps)" in err
    assert "lower optim.batch_size or optim.accumulate_steps" in err


# ------------------------------------------------------------------------------------------ runs


class _Recorder:
    """Counts the loop's EMA updates and the DINO-family centre updates, and keeps the gradients
    the loop clips (those of each optimiser step, after its last micro-batch)."""

    def __init__(self, monkeypatch):
        import mlsctl.methods.self_distillation as dino
        from mlsctl.train import optim

        self.ema, self.centers, self.gradients = 0, 0, []
        ema_update, center_from_statistics, clip = optim.ema_update, dino.center_from_statistics, optim.clip_gradients

        def counted_ema(pairs, momentum):
            self.ema += 1
            return ema_update(pairs, momentum)

        def counted_center(*args, **kwargs):
            self.centers += 1
            return center_from_statistics(*args, **kwargs)

        def recorded_clip(parameters, *args, **kwargs):
            self.gradients.append([None if p.grad is None else p.grad.detach().clone() for p in parameters])
            return clip(parameters, *args, **kwargs)

        monkeypatch.setattr(optim, "ema_update", counted_ema)
        monkeypatch.setattr(dino, "center_from_statistics", counted_center)
        monkeypatch.setattr(optim, "clip_gradients", recorded_clip)


def _train(monkeypatch, capsys, recipe: Path, out: Path, *overrides: str) -> _Recorder:
    with monkeypatch.context() as patch:
        recorder = _Recorder(patch)
        cli_ok(capsys, "pretrain", str(recipe), *overrides, "--out", str(out))
    return recorder


def _same_gradients(a: list, b: list, atol: float) -> bool:
    return all((x is None and y is None) or torch.allclose(x, y, atol=atol, rtol=1e-4) for x, y in zip(a, b))


def test_dino_batch_2_times_2_is_batch_4(tmp_path, images, monkeypatch, capsys):
    """Batch 2 x 2 micro-batches and batch 4 make the same optimiser steps with the same data,
    update the teacher and the centre once per step, write the same monitor bank and back-propagate
    the same gradients (DINO's loss is a mean over images, given the centre of the step)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))  # 16 images: 4 steps of 4 per epoch, 2 epochs
    big = _train(monkeypatch, capsys, recipe, tmp_path / "big")
    small = _train(monkeypatch, capsys, recipe, tmp_path / "small", "optim.batch_size=2", "optim.accumulate_steps=2")
    assert big.ema == small.ema == 8 and big.centers == small.centers == 8
    assert len(big.gradients) == len(small.gradients) == 8
    for x, y in zip(big.gradients, small.gradients):  # every step, each tensor to 1e-5 of its largest entry
        assert all((p is None and q is None) or float((p - q).abs().max()) <= 1e-5 * float(p.abs().max())
                   for p, q in zip(x, y))
    a, b = _metrics(tmp_path / "big"), _metrics(tmp_path / "small")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert (x["lr"], x["momentum"], x["weight_decay"]) == (y["lr"], y["momentum"], y["weight_decay"])
    assert [c.step for c in Run(tmp_path / "big").checkpoints()] == [c.step for c in Run(tmp_path / "small").checkpoints()]
    bank_big = load_banks(Run(tmp_path / "big").latest().banks_path)["cls"]
    bank_small = load_banks(Run(tmp_path / "small").latest().banks_path)["cls"]
    assert bank_big.n_written == bank_small.n_written == 32 and bank_big.ptr == bank_small.ptr
    for column in ("image_id", "step", "box"):
        assert torch.equal(bank_big.payload[column], bank_small.payload[column]), column
    assert torch.allclose(bank_big.vectors, bank_small.vectors, atol=1e-4)
    state_big = load_file(str(Run(tmp_path / "big").latest().model_path))
    state_small = load_file(str(Run(tmp_path / "small").latest().model_path))
    # within a tenth of one AdamW step (lr 1e-3): a missed or extra update would move weights by ~1e-3
    assert all(torch.allclose(state_big[k], state_small[k], atol=1e-4, rtol=0) for k in state_big)
    assert "8 steps of 4 images (2 x 1 process x 2 accumulated micro-batches)" in (tmp_path / "small" / "train.log").read_text()


def test_moco_queues_are_read_as_at_the_start_of_the_step(tmp_path, images, monkeypatch, capsys):
    """MLS (ViT: no BatchNorm): InfoNCE and the multi-label loss are means over images, scored
    against the queues as they were before the step, so every step's gradient of 2 x 2 equals
    batch 4's — which would not hold if the second micro-batch saw the first one's keys."""
    from test_mls import mls_recipe

    recipe = write_recipe(tmp_path / "r.yaml", mls_recipe(images))
    big = _train(monkeypatch, capsys, recipe, tmp_path / "big")
    small = _train(monkeypatch, capsys, recipe, tmp_path / "small", "optim.batch_size=2", "optim.accumulate_steps=2")
    assert len(big.gradients) == len(small.gradients) == 8
    assert all(_same_gradients(a, b, atol=1e-5) for a, b in zip(big.gradients, small.gradients))
    queues = [load_banks(Run(tmp_path / run).latest().banks_path) for run in ("big", "small")]
    for name in ("Q_g", "Q_z"):
        assert torch.equal(queues[0][name].payload["image_id"], queues[1][name].payload["image_id"])
        assert torch.allclose(queues[0][name].vectors, queues[1][name].vectors, atol=1e-5)


def test_multi_similarity_gradient_is_the_mean_of_its_micro_batches(tmp_path, monkeypatch, capsys):
    """MS mines its pairs inside the batch it sees, so its loss over 8 images is not the mean of
    its losses over two halves: accumulation gives the mean of the micro-batches' gradients (each
    mined on its own, as each process's under DDP), not batch 8's gradient."""
    from mlsctl.methods.ms import MS
    from mlsctl.schedules import Schedule
    from mlsctl.train import param_groups
    from test_ms import _class_images, _ms_recipe

    raw = _ms_recipe(_class_images(tmp_path / "images", 4, 6))
    raw["optim"]["epochs"] = 1
    raw["optim"]["clip_grad"] = 0.0
    recipe_path = write_recipe(tmp_path / "ms.yaml", raw)
    small = _train(monkeypatch, capsys, recipe_path, tmp_path / "small", "optim.batch_size=4", "optim.accumulate_steps=2")
    big = _train(monkeypatch, capsys, recipe_path, tmp_path / "big")

    # step 0 by hand: the same initial weights, the sampler's two micro-batches, each MS loss / 2
    recipe = config.load_recipe(str(recipe_path), ["optim.batch_size=4", "optim.accumulate_steps=2"])
    folder = MS.open_data(recipe)
    dataset, collate_fn = MS.build_dataset(recipe, folder)
    sampler = MS.batch_sampler(recipe, dataset)
    torch.manual_seed(recipe.seed)
    method = MS(recipe, Schedule(sampler.steps_per_epoch, 1))
    micro_batches = list(sampler)[:2]
    for keys in micro_batches:
        batch = dataset.on_device(collate_fn([dataset[key] for key in keys]))
        (method.training_step(batch, 0).loss / 2).backward()
    by_hand = [p.grad for group in param_groups(method, recipe.optim.decay_biases_and_norms) for p in group["params"]]
    assert _same_gradients(small.gradients[0], by_hand, atol=1e-6)
    assert not _same_gradients(big.gradients[0], by_hand, atol=1e-4)  # pairs across the halves count in batch 8


def test_interrupted_mid_accumulation_resumes_exactly(tmp_path, images, monkeypatch, capsys):
    """Checkpoints are written between optimiser steps only: a run stopped after the first
    micro-batch of a step (its gradient and held bank rows lost) and resumed writes what an
    uninterrupted run writes, bit for bit."""
    from mlsctl.methods.dino import DINO

    recipe = tiny_recipe(images)
    recipe["optim"].update(batch_size=2, accumulate_steps=2)
    recipe["train"]["checkpoint_every"] = 3
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cli_ok(capsys, "pretrain", str(path), "--out", str(tmp_path / "full"))

    training_step = DINO.training_step

    def stop_in_step_5(self, batch, step):
        if step == 4 and self.micro_batch == (1, 2):  # micro-batch 0 of step 5 is done, its rows held
            raise KeyboardInterrupt
        return training_step(self, batch, step)

    with monkeypatch.context() as patch:
        patch.setattr(DINO, "training_step", stop_in_step_5)
        code, _, err = cli("pretrain", str(path), "--out", str(tmp_path / "killed"), capsys=capsys)
    assert code != 0 and Run(tmp_path / "killed").latest().step == 3
    _, err = cli_ok(capsys, "pretrain", str(path), "--out", str(tmp_path / "killed"), "--resume")
    assert "from step 3" in err
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    for name in ("teacher.safetensors",):
        a, b = load_file(str(tmp_path / "killed" / name)), load_file(str(tmp_path / "full" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(Run(tmp_path / run).latest().model_path)) for run in ("killed", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # student, teacher and centre
    banks = [load_banks(Run(tmp_path / run).latest().banks_path)["cls"] for run in ("killed", "full")]
    assert all(torch.equal(x, y) for x, y in zip(banks[0].state_dict().values(), banks[1].state_dict().values()))
