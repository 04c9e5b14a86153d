"""SOVE's operations as pure functions (Silva et al., §2.2–2.3; docs/methods.md#sove).

Notation (paper → code):

* ``E`` — a memory of L2-normalised teacher embeddings [N, d] (``E_C`` for CLS, ``E_P`` for patches);
* ``A`` — the anchors: K memory entries drawn at random for one *task*;
* supports — each anchor's k nearest entries among the rest of the memory (the *pool*: the memory
  minus every anchor of the task), with their cosine ``s`` to the anchor clamped to [0, 1]; the
  anchor itself is a support too, with score ``1 − eps``;
* ``D`` — the judges: every support of every anchor stacked, [K(k+1), d] (here [K, k+1, d]);
* ``Y`` — the soft labels [K(k+1), K]: ``Y[r, j] = s_r`` when support r belongs to anchor j,
  ``(1 − s_r)/(K − 1)`` otherwise, so every row sums to 1;
* ``P(u; τ) = softmax(u · Dᵀ / τ) · Y`` — a view's vote distribution over the K concepts.

:func:`sample_judges` draws ``T`` independent tasks at once: the anchors of every task are scored
against the memory in tiles of anchor rows × memory rows (never a [K, N] matrix), each task's
own anchors left out of its pool (optionally scored in bfloat16 and rescored exactly).
:func:`judge_probabilities` computes ``P`` without building
``Y``: with ``p = softmax(u·Dᵀ/τ)`` and ``o_r = (1 − s_r)/(K − 1)``,
``P_j = Σ_r p_r o_r + Σ_{r ∈ j} p_r (s_r − o_r)`` — the same numbers as the dense product
(:func:`soft_labels` builds the dense ``Y`` for tests and small cases), in O(B·K(k+1)).

Departures from the authors' code (``sthalles/sop``, ``memory_bank.py``), each on purpose
(docs/methods.md#sove-departures):

* scores are clamped to [0, 1]: theirs are not, so a negative cosine gives a negative row of ``Y``
  and the loss can turn NaN;
* their default ``'low_energy'`` selection keeps a uniform random half of the drawn anchors (the
  weights it samples with are all equal) after searching supports in the memory minus *all* drawn
  anchors; ``anchor_selection="half"`` reproduces exactly that, ``"all"`` (the paper's text) keeps
  every anchor. Their halving runs on the CLS memory only (the patch tasks keep all their anchors),
  so the method passes ``"half"`` for the CLS tasks alone (:meth:`mlsctl.methods.sove.SOVE.anchor_selection_for`);
* :func:`patch_loss` averages over the views with at least one masked patch, where the authors count
  the others as 0 in the batch mean;
* their judge building holds the full [K, N] similarity matrix (1 GiB in float32 at N=65,536,
  K=4,096, before its dense Y; the dense way peaked at +6.3 GB in ``benchmarks/sove_judges.py``);
  ours works in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from mlsctl.device import full_float32, to_device

LOG_FLOOR = 1e-12  # the clamp of every log: a vote of 0 costs log(1e-12), not inf


@dataclass
class Judges:
    """``T`` tasks of judges: ``vectors`` D [T, K, k+1, d], ``scores`` s [T, K, k+1] (column 0 is
    the anchor itself, score 1 − eps; then its k supports by decreasing cosine), ``slots`` [T, K, k+1]
    the memory rows they came from."""

    vectors: torch.Tensor
    scores: torch.Tensor
    slots: torch.Tensor

    @property
    def n_tasks(self) -> int:
        return self.vectors.shape[0]

    @property
    def n_concepts(self) -> int:
        return self.vectors.shape[1]

    def task(self, t: int) -> "Judges":
        return Judges(self.vectors[t:t + 1], self.scores[t:t + 1], self.slots[t:t + 1])


def draw_anchors(memory_size: int, n_tasks: int, n_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """[T, K] memory rows: per task, the first K of a fresh random permutation (re-drawn every step:
    fixed anchors collapse)."""
    return torch.stack([torch.randperm(memory_size, generator=generator)[:n_anchors] for _ in range(n_tasks)])


def pool_rows_without(anchors: torch.Tensor, n: int) -> torch.Tensor:
    """The rows ``0..n-1`` other than ``anchors`` (distinct rows, as :func:`draw_anchors` draws
    them), in order: [n - K], what a mask's ``nonzero`` gives without its host synchronisation
    (the count is known). Pool row ``j`` is ``j`` plus the number of sorted anchors ``a_i`` with
    ``a_i - i <= j`` (``a_i - i``: the pool rows before anchor ``i``)."""
    k, device = len(anchors), anchors.device
    before = anchors.sort().values - torch.arange(k, device=device)
    j = torch.arange(n - k, device=device)
    return j + torch.searchsorted(before, j, right=True)


@torch.no_grad()
def nearest_supports(memory: torch.Tensor, anchors: torch.Tensor, k: int, chunk: int = 512, tile: int = 16384,
                     search: Literal["exact", "bf16"] = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's ``k`` nearest memory rows by inner product, excluding every anchor of its own
    task. ``memory`` [N, d] (unit rows), ``anchors`` [T, K] row indices. Returns cosines and rows,
    [T, K, k] each.

    Per task the pool (memory minus the task's anchors) is gathered once; anchors are scored
    ``chunk`` rows against ``tile`` pool rows at a time, each tile's best kept (peak extra memory
    ``chunk × tile`` scores, never [K, N]). ``search="bf16"`` scores in bfloat16 (4× faster on CPUs
    with AVX-512 BF16) and rescoring the best ``2k`` candidates of each anchor in float32: the
    returned cosines are exact, the chosen rows may differ from exact search where bf16 rounding
    (≈ 4e-3) reorders near-ties at the k-th place (``benchmarks/sove_judges.py`` measures how often)."""
    n_tasks, n_anchors = anchors.shape
    n, device = memory.shape[0], memory.device
    anchors = to_device(anchors, device)
    values = torch.empty(n_tasks, n_anchors, k, dtype=torch.float32, device=device)
    rows = torch.empty(n_tasks, n_anchors, k, dtype=torch.long, device=device)
    if k == 0:
        return values, rows
    if search not in ("exact", "bf16"):
        raise ValueError(f"search must be 'exact' or 'bf16', got {search!r}")
    keys = memory.float()
    candidates = k if search == "exact" else min(2 * k, n - n_anchors)
    score_dtype = torch.float32 if search == "exact" else torch.bfloat16
    for t in range(n_tasks):
        pool_rows = pool_rows_without(anchors[t], n)  # [N - K]
        pool = keys[pool_rows].to(score_dtype)
        for start in range(0, n_anchors, chunk):
            queries = keys[anchors[t, start:start + chunk]]
            query_scores = queries.to(score_dtype)
            best_v = best_i = None
            for c0 in range(0, len(pool_rows), tile):
                sims = query_scores @ pool[c0:c0 + tile].T  # bf16: ranked as bf16, rescored below
                top = sims.topk(min(candidates, sims.shape[1]), dim=1)
                tile_i = top.indices + c0
                if best_v is None:
                    best_v, best_i = top.values, tile_i
                else:
                    merged = torch.cat([best_v, top.values], 1).topk(candidates, dim=1)
                    best_i = torch.cat([best_i, tile_i], 1).gather(1, merged.indices)
                    best_v = merged.values
            found = pool_rows[best_i]  # memory rows [chunk, candidates]
            if search == "bf16":  # exact cosines of the candidates, then the best k of them
                exact = (keys[found] * queries[:, None]).sum(-1)
                top = exact.topk(k, dim=1)
                best_v, found = top.values, found.gather(1, top.indices)
            values[t, start:start + chunk], rows[t, start:start + chunk] = best_v, found
    return values, rows


