"""mlsctl.dist on several processes: host values (row counts, logged scalars) travel through a gloo
group even when the default group is NCCL, which refuses CPU tensors and makes a count sent as a
CUDA tensor a device synchronisation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from mlsctl import dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    real_all_gather, real_all_reduce = torch_dist.all_gather, torch_dist.all_reduce

    def all_gather(out, tensor, group=None, **kwargs):
        calls.append(("all_gather", tuple(tensor.shape), group is None))
        return real_all_gather(out, tensor, group=group, **kwargs)

    def all_reduce(tensor, group=None, **kwargs):
        calls.append(("all_reduce", tuple(tensor.shape), group is None))
        return real_all_reduce(tensor, group=group, **kwargs)

    # the default group of a multi-GPU run, as the helpers see it
    dist.dist.get_backend = lambda group=None: "nccl" if group is None else "gloo"
    dist.dist.all_gather, dist.dist.all_reduce = all_gather, all_reduce
    host = dist.host_group()
    assert host is not None and dist.host_group() is host  # made once
    rows = torch.arange(2 * (3 + rank), dtype=torch.float32).reshape(3 + rank, 2) + 100 * rank
    gathered = dist.gather_cat(rows)
    flags = dist.gather_cat(torch.tensor([True, False][: 1 + rank]))
    mean = dist.mean_over_processes({"loss": float(rank + 1), "acc": 0.5 * rank})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "gathered": gathered.tolist(), "flags": flags.tolist(), "mean": mean, "calls": calls}))
    torch_dist.barrier(group=host)
    # what every command does last: without it, the interpreter's exit with live gloo groups aborted a process now
    # and then inside gloo ("terminate called without an active exception"); mp.spawn's join fails on that exit
    dist.close()
    assert not torch_dist.is_initialized() and dist.host_group.__globals__["_HOST_GROUP"] == (None, None)


def test_counts_and_logged_scalars_travel_on_the_host_when_the_default_group_is_nccl(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = torch.cat([torch.arange(2 * (3 + r), dtype=torch.float32).reshape(3 + r, 2) + 100 * r
                          for r in range(2)]).tolist()
    for result in results:
        assert result["gathered"] == expected
        assert result["flags"] == [True, True, False]
        assert result["mean"] == {"loss": 1.5, "acc": 0.25}
        # on the default (NCCL) group only the rows themselves, padded to the longest; counts (shape 1) and the
        # scalars on the host group
        on_default = [call for call in result["calls"] if call[2]]
        assert on_default == [["all_gather", [4, 2], True], ["all_gather", [2], True]], result["calls"]
        assert [call for call in result["calls"] if not call[2]] == [
            ["all_gather", [1], False], ["all_gather", [1], False], ["all_reduce", [2], False]]


def _failing_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from mlsctl import dist
    from mlsctl.errors import UserError

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    outcomes = {}

    def share() -> None:  # process 1's share fails, process 0's does not
        if rank == 1:
            raise UserError("shard 1 could not be written", exit_code=1)

    def on_zero() -> int:
        raise OSError(28, "No space left on device")

    for name, call in (("on_every", lambda: dist.on_every(share)), ("on_main", lambda: dist.on_main(on_zero))):
        try:
            call()
            outcomes[name] = "returned"
        except UserError as exc:
            outcomes[name] = [type(exc).__name__, exc.message, exc.exit_code]
        except OSError as exc:
            outcomes[name] = [type(exc).__name__, str(exc)]
    outcomes["after"] = dist.all_gather_object(rank)  # nobody was left waiting at a collective
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.close()


def test_a_failure_in_one_process_is_raised_by_every_process(tmp_path: Path):
    """on_every (each process writes its share of embed's shards) and on_main: the failed process
    raises its own error, the others its sentence, and none waits for ever at the next collective."""
    mp.spawn(_failing_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero["on_every"] == one["on_every"] == ["UserError", "shard 1 could not be written", 1]
    assert zero["on_main"] == ["OSError", "[Errno 28] No space left on device"]
    assert one["on_main"][0] == "UserError" and one["on_main"][2] == 1 and "space" in one["on_main"][1]
    assert zero["after"] == one["after"] == [0, 1]


def _listing_worker(rank: int, world: int, init_file: str, out_dir: str, root: str) -> None:
    from mlsctl import dist
    from mlsctl.data import images
    from mlsctl.data.images import ImageFolder
    from mlsctl.methods.refine.method import FeatureData

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 1:  # the training loop lists data.root on process 0 only: process 1 must never walk it
        images.scan_images = lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("process 1 listed"))
    folder = dist.on_main(lambda: ImageFolder(Path(root) / "images", "data.root", max_pixels=123_456_789))
    features = dist.on_main(lambda: FeatureData(str(Path(root) / "features")))
    from PIL import Image

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "relpaths": folder.relpaths(), "pixels": Image.MAX_IMAGE_PIXELS, "size": folder.load(1).size,
        "features": [len(features), features.relpaths()]}))
    dist.close()


def test_the_training_data_is_listed_by_process_0_and_sent_to_the_others(tmp_path: Path):
    """Every process used to walk data.root itself (1.28 M stats each, W walks of an NFS folder at
    once, and lists that differ when files come and go during the walks); process 0 lists it and the
    others get its listing, with Pillow's limit set, and a feature folder travels as its path."""
    import numpy as np
    from PIL import Image

    from conftest import write_feature_folder

    for i, name in enumerate(["b/2.png", "a/1.png", "a/3.jpg"]):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 4 + i, 3), 40 * i, np.uint8)).save(tmp_path / "images" / name)
    write_feature_folder(tmp_path / "features", ["x/0.png", "y/1.png"], torch.randn(2, 4))
    mp.spawn(_listing_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero == one and zero["relpaths"] == ["a/1.png", "a/3.jpg", "b/2.png"] and zero["size"] == [6, 8]
    assert zero["pixels"] == 123_456_789 and zero["features"] == [2, ["x/0.png", "y/1.png"]]


def _slow_main_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime
    import time

    from mlsctl import dist

    # the default group times out after 2 s; process 0 then works alone for 4 (a listing on NFS, a
    # neighbour search: hours at scale, past a group's default 30 minutes)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=2))
    result = dist.on_main(lambda: time.sleep(4) or "listed")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.close()


def test_the_others_wait_for_process_0_longer_than_a_group_timeout(tmp_path: Path):
    """A review (2026-12-06): the others waited for on_main's result in a group with the default
    timeout, so a search of hours on process 0 killed them after 30 minutes. on_main's group waits
    a day (a process that dies closes its connections, so a dead one is not waited for)."""
    mp.spawn(_slow_main_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == ["listed", "listed"]
