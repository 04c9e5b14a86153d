"""Branches of the training code that only CUDA takes, imitated on the CPU: what torch and Accelerate
do there (an fp16 grad scaler, an NCCL process group) is set up by hand, with the same objects."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def fp16_accelerator():
    """An Accelerator as ``train.precision=fp16`` makes it on CUDA: with a grad scaler (Accelerate
    makes none on a CPU, so a CPU ``torch.amp.GradScaler`` takes its place; same class, same checks).
    Accelerate's process-wide state is set aside and put back, so other tests keep their precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    saved = dict(AcceleratorState._shared_state), dict(GradientState._shared_state)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision="fp16")
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        yield accelerator
    finally:
        for state, before in zip((AcceleratorState._shared_state, GradientState._shared_state), saved):
            state.clear()
            state.update(before)


def test_global_clipping_works_with_the_fp16_grad_scaler(fp16_accelerator):
    """The loop unscales the gradients (fp16) before clipping them; global clipping must not unscale
    them a second time, which the scaler refuses (``unscale_() has already been called``)."""
    from mlsctl.train import optim

    accelerator = fp16_accelerator
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(net.state_dict())
    params = list(net.parameters())
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=0.1))
    x = torch.randn(8, 4)
    accelerator.backward(net(x).pow(2).sum())  # scaled by 1024
    reference(x).pow(2).sum().backward()

    accelerator.unscale_gradients()  # as loop._train_one_step does with a scaler
    norm = optim.clip_gradients(params, 0.5, "global", accelerator)
    expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
    assert torch.allclose(norm, expected)
    for p, q in zip(params, reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    optimizer.step()  # the scaler's step after the unscale: the update happens
    assert not torch.equal(params[0].detach(), reference.weight.detach())


def test_the_mean_over_processes_reaches_a_process_group_that_serves_cuda_tensors_only(tmp_path, monkeypatch):
    """Several CUDA processes share an NCCL group (Accelerate's backend), which takes CUDA tensors
    only. A group with one backend for CUDA alone ("cuda:gloo") refuses a CPU tensor the same way
    ("No backend type associated with device type cpu"): the logged means travel through the gloo
    group mlsctl.dist.host_group makes over the same processes (one process, standing in for two)."""
    import torch.distributed as td

    from mlsctl import dist

    td.init_process_group("cuda:gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="device type cpu"):  # what NCCL answers a CPU tensor
            td.all_reduce(torch.zeros(2, dtype=torch.float64))
        monkeypatch.setattr(dist, "is_distributed", lambda: True)  # as with two processes
        assert dist.mean_over_processes({"loss": 1.5, "lr": 0.25}) == {"loss": 1.5, "lr": 0.25}
        assert dist.host_group() is not None  # a gloo group of its own
    finally:
        td.destroy_process_group()


class _FakeCudaRng:
    """torch.cuda's RNG functions for a machine with ``visible`` GPUs, this process on ``current``."""

    def __init__(self, visible: int, current: int):
        self.states = {i: torch.tensor([i, 7], dtype=torch.uint8) for i in range(visible)}
        self.current, self.visible = current, visible

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: self.states[device].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    def set(self, state: torch.Tensor, device: int) -> None:
        if device >= self.visible:
            raise RuntimeError(f"invalid device {device}")
        self.states[device] = state.clone()


def test_a_checkpoint_keeps_only_its_own_gpu_s_rng_and_resumes_on_a_machine_with_fewer(monkeypatch):
    """Saved on GPU 1 of 4, resumed as the same rank on a machine that shows 2 GPUs: only this
    process's device state is saved and put back (the state of every visible GPU made such a resume fail)."""
    from mlsctl.train import checkpoint

    saving = _FakeCudaRng(visible=4, current=1)
    saving.install(monkeypatch)
    saving.states[1] = torch.tensor([42, 43], dtype=torch.uint8)
    state = checkpoint.rng_state()
    assert "cuda" not in state and state["cuda_device"] == bytes([42, 43])

    resuming = _FakeCudaRng(visible=2, current=1)
    resuming.install(monkeypatch)
    checkpoint.set_rng_state(state)
    assert resuming.states[1].tolist() == [42, 43] and resuming.states[0].tolist() == [0, 7]

    old_format = {**state, "cuda": [bytes([9, i]) for i in range(4)]}  # before 2026-12-05: every visible GPU
    del old_format["cuda_device"]
    checkpoint.set_rng_state(old_format)
    assert resuming.states[1].tolist() == [9, 1] and resuming.states[0].tolist() == [0, 7]
