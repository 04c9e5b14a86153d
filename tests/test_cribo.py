"""CrIBo: clustering, object pooling, cycle-consistent retrieval and the method's gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mlsctl import config
from mlsctl.methods.cribo import CrIBo
from mlsctl.methods.cribo.ops import (cycle_consistent_neighbours, joint_clustering, object_boxes, patch_positions,
                                      pool_objects, single_linkage_cost)
from mlsctl.schedules import Schedule

from conftest import tiny_recipe


def grid_positions(side: int, views: int = 2) -> torch.Tensor:
    boxes = torch.tensor([[0.0, 0.0, float(side), float(side)]])
    one = patch_positions(boxes, torch.tensor([False]), (side, side))
    return torch.cat([one] * views, 1)


def test_patch_positions_follow_box_and_flip():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [10.0, 20.0, 50.0, 40.0]])
    pos = patch_positions(boxes, torch.tensor([False, True]), (2, 4))
    assert pos[0, 0].tolist() == [15.0, 25.0] and pos[0, 3].tolist() == [45.0, 25.0] and pos[0, 4].tolist() == [15.0, 35.0]
    assert pos[1, 0].tolist() == [45.0, 25.0]  # mirrored: the first token shows the right edge


def test_object_boxes_cover_their_patches_in_original_pixels():
    # view box (10, 20)-(50, 40) on a 2x4 grid: patches are 10 x 10 pixels, centres at x 15..45, y 25, 35
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [10.0, 20.0, 50.0, 40.0]])
    positions = patch_positions(boxes, torch.tensor([False, True]), (2, 4))
    assignment = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]])
    found = object_boxes(positions, assignment, 3, torch.tensor([[10.0, 10.0], [10.0, 10.0]]))
    assert found[0, 0].tolist() == [10.0, 20.0, 30.0, 40.0] and found[0, 1].tolist() == [30.0, 20.0, 50.0, 40.0]
    assert found[1, 0].tolist() == [30.0, 20.0, 50.0, 40.0]  # mirrored view: the left tokens show the right half
    assert found[0, 2].tolist() == [0.0, 0.0, 0.0, 0.0]  # no patch in cluster 2


def test_single_linkage_excludes_the_token_itself():
    positions = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]])
    distances = torch.cdist(positions, positions)
    distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    cost = single_linkage_cost(distances, torch.tensor([[0, 0, 1]]), 3)
    assert cost[0, :, 0].tolist() == [1.0, 1.0, 4.0]
    assert cost[0, 2, 1] == float("inf") and cost[0, 0, 1] == 5.0  # token 2 is cluster 1's only member
    assert torch.isinf(cost[0, :, 2]).all()  # an empty cluster


def test_clustering_is_a_partition_and_works_for_one_image():
    torch.manual_seed(0)
    tokens = torch.randn(1, 32, 16)
    assignment = joint_clustering(tokens, grid_positions(4), 5, generator=torch.Generator().manual_seed(0))
    assert assignment.shape == (1, 32) and assignment.dtype == torch.long
    assert assignment.min() >= 0 and assignment.max() < 5
    objects, valid = pool_objects(tokens, assignment, 5)
    members = F.one_hot(assignment, 5).sum(1)
    assert members.sum() == 32 and objects.shape == (1, 2, 5, 16)


def test_identical_views_match_every_object_to_itself():
    torch.manual_seed(0)
    view = torch.randn(3, 16, 8)
    tokens = torch.cat([view, view], 1)
    positions = grid_positions(4).expand(3, -1, -1)
    assignment = joint_clustering(tokens, positions, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(assignment[:, :16], assignment[:, 16:])
    objects, valid = pool_objects(tokens, assignment, 4)
    present = F.one_hot(assignment, 4).sum(1) > 0
    assert torch.equal(valid, present)
    assert torch.allclose(objects[:, 0], objects[:, 1])
    first, second = objects[:, 0][valid], objects[:, 1][valid]
    nearest, ok = cycle_consistent_neighbours(first, second, first, second)
    assert ok.all() and torch.equal(nearest, torch.arange(len(first)))


def test_positional_cost_keeps_clusters_compact():
    """Two far-apart regions with identical features: with the positional cost each cluster stays
    on one side; without it the clusters straddle both."""
    torch.manual_seed(0)
    side = 8
    feature = F.normalize(torch.randn(16), dim=0)
    tokens = feature.repeat(1, 2 * side * side, 1) + 0.01 * torch.randn(1, 2 * side * side, 16)
    positions = grid_positions(side)
    positions[:, :, 0] += torch.where(positions[:, :, 0] < side / 2, 0.0, 100.0)  # two regions far apart
    left = positions[0, :, 0] < 50

    def straddling(lambda_pos: float) -> int:
        assignment = joint_clustering(tokens, positions, 2, lambda_pos=lambda_pos,
                                      seed_indices=torch.tensor([[0, 7]]))  # one seed in each region
        return sum(bool(((assignment[0] == c) & left).any() and ((assignment[0] == c) & ~left).any())
                   for c in range(2))

    assert straddling(2.0) == 0
    assert straddling(0.0) > 0


def test_permuting_tokens_permutes_the_assignment():
    torch.manual_seed(0)
    tokens = torch.randn(2, 32, 8)
    positions = torch.rand(2, 32, 2) * 10
    seeds = torch.tensor([[0, 5, 9, 20], [3, 4, 17, 30]])
    assignment = joint_clustering(tokens, positions, 4, seed_indices=seeds)
    perm = torch.randperm(32)
    inverse = torch.argsort(perm)
    permuted = joint_clustering(tokens[:, perm], positions[:, perm], 4, seed_indices=inverse[seeds])
    assert torch.equal(permuted, assignment[:, perm])


def test_cycle_ratio_is_one_on_itself_and_near_zero_on_a_random_bank():
    torch.manual_seed(0)
    first, second = torch.randn(64, 32), torch.randn(64, 32)
    second = first + 0.3 * second  # the other view of each object is close to it
    _, ok = cycle_consistent_neighbours(first, second, first, second)
    assert ok.float().mean() == 1.0
    bank1, bank2 = torch.randn(500, 32), torch.randn(500, 32)
    _, ok = cycle_consistent_neighbours(first, second, bank1, bank2)
    assert ok.float().mean() < 0.1


def _cribo(tmp_path, **method):
    from conftest import make_images

    images = make_images(tmp_path / "images", 4, size=(32, 32))
    raw = tiny_recipe(images, data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = {"name": "cribo", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_clusters": 4,
                     "bank_images": 2, "warmup_teacher_temp_epochs": 0, **method}
    recipe = config.from_dict(raw)
    return CrIBo(recipe, Schedule(steps_per_epoch=2, epochs=2)), recipe


def _batch(recipe, b=4, seed=0):
    from mlsctl.data.loader import Batch

    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 4.0, 28.0, 28.0]]).expand(b, 2, 4).clone()
    return Batch(crops, boxes, torch.zeros(b, 2, dtype=torch.bool), torch.arange(b), torch.tensor([[32, 32]] * b), [])


def test_gradients_reach_every_student_parameter_and_never_the_teacher(tmp_path):
    method, recipe = _cribo(tmp_path)
    batch = _batch(recipe)
    for step in range(3):  # the bank (2 images x 4 clusters) fills, then the cross-image loss is on
        out = method.training_step(batch, step)
    assert float(out.terms["cross_image"]) > 0 and out.metrics["bootstrap_ratio"] > 0
    method.zero_grad()
    out.loss.backward()
    for name, p in method.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_bank_records_where_objects_came_from(tmp_path):
    method, recipe = _cribo(tmp_path)
    batch = _batch(recipe)
    method.training_step(batch, 0)
    bank = method.bank
    n = bank.filled
    assert n > 0 and bank.vectors.shape[1] == 2 * method.dim
    payload = bank.payload
    assert set(payload["image_id"][:n].tolist()) <= set(range(4))
    assert payload["box"][:n].tolist()[0] == [0.0, 0.0, 32.0, 32.0]  # view 1's box, drawn by `bank neighbors`
    assert payload["box_view2"][:n].tolist()[0] == [4.0, 4.0, 28.0, 28.0]
    assert payload["cluster_id"][:n].max() < 4
    region = payload["region"][:n]  # the object's patches of view 1: a non-empty box inside view 1
    assert (region[:, 2] > region[:, 0]).all() and (region[:, 3] > region[:, 1]).all()
    assert (region[:, :2] >= 0).all() and (region[:, 2:] <= 32).all()
    assert bank.query_feature.feature == "patch_mean" and bank.query_feature.stop == method.dim


@pytest.mark.parametrize("losses", [dict(cross_view_loss=False, cross_image_loss=False), dict(cross_image_loss=False)])
def test_loss_ablations(tmp_path, losses):
    method, recipe = _cribo(tmp_path, **losses)
    out = method.training_step(_batch(recipe), 0)
    expected = out.terms["global"] + (0 if not losses.get("cross_view_loss", True) else out.terms["cross_view"])
    assert float(out.loss.detach()) == pytest.approx(float(expected))


@pytest.mark.slow
def test_a_two_process_run_holds_identical_object_banks(tmp_path):
    from conftest import make_images, pretrain_on_two_processes_and_one
    from mlsctl.bank import load_banks
    from mlsctl.runs import Run

    images = make_images(tmp_path / "images", 8, size=(32, 32))
    raw = tiny_recipe(images, data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]}, optim__epochs=2,
                      optim__batch_size=2)
    raw["method"] = {"name": "cribo", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_clusters": 4,
                     "bank_images": 3, "warmup_teacher_temp_epochs": 0}
    runs = pretrain_on_two_processes_and_one(tmp_path, raw, 2)  # 2 processes of batch 2 against 1 of batch 4
    log = (runs[2] / "train.log").read_text()
    assert "memory banks identical on all 2 processes" in log  # checked at every checkpoint
    bank = load_banks(Run(runs[2]).latest().banks_path)["objects"]
    assert bank.n_written > bank.size  # both ranks' objects went in, and the queue wrapped
    rows = {n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs}
    assert all("bootstrap_ratio" in r and "time/clustering" in r for r in rows[2])
    # step 1, before the runs' updates differ (each process's object losses are means over its own objects,
    # as under DDP): every image is clustered as in 1 process, so the objects written are the same (a
    # reviewer found each process drawing the clustering seeds of its own stream: 3.5 objects per image
    # against 3.75)
    assert rows[2][0]["objects_per_image"] == rows[1][0]["objects_per_image"]
    two, one = (load_banks(next(c for c in Run(runs[n]).checkpoints() if c.step == 1).banks_path)["objects"]
                for n in (2, 1))
    assert two.n_written == one.n_written > 0
    for column in two.payload:
        assert torch.equal(two.payload[column], one.payload[column]), column
    assert torch.allclose(two.vectors, one.vectors, atol=1e-5)


# ------------------------------------------------------------------ the authors' three clustering details


def test_first_round_a_seed_costs_the_image_mean_to_its_own_cluster():
    """(a) In the first round only the seeds are members; a seed has no *other* member in its own
    cluster, so its positional cost there is the fill value, not 0."""
    from mlsctl.methods.cribo.ops import _fill_and_scale_positional

    positions = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]])
    distances = torch.cdist(positions, positions).masked_fill(torch.eye(3, dtype=torch.bool), float("inf"))
    seeds_only = torch.tensor([[0, 1, -1]])  # tokens 0 and 1 seed clusters 0 and 1; token 2 in none yet
    linkage = single_linkage_cost(distances, seeds_only, 2)
    assert linkage[0].tolist() == [[float("inf"), 3.0], [3.0, float("inf")], [4.0, 5.0]]
    cost = _fill_and_scale_positional(linkage)
    mean = (3.0 + 3.0 + 4.0 + 5.0) / 6  # over all 3 x 2 entries, the empty ones counted as 0
    assert cost[0, 0, 0].item() == pytest.approx(mean / 5.0) and cost[0, 1, 1].item() == pytest.approx(mean / 5.0)
    assert cost[0, 2, 1].item() == pytest.approx(1.0)


def test_fill_value_is_the_mean_over_all_entries_with_empty_ones_as_zero():
    """(b) Not the mean of the non-empty entries alone (that would be 4.0 here)."""
    from mlsctl.methods.cribo.ops import _fill_and_scale_positional

    inf = float("inf")
    linkage = torch.tensor([[[2.0, inf], [6.0, inf]]])
    cost = _fill_and_scale_positional(linkage)
    assert torch.allclose(cost[0], torch.tensor([[2.0 / 6.0, 2.0 / 6.0], [1.0, 2.0 / 6.0]]))  # fill (2 + 6) / 4 = 2


def test_an_empty_cluster_gets_a_zero_centroid():
    """(c) Its semantic cost is then 0 for every token in the next round (the old centroid is not kept)."""
    from mlsctl.methods.cribo.ops import cluster_centroids

    z = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]), dim=-1)
    centroids, counts = cluster_centroids(z, torch.tensor([[0, 0, 2]]), 3)
    assert counts[0].tolist() == [2.0, 0.0, 1.0]
    assert torch.allclose(centroids[0, 0], F.normalize(z[0, 0] + z[0, 1], dim=0))
    assert centroids[0, 1].tolist() == [0.0, 0.0] and torch.allclose(centroids[0, 2], z[0, 2])


def test_tokens_at_the_same_position_are_not_each_others_neighbours():
    """As the authors' code (which takes a zero distance for 'not a member'), a token at exactly the
    same spot in the other view does not count as a neighbour."""
    from mlsctl.methods.cribo.ops import neighbour_distances

    positions = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]])
    inf = float("inf")
    assert neighbour_distances(positions)[0].tolist() == [[inf, inf, 5.0], [inf, inf, 5.0], [5.0, 5.0, inf]]


# ------------------------------------------------------------------ loss weights 1 : 1 : 1


def test_object_losses_average_their_two_directions():
    from mlsctl.methods.cribo import cross_image_object_loss, cross_view_object_loss

    k = 8
    uniform = torch.full((3, k), 1.0 / k)
    flat = torch.zeros(3, k)
    # each direction is log K for uniform targets and flat students: the mean is log K, not 2 log K
    assert cross_view_object_loss(uniform, uniform, flat, flat, 0.1).item() == pytest.approx(math.log(k), rel=1e-6)
    # cross-image: direction 1 has two valid pairs, direction 2 one; each averaged over its own pairs
    one_hot = torch.eye(k)[:3]
    s = torch.zeros(3, k)
    s[0, 0] = math.log(3.0) + math.log(k - 1)  # student 0 gives class 0 probability 3/4 at temperature 1
    q_first = one_hot  # targets of direction 1 (against s2 = s)
    q_second = one_hot
    valid1 = torch.tensor([1.0, 1.0, 0.0])
    valid2 = torch.tensor([1.0, 0.0, 0.0])
    h_other = math.log(k)  # a flat student row against a one-hot target
    h_zero = -math.log(0.75)
    expected = 0.5 * ((h_zero + h_other) / 2 + h_zero / 1)
    got = cross_image_object_loss(q_first, q_second, s, s, valid1, valid2, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a direction without a valid pair contributes 0, and nothing divides by zero
    assert cross_image_object_loss(q_first, q_second, s, s, valid1, torch.zeros(3), 1.0).item() == pytest.approx(
        0.5 * (h_zero + h_other) / 2, rel=1e-6)


def test_the_three_terms_weigh_one_each_at_a_uniform_start(tmp_path):
    """With every head output uniform, each of the three terms is log(out_dim): a sum of two
    directions would make the cross-view term 2 log(out_dim)."""
    raw = tiny_recipe(tmp_path, data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = {"name": "cribo", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "n_clusters": 2,
                     "bank_images": 1}
    recipe = config.from_dict(raw)
    torch.manual_seed(0)
    method = CrIBo(recipe, Schedule(4, 2))
    for layer in (method.student.head.head.last_layer, method.student.head.object_layer,
                  method.teacher.head.head.last_layer, method.teacher.head.object_layer):
        torch.nn.init.zeros_(layer.gain)  # every logit 0: uniform outputs
    batch = _batch(recipe)
    method.training_step(batch, 0)  # fills the one-image bank ...
    out = method.training_step(_batch(recipe, seed=1), 1)  # ... so the cross-image term is on
    for name in ("global", "cross_view"):
        assert out.terms[name].item() == pytest.approx(math.log(32), rel=1e-5), name
    assert out.metrics["bootstrap_ratio"] > 0  # some pairs passed the cycle check: the term is on
    assert out.terms["cross_image"].item() == pytest.approx(math.log(32), rel=1e-5)


def test_neighbours_come_from_the_objects_of_the_newest_s_images_as_in_the_authors_queue(tmp_path):
    """The paper counts the bank in images (S): the authors' queue keeps S images, newest first, each with
    its valid objects, and drops the last images of its oldest batch first. Steps of 4 images with 0 to 4
    objects each, S = 6: the pool is what that queue holds, whatever more the S·K slots still keep. (An
    image without objects among the kept part of the oldest step would be passed over, and images with all
    K objects can push the oldest step's first images out of the slots: docs/methods.md.)"""
    method, _ = _cribo(tmp_path, bank_images=6)  # 6 x 4 clusters = 24 slots
    bank, images_per_step = method.bank, 4
    objects_of = {0: [4, 3, 2, 4], 1: [1, 2, 0, 3], 2: [2, 4, 1, 1], 3: [3, 4, 0, 2]}
    queue: list[tuple[int, int, int]] = []  # (step, place in the step's batch, objects): newest first
    for step, counts in objects_of.items():
        pool = method._newest_images(step, images_per_step)[:bank.filled]
        found = {(int(bank.payload["step"][i]), int(bank.payload["image_id"][i]) % 100)
                 for i in pool.nonzero().flatten().tolist()}
        assert found == {(s, place) for s, place, n in queue if n}, step
        places = torch.tensor([place for place, n in enumerate(counts) for _ in range(n)])
        bank.enqueue(torch.randn(len(places), 2 * method.dim), step=step, image_id=step * 100 + places,
                     box=torch.zeros(len(places), 4), box_view2=torch.zeros(len(places), 4),
                     region=torch.zeros(len(places), 4), cluster_id=torch.zeros(len(places), dtype=torch.long))
        queue = ([(step, place, n) for place, n in enumerate(counts)] + queue)[:6]
    assert bank.n_written > bank.size  # the slots wrapped: older objects were overwritten, others kept beyond S
    pool = method._newest_images(4, images_per_step)
    assert int(pool.sum()) == sum(n for _, _, n in queue) == 3 + 4 + 0 + 2 + 2 + 4
    # every image with all K = 4 objects: the newest 2 steps (32 objects) outgrow the 24 slots, the oldest step's
    # first images are overwritten first and its later ones stand in; still S = 6 images, those still there
    full, _ = _cribo(tmp_path, bank_images=6)
    for step in range(4):
        places = torch.arange(4).repeat_interleave(4)
        full.bank.enqueue(torch.randn(16, 2 * full.dim), step=step, image_id=step * 100 + places,
                          box=torch.zeros(16, 4), box_view2=torch.zeros(16, 4), region=torch.zeros(16, 4),
                          cluster_id=torch.zeros(16, dtype=torch.long))
    pool = full._newest_images(4, images_per_step)
    images = {(int(full.bank.payload["step"][i]), int(full.bank.payload["image_id"][i]) % 100)
              for i in pool.nonzero().flatten().tolist()}
    assert images == {(3, 0), (3, 1), (3, 2), (3, 3), (2, 2), (2, 3)} and int(pool.sum()) == 6 * 4


def test_the_cycle_check_never_passes_outside_the_pool():
    from mlsctl.methods.cribo.ops import cycle_consistent_neighbours

    objects = torch.eye(3)
    nearest, ok = cycle_consistent_neighbours(objects, objects, objects, objects)
    assert ok.all() and nearest.tolist() == [0, 1, 2]
    pool = torch.tensor([True, False, True])
    nearest, ok = cycle_consistent_neighbours(objects, objects, objects, objects, pool)
    assert ok.tolist() == [True, False, True] and bool(pool[nearest].all())
    _, ok = cycle_consistent_neighbours(objects, objects, objects, objects, torch.zeros(3, dtype=torch.bool))
    assert not ok.any()


def test_a_run_too_short_for_its_bank_says_the_cross_image_loss_stays_off(tmp_path):
    """A new user's probe (2026-12-06): a CrIBo run shorter than its bank logged loss/cross_image 0.0 at every
    step, and nothing said why."""
    method, _ = _cribo(tmp_path, bank_images=8)  # Schedule(2 steps an epoch, 2 epochs): 4 steps
    assert not method.run_notes(4 * 4)  # 3 steps x 4 images = 12 >= 8 before the last step
    notes = method.run_notes(4 * 2)  # 3 x 2 = 6 < 8
    assert len(notes) == 1 and "stays off" in notes[0] and "method.bank_images=8" in notes[0]
    off, _ = _cribo(tmp_path, bank_images=8, cross_image_loss=False)
    assert not off.run_notes(4 * 2)


def test_loss_equals_the_authors_on_a_fixed_input():
    """Our three terms, their total, both centre updates and the gradients, on one closed-form input,
    pinned to what the authors' ``CrIBoLoss.forward`` and ``get_nn_centroids`` gave on it:
    ``benchmarks/cribo_loss_reference.py`` (``fixed_case``, ``run_fixed_case``; results
    ``benchmarks/results/cribo_loss_reference.json``, ``fixed_case``) on tileb1/CrIBo at commit 311f569.
    The input: an identity object head (the object vectors are their logits), 2 images, 3 crops (2 global,
    1 local), 6 outputs, 3 objects, a bank of 5 entries in which one object's cycle fails in each direction
    (so both directions count 2 pairs and the authors' normalisation of the cross-image term, by the first
    direction's count, is ours here: docs/methods.md#cribo-departures); epoch 1 of a 3-epoch temperature
    warm-up. Composed as ``CrIBo.training_step`` composes them."""
    from mlsctl.methods.cribo import cross_image_object_loss, cross_view_object_loss
    from mlsctl.methods.self_distillation import StepCenters, dino_loss, teacher_probabilities
    from mlsctl.schedules import linear_warmup_epochs

    out, crops, epoch, warmup = 6, 3, 1, 3
    grid = torch.arange(60, dtype=torch.float32)
    student_cls = (2 * torch.sin(0.7 * grid[:3 * 2 * out]).reshape(6, out)).requires_grad_()
    teacher_cls = 2 * torch.cos(0.5 * grid[:2 * 2 * out] + 0.3).reshape(4, out)
    t = torch.sin(1.3 * grid[:3 * out] + 1.0).reshape(3, out)
    teacher_objects = torch.cat([t, t + 0.3 * torch.cos(2.1 * grid[:3 * out]).reshape(3, out)])  # c_1, c_2
    student_objects = (1.5 * torch.cos(0.9 * grid[:2 * 3 * out] + 0.2).reshape(6, out)).requires_grad_()
    noise = 0.4 * torch.sin(3.7 * grid[:5 * 2 * out] + 0.5).reshape(5, 2 * out)
    bank = torch.cat([teacher_objects[[2, 0, 1, 2, 0]], teacher_objects[[5, 3, 3, 3, 4]]], 1) + noise
    bank[3:] = torch.cos(1.7 * grid[:2 * 2 * out]).reshape(2, 2 * out)
    center, center_c = 0.3 * torch.sin(grid[:out])[None], 0.3 * torch.cos(grid[:out])[None]

    temperature = linear_warmup_epochs(epoch, warmup, 0.04, 0.07)
    temperature_c = linear_warmup_epochs(epoch, warmup, 0.05, 0.065)
    t1, t2 = teacher_objects.chunk(2)
    s1, s2 = student_objects.chunk(2)
    nearest1, ok1 = cycle_consistent_neighbours(t1, t2, bank[:, :out], bank[:, out:])
    nearest2, ok2 = cycle_consistent_neighbours(t2, t1, bank[:, out:], bank[:, :out])
    assert [ok1.int().tolist(), ok2.int().tolist()] == [[1, 0, 1], [1, 0, 1]]
    assert [nearest1.tolist(), nearest2.tolist()] == [[1, 2, 0], [1, 4, 0]]
    targets = teacher_probabilities(teacher_cls, center, temperature)
    global_ = dino_loss(student_cls.chunk(crops), targets.chunk(2), 0.1)
    p1, p2 = teacher_probabilities(teacher_objects, center_c, temperature_c).chunk(2)
    cross_view = cross_view_object_loss(p1, p2, s1, s2, 0.12)
    q1, q2 = teacher_probabilities(torch.cat([bank[nearest1, :out], bank[nearest2, out:]]), center_c,
                                   temperature_c).chunk(2)
    cross_image = cross_image_object_loss(q1, q2, s1, s2, ok1.float(), ok2.float(), 0.12)
    total = global_ + cross_view + cross_image
    total.backward()
    centers = StepCenters()
    new_center, new_center_c = center.clone(), center_c.clone()
    centers.add("center", new_center, teacher_cls, 0.9)
    centers.add("object_center", new_center_c, teacher_objects, 0.8)
    centers.apply()

    # the authors' values (tileb1/CrIBo 311f569, through benchmarks/cribo_loss_reference.py)
    assert global_.item() == pytest.approx(22.455032348632812, rel=1e-5)
    assert cross_view.item() == pytest.approx(10.347244262695312, rel=1e-5)
    assert cross_image.item() == pytest.approx(11.162843704223633, rel=1e-5)
    assert total.item() == pytest.approx(43.965118408203125, rel=1e-5)
    assert new_center[0].tolist() == pytest.approx(
        [-0.001225501298904419, 0.21943266689777374, 0.23310784995555878, 0.024098530411720276,
         -0.21651332080364227, -0.2662777304649353], abs=1e-6)
    assert new_center_c[0].tolist() == pytest.approx(
        [0.3131742477416992, 0.0675029456615448, -0.18159276247024536, -0.19780707359313965,
         -0.10013313591480255, 0.08401686698198318], abs=1e-6)
    assert student_cls.grad.abs().sum().item() == pytest.approx(15.00314712524414, rel=1e-5)
    assert student_objects.grad.abs().sum().item() == pytest.approx(28.347063064575195, rel=1e-5)
