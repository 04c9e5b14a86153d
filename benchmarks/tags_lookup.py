"""How long MLS's `bank inspect` takes to find the tags of its queues' entries at ImageNet scale.

Two queues of 65,536 entries (MLS's Q_g and Q_z, image ids drawn at random) against a tags file of
1,281,000 rows (the images of ImageNet-1k's training set, 1,000 classes of 1,281 names; no file is
read or written: the paths are only text), keyed relative to data.root (a tags file kept elsewhere)
or relative to the tags file's own folder (fmnist-scenes' scenes.jsonl, beside images/). Times
:func:`mlsctl.methods.mls.views.image_tags`, one pass over the file for both queues, and prints the
seconds of each layout; writes benchmarks/results/tags_lookup.json.

    python benchmarks/tags_lookup.py [--rows 1281000] [--entries 65536]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from mlsctl import atomic
from mlsctl.methods.mls.views import image_tags, written_images

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def seconds(layout: str, rows: int, entries: int) -> dict:
    root = Path("/nonexistent/imagenet/train")  # never touched: matching is on the paths' text
    relpaths = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(1000) for i in range(rows // 1000)]
    image_paths = [root / r for r in relpaths]
    if layout == "under data.root":
        table, tags_file = {r: ["a", "b"] for r in relpaths}, Path("/nonexistent/elsewhere/tags.jsonl")
    else:
        table, tags_file = {f"train/{r}": ["a", "b"] for r in relpaths}, root.parent / "tags.jsonl"
    generator = torch.Generator().manual_seed(0)
    banks = [type("Bank", (), {"payload": {"image_id": torch.randint(0, len(relpaths), (entries,), generator=generator),
                                           "step": torch.ones(entries, dtype=torch.long)}}) for _ in range(2)]
    started = time.perf_counter()
    slots = [written_images(bank, len(image_paths)) for bank in banks]
    tags = image_tags((i for held in slots for i in held if i is not None), image_paths, table, tags_file, root)
    took = time.perf_counter() - started
    return {"layout": layout, "rows": len(table), "queues": 2, "entries": entries, "images_tagged": len(tags),
            "seconds": round(took, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_000)
    parser.add_argument("--entries", type=int, default=65_536)
    args = parser.parse_args()
    measured = [seconds(layout, args.rows, args.entries) for layout in ("under data.root", "beside the tags file")]
    for row in measured:
        print(f"{row['layout']:>22}: {row['seconds']:6.2f} s for {row['queues']} queues of {row['entries']} entries "
              f"against {row['rows']} rows ({row['images_tagged']} images tagged)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_json(RESULTS / "tags_lookup.json", {"machine": platform.node(), "cores": os.cpu_count(),
                                                     "results": measured})
    print(f"written {RESULTS / 'tags_lookup.json'}")


if __name__ == "__main__":
    main()
