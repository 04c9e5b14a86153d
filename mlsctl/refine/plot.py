"""The supplement's pictures of context refinement (PNG, matplotlib).

* :func:`drift_figure` (supplement Figs. 2–9): ``points`` embeddings (500, a seeded sample) of a
  feature folder refined block by block, e⁰ → e¹ → … → e^T, projected to 2-D together (PCA, or
  PCA to 50 dimensions then t-SNE as the supplement does, with scikit-learn); each embedding is a
  track through the blocks coloured by its class, a small circle at e⁰ and a dot at e^T. The
  right panel follows one query with its k neighbours (the context embeddings it attends to,
  frame colour = their class, green edge = the query's class, marker area = the last block's
  attention; each neighbour is annotated with its attention and its cosine to the query's e⁰ and
  e^T, which the 2-D projection cannot show). The query shown is the first of the sample (in row order) whose nearest neighbour
  in the context changes from another class at e⁰ to its own class at e^T; when there is none,
  the first of the sample. The title says which.
* :func:`grid_figure` (supplement Fig. 1): R@1 over blocks × neighbours, mean over seeds (± std
  when there are several), from a sweep's JSON (``benchmarks/refine_fidelity.py`` writes one):
  ``{"grid": [{"blocks": T, "k": k, "seed": s, "recall": {"1": r1, ...}}, ...]}``; blocks 0 is the
  unrefined baseline.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mlsctl.console import counted
from mlsctl.errors import UserError
from mlsctl.outputs import literal_text, pyplot, save_figure

PROJECTIONS = ("pca", "tsne")


def _project(points: np.ndarray, projection: str, seed: int) -> np.ndarray:
    centred = points - points.mean(0, keepdims=True)
    if projection == "pca":
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        raise UserError("--projection tsne needs scikit-learn: pip install 'mlsctl[tsne]' (or use --projection pca)") from None
    reduced = PCA(n_components=min(50, points.shape[1], len(points)), random_state=seed).fit_transform(centred)
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, max(5.0, len(points) / 100))
                ).fit_transform(reduced)


EXACT_PICK_ROWS = 20_000  # contexts up to this size are refined whole to pick the query (seconds on a CPU)


def _refined_context(refiner, context, context_x: torch.Tensor, k: int, rows: torch.Tensor):
    """(context rows, their refined features) that the query pick searches: the whole context when it
    has at most :data:`EXACT_PICK_ROWS` rows; beyond, the sampled queries' k neighbours only (refining
    every row is an exact search of the context against itself: hours at 1 M rows); None when the
    context is too small for a row to have k neighbours besides itself."""
    from mlsctl.refine.apply import refine

    if len(context) <= k:
        return None
    ids = torch.arange(len(context)) if len(context) <= EXACT_PICK_ROWS else torch.unique(rows.flatten())
    return ids, refine(refiner, context.global_features(ids.tolist()), context_x, k, ids)


def _pick_query(before: torch.Tensor, after: torch.Tensor, context_before: torch.Tensor, refined_context,
                own_rows: torch.Tensor, labels: list[str], context_names: list[str]) -> tuple[int, bool]:
    """(index, True) of the first query whose nearest neighbour turns from another class to its own as
    retrieval sees it — e⁰ (``before``) among the context's e⁰, the refined output (``after``, final layer
    included) among the context refined alike (``refined_context``: :func:`_refined_context`; eval recall
    compares refined with refined features, and against the unrefined context the pick measured a mixture
    of the two) — each query's own row excluded; (0, False) when none does."""
    from mlsctl.methods.refine.neighbours import nearest_neighbours

    if refined_context is None:
        return 0, False
    ids, refined = refined_context
    position = {int(row): j for j, row in enumerate(ids)}
    nearest_before, _ = nearest_neighbours(before, context_before, 1, own_rows)
    nearest_after, _ = nearest_neighbours(after, refined, 1, torch.tensor([position.get(int(r), -1) for r in own_rows]))
    for i, label in enumerate(labels):
        if (context_names[int(nearest_before[i, 0])] != label
                and context_names[int(ids[int(nearest_after[i, 0])])] == label):
            return i, True
    return 0, False


