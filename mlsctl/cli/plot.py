from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli import app
from mlsctl.cli._options import png_file


@app.command("plot")
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (written by mlsctl pretrain); several are overlaid."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", callback=png_file("--out"), help="PNG to write."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title [default: the run names]."),
    as_json: bool = typer.Option(False, "--json", help="Print what each panel shows as JSON."),
) -> None:
    """Draw training curves (loss and its terms, learning rate, momentum, teacher entropy, bank health, monitors or throughput) to a PNG.

    Noisy series of more than 30 points are drawn faint under their exponential moving average; shorter ones with a marker on each point.

    Example: mlsctl plot runs/dino_fmnist_quick runs/sove_fmnist_quick --out curves.png
    """
    from mlsctl.curves import plot_runs
    from mlsctl.outputs import check_outside_images
    from mlsctl.restore import training_images
    from mlsctl.runs import Run, check_distinct

    check_distinct(runs)
    for run in runs:
        check_outside_images(out, training_images(Run(run)), f"the images run {run} trains on (its data.root)")
    result = plot_runs(runs, out, title=title)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"wrote {out}: " + "; ".join(f"{panel}: {', '.join(keys) or '-'}" for panel, keys in result["panels"].items()))