@torch.no_grad()
def sample_judges(memory: torch.Tensor, n_tasks: int, n_anchors: int, k: int, *, eps: float,
                  generator: torch.Generator, anchor_selection: Literal["all", "half"] = "all",
                  chunk: int = 512, search: Literal["exact", "bf16"] = "exact") -> Judges:
    """``n_tasks`` independent tasks of judge selection over ``memory`` [N, d] (unit rows).

    Per task: K anchors drawn at random, their k supports from the pool (memory minus the task's
    anchors), scores clamped to [0, 1], the anchor itself with score ``1 − eps``. With
    ``anchor_selection="half"`` a uniform random half of the anchors is kept afterwards (the
    authors' default); the randomness all comes from ``generator`` (a CPU generator)."""
    with full_float32(memory.device.type):  # the search and scores in float32 under mixed precision (and without TF32)
        return _sample_judges(memory, n_tasks, n_anchors, k, eps, generator, anchor_selection, chunk, search)


def _sample_judges(memory, n_tasks, n_anchors, k, eps, generator, anchor_selection, chunk, search) -> Judges:
    n = memory.shape[0]
    if n_anchors < 2 or n_anchors > n:
        raise ValueError(f"need 2 <= anchors <= memory size ({n}), got {n_anchors}")
    if k > n - n_anchors:
        raise ValueError(f"k={k} supports need a pool of at least k entries; the pool holds {n - n_anchors}")
    anchors = draw_anchors(n, n_tasks, n_anchors, generator)
    cosines, rows = nearest_supports(memory, anchors, k, chunk, search=search)
    anchors = to_device(anchors, memory.device)
    if anchor_selection == "half":
        keep = torch.stack([torch.randperm(n_anchors, generator=generator)[:n_anchors // 2] for _ in range(n_tasks)])
        keep = to_device(keep, memory.device)
        anchors = anchors.gather(1, keep)
        cosines = cosines.gather(1, keep[..., None].expand(-1, -1, k))
        rows = rows.gather(1, keep[..., None].expand(-1, -1, k))
    elif anchor_selection != "all":
        raise ValueError(f"anchor_selection must be 'all' or 'half', got {anchor_selection!r}")
    slots = torch.cat([anchors[..., None], rows], dim=2)  # [T, K', k+1]
    own = torch.full_like(anchors, 1.0 - eps, dtype=torch.float32)[..., None]
    scores = torch.cat([own, cosines.clamp(0.0, 1.0)], dim=2)
    return Judges(memory[slots].float(), scores, slots)


def soft_labels(scores: torch.Tensor) -> torch.Tensor:
    """The dense soft labels Y [K(k+1), K] of one task's scores [K, k+1] (rows sum to 1)."""
    n_concepts, per = scores.shape
    s = scores.reshape(-1, 1)
    owner = torch.arange(n_concepts, device=scores.device).repeat_interleave(per)
    labels = ((1 - s) / (n_concepts - 1)).expand(-1, n_concepts).clone()
    labels[torch.arange(len(owner), device=scores.device), owner] = s[:, 0]
    return labels


def judge_probabilities(u: torch.Tensor, vectors: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P(u; τ) = softmax(u · Dᵀ / τ) · Y`` [B, K] for embeddings ``u`` [B, d] and one task's judges
    ``vectors`` [K, k+1, d] with ``scores`` [K, k+1], without building Y (module docstring). Computed
    in float32 also under autocast (a bf16 logit at tau=0.04 would be off by about 0.1)."""
    with full_float32(u.device.type):
        return _judge_probabilities(u, vectors, scores, temperature)


def _judge_probabilities(u: torch.Tensor, vectors: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    n_concepts, per, dim = vectors.shape
    logits = u.float() @ vectors.reshape(-1, dim).T / temperature  # [B, K(k+1)]
    p = torch.softmax(logits, dim=-1)
    off = (1 - scores) / (n_concepts - 1)  # [K, k+1]: the label of support r outside its concept
    base = p @ off.reshape(-1, 1)  # [B, 1]: Σ_r p_r o_r
    return base + (p.view(-1, n_concepts, per) * (scores - off)).sum(-1)


def cross_entropy(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """``H(p, q) = −Σ p log q`` per row, with the log clamped at :data:`LOG_FLOOR`."""
    return -(target.float() * prediction.float().clamp_min(LOG_FLOOR).log()).sum(-1)


def cls_loss(student_probs: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cross-view SOVE loss of one task: each teacher global view ``i`` against every student view
    ``v ≠ i`` (global views first in both), ``H(P_t, P_s)`` averaged over images and pairs."""
    total, pairs = student_probs[0].new_zeros(()), 0
    for i, target in enumerate(teacher_probs):
        for v, prediction in enumerate(student_probs):
            if v != i:
                total = total + cross_entropy(target, prediction).mean()
                pairs += 1
    if pairs == 0:
        raise ValueError("cls_loss needs at least one cross-view pair (two views)")
    return total / pairs


def patch_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor, image_of: torch.Tensor,
               n_images: int) -> torch.Tensor:
    """Non-parametric MIM loss: ``H(P_t, P_s)`` of each *masked* patch (rows of ``student_probs`` /
    ``teacher_probs`` [M, K], their view-image in ``image_of`` [M]) averaged per view-image, then
    over the view-images with at least one masked patch.

    The authors count a view without masked patches as 0 in the batch mean, which lowers the loss
    with the share of unmasked views; we leave such views out of the mean
    (docs/methods.md#sove-departures). No masked patch at all gives 0 (still connected to the graph)."""
    if len(image_of) == 0:
        return student_probs.sum() * 0.0
    per_patch = cross_entropy(teacher_probs, student_probs)
    sums = per_patch.new_zeros(n_images).index_add(0, image_of, per_patch)
    # bincount's counts without it: on CUDA it reads the indices' range on the host (a synchronisation)
    counts = image_of.new_zeros(n_images).index_add(0, image_of, torch.ones_like(image_of)).to(per_patch.dtype)
    # the view-images with a masked patch: one host synchronisation for their number (indexing by
    # them, forward and backward, needs none; a boolean mask would take one each time)
    present = (counts > 0).nonzero(as_tuple=True)[0]
    return (sums[present] / counts[present]).mean()


def judge_overlap(slots: torch.Tensor, memory_size: Optional[int] = None) -> dict:
    """How many memory entries support more than one anchor in one task (``slots`` [K, k+1], the
    anchor in column 0 is left out: anchors never support each other)."""
    supports = slots[:, 1:].reshape(-1)
    if supports.numel() == 0:
        return {"supports": 0, "distinct": 0, "shared": 0, "shared_share": 0.0, "max_anchors_per_entry": 0}
    counts = torch.bincount(supports, minlength=memory_size or 0)
    used = counts[counts > 0]
    shared = int((used > 1).sum())
    return {"supports": int(supports.numel()), "distinct": int(len(used)), "shared": shared,
            "shared_share": shared / max(1, len(used)), "max_anchors_per_entry": int(used.max())}