def _draw_tracks(ax, tracks: np.ndarray, labels: list[str], colour: dict, sup: str, projection: str) -> None:
    """The left panel: each embedding's track e⁰ → … → e^T (``tracks``: [T + 1, n, 2]) in its class colour, a
    small circle at e⁰ and a dot at e^T."""
    n = tracks.shape[1]
    for i in range(n):
        c = colour[labels[i]]
        ax.plot(tracks[:, i, 0], tracks[:, i, 1], "-", color=c, alpha=0.55, linewidth=0.8)
        ax.scatter(tracks[0, i, 0], tracks[0, i, 1], s=10, facecolors="none", edgecolors=[c], linewidths=0.6)
        ax.scatter(tracks[-1, i, 0], tracks[-1, i, 1], s=14, color=[c])
    repeat = ", colours repeat" if len(colour) > 20 else ""  # tab20: said only where it happens (a new user)
    ax.set_title(f"{n} embeddings, e⁰ (circle) → e{sup} (dot), one colour per class "
                 f"({counted(len(set(labels)), 'class', 'classes')}{repeat})", fontsize=10)
    ax.set_xlabel(f"{projection.upper()} 1")
    ax.set_ylabel(f"{projection.upper()} 2")


def _draw_query(ax, q_track: np.ndarray, q_class: str, q_states: torch.Tensor, neighbour_xy: np.ndarray,
                neighbour_names: list[str], neighbour_x: torch.Tensor, attention: torch.Tensor, colour: dict,
                sup: str) -> None:
    """The right panel: the query's track e⁰ → e^T (``q_track``: [T + 1, 2], of its states ``q_states``:
    [T + 1, d]) and its k context neighbours (``neighbour_x``: their unit rows) as numbered squares (area: the
    last block's ``attention``), with a table beside the panel of each one's class, attention a and cosine to the
    query's e⁰ → e^T."""
    cos_before, cos_after = neighbour_x @ q_states[0], neighbour_x @ q_states[-1]
    ax.plot(q_track[:, 0], q_track[:, 1], "-o", color="black", markersize=3, linewidth=1.5,
            label=f"query ({q_class}) e⁰ (circle) → e{sup} (star, its class colour)")
    ax.scatter(q_track[0, 0], q_track[0, 1], s=120, facecolors="none", edgecolors="black", linewidths=2)
    ax.scatter(q_track[-1, 0], q_track[-1, 1], s=220, marker="*", color=[colour[q_class]], edgecolors="black")
    # each square numbered, its values in a table beside the panel: labels beside squares that lie close together
    # piled up unreadably (a new user's run-through, 2026-12-06)
    rows_text = [f"{'':2} {'class':<12} {'same':>4} {'a':>5} {'cos e⁰→e' + sup:>13}"]
    for j, name in enumerate(neighbour_names):
        same = name == q_class
        # fill: the neighbour's class colour; frame: solid black for the query's class, dashed grey for another
        # (green and red frames read as class colours of the palette: a new user, 2026-12-06)
        ax.scatter(neighbour_xy[j, 0], neighbour_xy[j, 1], s=60 + 1500 * float(attention[j]), marker="s",
                   color=[colour[name]], edgecolors="black" if same else "grey", linewidths=2.5 if same else 1.5,
                   linestyles="solid" if same else "dashed")
        ax.annotate(str(j + 1), neighbour_xy[j], textcoords="offset points", xytext=(5, 5), fontsize=9,
                    fontweight="bold")
        rows_text.append(f"{j + 1:>2} {name[:12]:<12} {'yes' if same else 'no':>4} {float(attention[j]):5.2f} "
                         f"{float(cos_before[j]):6.2f} → {float(cos_after[j]):5.2f}")
    ax.text(1.02, 1.0, "\n".join(rows_text), transform=ax.transAxes, va="top", ha="left", fontsize=8,
            family="monospace")
    ax.scatter([], [], marker="s", color="white", edgecolors="black", linewidths=2.5,
               label="neighbour of the query's class (fill: its class colour)")
    ax.scatter([], [], marker="s", color="white", edgecolors="grey", linewidths=1.5, linestyles="dashed",
               label="neighbour of another class")


