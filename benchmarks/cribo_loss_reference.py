"""CrIBo's loss beside the authors' code, on identical inputs: do the three terms, the centres and
the gradients agree?

    pip install einops
    python benchmarks/cribo_loss_reference.py --authors /path/to/CrIBo   # a checkout of tileb1/CrIBo

Like ``benchmarks/cribo_reference.py`` (the clustering alone), the authors' code is executed from
*their* ``main_cribo.py`` at run time: its source is parsed and only ``Clustering``, ``all_gather``,
``get_nn_centroids`` and ``CrIBoLoss`` are executed; nothing of it is copied here. Their calls to
``torch.distributed`` are answered by a one-process stand-in and their ``device='cuda'`` scalars
are made on the CPU (:class:`TorchOnCPU`); everything else runs as written.

One trial, both sides fed the same tensors:

* teacher tokens [B, 2N, D] and patch positions of two random views, K seed tokens (their
  ``multinomial`` answered with our seeds, as in ``cribo_reference.py``): their
  ``Clustering.compute_teacher_centroids`` against our :func:`joint_clustering`
  (``normalize_per_image=False``, their batched min-max) and :func:`pool_objects` — the valid
  objects and the teacher centroids ``c_v^k``;
* student tokens: their ``compute_student_centroids`` against our :func:`pool_objects` on their
  assignment's argmax (ours) — the student centroids, through which the gradient flows;
* an object queue: theirs (``centroids_queue``, ``cpv_queue``: S images, newest first) and ours
  (the same entries oldest first in a bank that also holds older, stale entries left out by the
  pool mask): their ``get_nn_centroids`` against our :func:`cycle_consistent_neighbours`, both
  directions — the neighbours and the cycle masks;
* a fixed random object head (``F.normalize(x @ W1) @ W2``, standing for their ``forward_c``
  and our ``object_layer(project(x))``) on both sides' centroids and neighbours; student CLS
  logits of every crop, teacher CLS logits of the two global views, both centres;
* their ``CrIBoLoss.forward`` (and its ``update_center``) against ours composed from the pure
  functions the method calls: :func:`teacher_probabilities`, :func:`dino_loss`,
  :func:`cross_view_object_loss`, :func:`cross_image_object_loss` and
  :class:`StepCenters` (``CrIBo.training_step``), the teacher temperatures from
  :func:`linear_warmup_epochs`. Their gate of the cross-image term (``epoch >= 1``) is applied to
  ours too: our method's gate (on once S images have been written) lives in
  ``CrIBo._cross_image_term``, not in the loss.

Ours departs from theirs in one documented place (docs/methods.md#cribo-departures): the
cross-image term averages each direction over its own cycle-consistent pairs where the authors
divide both by the first direction's count. Its difference is reported as it is (``cross_image``)
and after recomposing ours with their normalisation (``cross_image_their_norm``: our per-direction
means, the second scaled by ``|V2| / |V1|``, 0 when ``|V1| = 0``); the totals and gradients alike.

Also run: the fixed case pinned by ``tests/test_cribo.py``
(``test_loss_equals_the_authors_on_a_fixed_input``; identity head), whose authors' values are
written to the results, and the case of a batch without any valid object (their ``.mean()`` of
nothing). Prints a table of the largest absolute differences and writes
``benchmarks/results/cribo_loss_reference.json``.
"""

from __future__ import annotations

import argparse
import ast
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cribo_reference import given_seeds, random_views, tokens_for  # noqa: E402

from mlsctl import atomic  # noqa: E402
from mlsctl.methods.cribo.method import cross_image_object_loss, cross_view_object_loss  # noqa: E402
from mlsctl.methods.cribo.ops import cycle_consistent_neighbours, joint_clustering, pool_objects  # noqa: E402
from mlsctl.methods.self_distillation import StepCenters, dino_loss, teacher_probabilities  # noqa: E402
from mlsctl.schedules import linear_warmup_epochs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cribo_loss_reference.json"
THEIRS = ("Clustering", "all_gather", "get_nn_centroids", "CrIBoLoss")
# temperatures: the global ones are the authors' defaults; the object ones differ on purpose, so
# that a mix-up of the two sets (or of the two centres) shows
TEMPS = dict(warmup=0.04, final=0.07, warmup_c=0.05, final_c=0.065, student=0.1, student_c=0.12)
MOMENTUM, MOMENTUM_C = 0.9, 0.8


