"""The memory bank's semantics: FIFO order, odd sizes, payloads, no self-retrieval, persistence,
and identical banks on every process."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st

from mlsctl.bank import Column, MemoryBank, load_banks, save_banks


def rows(start: int, n: int, dim: int = 3) -> torch.Tensor:
    """Row i holds the value start+i in every coordinate, so contents are easy to read back."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def contents(bank: MemoryBank) -> list[int]:
    return bank.vectors[bank.order(), 0].long().tolist()


def test_fifo_order_with_a_size_that_is_not_a_multiple_of_the_batch():
    bank = MemoryBank(10, 3)
    written = 0
    for step in range(5):  # 5 batches of 3 into 10 slots: wraps in the middle of a batch
        bank.enqueue(rows(written, 3), step=step)
        written += 3
    assert bank.is_full and bank.n_written == 15
    assert contents(bank) == list(range(5, 15))  # the newest 10, oldest first
    assert bank.ptr == 5


def test_partial_fill_and_ages():
    bank = MemoryBank(8, 3)
    bank.enqueue(rows(0, 3), step=10)
    bank.enqueue(rows(3, 2), step=12)
    assert bank.filled == 5 and not bank.is_full and bank.fill == pytest.approx(5 / 8)
    assert contents(bank) == [0, 1, 2, 3, 4]
    assert bank.ages(step=15).tolist() == [5, 5, 5, 3, 3]


def test_ages_after_wrap_around():
    bank = MemoryBank(4, 3)
    for step in range(6):  # one entry per step: steps 2..5 remain
        bank.enqueue(rows(step, 1), step=step)
    assert bank.ages(step=6).tolist() == [4, 3, 2, 1]


def test_batch_larger_than_the_bank_keeps_its_newest_rows():
    bank = MemoryBank(4, 3)
    bank.enqueue(rows(0, 2), step=0)
    bank.enqueue(rows(100, 7), step=1)
    assert contents(bank) == [103, 104, 105, 106]
    bank.enqueue(rows(200, 1), step=2)
    assert contents(bank) == [104, 105, 106, 200]


def test_payload_columns_travel_with_their_vectors():
    bank = MemoryBank(5, 3, {"image_id": Column(), "box": Column((4,), torch.float32)})
    for step in range(3):
        ids = torch.arange(step * 2, step * 2 + 2)
        bank.enqueue(rows(step * 2, 2), step=step, image_id=ids, box=ids[:, None].float().repeat(1, 4))
    order = bank.order()
    assert bank.payload["image_id"][order].tolist() == contents(bank) == [1, 2, 3, 4, 5]
    assert bank.payload["box"][order][:, 2].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert bank.payload["step"][order].tolist() == [0, 1, 1, 2, 2]


def test_payload_mistakes_are_refused():
    bank = MemoryBank(5, 3, {"image_id": Column()})
    with pytest.raises(ValueError, match="missing \\['image_id'\\]"):
        bank.enqueue(rows(0, 2), step=0)
    with pytest.raises(ValueError, match="shape"):
        bank.enqueue(rows(0, 2), step=0, image_id=torch.arange(3))
    with pytest.raises(ValueError, match="vectors of shape"):
        bank.enqueue(torch.zeros(2, 4), step=0, image_id=torch.arange(2))


def test_query_matches_brute_force_and_skips_empty_slots():
    torch.manual_seed(0)
    bank = MemoryBank(50, 8)
    data = torch.randn(30, 8)
    bank.enqueue(data, step=0)
    queries = torch.randn(6, 8)
    scores, slots = bank.query(queries, k=5)
    reference = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(data, dim=1).T
    top = reference.topk(5, dim=1)
    assert torch.equal(slots, top.indices)
    assert torch.allclose(scores, top.values, atol=1e-6)
    _, all_slots = bank.query(queries, k=100)  # more than valid: clipped to the 30 written
    assert all_slots.shape == (6, 30) and int(all_slots.max()) < 30