@literal_text
def drift_figure(run_dir: str | Path, feats_dir: str | Path, out: str | Path, *, context_dir: Optional[str | Path] = None,
                 labels_file: Optional[Path] = None, points: int = 500, projection: str = "pca", seed: int = 0,
                 k: Optional[int] = None) -> dict:
    """Draw the drift picture of ``feats_dir`` refined by the run; returns what was drawn."""
    plt = pyplot()

    from mlsctl.evaluate.knn import labels_for
    from mlsctl.refine.apply import open_inputs, refine, self_rows
    from mlsctl.methods.refine.neighbours import check_reference_size

    if projection not in PROJECTIONS:
        raise UserError(f"--projection {projection} is not one of {', '.join(PROJECTIONS)}")
    loaded, features, context = open_inputs(run_dir, feats_dir, context_dir)
    k = k or loaded.cfg.neighbours
    names = labels_for(features, labels_file, "", "--labels")
    context_names = names if context is features else labels_for(context, labels_file, "context", "--labels")
    exclude_all = self_rows(features, context)
    check_reference_size(len(context), k, bool((exclude_all >= 0).any()), f"context features {context.path}",
                         "give a larger context or a smaller --k")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(features), generator=generator)[:points].sort().values
    queries = features.global_features(chosen.tolist())
    context_x = torch.nn.functional.normalize(context.global_features(), dim=-1)
    refined, states, attentions, rows = refine(loaded.refiner, queries, context_x, k, exclude_all[chosen], trace=True)
    n, T = len(chosen), states.shape[0] - 1
    labels = [names[i] for i in chosen.tolist()]
    pick, fixed = _pick_query(states[0], refined, context_x, _refined_context(loaded.refiner, context, context_x, k, rows),
                              exclude_all[chosen], labels, context_names)
    neighbour_rows = rows[pick]
    stacked = torch.cat([states.reshape(-1, states.shape[-1]), context_x[neighbour_rows]]).numpy()
    flat = _project(stacked, projection, seed)
    tracks = flat[: (T + 1) * n].reshape(T + 1, n, 2)
    neighbour_xy = flat[(T + 1) * n:]

    sup = str(T).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))  # e⁸, as e⁰ is drawn (not e^8)
    classes = sorted(set(labels) | {context_names[int(r)] for r in neighbour_rows})
    cmap = plt.get_cmap("tab20")
    colour = {c: cmap(i % 20) for i, c in enumerate(classes)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(18, 7))
    _draw_tracks(left, tracks, labels, colour, sup, projection)
    q_class = labels[pick]
    last_attention = attentions[-1, pick] if attentions.numel() else torch.full((k,), 1.0 / k)
    _draw_query(right, tracks[:, pick], q_class, states[:, pick], neighbour_xy,
                [context_names[row] for row in neighbour_rows.tolist()], context_x[neighbour_rows], last_attention,
                colour, sup)
    among = f"its e{sup}" if len(context) <= EXACT_PICK_ROWS else f"the e{sup} of its rows near the sampled queries"
    how = (f"its nearest neighbour turns from another class to its own (e⁰ among the context's e⁰, e{sup} among {among})"
           if fixed else "no sampled query's nearest neighbour turns to its own class; the first one")
    right.set_title(f"one query and its {k} neighbours, numbered (square area and a: the last block's attention; "
                    f"cos: to the query's e⁰ → e{sup})\n"
                    f"query shown: {how}", fontsize=10)
    right.legend(fontsize=8, loc="best")
    figure.suptitle(f"context refinement drift: {Path(feats_dir).name} refined by {Path(run_dir).name} "
                    f"(T = {T} blocks, k = {k}, context {Path(context.path).name})")
    figure.tight_layout()
    out = Path(out)
    save_figure(figure, out, dpi=110)
    plt.close(figure)
    return {"out": str(out), "points": n, "blocks": T, "k": k, "projection": projection,
            "query": {"file": features.files[int(chosen[pick])], "class": q_class, "nearest_class_fixed": fixed}}


