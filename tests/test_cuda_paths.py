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


def _cuda_tf32() -> bool:
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


def test_full_float32_turns_off_autocast_and_cuda_s_tf32_and_puts_both_back():
    """A review of the CUDA paths (2026-12-06): the steps' "float32" blocks ran in TF32 on CUDA; a second
    and a third review: a caller's own settings — torch's newer per-backend ones included, whose older
    switches torch 2.14 then refuses to read — come back as they were, and the CPU's are not touched."""
    from mlsctl.device import full_float32, precision_switches, restore_precision_switches, set_tf32

    saved = precision_switches()
    try:
        set_tf32(matmul=True)  # as the training loop sets it on CUDA
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # a caller's CPU setting, through the newer API
        before = precision_switches()
        a = torch.randn(4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (a @ a).dtype == torch.bfloat16
            with full_float32("cpu"):
                assert (a @ a).dtype == torch.float32 and _cuda_tf32()
            with full_float32("cuda"):
                assert not _cuda_tf32()
            assert (a @ a).dtype == torch.bfloat16 and _cuda_tf32()
        with pytest.raises(KeyError), full_float32("cuda"):
            raise KeyError("a failing block")
        assert precision_switches() == before
    finally:
        restore_precision_switches(saved)
    assert precision_switches() == saved


def test_cribo_clusters_pools_and_searches_its_bank_in_float32_under_bf16_autocast(tmp_path, monkeypatch):
    """The same review: under bf16 autocast (the default on CUDA) CrIBo's clustering, object pooling
    and cycle-consistent bank search ran in bf16; a simulation on 3,200 bank entries changed the
    nearest entry of 19 % of the queries and the cycle check of 9.5 %."""
    from test_cribo import _batch, _cribo

    from mlsctl.methods.cribo import method as cribo_method

    seen = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            probe = torch.ones(2, 2) @ torch.ones(2, 2)
            seen.append((fn.__name__, torch.is_autocast_enabled("cpu"), probe.dtype,
                         {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))
            return fn(*args, **kwargs)
        return wrapped

    for name in ("joint_clustering", "pool_objects", "cycle_consistent_neighbours"):
        monkeypatch.setattr(cribo_method, name, recording(getattr(cribo_method, name)))
    method, recipe = _cribo(tmp_path)
    batch = _batch(recipe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step in range(3):  # the bank fills, then it is searched
            out = method.training_step(batch, step)
    assert {name for name, *_ in seen} == {"joint_clustering", "pool_objects", "cycle_consistent_neighbours"}
    assert all(not enabled and probe == torch.float32 and dtypes <= {torch.float32} for _, enabled, probe, dtypes in seen), seen
    assert torch.isfinite(out.loss)


def test_tf32_switches_leave_torch_s_older_reads_working_for_torch_compile():
    """A review of the CUDA paths (2026-12-07): "tf32" written to torch's newer per-backend string alone
    left ``torch.get_float32_matmul_precision()`` and the older ``allow_tf32`` raising ("a mix of the legacy
    and new APIs"); torch.compile's inductor reads them (before torch 2.13), so ``train.compile: true``
    would have failed on CUDA. Now every state set_tf32, full_float32 and the restore leave is readable."""
    from mlsctl.device import full_float32, precision_switches, restore_precision_switches, set_tf32

    def reads() -> tuple:
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32)

    saved = precision_switches()
    try:
        set_tf32(matmul=True, conv=True)
        assert reads() == ("high", True, True) and _cuda_tf32()
        with full_float32("cuda"):
            assert reads() == ("highest", False, True) and not _cuda_tf32()
        assert reads() == ("high", True, True) and _cuda_tf32()
        set_tf32(matmul=False, conv=False)
        assert reads() == ("highest", False, False)
    finally:
        restore_precision_switches(saved)
    reads()
    assert precision_switches() == saved
    # a caller's own per-backend cuDNN state, which the older switch cannot say, comes back as it was (a review:
    # its RNNs' TF32 was switched off)
    if hasattr(torch.backends.cudnn, "rnn"):
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        caller = precision_switches()
        try:
            set_tf32(matmul=True, conv=True)
        finally:
            restore_precision_switches(caller)
        assert precision_switches() == caller and torch.backends.cudnn.rnn.fp32_precision == "tf32"
        restore_precision_switches(saved)
        assert precision_switches() == saved


def test_pretrain_puts_the_caller_s_tf32_switches_back(monkeypatch):
    from mlsctl.device import precision_switches, set_tf32
    from mlsctl.train import loop

    def training(*args, **kwargs):  # what make_accelerator does on CUDA
        set_tf32(matmul=True, conv=True)
        return "summary"

    before = precision_switches()
    monkeypatch.setattr(loop, "_pretrain", training)
    assert loop.pretrain(None, "unused") == "summary"
    assert precision_switches() == before  # "none" stays "none": nothing written that did not change