def test_a_query_never_sees_its_own_batch():
    bank = MemoryBank(16, 4)
    older = torch.randn(8, 4)
    bank.enqueue(older, step=0)
    batch = torch.randn(4, 4)
    bank.enqueue(batch, step=1)  # even when the batch was enqueued before the query...
    _, slots = bank.query(batch, k=12, exclude_step=1)  # ...it is excluded
    assert set(slots.flatten().tolist()) <= set(range(8))
    _, with_self = bank.query(batch, k=1)
    assert (with_self.squeeze(1) >= 8).all()  # without the exclusion each query would find itself


def test_query_on_an_empty_bank_fails_clearly():
    with pytest.raises(RuntimeError, match="no valid entries"):
        MemoryBank(4, 2).query(torch.randn(1, 2), k=1)


def test_random_unit_init_is_full_seeded_and_ageless():
    a = MemoryBank(6, 4, init="random_unit", generator=torch.Generator().manual_seed(1))
    b = MemoryBank(6, 4, init="random_unit", generator=torch.Generator().manual_seed(1))
    assert a.is_full and torch.equal(a.vectors, b.vectors)
    assert torch.allclose(a.vectors.norm(dim=1), torch.ones(6))
    assert a.ages(step=3).tolist() == [-1] * 6


def test_state_survives_save_and_load(tmp_path: Path):
    bank = MemoryBank(7, 3, {"image_id": Column(), "box": Column((4,), torch.float32)})
    for step in range(4):
        bank.enqueue(rows(step * 3, 3), step=step, image_id=torch.arange(3) + step, box=torch.rand(3, 4))
    other = MemoryBank(5, 2, init="random_unit", generator=torch.Generator().manual_seed(0))
    save_banks({"objects": bank, "memory": other}, tmp_path / "banks.safetensors")
    loaded = load_banks(tmp_path / "banks.safetensors")
    assert set(loaded) == {"objects", "memory"}
    again = loaded["objects"]
    assert again.ptr == bank.ptr and again.n_written == bank.n_written and again.filled == bank.filled
    assert torch.equal(again.vectors, bank.vectors)
    for name in bank.payload:
        assert torch.equal(again.payload[name], bank.payload[name])
    assert loaded["memory"].is_full and torch.equal(loaded["memory"].vectors, other.vectors)
    # and it continues exactly as the original would
    bank.enqueue(rows(50, 2), step=9, image_id=torch.arange(2), box=torch.zeros(2, 4))
    again.enqueue(rows(50, 2), step=9, image_id=torch.arange(2), box=torch.zeros(2, 4))
    assert contents(bank) == contents(again)


def test_loading_a_state_of_another_shape_is_refused():
    saved = MemoryBank(4, 3).state_dict()
    with pytest.raises(ValueError, match="shape differs"):
        MemoryBank(5, 3).load_state_dict(saved)


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 17), batches=st.lists(st.integers(0, 23), min_size=1, max_size=12))
def test_bank_behaves_like_a_bounded_deque(size, batches):
    bank = MemoryBank(size, 2)
    model: collections.deque = collections.deque(maxlen=size)
    counter = 0
    for step, n in enumerate(batches):
        if n == 0:
            continue
        bank.enqueue(rows(counter, n, dim=2), step=step)
        model.extend(range(counter, counter + n))
        counter += n
    assert contents(bank) == list(model)
    assert bank.filled == len(model)


# ---------------------------------------------------------------------------------------- 2 processes


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    bank = MemoryBank(11, 4, {"image_id": Column()})
    for step in range(4):
        local = torch.full((3 + rank, 4), float(10 * step + rank))  # ranks hold different batch sizes
        bank.enqueue(local, step=step, image_id=torch.full((3 + rank,), rank))
    bank.assert_synchronized("test")
    save_banks({"b": bank}, Path(out_dir) / f"rank{rank}.safetensors")
    dist.destroy_process_group()