def read_sweep(path: Path) -> list[dict]:
    from mlsctl.data.labels import read_text_file

    try:
        data = json.loads(read_text_file(Path(path), "sweep file"))
        grid = data["grid"]
        rows = [{"blocks": int(r["blocks"]), "k": int(r["k"]), "seed": int(r.get("seed", 0)),
                 "r1": float(r["recall"]["1"])} for r in grid]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a sweep JSON ({{\"grid\": [{{\"blocks\", \"k\", \"seed\", \"recall\": "
                        f"{{\"1\": ...}}}}]}}, as benchmarks/refine_fidelity.py writes)") from None
    if not rows:
        raise UserError(f"sweep file {path} holds no grid rows")
    return rows


@literal_text
def grid_figure(sweep: str | Path, out: str | Path, title: str = "") -> dict:
    """The R@1 heat map over blocks (rows) × neighbours (columns) of a sweep."""
    plt = pyplot()

    rows = read_sweep(Path(sweep))
    blocks = sorted({r["blocks"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    mean = np.full((len(blocks), len(ks)), np.nan)
    std = np.zeros_like(mean)
    seeds = np.zeros_like(mean, dtype=int)
    for a, b in enumerate(blocks):
        for c, k in enumerate(ks):
            values = [r["r1"] for r in rows if r["blocks"] == b and r["k"] == k]
            if values:
                mean[a, c] = 100 * np.mean(values)
                std[a, c] = 100 * np.std(values, ddof=1) if len(values) > 1 else 0.0
                seeds[a, c] = len(values)
    n_seeds = int(seeds.max())
    title = title or f"R@1 (%) over blocks x neighbours, mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    width = 1.6 * len(ks) + 2.5
    title = textwrap.fill(title, width=max(30, int(width * 11)))  # a narrow grid (one k) cut a long title off
    figure, axis = plt.subplots(figsize=(width, 0.8 * len(blocks) + 1.6 + 0.2 * (title.count("\n") + 1)))
    image = axis.imshow(mean, cmap="viridis", aspect="auto")
    for a in range(len(blocks)):
        for c in range(len(ks)):
            if not np.isnan(mean[a, c]):
                text = f"{mean[a, c]:.1f}" + (f"\n± {std[a, c]:.1f}" if seeds[a, c] > 1 else "")
                bright = mean[a, c] > np.nanmean(mean)
                axis.text(c, a, text, ha="center", va="center", fontsize=9, color="black" if bright else "white")
    axis.set_xticks(range(len(ks)), [str(k) for k in ks])
    axis.set_yticks(range(len(blocks)), [f"{b}" + (" (baseline)" if b == 0 else "") for b in blocks])
    axis.set_xlabel("neighbours k")
    axis.set_ylabel("cross-attention blocks T")
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, label="R@1 (%)")
    figure.tight_layout()
    out = Path(out)
    save_figure(figure, out, dpi=110)
    plt.close(figure)
    return {"out": str(out), "blocks": blocks, "k": ks,
            "r1": {f"{b}x{k}": (None if np.isnan(mean[a, c]) else round(float(mean[a, c]), 2))
                   for a, b in enumerate(blocks) for c, k in enumerate(ks)}}
