"""The k nearest neighbours of embeddings in a reference set (cosine), with self-exclusion.

:func:`nearest_neighbours` searches an exact faiss ``IndexFlatIP`` over the L2-normalised reference
and returns, for every query, the reference rows of its ``k`` most similar entries, best first.
``exclude[i]`` names the reference row query ``i`` must never see (itself, when the reference
contains the query; -1 for none): ``k + 1`` entries are searched and that row is removed *by its
index*, not by its similarity, so an exact duplicate of the query elsewhere in the reference is
still a neighbour; when the excluded row is not among the ``k + 1`` (ties), the last one is dropped.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mlsctl import threads
from mlsctl.errors import UserError


def check_reference_size(rows: int, k: int, excluding: bool, what: str, fix: str) -> None:
    """One sentence when a reference of ``rows`` embeddings cannot give each query ``k`` neighbours
    (``k + 1`` rows when the query's own row is excluded from its neighbours)."""
    needed = k + 1 if excluding else k
    if rows < needed:
        raise UserError(f"{what} holds {rows} embeddings, fewer than the {needed} a query needs (k = {k}"
                        f"{' besides itself' if excluding else ''}); {fix}")


def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, k: int,
                       exclude: Optional[torch.Tensor] = None, chunk: int = 8192,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [n, k] int64, cosine similarities [n, k]) of each query's k nearest reference rows;
    ``progress``: a bar over the queries (an exact search of 1 M against 1 M takes hours on a CPU).
    A reference that is the queries themselves (the same tensor) is normalised once."""
    parts = list(neighbour_chunks(queries, reference, k, exclude, chunk, progress))
    if not parts:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat([i for _, i, _ in parts]), torch.cat([s for _, _, s in parts])


def neighbour_chunks(queries: torch.Tensor, reference: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None,
                     chunk: int = 8192, progress: bool = False):
    """:func:`nearest_neighbours` ``chunk`` queries at a time: yields (first query row, indices [c, k],
    similarities [c, k]) from one index of the reference, so a caller holds one chunk's neighbours at a
    time (``eval recall`` at ImageNet scale: 1.28 M queries x k = 1,300 would be tens of GB at once)."""
    from tqdm import tqdm

    faiss = threads.faiss()

    q = np.ascontiguousarray(F.normalize(queries.float(), dim=-1).numpy())
    r = q if reference is queries else np.ascontiguousarray(F.normalize(reference.float(), dim=-1).numpy())
    excluding = exclude is not None and bool((exclude >= 0).any())
    wanted = k + 1 if excluding else k
    if wanted > len(r):
        raise ValueError(f"{wanted} neighbours asked of a reference of {len(r)} rows")
    index = faiss.IndexFlatIP(r.shape[1])
    index.add(r)
    with tqdm(total=len(q), desc="neighbours", unit="query", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for start in range(0, len(q), chunk):
            s, i = index.search(q[start:start + chunk], wanted)
            similarity, indices = torch.from_numpy(s), torch.from_numpy(i).long()
            bar.update(len(s))
            if excluding:
                own = indices == exclude[start:start + chunk, None]
                own[~own.any(1), -1] = True  # the excluded row lies beyond k + 1 (ties), or there is none: drop the last
                keep = ~own
                indices, similarity = indices[keep].view(len(s), k), similarity[keep].view(len(s), k)
            yield start, indices, similarity