def test_two_processes_hold_identical_banks_equal_to_one_process(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    b0 = load_banks(tmp_path / "rank0.safetensors")["b"]
    b1 = load_banks(tmp_path / "rank1.safetensors")["b"]
    assert torch.equal(b0.vectors, b1.vectors) and b0.ptr == b1.ptr
    assert torch.equal(b0.payload["image_id"], b1.payload["image_id"])
    single = MemoryBank(11, 4, {"image_id": Column()})
    for step in range(4):  # what one process writes when it holds both ranks' batches, in rank order
        batch = torch.cat([torch.full((3 + r, 4), float(10 * step + r)) for r in range(2)])
        single.enqueue(batch, step=step, image_id=torch.cat([torch.full((3 + r,), r) for r in range(2)]))
    assert torch.equal(single.vectors, b0.vectors)
    assert torch.equal(single.payload["image_id"], b0.payload["image_id"])


def test_the_checksum_sees_rows_swapped_between_slots_and_values_moved_within_a_row():
    """A test review (2026-12-05): the fingerprint that `assert_synchronized` compares summed the vectors
    and payload, blind to two slots swapped; rows swapped between slots, a payload swapped alone and values
    moved within a row now change it (a fingerprint: contrived pairs can still collide)."""
    def bank_with(rows, ids):
        bank = MemoryBank(4, 3, {"image_id": Column()})
        bank.enqueue(torch.tensor(rows, dtype=torch.float32), step=0, gather=False,
                     image_id=torch.tensor(ids))
        return bank

    rows, ids = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], [0, 1, 2]
    reference = bank_with(rows, ids).checksum()
    assert torch.equal(bank_with(rows, ids).checksum(), reference)
    different = [bank_with([rows[1], rows[0], rows[2]], [1, 0, 2]),  # two slots swapped, payload with them
                 bank_with(rows, [1, 0, 2]),  # only the payload swapped
                 bank_with([[3.0, 2.0, 1.0], rows[1], rows[2]], ids)]  # values moved within a row
    for bank in different:
        assert not torch.equal(bank.checksum(), reference)


def _differing_worker(rank: int, world: int, init_file: str, swap: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bank = MemoryBank(4, 2, {"image_id": Column()})
    rows, ids = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 1])
    if rank == 1:  # the same rows in other slots, or other rows
        rows, ids = (rows.flip(0), ids.flip(0)) if swap else (rows + 1, ids)
    bank.enqueue(rows, step=0, gather=False, image_id=ids)
    try:
        bank.assert_synchronized("test")
    except RuntimeError as exc:
        assert "differs between processes" in str(exc)
        return
    finally:
        dist.destroy_process_group()
    raise AssertionError(f"rank {rank}: banks that differ passed the check")


@pytest.mark.parametrize("swap", [False, True], ids=["other-rows", "swapped-slots"])
def test_processes_holding_different_banks_are_caught(tmp_path: Path, swap: bool):
    mp.spawn(_differing_worker, args=(2, str(tmp_path / "init"), swap), nprocs=2, join=True)


def test_written_counts_only_slots_written_by_training_and_survives_save_load_resume(tmp_path: Path):
    queue = MemoryBank(64, 4, {"image_id": Column()}, init="random_unit", generator=torch.Generator().manual_seed(0))
    assert queue.is_full and queue.filled == 64  # the random start is valid for queries...
    assert queue.written == 0 and queue.fill == 0.0  # ...but training wrote nothing yet
    for step in range(3):  # 3 batches of 16: 48 writes
        queue.enqueue(rows(16 * step, 16, dim=4), step=step, image_id=torch.arange(16))
    assert (queue.written, queue.fill, queue.n_written) == (48, 48 / 64, 48)
    assert queue.vectors[queue.written_order(), 0].long().tolist() == list(range(48))  # oldest first, no random entry
    save_banks({"q": queue}, tmp_path / "banks.safetensors")
    resumed = load_banks(tmp_path / "banks.safetensors")["q"]
    assert resumed.written == 48 and resumed.prefilled
    for bank in (queue, resumed):  # resume continues the count exactly as the original run does
        bank.enqueue(rows(100, 20, dim=4), step=3, image_id=torch.arange(20))
    assert queue.written == resumed.written == 64 and queue.fill == 1.0
    assert torch.equal(queue.written_order(), resumed.written_order())


