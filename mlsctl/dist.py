"""Small helpers over ``torch.distributed`` (initialised by Accelerate), safe with one process.

None of these take part in autograd: they are used for bookkeeping (banks, centers, checksums),
never inside a loss.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


_HOST_GROUP: tuple = (None, None)  # (the default group it was made for, a gloo group over the same processes)
_MAIN_GROUP: tuple = (None, None)  # the same, for on_main: with WAIT_FOR_MAIN as its timeout
WAIT_FOR_MAIN = timedelta(hours=24)


def host_group():
    """The process group for exchanges of host values (row counts, logged scalars): the default
    group when it runs on gloo, else a gloo group over the same processes, made at the first call.

    NCCL, the default group of a multi-GPU run, takes CUDA tensors only: a CPU tensor there is an
    error, and a count sent as a CUDA tensor must be read back with ``.item()``, which waits for
    every kernel queued before it. Through gloo the host exchanges its own values and the GPU's
    queue runs on. Every process calls this at the same point of the same code (a group is made
    collectively), as with any collective."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _HOST_GROUP[0] is not world:
        _HOST_GROUP = (world, dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


def _main_group():
    """The gloo group :func:`on_main` waits in: every process, with a day's timeout. The others wait
    there while process 0 works alone (listing millions of files on NFS, an exact neighbour search
    of a million rows), which may take longer than a group's default 30 minutes; a process that
    dies closes its connections, so no one waits a day for a dead one. Made collectively at the
    first call, as :func:`host_group`."""
    global _MAIN_GROUP
    world = dist.group.WORLD
    if _MAIN_GROUP[0] is not world:
        _MAIN_GROUP = (world, dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN))
    return _MAIN_GROUP[1]


def close() -> None:
    """Destroy this process's process groups (the default one and :func:`host_group`'s) before it
    exits, as every command does last. Left to the interpreter's exit, gloo's threads aborted a
    process now and then ("terminate called without an active exception", SIGABRT: 5-11 of 20
    two-process exits of a bare script, 0 of 80 after this), and NCCL warns that the group was
    not destroyed."""
    global _HOST_GROUP, _MAIN_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the host and main groups too
    _HOST_GROUP = _MAIN_GROUP = (None, None)


@torch.no_grad()
def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order.

    Processes may hold different numbers of rows; they are padded to the largest for the
    collective and trimmed afterwards. The row counts are exchanged on the host
    (:func:`host_group`): no device synchronisation. Booleans travel as uint8 (gloo cannot gather
    bool).
    """
    return gather_cat_with_counts(tensor)[0]


def gather_cat_with_counts(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """:func:`gather_cat` and the number of rows each process gave, in rank order."""
    if not is_distributed():
        return tensor, [tensor.shape[0]]
    was_bool = tensor.dtype == torch.bool
    local = tensor.to(torch.uint8) if was_bool else tensor
    local = local.contiguous()
    size = torch.tensor([local.shape[0]], dtype=torch.long)  # the shape is host metadata
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size, group=host_group())
    counts = [int(s) for s in sizes]
    longest = max(counts)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    out = torch.cat([p[:n] for p, n in zip(parts, counts)])
    return (out.bool() if was_bool else out), counts


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy; the input is left alone)."""
    out = tensor.clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


@torch.no_grad()
def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over processes (for logging a global-batch value), on the host
    (:func:`host_group`: NCCL refuses the CPU tensor they travel in)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(stacked, group=host_group())
    return {k: float(v) / world_size() for k, v in zip(keys, stacked)}


def all_gather_object(obj):
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _attempt(fn):
    """``(failure, result, error)`` of ``fn()``: ``failure`` is None, or the sentence and exit code
    every process will raise; ``error`` the exception itself."""
    from mlsctl.errors import UserError, describe_environment_error, environment_exit_code

    try:
        return None, fn(), None
    except UserError as exc:
        return (exc.message, exc.exit_code), None, exc
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller, after the other processes know
        return (describe_environment_error(exc) or f"process {rank()} failed ({type(exc).__name__}: {exc})",
                environment_exit_code(exc)), None, exc


def on_main(fn):
    """``fn()`` on process 0 only; every process gets its result (which must pickle). When it fails,
    every process raises — process 0 its own exception, the others a :class:`~mlsctl.errors.UserError`
    with its sentence and exit code — so none is left waiting at the next collective."""
    from mlsctl.errors import UserError

    if not is_distributed():
        return fn()
    failure, result, error = _attempt(fn) if rank() == 0 else (None, None, None)
    sent = [(failure, result)]
    # one copy to each process (a listing of 1.28 M images is ~50 MB), host to host (not through the GPUs),
    # in a group whose timeout outlasts what process 0 may do alone meanwhile
    dist.broadcast_object_list(sent, src=0, group=_main_group())
    failure, result = sent[0]
    if failure is not None:
        if rank() == 0:
            raise error
        raise UserError(failure[0], failure[1])
    return result


def on_every(fn) -> None:
    """``fn()`` on every process, each its own share of a job; when one fails, every process raises —
    a failed one its own exception, the others a :class:`~mlsctl.errors.UserError` with the first
    failed process's sentence and exit code — so none is left waiting at the next collective."""
    from mlsctl.errors import UserError

    if not is_distributed():
        fn()
        return
    failure, _, error = _attempt(fn)
    failures = [f for f in all_gather_object(failure) if f is not None]
    if failures:
        if error is not None:
            raise error
        raise UserError(failures[0][0], failures[0][1])


def init_from_environment() -> None:
    """Join the process group a launcher (``accelerate launch``, torchrun) described in the
    environment, for commands that need collectives but no Accelerator (embed, eval)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
