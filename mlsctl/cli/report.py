from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli import app
from mlsctl.cli._options import RUN_ARGUMENT
from mlsctl.console import counted


@app.command("report")
def report(
    run: Path = RUN_ARGUMENT,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write, ending in .html [default: RUN/report.html]."),
    results: Optional[list[Path]] = typer.Option(None, "--results", help="Folders of mlsctl eval result JSONs to search for this run's evaluations [default: ./results]."),
    patch_images: int = typer.Option(8, "--patch-images", min=1, max=256, help="Training images drawn with PCA patch maps (at most 256: each is embedded in the page)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out file that is not an earlier report (an earlier one is always replaced)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """One self-contained HTML page of a run: summary, recipe, curves, PCA patch maps, banks and evaluations.

    Example: mlsctl report runs/dino_fmnist_quick --out report.html
    """
    from mlsctl.errors import UserError
    from mlsctl.report import write_report

    for folder in results or []:  # the default ./results may be absent (no evaluation yet); a folder given must exist
        if not folder.is_dir():
            raise UserError(f"--results {folder} {'is a file' if folder.exists() else 'does not exist'}; give a "
                            f"folder of mlsctl eval result JSONs (their --out folder, ./results by default)")
    target = out or (run / "report.html")
    record = write_report(run, target, results=results or [Path("results")], patch_images=patch_images,
                          overwrite=overwrite)
    for line in record["skipped"]:
        print(line, file=sys.stderr)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    counts = [f"{record['evaluations']} evaluation{'s' if record['evaluations'] != 1 else ''} of the run's weights"]
    if record["comparisons"]:
        counts.append(f"{record['comparisons']} of comparison models")
    if record["unmatched"]:
        counts.append(f"{record['unmatched']} unmatched")
    print(f"wrote {target} ({record['bytes'] / 1e6:.1f} MB, {counted(record['images'], 'picture')}, {', '.join(counts)}); "
          f"open it in any browser")
    memorised = record["val_images_in_train"]
    if memorised:
        print(f"note: {counted(len(memorised), 'evaluation')} scored val images that are training images too (the "
              f"page flags {'them' if len(memorised) > 1 else 'it'}: the scores measure memory, not generalisation): "
              f"{', '.join(memorised)}")