class TorchOnCPU:
    """``torch`` for their code: ``torch.tensor(..., device='cuda')`` is made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, **kwargs)


class OneProcess:
    """``torch.distributed`` of a single process."""

    @staticmethod
    def all_reduce(tensor, *args, **kwargs):
        return None

    @staticmethod
    def all_gather(out, tensor, *args, **kwargs):
        out[0].copy_(tensor)

    @staticmethod
    def get_world_size():
        return 1


def authors_code(checkout: Path) -> SimpleNamespace:
    """Their ``Clustering``, ``all_gather``, ``get_nn_centroids`` and ``CrIBoLoss``, executed from their source file."""
    import einops

    path = checkout / "main_cribo.py"
    tree = ast.parse(path.read_text())
    nodes = [node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in THEIRS]
    namespace = {"torch": TorchOnCPU(), "F": F, "nn": nn, "np": np, "dist": OneProcess(), "einops": einops,
                 "rearrange": einops.rearrange, "repeat": einops.repeat, "reduce": einops.reduce}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return SimpleNamespace(**{name: namespace[name] for name in THEIRS})


def authors_commit(checkout: Path) -> str:
    """The checkout's commit, where it is a git work tree (an exported tree: "unknown")."""
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def their_loss_module(code, out: int, crops: int, warmup_epochs: int, epochs: int, center, center_c):
    loss = code.CrIBoLoss(out_dim=out, out_dim_c=out, ncrops=crops, warmup_teacher_temp=TEMPS["warmup"],
                          warmup_teacher_temp_c=TEMPS["warmup_c"], teacher_temp=TEMPS["final"],
                          teacher_temp_c=TEMPS["final_c"], warmup_teacher_temp_epochs=warmup_epochs, nepochs=epochs,
                          student_temp=TEMPS["student"], student_temp_c=TEMPS["student_c"],
                          center_momentum=MOMENTUM, center_momentum_c=MOMENTUM_C, args=None)
    loss.center.copy_(center)
    loss.center_c.copy_(center_c)
    return loss


def our_losses(student_cls, teacher_cls, s1_logits, s2_logits, teacher_object_logits, neighbour_logits,
               ok1, ok2, crops: int, epoch: int, warmup_epochs: int, center, center_c) -> dict:
    """Our three terms as ``CrIBo.training_step`` composes them, with the authors' gate of the cross-image
    term (``epoch >= 1``), and the cross-image term recomposed with their normalisation."""
    temperature = linear_warmup_epochs(epoch, warmup_epochs, TEMPS["warmup"], TEMPS["final"])
    temperature_c = linear_warmup_epochs(epoch, warmup_epochs, TEMPS["warmup_c"], TEMPS["final_c"])
    targets = teacher_probabilities(teacher_cls, center, temperature)
    terms = {"global": dino_loss(student_cls.chunk(crops), targets.chunk(2), TEMPS["student"])}
    p1, p2 = teacher_probabilities(teacher_object_logits, center_c, temperature_c).chunk(2)
    zero = student_cls.new_zeros(())
    terms["cross_view"] = (cross_view_object_loss(p1, p2, s1_logits, s2_logits, TEMPS["student_c"])
                           if len(s1_logits) else zero)
    on = epoch >= 1 and len(s1_logits) > 0
    if on:
        q1, q2 = teacher_probabilities(neighbour_logits, center_c, temperature_c).chunk(2)
        v1, v2, none = ok1.float(), ok2.float(), torch.zeros_like(ok1, dtype=torch.float32)
        terms["cross_image"] = cross_image_object_loss(q1, q2, s1_logits, s2_logits, v1, v2, TEMPS["student_c"])
        # each direction's own mean (the other direction given no pair), then the authors' normalisation
        first = 2 * cross_image_object_loss(q1, q2, s1_logits, s2_logits, v1, none, TEMPS["student_c"])
        second = 2 * cross_image_object_loss(q1, q2, s1_logits, s2_logits, none, v2, TEMPS["student_c"])
        n1, n2 = int(ok1.sum()), int(ok2.sum())
        terms["cross_image_their_norm"] = 0.5 * (first + second * n2 / n1) if n1 else zero
    else:
        terms["cross_image"] = terms["cross_image_their_norm"] = zero
    terms["total"] = terms["global"] + terms["cross_view"] + terms["cross_image"]
    terms["total_their_norm"] = terms["global"] + terms["cross_view"] + terms["cross_image_their_norm"]
    centers = StepCenters()
    new_center, new_center_c = center.clone(), center_c.clone()
    centers.add("center", new_center, teacher_cls, MOMENTUM)
    centers.add("object_center", new_center_c, teacher_object_logits, MOMENTUM_C)
    centers.apply()
    return {"terms": terms, "center": new_center, "center_c": new_center_c, "temperature": temperature,
            "temperature_c": temperature_c}


