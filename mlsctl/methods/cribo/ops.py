"""CrIBo's operations as pure functions (Lebailly et al., 2024; docs/methods.md#cribo-clustering).

Notation (paper → code): B images, two views with N patch tokens each, ``z_cat`` [B, 2N, D] the
L2-normalised teacher tokens of both views, K clusters, ``T_sem`` / ``T_pos`` the semantic and
positional costs, ``M`` their sum, ``P`` the Sinkhorn transport plan, ``c_v^k`` the object
representation of cluster k in view v, ``M1``/``M2`` the view-1/view-2 halves of the object bank.

* :func:`patch_positions` — the centre of every patch of a view in original-image pixels, from the
  view's crop box and flip (no coordinate-grid image).
* :func:`joint_clustering` — joint-space Sinkhorn clustering of both views' tokens with the
  single-linkage positional cost; memory O(B·(2N)²), never [B, 2N, 2N, K]. Its hard assignments
  equal the authors' ``Clustering.compute_assignments`` on identical inputs
  (``benchmarks/cribo_reference.py``).
* :func:`pool_objects` — per-view object representations and the both-views validity mask.
* :func:`cycle_consistent_neighbours` — nearest bank entries that survive the cycle check.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mlsctl.device import to_device


def patch_positions(boxes: torch.Tensor, flips: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch centres [B, h·w, 2] (x, y) in original-image pixels, row-major like the tokens.

    ``boxes`` [B, 4] are the views' crop boxes (x0, y0, x1, y1) and ``flips`` [B] whether the crop
    was mirrored after cropping (then token column j shows crop column w-1-j)."""
    h, w = grid
    u = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) / w  # [w]
    v = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) / h  # [h]
    u = torch.where(flips[:, None].bool(), 1 - u[None], u[None])  # [B, w]
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    x = x0[:, None] + u * (x1 - x0)[:, None]  # [B, w]
    y = y0[:, None] + v[None] * (y1 - y0)[:, None]  # [B, h]
    xx = x[:, None, :].expand(-1, h, -1)
    yy = y[:, :, None].expand(-1, -1, w)
    return torch.stack([xx, yy], dim=-1).reshape(len(boxes), h * w, 2)


