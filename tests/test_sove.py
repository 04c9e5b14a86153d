"""SOVE: judges and soft labels, the vote distribution, masking, the method's gradients, its
memories (resume, two processes, `mlsctl bank`) and its recipe checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mlsctl import config
from mlsctl.data.masking import block_mask
from mlsctl.methods.sove import SOVE
from mlsctl.methods.sove.ops import (cls_loss, judge_overlap, judge_probabilities, nearest_supports, patch_loss,
                                     sample_judges, soft_labels)
from mlsctl.schedules import Schedule

from conftest import REPO, as_killed_at, cli, cli_ok, make_images, tiny_recipe, write_recipe

SOVE_METHOD = {"name": "sove", "hidden_dim": 64, "bottleneck_dim": 32, "class_memory_size": 64, "patch_memory_size": 32,
               "cls_anchors": 6, "cls_supports": 3, "cls_tasks": 2, "patch_anchors": 4, "warmup_teacher_temp_epochs": 0}


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ------------------------------------------------------------------ judges and soft labels


def test_soft_labels_rows_sum_to_one_and_carry_their_score_on_their_own_concept():
    scores = torch.tensor([[0.9, 0.7, 0.2], [0.9, 0.5, 0.0], [0.9, 1.0, 0.3]])  # K=3 concepts, k=2
    y = soft_labels(scores)
    assert y.shape == (9, 3)
    assert torch.allclose(y.sum(1), torch.ones(9))
    owner = torch.arange(3).repeat_interleave(3)
    assert torch.equal(y[torch.arange(9), owner], scores.reshape(-1))
    assert y[1, 1] == pytest.approx((1 - 0.7) / 2) and y[5, 0] == pytest.approx((1 - 0.0) / 2)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), k_anchors=st.integers(2, 7), k=st.integers(0, 4), temperature=st.floats(0.03, 1.0),
       seed=st.integers(0, 10_000))
def test_votes_equal_the_dense_product_and_are_distributions(b, k_anchors, k, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(k_anchors, k + 1, 8, generator=g), dim=-1)
    scores = torch.cat([torch.full((k_anchors, 1), 0.9), torch.rand(k_anchors, k, generator=g)], 1)
    u = F.normalize(torch.randn(b, 8, generator=g), dim=-1)
    p = judge_probabilities(u, vectors, scores, temperature)
    dense = torch.softmax(u @ vectors.reshape(-1, 8).T / temperature, -1) @ soft_labels(scores)
    assert torch.allclose(p, dense, atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(b), atol=1e-5) and (p >= -1e-7).all()


def test_one_judge_and_eps_to_zero_is_a_softmax_over_the_anchors():
    memory = unit(40, 16)
    judges = sample_judges(memory, 1, 8, 0, eps=0.0, generator=torch.Generator().manual_seed(0))
    u = unit(5, 16, seed=1)
    p = judge_probabilities(u, judges.vectors[0], judges.scores[0], 0.1)
    anchors = memory[judges.slots[0, :, 0]]
    assert torch.allclose(p, torch.softmax(u @ anchors.T / 0.1, -1), atol=1e-6)


def test_identical_memory_entries_give_uniform_votes():
    memory = F.normalize(torch.ones(50, 16), dim=1)
    judges = sample_judges(memory, 2, 5, 3, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(judges.scores[..., 1:], torch.ones(2, 5, 3))  # cos 1 with every entry
    for t in range(2):
        p = judge_probabilities(unit(4, 16), judges.vectors[t], judges.scores[t], 0.1)
        assert torch.allclose(p, torch.full((4, 5), 0.2), atol=1e-6)


def test_supports_are_the_nearest_entries_outside_the_tasks_anchors():
    memory = unit(300, 12)
    judges = sample_judges(memory, 3, 10, 4, eps=0.1, generator=torch.Generator().manual_seed(3), chunk=7)
    for t in range(3):
        anchors = judges.slots[t, :, 0]
        pool = torch.ones(300, dtype=torch.bool)
        pool[anchors] = False
        sims = memory[anchors] @ memory.T
        sims[:, ~pool] = -float("inf")
        top = sims.topk(4, dim=1)
        assert torch.equal(judges.slots[t, :, 1:], top.indices)
        assert torch.allclose(judges.scores[t, :, 1:], top.values.clamp(0, 1))
        assert not bool(torch.isin(judges.slots[t, :, 1:], anchors).any())
    assert torch.allclose(judges.scores[..., 0], torch.full((3, 10), 0.9))
    assert torch.equal(judges.vectors, memory[judges.slots])


def test_negative_cosines_are_clamped_so_labels_stay_distributions():
    memory = torch.cat([torch.eye(4), -torch.eye(4)])  # every other entry is opposite or orthogonal
    judges = sample_judges(memory, 1, 2, 5, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert (judges.scores >= 0).all()
    assert (soft_labels(judges.scores[0]) >= 0).all()


def test_tasks_draw_fresh_anchors_and_half_keeps_half():
    memory = unit(200, 8)
    judges = sample_judges(memory, 4, 20, 2, eps=0.1, generator=torch.Generator().manual_seed(0))
    anchor_sets = {tuple(sorted(judges.slots[t, :, 0].tolist())) for t in range(4)}
    assert len(anchor_sets) == 4
    half = sample_judges(memory, 2, 20, 2, eps=0.1, generator=torch.Generator().manual_seed(0), anchor_selection="half")
    assert half.vectors.shape == (2, 10, 3, 8)


def test_chunking_does_not_change_the_supports():
    memory = unit(500, 16)
    anchors = torch.stack([torch.randperm(500, generator=torch.Generator().manual_seed(s))[:40] for s in range(3)])
    full = nearest_supports(memory, anchors, 6, chunk=10_000)
    small = nearest_supports(memory, anchors, 6, chunk=13)
    assert torch.equal(full[1], small[1]) and torch.allclose(full[0], small[0], atol=1e-6)  # BLAS blocking rounds


def test_judge_overlap_counts_entries_shared_by_anchors():
    slots = torch.tensor([[0, 10, 11], [1, 11, 12], [2, 11, 13]])
    overlap = judge_overlap(slots)
    assert overlap["shared"] == 1 and overlap["distinct"] == 4 and overlap["max_anchors_per_entry"] == 3


# ------------------------------------------------------------------ the losses


def test_cls_loss_pairs_teacher_views_with_the_other_student_views():
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    s = [torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]]), torch.tensor([[0.2, 0.8]])]
    expected = (-np.log(0.9) - np.log(0.2) - np.log(0.5) - np.log(0.8)) / 4  # (t0,s1) (t0,s2) (t1,s0) (t1,s2)
    assert float(cls_loss(s, t)) == pytest.approx(expected, rel=1e-6)


def test_patch_loss_averages_masked_patches_per_view_then_over_views_with_any():
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.1, 0.9]])
    image_of = torch.tensor([0, 0, 2])  # view 1 has no masked patch: left out of the mean
    expected = ((-np.log(0.5) - np.log(0.25)) / 2 + -np.log(0.9)) / 2
    assert float(patch_loss(student, teacher, image_of, 3)) == pytest.approx(expected, rel=1e-6)
    assert float(patch_loss(student[:0], teacher[:0], image_of[:0], 3)) == 0.0


# ------------------------------------------------------------------ masking


@settings(max_examples=30, deadline=None)
@given(h=st.integers(2, 14), w=st.integers(2, 14), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 1000))
def test_block_masks_never_pass_their_budget(h, w, ratio, seed):
    mask = block_mask(h, w, ratio, np.random.default_rng(seed))
    assert mask.shape == (h, w) and mask.dtype == bool
    assert mask.sum() <= round(ratio * h * w)


def test_block_masks_reach_about_the_ratio_in_blocks():
    rng = np.random.default_rng(0)
    masks = np.stack([block_mask(14, 14, 0.3, rng) for _ in range(200)])
    assert 0.25 < masks.mean() <= round(0.3 * 196) / 196
    with pytest.raises(ValueError):
        block_mask(8, 8, 1.0, rng)


def test_the_mask_token_replaces_exactly_the_masked_patch_embeddings():
    from mlsctl.models.backbone import Backbone

    backbone = Backbone("vit_small_patch16_224", img_size=32, patch_size=8, mask_token=True,
                        timm_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}).eval()
    with torch.no_grad():
        backbone.mask_token.copy_(torch.randn(1, 32))
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 3, 0] = mask[1, 0, 0] = True
    seen = []
    handle = backbone.net.patch_drop.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    with torch.no_grad():
        backbone(x)
        backbone(x, mask=mask)
        embeddings = backbone.net.patch_embed(x).reshape(2, 16, 32)
    handle.remove()
    plain, masked = seen[0][:, 1:], seen[1][:, 1:]  # after the position embedding, CLS dropped
    where = mask.reshape(2, 16)
    assert torch.equal(plain[~where], masked[~where])
    assert torch.allclose((masked - plain)[where], backbone.mask_token - embeddings[where], atol=1e-6)
    assert torch.equal(seen[0][:, 0], seen[1][:, 0])


# ------------------------------------------------------------------ the method


def _sove(tmp_path, **method):
    from mlsctl.data.images import ImageFolder

    images = make_images(tmp_path / "images", 8, size=(32, 32))
    raw = tiny_recipe(images, data__local_crops={"count": 2, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = {**SOVE_METHOD, **method}
    recipe = config.from_dict(raw)
    method_ = SOVE(recipe, Schedule(steps_per_epoch=2, epochs=2))
    dataset, collate = SOVE.build_dataset(recipe, ImageFolder(str(images), "data.root"))
    return method_, dataset.on_device(collate([dataset[(0, i)] for i in range(4)]))


def test_every_student_parameter_gets_a_gradient_and_the_teacher_none(tmp_path):
    method, batch = _sove(tmp_path)
    assert batch.masks.shape == (4, 2, 4, 4) and batch.masks.any()
    out = method.training_step(batch, 0)
    assert set(out.terms) == {"cls", "patch"} and float(out.terms["patch"]) > 0
    assert {"time/judges", "time/votes", "time/memory"} <= set(out.metrics)
    out.loss.backward()
    for name, p in method.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


def test_without_masked_patches_the_patch_loss_is_zero_and_the_mask_token_idle(tmp_path):
    method, batch = _sove(tmp_path, mask_ratio=0.0)
    assert not batch.masks.any()
    out = method.training_step(batch, 0)
    assert float(out.terms["patch"]) == 0.0
    out.loss.backward()
    assert method.student.backbone.mask_token.grad is None or not method.student.backbone.mask_token.grad.any()


def test_the_patch_loss_can_be_switched_off_and_then_nothing_is_masked(tmp_path):
    method, batch = _sove(tmp_path, patch_loss=False)
    assert batch.masks.any()
    out = method.training_step(batch, 0)
    assert set(out.terms) == {"cls"} and float(out.loss.detach()) == pytest.approx(float(out.terms["cls"]))
    out.loss.backward()
    token = method.student.backbone.mask_token.grad
    assert token is None or not token.any()  # CLS-only SOVE trains on unmasked views


def test_votes_stay_float32_under_autocast():
    judges = sample_judges(unit(64, 16), 1, 4, 2, eps=0.1, generator=torch.Generator().manual_seed(0))
    u = unit(3, 16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = judge_probabilities(u, judges.vectors[0], judges.scores[0], 0.04)
        low = sample_judges(unit(64, 16), 1, 4, 2, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert p.dtype == torch.float32 and low.scores.dtype == torch.float32
    assert torch.equal(p, judge_probabilities(u, judges.vectors[0], judges.scores[0], 0.04))
    assert torch.equal(low.slots, judges.slots)


def test_memories_take_view_two_of_the_teacher(tmp_path):
    method, batch = _sove(tmp_path)
    before = method.class_memory.vectors.clone()
    method.training_step(batch, 0)
    with torch.no_grad():
        expected = method.teacher.head(method.teacher.backbone(batch.crops[1]).cls)
    assert torch.allclose(method.class_memory.vectors[:4], expected, atol=1e-5)
    assert torch.equal(method.class_memory.vectors[4:], before[4:])
    assert torch.equal(method.class_memory.payload["box"][:4], batch.boxes[:, 1].float())
    region = method.patch_memory.payload["region"][:4]
    box = batch.boxes[:, 1].float()
    assert (region[:, :2] >= box[:, :2] - 1e-4).all() and (region[:, 2:] <= box[:, 2:] + 1e-4).all()
    assert torch.allclose(method.patch_memory.vectors[:4].norm(dim=1), torch.ones(4), atol=1e-5)


# ------------------------------------------------------------------ runs: resume, banks, recipes


@pytest.fixture(scope="session")
def sove_run(tmp_path_factory):
    from mlsctl.train import pretrain

    tmp = tmp_path_factory.mktemp("sove")
    images = make_images(tmp / "images", 12, size=(32, 32))
    raw = tiny_recipe(images, data__local_crops={"count": 2, "size": 16, "scale": [0.1, 0.4]}, optim__epochs=3,
                      optim__batch_size=4)
    raw["method"] = dict(SOVE_METHOD)
    raw["train"].update(checkpoint_every=3, keep_checkpoints=5, log_every=1)
    path = write_recipe(tmp / "sove.yaml", raw)
    pretrain(config.load_recipe(str(path)), tmp / "run", recipe_source=str(path))
    return tmp / "run", path


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(sove_run, tmp_path):
    """The state a kill leaves (the checkpoint at step 3, later files gone), resumed: the same
    losses, teacher and memories as the run that never stopped."""
    from safetensors.torch import load_file

    from mlsctl.bank import load_banks
    from mlsctl.runs import Run
    from mlsctl.train import pretrain

    run_dir, recipe_path = sove_run
    copy = as_killed_at(run_dir, tmp_path / "killed", 3)
    pretrain(config.load_recipe(str(recipe_path)), copy, resume=True, recipe_source=str(recipe_path))

    def losses(folder):
        return [(r["step"], r["loss"], r["loss/cls"], r["loss/patch"])
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(copy) == losses(run_dir) and len(losses(run_dir)) == 9
    a, b = load_file(str(copy / "teacher.safetensors")), load_file(str(run_dir / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    banks_a, banks_b = load_banks(Run(copy).latest().banks_path), load_banks(Run(run_dir).latest().banks_path)
    for name in ("E_C", "E_P"):
        assert torch.equal(banks_a[name].vectors, banks_b[name].vectors)
        assert banks_a[name].n_written == banks_b[name].n_written == 36


def test_metrics_log_both_terms_and_sove_s_share_of_the_step(sove_run):
    run_dir, _ = sove_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert all({"loss/cls", "loss/patch", "time/judges", "time/method_share"} <= set(r) for r in logged)
    assert all(0 < r["time/method_share"] < 1 for r in logged)


def test_bank_commands_show_both_memories_and_the_judge_overlap(sove_run, tmp_path, capsys):
    run_dir, _ = sove_run
    out, _ = cli_ok(capsys, "bank", "inspect", str(run_dir))
    assert "E_C" in out and "E_P" in out and "judge overlap" in out and "support >1 anchor" in out
    out, _ = cli_ok(capsys, "bank", "inspect", str(run_dir), "--json")
    report = json.loads(out)
    assert report["banks"]["E_C"]["method"]["judge_overlap"]["supports"] == 6 * 3
    query = next(iter(sorted((run_dir.parent / "images").rglob("*.png"))))
    for bank in ("E_C", "E_P"):
        out, _ = cli_ok(capsys, "bank", "neighbors", str(run_dir), "--bank", bank, "--query", str(query), "-k", "3",
                        "--out", str(tmp_path / f"{bank}.png"), "--json")
        found = json.loads(out[out.index("{"):])["neighbours"]
        assert len(found) == 3 and (tmp_path / f"{bank}.png").is_file()
    cli_ok(capsys, "bank", "export", str(run_dir), "--out", str(tmp_path / "banks.safetensors"))


@pytest.mark.parametrize("override, words", [
    ("method.class_memory_size=8", "cannot hold 6 anchors and a pool of k=3 supports"),
    ("method.cls_supports=64", "k=64 must be smaller than the memory"),
    ("method.mask_ratio=1.0", "mask_ratio' must be < 1.0"),
    ("model.arch=resnet18", "needs a Vision Transformer"),  # a CNN: no patch tokens to mask
])
def test_bad_settings_are_one_sentence_before_training(tmp_path, capsys, override, words):
    images = make_images(tmp_path / "images", 4, size=(32, 32))
    raw = tiny_recipe(images)
    raw["method"] = dict(SOVE_METHOD)
    path = write_recipe(tmp_path / "r.yaml", raw)
    code, _, err = cli("pretrain", str(path), override, "--out", str(tmp_path / "run"), capsys=capsys)
    assert code != 0 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_judges_may_share_memory_entries_as_in_the_paper(tmp_path):
    """A memory entry may belong to several pseudo-classes (the paper's section 2.2.1): K(k+1) judges may
    outnumber the memory, as the paper's own K = 8,192, k = 8 on 65,536 entries do; only the K anchors and
    a pool of k supports beside them must fit."""
    raw = tiny_recipe(tmp_path)
    raw["method"] = {**SOVE_METHOD, "class_memory_size": 64, "cls_anchors": 24, "cls_supports": 3}  # 96 judges
    assert not SOVE.check_recipe(config.from_dict(raw))
    raw["method"]["cls_anchors"] = 62  # 62 anchors leave a pool of 2 for k = 3
    assert [key for key, _ in SOVE.check_recipe(config.from_dict(raw))] == ["method.class_memory_size"]
    paper = config.load_recipe(REPO / "recipes" / "sove_in1k.yaml", ["method.cls_anchors=8192"])
    assert not SOVE.check_recipe(paper)
    judges = sample_judges(unit(64, 8), 1, 24, 3, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert judges.slots.shape == (1, 24, 4) and judges.slots.unique().numel() < 96


def test_half_selection_halves_the_cls_anchors_only_as_the_authors_code_does(tmp_path):
    method, _ = _sove(tmp_path, anchor_selection="half")
    cfg = method.cfg
    cls_judges = method._judges(method.class_memory, "cls", 0, 0)
    patch_judges = method._judges(method.patch_memory, "patch", 0, 1)
    assert cls_judges.n_concepts == cfg.cls_anchors // 2
    assert patch_judges.n_concepts == cfg.patch_anchors  # 512 of 512 on the authors' identical check


def test_shipped_recipes_validate(tmp_path):
    from mlsctl.methods import method_class

    root = Path(__file__).resolve().parent.parent / "recipes"
    for name in ("sove_in1k.yaml", "sove_fmnist_quick.yaml"):
        recipe = config.load_recipe(str(root / name), [f"data.root={tmp_path}"])
        assert recipe.method.name == "sove" and not method_class("sove").check_recipe(recipe)
    paper = config.load_recipe(str(root / "sove_in1k.yaml"), [f"data.root={tmp_path}"]).method
    assert (paper.class_memory_size, paper.patch_memory_size, paper.cls_anchors, paper.cls_supports,
            paper.cls_tasks, paper.patch_anchors, paper.patch_supports) == (65536, 8192, 4096, 8, 4, 512, 0)


@pytest.mark.slow
def test_a_two_process_run_holds_identical_memories(tmp_path):
    from conftest import pretrain_on_two_processes_and_one
    from mlsctl.bank import load_banks
    from mlsctl.runs import Run

    images = make_images(tmp_path / "images", 8, size=(32, 32))
    raw = tiny_recipe(images, data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]}, optim__epochs=2,
                      optim__batch_size=2)
    raw["method"] = {**SOVE_METHOD, "class_memory_size": 24, "patch_memory_size": 12, "cls_anchors": 4,
                     "cls_supports": 2, "patch_anchors": 3}
    runs = pretrain_on_two_processes_and_one(tmp_path, raw, 2)  # 2 processes of batch 2 against 1 of batch 4
    assert "memory banks identical on all 2 processes" in (runs[2] / "train.log").read_text()
    banks = load_banks(Run(runs[2]).latest().banks_path)
    assert banks["E_C"].n_written == 16 and banks["E_P"].n_written == 16  # 4 steps x 2 processes x 2 images
    # step 1, before the runs' updates differ: the memories hold what 1 process writes, the patch picked
    # for each image included (a reviewer found each process drawing its picks from a stream of its own)
    two, one = (load_banks(next(c for c in Run(runs[n]).checkpoints() if c.step == 1).banks_path) for n in (2, 1))
    for name in ("E_C", "E_P"):
        assert two[name].n_written == one[name].n_written == 4
        for column in two[name].payload:
            assert torch.equal(two[name].payload[column], one[name].payload[column]), (name, column)
        assert torch.allclose(two[name].vectors, one[name].vectors, atol=1e-5), name


def test_bf16_search_returns_exact_cosines_and_nearly_the_exact_supports():
    centres = unit(20, 32, seed=5)
    memory = F.normalize(centres.repeat_interleave(30, 0) + 0.3 * torch.randn(600, 32, generator=torch.Generator().manual_seed(6)), dim=1)
    exact = sample_judges(memory, 2, 30, 5, eps=0.1, generator=torch.Generator().manual_seed(0), chunk=7)
    fast = sample_judges(memory, 2, 30, 5, eps=0.1, generator=torch.Generator().manual_seed(0), chunk=7, search="bf16")
    assert torch.equal(fast.slots[..., 0], exact.slots[..., 0])  # the same anchors
    cos = (memory[fast.slots[..., 1:]] * memory[fast.slots[..., :1]]).sum(-1).clamp(0, 1)
    assert torch.allclose(fast.scores[..., 1:], cos, atol=1e-6)  # rescored in float32
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in
                 zip(fast.slots[..., 1:].reshape(-1, 5), exact.slots[..., 1:].reshape(-1, 5)))
    assert shared / (2 * 30 * 5) > 0.95
