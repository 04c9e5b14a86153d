"""CrIBo's clustering beside the authors' code, on identical inputs: do the hard assignments agree?

    python benchmarks/cribo_reference.py --authors /path/to/CrIBo   # a checkout of tileb1/CrIBo

The authors' ``Clustering`` class is read from *their* ``main_cribo.py`` at run time (its source
is parsed and only that class is executed; nothing of it is copied here) and needs ``einops``
(``pip install einops``). For every trial both implementations get the same L2-normalised tokens
[B, 2N, D], the same patch positions (two random crop boxes of one image, through
:func:`mlsctl.methods.cribo.ops.patch_positions`) and the same K seed tokens (their
``multinomial`` call is answered with our seed indices while it runs).

Two comparisons:

* ``batch``: their batched call (min-max over the whole batch) against ours with
  ``normalize_per_image=False``;
* ``image``: their code on one image at a time against our per-image default. Their call cannot
  take a batch of one (``r_uni.squeeze()`` drops the batch axis), so each image goes in twice with
  the same seeds — two identical copies share one minimum and one maximum, which is the per-image
  normalisation — and the first copy is compared.

A token whose plan row holds the same maximum in several clusters is a tie (their code marks all
of them; ours picks the lowest): ties are counted apart. Prints a table and writes
``benchmarks/results/cribo_reference.json``.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlsctl import atomic  # noqa: E402
from mlsctl.methods.cribo.ops import joint_clustering, patch_positions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cribo_reference.json"


def authors_clustering(checkout: Path):
    """The authors' ``Clustering`` class, executed from their source file."""
    import einops

    source = (checkout / "main_cribo.py").read_text()
    tree = ast.parse(source)
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Clustering")
    namespace = {"torch": torch, "F": F, "np": np, "einops": einops, "rearrange": einops.rearrange,
                 "repeat": einops.repeat, "reduce": einops.reduce}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(checkout / "main_cribo.py"), "exec"), namespace)
    return namespace["Clustering"]


def random_views(b: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Positions [B, 2·grid², 2] of two random crops (with flips) of a 224-pixel image."""
    views = []
    for _ in range(2):
        low = torch.rand(b, 2, generator=generator) * 112
        size = 56 + torch.rand(b, 1, generator=generator) * 112
        boxes = torch.cat([low, low + size], 1)
        flips = torch.rand(b, generator=generator) < 0.5
        views.append(patch_positions(boxes, flips, (grid, grid)))
    return torch.cat(views, 1)


def tokens_for(b: int, t: int, d: int, kind: str, generator: torch.Generator, positions: torch.Tensor) -> torch.Tensor:
    if kind == "noise":
        return torch.randn(b, t, d, generator=generator)
    # "scene": a few smooth regions of the image with their own direction, plus noise
    centres = torch.rand(b, 5, 2, generator=generator) * 224
    directions = torch.randn(b, 5, d, generator=generator)
    nearest = torch.cdist(positions, centres).argmin(-1)  # [B, T]
    return torch.gather(directions, 1, nearest[..., None].expand(-1, -1, d)) + 0.5 * torch.randn(b, t, d, generator=generator)


class given_seeds:
    """While active, ``Tensor.multinomial`` (the authors' seed draw) returns ``seeds``."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds

    def __enter__(self):
        self.original = torch.Tensor.multinomial
        torch.Tensor.multinomial = lambda tensor, num_samples, replacement=False: self.seeds.clone()

    def __exit__(self, *exc):
        torch.Tensor.multinomial = self.original


def their_hard(assignment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster of each token, tie mask) from their column-normalised one-hot assignment."""
    member = assignment > 0
    return member.float().argmax(-1), member.sum(-1) > 1


def compare(Clustering, b: int, grid: int, d: int, k: int, lambda_pos: float, kind: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    t = 2 * grid * grid
    positions = random_views(b, grid, generator)
    tokens = tokens_for(b, t, d, kind, generator, positions)
    args = SimpleNamespace(gpu="cpu", n_iter=5, update_c=True, patch_size=16, epochs=1)
    theirs = Clustering(args, n_tokens=k, n_heads=1, sinkhorn_lambda=20.0, sinkhorn_iterations=5)
    out = {}
    for mode in ("batch", "image"):
        agree = ties = total = 0
        groups = [list(range(b))] if mode == "batch" else [[i, i] for i in range(b)]
        for group in groups:
            x, p = tokens[group], positions[group]
            seeds = torch.stack([torch.randperm(t, generator=generator)[:k] for _ in range(b)])[group]
            with given_seeds(seeds):
                assignment, _, _ = theirs.compute_assignments(x.clone(), p.clone(), k, lambda_pos, 20.0, 5)
            reference, tie = their_hard(assignment)
            ours = joint_clustering(x, p, k, lambda_pos=lambda_pos, sinkhorn_strength=20.0, sinkhorn_iterations=5,
                                    normalize_per_image=mode == "image", seed_indices=seeds)
            rows = slice(None) if mode == "batch" else slice(0, 1)
            same = (ours[rows] == reference[rows]) | tie[rows]
            agree += int(same.sum())
            ties += int(tie[rows].sum())
            total += same.numel()
        out[mode] = {"tokens": total, "agree": agree, "ties": ties, "agreement": agree / total}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of tileb1/CrIBo")
    parser.add_argument("--seeds", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(2)
    Clustering = authors_clustering(options.authors)
    settings = [  # (B, grid, D, K, lambda_pos, tokens)
        (4, 6, 32, 8, 2.0, "noise"), (4, 6, 32, 8, 2.0, "scene"), (4, 8, 64, 16, 1.0, "scene"),
        (4, 14, 64, 32, 1.0, "scene"), (4, 14, 64, 64, 2.0, "scene"), (4, 14, 64, 64, 2.0, "noise"),
    ]
    rows = []
    started = time.perf_counter()
    for b, grid, d, k, lam, kind in settings:
        for seed in range(options.seeds):
            result = compare(Clustering, b, grid, d, k, lam, kind, seed)
            rows.append({"batch": b, "tokens_per_image": 2 * grid * grid, "dim": d, "k": k, "lambda_pos": lam,
                         "tokens": kind, "seed": seed, **result})
            print(f"B={b} T={2 * grid * grid:3d} K={k:2d} lambda={lam} {kind:5s} seed {seed}: "
                  f"batch {result['batch']['agree']}/{result['batch']['tokens']} "
                  f"(ties {result['batch']['ties']}), per image {result['image']['agree']}/{result['image']['tokens']} "
                  f"(ties {result['image']['ties']})", flush=True)
    totals = {mode: {"agree": sum(r[mode]["agree"] for r in rows), "tokens": sum(r[mode]["tokens"] for r in rows),
                     "ties": sum(r[mode]["ties"] for r in rows)} for mode in ("batch", "image")}
    for mode, total in totals.items():
        print(f"{mode}: {total['agree']} of {total['tokens']} tokens assigned alike ({total['ties']} ties)")
    atomic.write_json(RESULTS, {"authors": str(options.authors), "seconds": round(time.perf_counter() - started, 1),
                                "totals": totals, "rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
