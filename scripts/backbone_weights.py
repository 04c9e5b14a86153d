"""A run's teacher as the bf16 weights file of ``weights/`` (and back from the parts a device window brings).

    python scripts/backbone_weights.py RUN OUT_PREFIX      # OUT_PREFIX.safetensors, in parts of < 16 MiB
    python scripts/backbone_weights.py --join OUT_PREFIX DEST.safetensors

The file is ``RUN/teacher.safetensors`` (timm's key layout, what ``model.weights`` and ``--weights``
read) in bfloat16, with its metadata (``model``: the architecture) and the provenance a reader needs:
the run's method, data, steps, seed and recipe. A device window returns files of at most 16 MiB, so
the file is written in parts (``OUT_PREFIX.safetensors.part0``, ``part1``, ...) when larger;
``--join`` puts them back together and checks the result loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mlsctl from this checkout, installed or not

PART_BYTES = 15 * 2**20


def to_bf16(run: Path, out_prefix: Path) -> list[Path]:
    import torch
    import yaml
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mlsctl import atomic

    teacher = run / "teacher.safetensors"
    with safe_open(str(teacher), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        state = {k: handle.get_tensor(k).to(torch.bfloat16).contiguous() for k in handle.keys()}
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    metadata["provenance"] = json.dumps({
        "run": run.name, "method": recipe["method"]["name"], "data": recipe["data"]["root"], "seed": recipe["seed"],
        "steps": summary["steps"], "epochs": recipe["optim"]["epochs"], "batch_size": recipe["optim"]["batch_size"],
        "recipe_sha256": hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest(), "dtype": "bfloat16",
        # where and how it trained (the last session's, for a resumed run) and the code it ended with
        "device": summary.get("device"), "precision": summary.get("precision"), "finished": summary.get("finished"),
        "commit": summary.get("commit"), "processes": summary.get("processes"),
    }, sort_keys=True)
    out = out_prefix.with_name(out_prefix.name + ".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    # written whole outside the folder first: a device window cut while the whole 20 MB file sat in $OUT would
    # leave a file over the 16 MiB that come back, and no parts (a review, 2026-12-06)
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / out.name
        save_file(state, str(whole), metadata=metadata)
        data = whole.read_bytes()
    if len(data) <= PART_BYTES:
        atomic.write_bytes(out, data)
        return [out]
    parts = []
    for i in range(0, len(data), PART_BYTES):
        part = out.with_name(f"{out.name}.part{i // PART_BYTES}")
        atomic.write_bytes(part, data[i:i + PART_BYTES])
        parts.append(part)
    return parts


def join(prefix: Path, dest: Path) -> Path:
    from safetensors import safe_open

    parts = sorted(prefix.parent.glob(prefix.name + ".safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"error: no {prefix}.safetensors.part* files")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(b"".join(p.read_bytes() for p in parts))
    with safe_open(str(tmp), "pt") as handle:  # it must load before it replaces anything
        n = len(list(handle.keys()))
    tmp.replace(dest)
    print(f"{dest}: {n} tensors from {len(parts)} parts, {dest.stat().st_size / 2**20:.1f} MiB")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--join", action="store_true", help="join OUT_PREFIX's parts into the second argument")
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    options = parser.parse_args(argv)
    if options.join:
        join(options.first, options.second)
    else:
        for path in to_bf16(options.first, options.second):
            print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