def test_written_is_read_from_checkpoints_of_the_first_bank_format(tmp_path: Path):
    """The tensors exactly as the first bank format saved them (no count of written slots): the
    count comes from the step column, which has always been saved."""
    from safetensors.torch import save_file

    vectors = torch.nn.functional.normalize(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    steps = torch.tensor([4, 4, 5, -1, -1, -1, -1, -1])  # 3 slots written over a random start
    save_file({"m/vectors": vectors, "m/ptr": torch.tensor(3), "m/n_written": torch.tensor(3),
               "m/prefilled": torch.tensor(1), "m/payload.step": steps}, str(tmp_path / "old.safetensors"),
              metadata={"format_version": "1", "banks": "m", "query_features": "{}"})
    old = load_banks(tmp_path / "old.safetensors")["m"]
    assert (old.filled, old.written, old.fill) == (8, 3, 3 / 8)


def test_enqueue_refuses_a_negative_step():
    with pytest.raises(ValueError, match="step >= 0"):
        MemoryBank(4, 3).enqueue(rows(0, 1), step=-1)


def test_what_a_bank_cannot_store_faithfully_is_refused_and_nothing_held_is_lost():
    """An API probe (2026-12-05): an fp16 bank took 70,000 (finite in fp32) as inf and then could not be loaded;
    to(torch.float16) rounded image id 2049 to 2048; a float box in a long column was truncated; a failed
    release() dropped the rows it held."""
    from mlsctl.bank import NonFiniteVectors

    half = MemoryBank(4, 2, dtype=torch.float16)
    with pytest.raises(NonFiniteVectors):
        half.enqueue(torch.tensor([[70000.0, 1.0]]), step=0)
    assert half.filled == 0
    bank = MemoryBank(4, 2, {"image_id": Column()})
    with pytest.raises(TypeError, match="takes a device, not the dtype"):
        bank.to(torch.float16)
    with pytest.raises(ValueError, match="payload 'image_id' is a torch.int64 column and got torch.float32 values"):
        bank.enqueue(torch.ones(1, 2), step=0, image_id=torch.tensor([0.4]))
    bank.hold()
    bank.enqueue(torch.ones(1, 2), step=2, image_id=torch.tensor([4]))
    bank.enqueue(torch.ones(1, 2), step=3, image_id=torch.tensor([5]))
    with pytest.raises(RuntimeError, match="held writes of different steps"):
        bank.release()
    assert bank._held is not None and len(bank._held) == 2 and bank.filled == 0
    with pytest.raises(ValueError, match=r"query expects queries of shape \[n, 2\], got \[1, 3\]"):
        bank.query(torch.ones(1, 3), 1)


def test_load_and_save_banks_name_the_file_and_the_mistake(tmp_path):
    """An API probe (2026-12-05): a missing file was 'it is not a complete safetensors file (No such
    file ...)', a weights file 'its banks are not complete', and save_banks(bank) an AttributeError."""
    from safetensors.torch import save_file

    from mlsctl.bank import load_banks, save_banks

    with pytest.raises(FileNotFoundError, match=r"nope.safetensors does not exist; give a banks file"):
        load_banks(tmp_path / "nope.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"weights.safetensors: its banks are not complete"):
        load_banks(tmp_path / "weights.safetensors")
    with pytest.raises(TypeError, match=r"save_banks takes the banks by name, such as \{'cls': bank\}"):
        save_banks(MemoryBank(4, 2), tmp_path / "b.safetensors")
