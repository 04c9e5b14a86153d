from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from mlsctl.cli import app
from mlsctl.cli._options import RUN_ARGUMENT, one_of

Format = Literal["timm"]


@app.command("export")
def export(
    run: Path = RUN_ARGUMENT,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write config.json, model.safetensors and mlsctl.json to."),
    fmt: Format = typer.Option("timm", "--format", parser=one_of("--format", Format), help="Export format: timm (a folder timm.create_model('local-dir:...') loads)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step [default: the final teacher, else the latest checkpoint]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Export the run's teacher backbone (LoRA merged) as a timm model folder.

    Example: mlsctl export runs/dino_fmnist_quick --out exports/dino
    then, without mlsctl: timm.create_model("local-dir:exports/dino", pretrained=True)
    """
    from mlsctl.export import export_timm

    record = export_timm(run, out, step=step, overwrite=overwrite)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    print(f"wrote {out} ({', '.join(record['files'])}): {record['model']} from {record['run']}"
          f"{' step ' + str(record['step']) if record['step'] is not None else ''}")
    print(f"load it with: {record['load']}", file=sys.stderr)
