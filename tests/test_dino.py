"""DINO's loss as pure functions (closed-form values), and gradients through a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlsctl import config
from mlsctl.data.loader import StepBatchSampler
from mlsctl.methods.dino import DINO
from mlsctl.methods.self_distillation import cross_entropy, dino_loss, teacher_probabilities, updated_center
from mlsctl.schedules import Schedule, cosine, linear_warmup_epochs

from conftest import tiny_recipe


def test_uniform_student_gives_log_k():
    k = 16
    student = [torch.zeros(3, k) for _ in range(4)]
    teacher = [F.softmax(torch.randn(3, k), dim=-1) for _ in range(2)]
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(math.log(k), rel=1e-6)


def test_cross_entropy_closed_form():
    # p = (1, 0), s = (log 3, 0) at temperature 1: q = (3/4, 1/4), H = -log(3/4)
    p = torch.tensor([[1.0, 0.0]])
    s = torch.tensor([[math.log(3.0), 0.0]])
    assert cross_entropy(p, s, 1.0).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # temperature 0.5 doubles the logits: q = (9/10, 1/10)
    assert cross_entropy(p, s, 0.5).item() == pytest.approx(-math.log(0.9), rel=1e-6)


def test_only_cross_view_pairs_count():
    """Two teacher views, three student views: pairs (0,1) (0,2) (1,0) (1,2); the same-view
    pairs (0,0) and (1,1), which would contribute log(2) each, are left out."""
    one_hot = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    big = 50.0
    student = [torch.tensor([[big, -big]]), torch.tensor([[-big, big]]), torch.tensor([[0.0, 0.0]])]
    # (0,1): teacher says class 0, student 1 says class 1 with logit gap 2*big/0.1 → loss ≈ 1000
    # (0,2): log 2; (1,0): ≈ 1000; (1,2): log 2
    expected = (2 * (2 * big / 0.1) + 2 * math.log(2)) / 4
    assert dino_loss(student, one_hot, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_teacher_probabilities_center_and_sharpen():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    center = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(teacher_probabilities(logits, center, 0.04), torch.full((1, 3), 1 / 3))
    probs = teacher_probabilities(logits, torch.zeros(1, 3), 0.5)
    expected = torch.softmax(torch.tensor([2.0, 4.0, 6.0]), 0)
    assert torch.allclose(probs[0], expected)


def test_center_update_is_an_ema_of_the_batch_mean():
    center = torch.tensor([[1.0, 1.0]])
    logits = torch.tensor([[0.0, 2.0], [2.0, 6.0]])
    new = updated_center(center, logits, 0.9)
    assert torch.allclose(new, torch.tensor([[0.9 + 0.1 * 1.0, 0.9 + 0.1 * 4.0]]))


def test_schedules():
    assert cosine(0, 100, 1.0, 0.0) == 1.0 and cosine(100, 100, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    # DINO's teacher temperature: linspace(0.04, 0.07, 30)[e], then 0.07
    assert linear_warmup_epochs(0, 30, 0.04, 0.07) == 0.04
    assert linear_warmup_epochs(29, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup_epochs(15, 30, 0.04, 0.07) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert linear_warmup_epochs(100, 30, 0.04, 0.07) == 0.07
    assert Schedule(10, 3).total_steps == 30 and Schedule(10, 3).epoch(25) == 2


def tiny_dino(images):
    recipe = config.from_dict(tiny_recipe(images))
    torch.manual_seed(0)
    return DINO(recipe, Schedule(4, 2)), recipe


def a_batch(recipe, images):
    from mlsctl.data.images import ImageFolder
    from mlsctl.methods.base import Method

    dataset, collate_fn = Method.build_dataset(recipe, ImageFolder(images))
    sampler = StepBatchSampler(len(dataset), 4, seed=0)
    return dataset.on_device(collate_fn([dataset[key] for key in next(iter(sampler))]))


def test_every_student_parameter_gets_a_gradient_and_the_teacher_none(images):
    method, recipe = tiny_dino(images)
    batch = a_batch(recipe, images)
    out = method.training_step(batch, step=0)
    out.loss.backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("student.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(p.grad is None for n, p in method.named_parameters() if n.startswith("teacher."))
    # the gain of a normalised last layer is fixed, as DINO's norm_last_layer=True
    assert not method.student.head.last_layer.gain.requires_grad


def test_teacher_starts_as_a_copy_of_the_student(images):
    method, _ = tiny_dino(images)
    for (ns, ps), (nt, pt) in zip(method.student.named_parameters(), method.teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt)


def test_training_step_updates_center_and_monitor_bank(images):
    method, recipe = tiny_dino(images)
    batch = a_batch(recipe, images)
    with torch.no_grad():
        out = method.training_step(batch, step=0)
    assert out.terms["dino"].item() == pytest.approx(out.loss.item())
    assert method.center.abs().sum() == 0  # the center moves once per optimiser step, at its end
    method.end_step(0)
    assert method.center.abs().sum() > 0
    bank = method.banks()["cls"]
    assert bank.filled == 4
    assert bank.payload["image_id"][:4].tolist() == batch.image_ids.tolist()
    assert torch.equal(bank.payload["box"][:4], batch.boxes[:, 0])


def test_last_layer_matches_the_authors_init_and_weight_decay(tmp_path):
    """DINO's last layer is weight_norm(nn.Linear): its direction starts with nn.Linear's default
    init (row norm ≈ sqrt(1/3)), and its gain g is [out, 1], weight-decayed when it trains."""
    from mlsctl.models.heads import WeightNormLinear
    from mlsctl.train import param_groups

    layer = WeightNormLinear(256, 4096, fixed_gain=False)
    assert layer.direction.norm(dim=1).mean().item() == pytest.approx(math.sqrt(1 / 3), rel=0.02)
    assert layer.gain.shape == (4096, 1)
    raw = tiny_recipe(tmp_path)
    raw["method"]["norm_last_layer"] = False
    method = DINO(config.from_dict(raw), Schedule(4, 2))
    decayed, exempt = (set(map(id, group["params"])) for group in param_groups(method))
    gain = method.student.head.last_layer.gain
    assert id(gain) in decayed and id(gain) not in exempt
    fixed = DINO(config.from_dict(tiny_recipe(tmp_path)), Schedule(4, 2)).student.head.last_layer.gain
    assert not fixed.requires_grad  # norm_last_layer: true keeps g = 1
    # a gain saved as [out] (before this change) still loads
    old = {"direction": layer.direction.detach().clone(), "gain": torch.full((4096,), 2.0)}
    layer.load_state_dict(old)
    assert layer.gain.shape == (4096, 1) and layer.gain.eq(2.0).all()


def test_the_prototype_scores_are_float32_under_bf16_autocast():
    """A review (2026-12-06): under the loop's bf16 autocast the last layer rounded the logits to bf16
    (error ~1e-3 before the teacher's division by 0.04); the authors' fp16 rounds 8 times less."""
    from mlsctl.models.heads import WeightNormLinear

    torch.manual_seed(0)
    layer, x = WeightNormLinear(256, 8192), torch.nn.functional.normalize(torch.randn(16, 256), dim=-1)
    exact = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = layer(x)
    assert cast.dtype == torch.float32 and torch.allclose(cast, exact, atol=1e-6, rtol=0)  # bf16 was ~1e-3 off
