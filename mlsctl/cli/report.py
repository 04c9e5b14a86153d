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
    from mlsctl.runs import open_run

    open_run(run)  # before the imports of the report (torch): a path that is no run is said at once
    for folder in results or []:  # the default ./results may be absent (no evaluation yet); a folder given must exist
        if not folder.is_dir():
            raise UserError(f"--results {folder} {'is a file' if folder.exists() else 'does not exist'}; give a "
                            f"folder of mlsctl eval result JSONs (their --out folder, ./results by default)")
    from mlsctl.report import write_report

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


@app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders (written by mlsctl pretrain or refine train)."),
    results: Optional[list[Path]] = typer.Option(None, "--results", help="Folders of mlsctl eval result JSONs to search for the runs' evaluations [default: ./results]; each run's results/ folder is always read."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the comparison as one HTML page, ending in .html, with the runs' training curves."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out file that is not an earlier mlsctl page."),
    over_seeds: bool = typer.Option(False, "--over-seeds", help="Runs whose recipes differ only in their seed become one row: the mean ± the standard deviation over them."),
    as_json: bool = typer.Option(False, "--json", help="Print the tables as JSON (every score as a share, with its result file)."),
) -> None:
    """The evaluations of several runs side by side: a table for each evaluation and data set, a row for each model.

    Results are matched to a run by the fingerprint of the weights they evaluated, as in mlsctl report; a random
    init of a run's architecture and the weights a run started from get rows of their own, and a chance row
    ends each table where the results record it.

    Example: mlsctl compare runs/dino_fmnist_quick runs/mls_fmnist_quick --out compare.html

    Three seeds an arm: mlsctl compare runs/dino_s0 runs/dino_s1 runs/dino_s2 runs/mls_s0 runs/mls_s1 --over-seeds
    """
    import tempfile

    from mlsctl.errors import UserError
    from mlsctl.runs import check_distinct, open_run

    check_distinct(runs)
    for run in runs:  # before the imports of the comparison (torch): a path that is no run is said at once
        open_run(run)
    from mlsctl.cli._format import table
    from mlsctl.compare import NO_RESULTS, unmatched_notes, compare as compare_runs, table_rows, title, to_json, \
        write_page
    from mlsctl.report import check_report_target

    for folder in results or []:
        if not folder.is_dir():
            raise UserError(f"--results {folder} {'is a file' if folder.exists() else 'does not exist'}; give a "
                            f"folder of mlsctl eval result JSONs (their --out folder, ./results by default)")
    if out is not None:
        check_report_target(out, overwrite)
    compared = compare_runs(runs, results or [Path("results")], over_seeds=over_seeds)
    if out is not None:
        from mlsctl.curves import plot_runs

        with tempfile.TemporaryDirectory() as tmp:
            curves = Path(tmp) / "curves.png"
            drawn = [run for run in runs
                     if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size]
            if drawn:
                plot_runs(drawn, curves, title="training curves of " + ", ".join(r.name for r in drawn))
            write_page(compared, out, curves if drawn else None)
    for line in [*compared["skipped"], *unmatched_notes(compared)]:
        print(line, file=sys.stderr)
    if as_json:
        print(json.dumps({**to_json(compared), **({"out": str(out)} if out else {})}, indent=2))
        return
    if not compared["tables"]:
        print(NO_RESULTS)
    for n, found in enumerate(compared["tables"]):
        print(("\n" if n else "") + title(found))
        print(table(*table_rows(found)))
    if out is not None:
        print(f"\nwrote {out}; open it in any browser")