def object_head(d: int, out: int, generator: torch.Generator):
    """A fixed stand-in for the shared head MLP and the objects' output layer."""
    w1 = torch.randn(d, 16, generator=generator) / math.sqrt(d)
    w2 = torch.randn(16, out, generator=generator) * 0.8
    return lambda x: F.normalize(x @ w1, dim=-1) @ w2


def object_queue(kind: str, t1, t2, s: int, k: int, stale: int, generator: torch.Generator):
    """(their centroids_queue [2, K·S, D], cpv_queue [S], our bank view 1 [M, D], view 2 [M, D], pool [M],
    map from our bank rows to their queue rows). ``random``: their initial queue (uniform [0, 1)
    vectors, K objects per image); ``objects``: S images with 0..K objects each, about a third of the
    entries noisy copies of the batch's objects (so that some cycles close), the others random."""
    d = t1.shape[1]
    if kind == "random":
        queue = torch.rand(2, k * s, d, generator=generator)
        counts = torch.full((s,), k, dtype=torch.int32)
    else:
        counts = torch.randint(0, k + 1, (s,), generator=generator, dtype=torch.int32)
        counts[torch.randint(0, s, (2,), generator=generator)] = 0  # images without any valid object
        counts[0] = max(int(counts[0]), 1)
        queue = torch.randn(2, k * s, d, generator=generator) * t1.norm(dim=1).mean()
        n = int(counts.sum())
        copies = torch.rand(n, generator=generator) < 1 / 3
        source = torch.randint(0, len(t1), (n,), generator=generator)
        for view, objects in enumerate((t1, t2)):
            noisy = objects[source] + 0.3 * objects.norm(dim=1).mean() * torch.randn(n, d, generator=generator) / math.sqrt(d)
            queue[view, :n] = torch.where(copies[:, None], noisy, queue[view, :n])
    n = int(counts.sum())
    valid = queue[:, :n].flip(1)  # ours: oldest first
    old = torch.randn(2, stale, d, generator=generator) * t1.norm(dim=1).mean()
    ours = torch.cat([old, valid], 1)
    pool = torch.cat([torch.zeros(stale, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    to_theirs = torch.cat([torch.full((stale,), -1), torch.arange(n - 1, -1, -1)])
    return queue, counts, ours[0], ours[1], pool, to_theirs


def num(value):
    """A float, or its name where it is not finite (the results stay strict JSON)."""
    value = float(torch.as_tensor(value).detach())
    return value if math.isfinite(value) else str(value)


def maxdiff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def grads(output, inputs):
    if not output.requires_grad:  # a term that is a constant here (a gate off)
        return [torch.zeros_like(x) for x in inputs]
    found = torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]


def trial(code, *, b: int, grid: int, k: int, crops: int, epoch: int, bank: str, seed: int, d: int = 32,
          out: int = 64, lambda_pos: float = 2.0, epochs: int = 10, warmup_epochs: int = 4, s: int = 12) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n, t = grid * grid, 2 * grid * grid
    positions = random_views(b, grid, generator)  # [B, 2N, 2]
    tokens = 2.0 * tokens_for(b, t, d, "scene", generator, positions)  # raw: the pooling sees their norm
    seeds = torch.stack([torch.randperm(t, generator=generator)[:k] for _ in range(b)])
    head = object_head(d, out, generator)

    # their layout: tokens [(m b), 1 + N, D] with a CLS token first, positions [m, b, 2, N]
    def theirs_layout(x):
        views = x.reshape(b, 2, n, -1).transpose(0, 1).reshape(2 * b, n, -1)
        return torch.cat([torch.zeros(2 * b, 1, x.shape[-1]), views], 1)

    their_positions = positions.reshape(b, 2, n, 2).permute(1, 0, 3, 2).contiguous()
    clustering = code.Clustering(SimpleNamespace(gpu="cpu", n_iter=5, update_c=True, patch_size=16, epochs=epochs),
                                 n_tokens=k, n_heads=1, sinkhorn_lambda=20.0, sinkhorn_iterations=5,
                                 pos_alpha=(lambda_pos, lambda_pos))
    with given_seeds(seeds):
        (th_t1, th_t2), th_valid, th_assign, _, th_cpv = clustering.compute_teacher_centroids(
            theirs_layout(tokens), theirs_layout(tokens), their_positions.clone(), epoch)
    assignment = joint_clustering(tokens, positions, k, lambda_pos=lambda_pos, normalize_per_image=False,
                                  seed_indices=seeds)
    objects, valid = pool_objects(tokens, assignment, k)
    rows, ids = valid.reshape(b, k).nonzero(as_tuple=True)
    t1, t2 = objects[rows, 0, ids], objects[rows, 1, ids]
    their_hard = (th_assign[:, :, 0] > 0)  # [2, B, N, K]
    ties = int((their_hard.sum(-1) > 1).sum())
    their_argmax = their_hard.float().argmax(-1).permute(1, 0, 2).reshape(b, t)
    row = {"batch": b, "tokens_per_image": t, "k": k, "crops": crops, "epoch": epoch, "bank": bank, "seed": seed,
           "objects": len(t1), "invalid_clusters": b * k - len(t1), "ties": ties,
           "assignment_agree": int((their_argmax == assignment).sum()), "assignment_tokens": b * t,
           "valid_same": bool(torch.equal(th_valid, valid.reshape(-1))),
           "teacher_centroids": max(maxdiff(th_t1, t1), maxdiff(th_t2, t2))}
    if not row["valid_same"] or ties:
        row["skipped"] = "the clusterings differ"
        return row

    # student: tokens in their layout (with a CLS row) → centroids, both sides from one base tensor
    student_base = torch.randn(2 * b, 1 + n, d, generator=generator)
    cls_base = 2 * torch.randn(crops * b, out, generator=generator)
    teacher_cls = 2 * torch.randn(2 * b, out, generator=generator)
    teacher_cls_features = torch.randn(2 * b, d, generator=generator)
    center, center_c = 0.5 * torch.randn(1, out, generator=generator), 0.5 * torch.randn(1, out, generator=generator)
    their_tokens, our_tokens = student_base.clone().requires_grad_(), student_base.clone().requires_grad_()
    their_cls, our_cls = cls_base.clone().requires_grad_(), cls_base.clone().requires_grad_()
    th_s1, th_s2 = clustering.compute_student_centroids(th_assign, their_tokens, th_valid)
    ours_student = our_tokens[:, 1:].reshape(2, b, n, d).transpose(0, 1).reshape(b, t, d)
    student_objects, _ = pool_objects(ours_student, assignment, k)
    s1, s2 = student_objects[rows, 0, ids], student_objects[rows, 1, ids]
    row["student_centroids"] = max(maxdiff(th_s1, s1), maxdiff(th_s2, s2))

    # neighbours: their queue and our bank hold the same S images' objects
    queue, counts, bank1, bank2, pool, to_theirs = object_queue(bank, t1, t2, s, k, stale=2 * k, generator=generator)
    args = SimpleNamespace(gpu="cpu", normalized_matching=True, world_size=1, queue_size=s)
    cls_queue = torch.rand(2, s, d, generator=generator)
    nn1, mask1, idx1, nn2, idx2, mask2 = code.get_nn_centroids(teacher_cls_features, (th_t1, th_t2), th_cpv,
                                                               queue.clone(), cls_queue, counts.clone(), args)
    nearest1, ok1 = cycle_consistent_neighbours(t1, t2, bank1, bank2, pool)
    nearest2, ok2 = cycle_consistent_neighbours(t2, t1, bank2, bank1, pool)
    row.update(cycle_pairs=[int(ok1.sum()), int(ok2.sum())], their_cycle_pairs=[int(mask1.sum()), int(mask2.sum())],
               masks_same=bool(torch.equal(mask1, ok1) and torch.equal(mask2, ok2)),
               neighbours_same=bool(torch.equal(to_theirs[nearest1], idx1) and torch.equal(to_theirs[nearest2], idx2)),
               neighbour_vectors=max(maxdiff(nn1[0], bank1[nearest1]), maxdiff(nn2[1], bank2[nearest2])))

    # the loss: theirs, then ours on the same logits
    with torch.no_grad():
        teacher_object_logits = head(torch.cat([th_t1, th_t2]))
        their_nn_logits, their_nn2_logits = head(nn1), head(nn2)
        neighbour_logits = head(torch.cat([bank1[nearest1], bank2[nearest2]]))
    theirs = their_loss_module(code, out, crops, warmup_epochs, epochs, center, center_c)
    loss_d, loss_c, loss_nn = theirs(their_cls, teacher_cls, epoch, head(torch.cat([th_s1, th_s2])),
                                     teacher_object_logits, mask1, their_nn_logits, idx1, their_nn2_logits, idx2, mask2)
    their_terms = {"global": loss_d, "cross_view": loss_c, "cross_image": loss_nn, "total": loss_d + loss_c + loss_nn}
    s1_logits, s2_logits = head(torch.cat([s1, s2])).chunk(2)
    ours = our_losses(our_cls, teacher_cls, s1_logits, s2_logits, teacher_object_logits, neighbour_logits, ok1, ok2,
                      crops, epoch, warmup_epochs, center, center_c)
    terms = ours["terms"]
    row["values"] = {"theirs": {name: num(v) for name, v in their_terms.items()},
                     "ours": {name: num(v) for name, v in terms.items()}}
    for name in ("global", "cross_view", "cross_image", "total"):
        row[name] = maxdiff(their_terms[name], terms[name])
    row["cross_image_their_norm"] = maxdiff(loss_nn, terms["cross_image_their_norm"])
    row["total_their_norm"] = maxdiff(their_terms["total"], terms["total_their_norm"])
    row["temperature"] = max(abs(theirs.teacher_temp_schedule[epoch] - ours["temperature"]),
                             abs(theirs.teacher_temp_schedule_c[epoch] - ours["temperature_c"]))
    row["center"] = maxdiff(theirs.center, ours["center"])
    row["center_c"] = maxdiff(theirs.center_c, ours["center_c"])
    # gradients w.r.t. the student's CLS logits and its tokens (through the pooling and the head)
    for name in ("global", "cross_view", "cross_image", "total"):
        g_theirs = grads(their_terms[name], [their_cls, their_tokens])
        g_ours = grads(terms[name], [our_cls, our_tokens])
        row[f"grad_{name}"] = max(maxdiff(a, b_) for a, b_ in zip(g_theirs, g_ours))
    g_theirs = grads(their_terms["total"], [their_cls, their_tokens])
    g_ours = grads(terms["total_their_norm"], [our_cls, our_tokens])
    row["grad_total_their_norm"] = max(maxdiff(a, b_) for a, b_ in zip(g_theirs, g_ours))
    return row


def fixed_case():
    """The input of ``tests/test_cribo.py::test_loss_equals_the_authors_on_a_fixed_input``: closed-form
    tensors, an identity object head (the pre-head object vectors are their logits), 2 images, 3 crops
    (2 global, 1 local), 6 outputs, 3 objects, a bank of 5 entries; epoch 1 of 4 with a 3-epoch warm-up."""
    out = 6
    grid = torch.arange(60, dtype=torch.float32)
    student_cls = 2 * torch.sin(0.7 * grid[:3 * 2 * out]).reshape(6, out)
    teacher_cls = 2 * torch.cos(0.5 * grid[:2 * 2 * out] + 0.3).reshape(4, out)
    t = torch.sin(1.3 * grid[:3 * out] + 1.0).reshape(3, out)
    teacher_objects = torch.cat([t, t + 0.3 * torch.cos(2.1 * grid[:3 * out]).reshape(3, out)])  # c_1, c_2
    student_objects = 1.5 * torch.cos(0.9 * grid[:2 * 3 * out] + 0.2).reshape(6, out)
    noise = 0.4 * torch.sin(3.7 * grid[:5 * 2 * out] + 0.5).reshape(5, 2 * out)
    bank = torch.cat([teacher_objects[[2, 0, 1, 2, 0]], teacher_objects[[5, 3, 3, 3, 4]]], 1) + noise
    bank[3:] = torch.cos(1.7 * grid[:2 * 2 * out]).reshape(2, 2 * out)
    center = 0.3 * torch.sin(grid[:out])[None]
    center_c = 0.3 * torch.cos(grid[:out])[None]
    return dict(student_cls=student_cls, teacher_cls=teacher_cls, teacher_objects=teacher_objects,
                student_objects=student_objects, bank=bank, center=center, center_c=center_c,
                crops=3, epoch=1, epochs=4, warmup_epochs=3, out=out)


def run_fixed_case(code) -> dict:
    case = fixed_case()
    out, crops, epoch = case["out"], case["crops"], case["epoch"]
    t1, t2 = case["teacher_objects"].chunk(2)
    bank = case["bank"]
    m = len(bank)
    # their queue: newest first, every entry valid (one image holding all five, one none)
    queue = torch.stack([bank[:, :out].flip(0), bank[:, out:].flip(0)])
    counts = torch.tensor([m, 0], dtype=torch.int32)
    args = SimpleNamespace(gpu="cpu", normalized_matching=True, world_size=1, queue_size=2)
    nn1, mask1, idx1, nn2, idx2, mask2 = code.get_nn_centroids(
        torch.zeros(4, out), (t1, t2), torch.tensor([2, 1]), queue, torch.zeros(2, 2, out), counts, args)
    theirs = their_loss_module(code, out, crops, case["warmup_epochs"], case["epochs"], case["center"], case["center_c"])
    student_objects = case["student_objects"].clone().requires_grad_()
    student_cls = case["student_cls"].clone().requires_grad_()
    loss_d, loss_c, loss_nn = theirs(student_cls, case["teacher_cls"], epoch, student_objects, case["teacher_objects"],
                                     mask1, nn1, idx1, nn2, idx2, mask2)
    total = loss_d + loss_c + loss_nn
    total.backward()
    # ours, on the same input, for the record beside theirs
    nearest1, ok1 = cycle_consistent_neighbours(t1, t2, bank[:, :out], bank[:, out:])
    nearest2, ok2 = cycle_consistent_neighbours(t2, t1, bank[:, out:], bank[:, :out])
    s1, s2 = case["student_objects"].chunk(2)
    ours = our_losses(case["student_cls"], case["teacher_cls"], s1, s2, case["teacher_objects"],
                      torch.cat([bank[nearest1, :out], bank[nearest2, out:]]), ok1, ok2, crops, epoch,
                      case["warmup_epochs"], case["center"], case["center_c"])
    return {"theirs": {"global": num(loss_d), "cross_view": num(loss_c), "cross_image": num(loss_nn),
                       "total": num(total), "center": theirs.center[0].tolist(), "center_c": theirs.center_c[0].tolist(),
                       "cycle_masks": [mask1.int().tolist(), mask2.int().tolist()],
                       "neighbours": [(m - 1 - idx1).tolist(), (m - 1 - idx2).tolist()],
                       "grad_student_cls_abs_sum": float(student_cls.grad.abs().sum()),
                       "grad_student_objects_abs_sum": float(student_objects.grad.abs().sum())},
            "ours": {name: num(v) for name, v in ours["terms"].items()} | {
                "cycle_masks": [ok1.int().tolist(), ok2.int().tolist()],
                "neighbours": [nearest1.tolist(), nearest2.tolist()]}}


def run_no_objects(code) -> dict:
    """A batch without any valid object, after the warm-up: their terms and object centre, and ours."""
    out = 8
    generator = torch.Generator().manual_seed(0)
    student_cls, teacher_cls = torch.randn(4, out, generator=generator), torch.randn(4, out, generator=generator)
    empty = torch.zeros(0, out)
    theirs = their_loss_module(code, out, 2, 1, 3, torch.zeros(1, out), torch.zeros(1, out))
    no_pair = torch.zeros(0, dtype=torch.bool)
    loss_d, loss_c, loss_nn = theirs(student_cls, teacher_cls, 2, empty, empty, no_pair, torch.zeros(2, 0, out),
                                     torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, out),
                                     torch.zeros(0, dtype=torch.long), no_pair)
    ours = our_losses(student_cls, teacher_cls, empty, empty, empty, empty, no_pair, no_pair, 2, 2, 1,
                      torch.zeros(1, out), torch.zeros(1, out))
    return {"theirs": {"cross_view": num(loss_c), "cross_image": num(loss_nn),
                       "object_center_finite": bool(torch.isfinite(theirs.center_c).all())},
            "ours": {"cross_view": num(ours["terms"]["cross_view"]), "cross_image": num(ours["terms"]["cross_image"]),
                     "object_center_finite": bool(torch.isfinite(ours["center_c"]).all())},
            "global": maxdiff(loss_d, ours["terms"]["global"])}


COLUMNS = ("teacher_centroids", "student_centroids", "neighbour_vectors", "temperature", "global", "cross_view",
           "cross_image", "cross_image_their_norm", "total", "total_their_norm", "center", "center_c",
           "grad_global", "grad_cross_view", "grad_cross_image", "grad_total", "grad_total_their_norm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of tileb1/CrIBo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--commit", help="the authors' commit, where --authors is an exported tree without .git")
    options = parser.parse_args()
    torch.set_num_threads(2)
    code = authors_code(options.authors)
    settings = [  # (B, grid, K, crops, epoch, bank)
        (2, 4, 4, 2, 0, "random"), (4, 4, 8, 4, 2, "random"), (4, 4, 16, 6, 5, "random"),
        (2, 6, 8, 2, 1, "objects"), (4, 4, 16, 4, 3, "objects"), (4, 6, 8, 6, 5, "objects"),
        (8, 4, 8, 2, 9, "objects"), (8, 6, 32, 4, 0, "objects"),
    ]
    rows = []
    started = time.perf_counter()
    for b, grid, k, crops, epoch, bank in settings:
        for seed in range(options.seeds):
            row = trial(code, b=b, grid=grid, k=k, crops=crops, epoch=epoch, bank=bank, seed=seed)
            rows.append(row)
            if "skipped" in row:
                print(f"B={b} T={2 * grid * grid} K={k} seed {seed}: skipped ({row['skipped']})", flush=True)
                continue
            print(f"B={b} T={2 * grid * grid:2d} K={k:2d} crops={crops} epoch={epoch} {bank:7s} seed {seed}: "
                  f"V={row['objects']:3d} (invalid {row['invalid_clusters']:3d}) pairs {row['cycle_pairs']} "
                  f"global {row['global']:.1e} cv {row['cross_view']:.1e} ci {row['cross_image']:.1e} "
                  f"(their norm {row['cross_image_their_norm']:.1e}) grad {row['grad_total_their_norm']:.1e}",
                  flush=True)
    compared = [r for r in rows if "skipped" not in r]
    worst = {column: max(r[column] for r in compared) for column in COLUMNS}
    checks = {"trials": len(rows), "compared": len(compared),
              "valid_masks_same": sum(r["valid_same"] for r in rows),
              "assignment_agree": f"{sum(r['assignment_agree'] for r in rows)}/{sum(r['assignment_tokens'] for r in rows)}",
              "cycle_masks_same": sum(r["masks_same"] for r in compared),
              "neighbours_same": sum(r["neighbours_same"] for r in compared),
              "cross_image_on_with_unequal_pair_counts": sum(r["epoch"] >= 1 and r["cycle_pairs"][0] != r["cycle_pairs"][1]
                                                              for r in compared)}
    print("\nlargest absolute difference over the trials:")
    for column, value in worst.items():
        print(f"  {column:24s} {value:.2e}")
    print(checks)
    fixed = run_fixed_case(code)
    no_objects = run_no_objects(code)
    print("fixed case:", fixed)
    print("no objects:", no_objects)
    atomic.write_json(RESULTS, {"authors": str(options.authors), "authors_commit": options.commit or authors_commit(options.authors),
                                "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
                                "temperatures": TEMPS, "momenta": [MOMENTUM, MOMENTUM_C], "max_abs_diff": worst,
                                "checks": checks, "fixed_case": fixed, "no_objects": no_objects, "rows": rows})


if __name__ == "__main__":
    main()
