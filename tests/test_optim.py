"""The optimiser step's pieces on hand-set gradients: per-parameter clipping (DINO's default) and
global clipping against closed-form values."""

from __future__ import annotations

import pytest
import torch

from mlsctl.train import optim


def parameters_with_gradient_norms(norms: list[float]) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = []
    for norm, shape in zip(norms, [(3,), (2, 4), (5, 1, 2)]):
        p = torch.nn.Parameter(torch.zeros(shape))
        direction = torch.randn(shape)
        p.grad = direction / direction.norm() * norm
        params.append(p)
    return params


def test_per_parameter_clipping_caps_each_gradient_at_the_threshold_and_keeps_its_direction():
    norms = [0.5, 3.0, 10.0]
    params = parameters_with_gradient_norms(norms)
    before = [p.grad.clone() for p in params]
    total = optim.clip_gradients(params, 2.0, "per_param", accelerator=None)
    assert total.item() == pytest.approx(sum(n * n for n in norms) ** 0.5, rel=1e-6)  # before clipping
    for p, g, norm in zip(params, before, norms):
        assert p.grad.norm().item() == pytest.approx(min(norm, 2.0), rel=1e-5)
        assert torch.allclose(p.grad / p.grad.norm(), g / g.norm(), atol=1e-6)
    assert torch.equal(params[0].grad, before[0])  # under the threshold: untouched


def test_global_clipping_scales_all_gradients_by_one_factor():
    norms = [0.5, 3.0, 10.0]
    params = parameters_with_gradient_norms(norms)
    before = [p.grad.clone() for p in params]
    total = optim.clip_gradients(params, 2.0, "global", accelerator=None)
    expected_total = sum(n * n for n in norms) ** 0.5
    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    factor = 2.0 / expected_total
    for p, g in zip(params, before):
        assert torch.allclose(p.grad, g * factor, rtol=1e-4, atol=1e-7)


def test_a_threshold_of_0_clips_nothing_and_still_returns_the_norm():
    params = parameters_with_gradient_norms([0.5, 3.0, 10.0])
    before = [p.grad.clone() for p in params]
    assert optim.clip_gradients(params, 0.0, "per_param", accelerator=None).item() == pytest.approx(
        (0.25 + 9 + 100) ** 0.5, rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_a_frozen_last_layer_counts_in_no_clipping_norm():
    """A review (2026-12-06): the loop clipped before dropping the frozen last layer's gradients, so a
    global norm counted a gradient that was never applied and shrank every other one."""
    from types import SimpleNamespace

    for mode in ("global", "per_param"):
        params = parameters_with_gradient_norms([3.0, 4.0, 100.0])
        rest, last = params[:2], params[2:]
        plan = SimpleNamespace(freeze_steps=2, cfg=SimpleNamespace(clip_grad=2.5, clip_grad_mode=mode))
        total = optim.gradients_to_apply(params, last, 1, plan, accelerator=None)
        assert total.item() == pytest.approx(5.0, rel=1e-6) and last[0].grad is None
        expected = [2.5 * 3 / 5, 2.5 * 4 / 5] if mode == "global" else [2.5, 2.5]
        assert [p.grad.norm().item() for p in rest] == pytest.approx(expected, rel=1e-5)
    last[0].grad = torch.ones_like(last[0])  # after the frozen steps the last layer counts again
    total = optim.gradients_to_apply(params, last, 2, plan, accelerator=None)  # the rest: 2.5 each, clipped above
    assert total.item() == pytest.approx((2.5 ** 2 * 2 + last[0].numel()) ** 0.5, rel=1e-6)