def single_linkage_cost(distances: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """``T_pos[b, i, j]`` = distance from token i to the nearest *other* token assigned to cluster j.

    ``distances`` [B, T, T] with +inf where a token may not count as another's neighbour (itself,
    and, as in the authors' code, any token at the very same position), ``assignment`` [B, T] with
    -1 for a token in no cluster yet (the first round: only the seeds belong). One scatter-min over
    the [B, T, T] matrix; clusters without another member come back as +inf."""
    b, t, _ = distances.shape
    index = torch.where(assignment < 0, k, assignment)[:, None, :].expand(b, t, t)  # column k: no cluster
    out = distances.new_full((b, t, k + 1), float("inf"))
    return out.scatter_reduce(2, index, distances, reduce="amin", include_self=True)[..., :k]


def neighbour_distances(positions: torch.Tensor) -> torch.Tensor:
    """Pairwise distances [B, T, T] of patch positions [B, T, 2], +inf where a token may not be
    another's single-linkage neighbour: itself and, as in the authors' code (which reads a zero
    distance as "not a member"), a token at exactly the same position. Computed with the plain
    formula (no matrix-product shortcut, whose rounding would move near-ties)."""
    positions = positions.float()
    distances = torch.cdist(positions, positions, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.masked_fill(distances == 0, float("inf"))


def _fill_and_scale_positional(cost: torch.Tensor) -> torch.Tensor:
    """Entries without another member (+inf) take the image's mean positional cost, that mean taken
    over all [T, K] entries with the empty ones counted as 0 (exactly the authors' fill); then the
    cost is divided by the image's max."""
    finite = torch.isfinite(cost)
    zeroed = torch.where(finite, cost, torch.zeros_like(cost))
    mean = zeroed.mean((1, 2), keepdim=True)
    cost = torch.where(finite, cost, mean.expand_as(cost))
    top = cost.amax((1, 2), keepdim=True).clamp_min(1e-12)
    return cost / top


def _min_max(cost: torch.Tensor, per_image: bool) -> torch.Tensor:
    dims = (1, 2) if per_image else (0, 1, 2)
    low = cost.amin(dims, keepdim=True)
    high = cost.amax(dims, keepdim=True)
    return (cost - low) / (high - low).clamp_min(1e-12)


def sinkhorn(cost: torch.Tensor, column_marginals: torch.Tensor, strength: float, iterations: int) -> torch.Tensor:
    """Transport plan ``P`` [B, T, K] for ``exp(-strength · cost)`` with row marginals 1/T and
    column marginals ``column_marginals`` [B, K] (each summing to 1), by alternate scaling."""
    t = cost.shape[1]
    plan = torch.exp(-strength * cost)
    for _ in range(iterations):
        plan = plan * ((1.0 / t) / plan.sum(2, keepdim=True).clamp_min(1e-30))
        plan = plan * (column_marginals[:, None, :] / plan.sum(1, keepdim=True).clamp_min(1e-30))
    return plan


def cluster_centroids(z: torch.Tensor, assignment: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [B, K, D], member counts [B, K]): the L2-normalised sum of each cluster's tokens;
    a cluster left empty gets a zero centroid (as the authors' ``F.normalize`` of a zero sum),
    so its semantic cost is 0 for every token in the next round."""
    one_hot = F.one_hot(assignment, k).to(z.dtype)  # [B, T, K]
    return F.normalize(one_hot.transpose(1, 2) @ z, dim=-1), one_hot.sum(1)


def clustering_seeds(seed: int, step: int, rows: range, tokens_per_image: int, k: int) -> torch.Tensor:
    """The K seed tokens [len(rows), K] of each image of a batch, drawn without replacement from a generator
    of the image's own, seeded by the recipe's seed, the step and the image's place in the step's global
    batch (:meth:`~mlsctl.methods.base.Method.global_rows`): an image's seeds do not depend on how the
    global batch is split over processes and micro-batches, so 2 processes cluster as 1 does."""
    seeds = []
    for row in rows:
        generator = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_003 + row) % 2**63)
        seeds.append(torch.randperm(tokens_per_image, generator=generator)[:k])
    return torch.stack(seeds)


@torch.no_grad()
def joint_clustering(tokens: torch.Tensor, positions: torch.Tensor, k: int, *, iterations: int = 5,
                     lambda_pos: float = 1.0, sinkhorn_strength: float = 20.0, sinkhorn_iterations: int = 5,
                     normalize_per_image: bool = True, generator: Optional[torch.Generator] = None,
                     seed_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cluster the tokens of both views of each image jointly; returns the hard assignment [B, 2N].

    ``tokens`` [B, 2N, D] (``z_cat``, normalised here), ``positions`` [B, 2N, 2] in one frame per
    image. K seed tokens per image (drawn without replacement from ``generator``, or given as
    ``seed_indices`` [B, K]) start the centroids and are the only members of their clusters in the
    first round. Each of ``iterations`` rounds computes ``M = T_sem + lambda_pos · T_pos``
    (single-linkage positional cost to the current members; a token without another member in a
    cluster — a seed in the first round — gets the image's mean cost, see
    :func:`_fill_and_scale_positional`), min-max normalises it per image (over the batch with
    ``normalize_per_image=False``, as the authors' batched call does), solves Sinkhorn towards the
    current cluster sizes, takes the argmax assignment (ties to the lowest cluster) and recomputes
    the centroids (a cluster left empty gets a zero centroid, as in the authors' code).

    Given the same tokens, positions and seeds, the assignment equals the authors'
    ``Clustering.compute_assignments`` (batched, with ``normalize_per_image=False``; one image at a
    time, per image): ``benchmarks/cribo_reference.py`` checks it on their code."""
    z = F.normalize(tokens.float(), dim=-1)
    b, t, d = z.shape
    if k > t:
        raise ValueError(f"K={k} clusters for {t} tokens per image")
    device = z.device
    if seed_indices is None:
        seed_indices = torch.stack([torch.randperm(t, generator=generator)[:k] for _ in range(b)])
    seeds = to_device(seed_indices, device)
    centroids = torch.gather(z, 1, seeds[..., None].expand(-1, -1, d))  # [B, K, D]
    distances = neighbour_distances(positions)
    assignment = torch.full((b, t), -1, dtype=torch.long, device=device)
    assignment.scatter_(1, seeds, torch.arange(k, device=device).expand(b, k).contiguous())
    sizes = torch.full((b, k), 1.0 / k, device=device)
    for _ in range(iterations):
        semantic = -(z @ centroids.transpose(1, 2))  # T_sem [B, T, K]
        positional = _fill_and_scale_positional(single_linkage_cost(distances, assignment, k))
        cost = _min_max(semantic + lambda_pos * positional, normalize_per_image)
        plan = sinkhorn(cost, sizes, sinkhorn_strength, sinkhorn_iterations)
        assignment = plan.argmax(2)
        centroids, counts = cluster_centroids(z, assignment, k)
        sizes = counts + 1e-2
        sizes = sizes / sizes.sum(1, keepdim=True)
    return assignment


def pool_objects(tokens: torch.Tensor, assignment: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Object representations ``c_v^k`` [B, 2, K, D] (mean of the raw tokens of view v in cluster k;
    zero where empty) and ``valid`` [B, K]: cluster k is non-empty in *both* views.

    ``tokens`` [B, 2N, D] (view 1 then view 2, as clustered), ``assignment`` [B, 2N]."""
    b, t, d = tokens.shape
    n = t // 2
    one_hot = F.one_hot(assignment, k).to(tokens.dtype).reshape(b, 2, n, k)  # [B, 2, N, K]
    counts = one_hot.sum(2)  # [B, 2, K]
    weights = one_hot / counts[:, :, None, :].clamp_min(1)  # columns L1-normalised within the view
    objects = torch.einsum("bvnk,bvnd->bvkd", weights, tokens.reshape(b, 2, n, d))
    valid = (counts > 0).all(1)
    return objects, valid


@torch.no_grad()
def object_boxes(positions: torch.Tensor, assignment: torch.Tensor, k: int, patch_extent: torch.Tensor) -> torch.Tensor:
    """Bounding box (x0, y0, x1, y1) in original pixels of every cluster's patches in one view:
    [B, K, 4] (zeros where the cluster has no patch in this view).

    ``positions`` [B, N, 2] are the view's patch centres (:func:`patch_positions`), ``assignment``
    [B, N] their clusters and ``patch_extent`` [B, 2] the width and height of one patch in
    original pixels; a box reaches half a patch beyond the outermost centres."""
    member = F.one_hot(assignment, k).bool().transpose(1, 2)[..., None]  # [B, K, N, 1]
    points = positions[:, None].expand(-1, k, -1, -1)  # [B, K, N, 2]
    low = torch.where(member, points, torch.full_like(points, float("inf"))).amin(2)  # [B, K, 2]
    high = torch.where(member, points, torch.full_like(points, float("-inf"))).amax(2)
    half = patch_extent[:, None, :] / 2
    boxes = torch.cat([low - half, high + half], -1)
    return torch.where(member.any(2).expand_as(boxes), boxes, torch.zeros_like(boxes))


@torch.no_grad()
def cycle_consistent_neighbours(queries: torch.Tensor, others: torch.Tensor, bank_same: torch.Tensor,
                                bank_other: torch.Tensor, pool: Optional[torch.Tensor] = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each object (``queries`` [Q, D], view a), its nearest bank entry by cosine among
    ``bank_same`` [M, D] (the bank's view-a vectors; only the rows where ``pool`` [M] is true, if
    given); then that entry's view-b vector (``bank_other``) finds its nearest object among
    ``others`` [Q, D] (the batch's view-b objects). Returns (entry index [Q], valid [Q]): valid iff
    the cycle returns to the query (never, with an empty pool)."""
    q = F.normalize(queries.float(), dim=-1)
    bank_a = F.normalize(bank_same.float(), dim=-1)
    similarity = q @ bank_a.T
    if pool is not None:
        similarity = similarity.masked_fill(~pool, float("-inf"))
    nearest = similarity.argmax(1)
    back = (F.normalize(bank_other.float()[nearest], dim=-1) @ F.normalize(others.float(), dim=-1).T).argmax(1)
    valid = back == torch.arange(len(q), device=q.device)
    return nearest, valid if pool is None else valid & pool[nearest]
