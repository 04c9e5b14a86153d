from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

import typer

from mlsctl.cli._format import say, table
from mlsctl.console import counted
from mlsctl.errors import UserError
from mlsctl.cli._options import RUN_ARGUMENT, one_of, png_file

app = typer.Typer(rich_markup_mode=None, help="Look inside the memory banks of a run: health, neighbours, projection, export.",
                  no_args_is_help=True)


Projection = Literal["auto", "pca", "tsne"]  # bank_inspect.PROJECTIONS

RUN_ARG = RUN_ARGUMENT
STEP_OPT = typer.Option(None, "--step", help="Checkpoint step [default: the latest checkpoint].")


def _fmt(value, digits: int = 3) -> str:
    if value is None or value != value:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rows(health, bank) -> list[tuple[str, str]]:
    qf = bank.query_feature
    rows = [
        ("shape", f"{health.size} x {health.dim}"), ("dtype", health.dtype),
        ("fill", _fill(health)),
        ("write pointer", str(health.ptr)), ("entries written", str(health.n_written)),
        ("age min / median / max", " / ".join(_fmt(v, 1) for v in (health.age_min, health.age_median, health.age_max))),
        ("norm min / mean / max", " / ".join(_fmt(v, 2) for v in (health.norm_min, health.norm_mean, health.norm_max))),
        ("norm std", _fmt(health.norm_std, 2)),
        ("mean pairwise cosine", f"{_fmt(health.mean_cosine)} (sample {health.sample})"),
        ("effective rank", f"{_fmt(health.effective_rank, 1)} of {min(health.sample, health.dim)}"),
        ("uniformity", _fmt(health.uniformity)),
        ("near-duplicates", f"{health.near_duplicates} ({100 * health.duplicate_rate:.2f}%) at cos >= "
                            f"{health.duplicate_threshold:g}" + (f", of {health.duplicate_rows} sampled entries each "
                                                                  f"against every older one"
                                                                  if health.duplicate_rows < health.written else "")),
        ("payload", ", ".join(f"{k}{list(c.shape) if c.shape else ''}" for k, c in bank.columns.items())),
        ("query feature", (f"{qf.feature}{' → ' + qf.projection if qf.projection else ''} "
                           f"[{qf.start}:{qf.stop if qf.stop is not None else health.dim}]") if qf else "-"),
    ]
    if health.label_counts is not None:
        top = sorted(health.label_counts.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{label}: {count}" for label, count in top[:8])
        rows.append(("labels", f"{len(top)} labels; {shown}{', ...' if len(top) > 8 else ''}"))
    rows.append(("status", health.status_line()))
    return rows


def _near_duplicate_cosine(value: float) -> float:
    """``--duplicate-threshold``: a cosine in (0, 1]. A new user's probe (2026-12-07): -1 called every
    pair a near-duplicate and a healthy bank a partial collapse; nan was refused for the wrong reason."""
    if not 0 < value <= 1:  # nan included
        raise UserError(f"--duplicate-threshold {value:g} is not a cosine of near-duplicates: give one above 0 and at "
                        f"most 1 (the default 0.999 is within 2.6 degrees)")
    return value


def _fill(health) -> str:
    """The written share of the slots; a prefilled bank says how many still hold its random start."""
    text = f"{100 * health.fill:.1f}% ({health.written}/{health.size})"
    start = health.filled - health.written
    if start > 0:
        text += f" written by training; {start} slots still hold the random start"
    return text


@app.command("inspect")
def inspect(
    run: Path = RUN_ARG,
    step: Optional[int] = STEP_OPT,
    sample: int = typer.Option(2048, "--sample", min=2, max=16384, help="Entries sampled for the pairwise indicators (their cost grows with its square)."),
    duplicate_threshold: float = typer.Option(0.999, "--duplicate-threshold", callback=_near_duplicate_cosine,
                                              help="Cosine at or above which an entry duplicates an older one "
                                                   "(above 0, at most 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Fill, write pointer, ages, norms, collapse indicators and duplicates of every bank.

    Example: mlsctl bank inspect runs/cribo_fmnist_quick --json
    """
    from mlsctl.bank_health import bank_health
    from mlsctl.bank_inspect import method_views, open_banks

    run_, checkpoint, banks = open_banks(run, step)
    healths = {name: bank_health(bank, name, checkpoint.step, sample=sample, duplicate_threshold=duplicate_threshold)
               for name, bank in banks.items()}
    views = method_views(run_, banks)
    if as_json:
        out = {name: h.to_dict() for name, h in healths.items()}
        for name, bank in banks.items():  # what the table shows besides the indicators (a probe, 2026-12-06)
            qf = bank.query_feature
            out[name]["payload"] = {k: list(c.shape) for k, c in bank.columns.items()}
            out[name]["query_feature"] = ({"feature": qf.feature, "projection": qf.projection, "start": qf.start,
                                           "stop": qf.stop} if qf else None)
        for name, rows in views.items():
            out[name]["method"] = {label.replace(" ", "_"): value for label, _, value in rows}
        print(json.dumps({"run": str(run_.root), "step": checkpoint.step, "banks": out}, indent=2))
        return
    if not banks:
        print(f"{run_.root} (step {checkpoint.step}) has no memory bank")
        return
    print(f"{run_.root}, checkpoint step {checkpoint.step}")
    columns = {name: dict(_rows(h, banks[name]) + [(label, text) for label, text, _ in views.get(name, [])])
               for name, h in healths.items()}
    keys = list(next(iter(columns.values())))
    for values in columns.values():
        keys += [k for k in values if k not in keys]
    side_by_side = table(["bank", *columns], [[k, *(c.get(k, "") for c in columns.values())] for k in keys],
                         right=[False] * (len(columns) + 1))
    if len(columns) == 1 or max(map(len, side_by_side.splitlines())) <= shutil.get_terminal_size((120, 24)).columns:
        print(side_by_side)
        return
    # banks side by side wider than the terminal (MLS: two columns of long status cells, 330 characters; a new
    # user, 2026-12-06): one table per bank, one under the other
    print("\n\n".join(table(["bank", name], [[k, v] for k, v in values.items()], right=[False, False])
                       for name, values in columns.items()))


@app.command("neighbors")
def neighbors(
    run: Path = RUN_ARG,
    query: Path = typer.Option(..., "--query", "-q", help="Image to look up."),
    k: int = typer.Option(8, "-k", "--k", min=1, help="Entries to show."),
    bank: Optional[str] = typer.Option(None, "--bank", help="Bank name [default: the run's only bank]."),
    out: Path = typer.Option(Path("neighbors.png"), "--out", "-o", callback=png_file("--out"), help="PNG grid to write."),
    step: Optional[int] = STEP_OPT,
    cell: int = typer.Option(128, "--cell", min=32, max=1024, help="Side of each crop in pixels."),
    as_json: bool = typer.Option(False, "--json", help="Also print the entries as JSON."),
) -> None:
    """Embed an image with the run's teacher and draw its nearest bank entries as crops of their sources.

    Example: mlsctl bank neighbors runs/cribo_fmnist_quick --query data/fmnist-scenes/val/images/000000.png -k 8 --out grid.png
    """
    from dataclasses import asdict

    from mlsctl.bank_inspect import (SourceImages, choose_bank, embed_query, nearest_entries, neighbour_tiles,
                                     open_banks, query_resolution, query_size_line)
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.errors import UserError
    from mlsctl.outputs import check_outside_images, same_file
    from mlsctl.restore import from_checkpoint, recipe_of, training_images
    from mlsctl.viz import neighbour_grid

    if same_file(out, query):  # a probe (2026-12-06): the grid replaced its own query
        raise UserError(f"--out {out} is the --query image; write the grid somewhere else")
    try:
        image = load_rgb(query)
    except (BadImage, OSError) as exc:
        raise UserError(f"cannot read --query {query}: {exc}") from None
    run_, checkpoint, banks = open_banks(run, step)
    check_outside_images(out, training_images(run_), f"the images run {run_.root} trains on (its data.root)")
    name, chosen = choose_bank(banks, bank, run_)
    if chosen.written == 0:
        raise UserError(f"bank '{name}' holds no entry written by training at step {checkpoint.step} (only its random "
                        f"start); choose a later checkpoint with --step")
    recipe = recipe_of(run_)
    model = from_checkpoint(recipe, checkpoint, run_)
    resolution = query_resolution(recipe, model.backbone.patch_size)
    say(query_size_line(model, resolution))
    vector = embed_query(model, chosen, [image], resolution)[0]
    sources = SourceImages(run_)
    if sources.note:
        say(sources.note)
    found = nearest_entries(chosen, vector, k, sources)
    if len(found) < k:  # -k 1000 of a 256-entry bank drew all 256 without a word (a new user, 2026-12-06)
        say(f"note: bank '{name}' holds {counted(len(found), 'entry', 'entries')} written by training; all are drawn")
    tiles = neighbour_tiles(found, sources, cell)
    missing = sum(tile is None for tile, _ in tiles)
    title = f"{run_.root.name} · bank '{name}' · step {checkpoint.step} · {len(found)} nearest of {chosen.written}"
    neighbour_grid(image, tiles, out, title=title, cell=cell)
    # written in step n.step + 1: the payload's step is the step's index from 0, metrics.jsonl and the checkpoints
    # count steps done (a probe, 2026-12-07: "written at 10" was the step logged as 11)
    rows = [[i + 1, f"{n.score:.3f}", n.step + 1, n.image_id, sources.shown(n.image) if n.image else "-",
             "yes" if tile is not None else "missing"] for i, (n, (tile, _)) in enumerate(zip(found, tiles))]
    if as_json:
        print(json.dumps({"run": str(run_.root), "step": checkpoint.step, "bank": name, "query": str(query),
                          "query_resolution": resolution,  # the global crop size: the bank's entries' (docs/banks.md)
                          "out": str(out), "missing": missing,
                          "neighbours": [dict(asdict(n), written_in_step=n.step + 1, drawn=tile is not None)
                                         for n, (tile, _) in zip(found, tiles)]}, indent=2))
    else:
        print(table(["#", "cosine", "written in step", "image_id", f"image (in {sources.root})", "drawn"], rows))
    say(f"wrote {out}" + (f" ({missing} source image{'s' if missing != 1 else ''} missing, drawn blank)" if missing else ""))


def _say_plot_notes(colours, flat: Optional[str], drawn: int, color_by: str) -> None:
    """What ``bank plot`` says beside its picture: what the colours are not, a principal component without variance,
    the entries the colours leave grey."""
    if colours.note:
        say(colours.note)
    if flat:
        say(f"note: {flat}")
    if colours.missing:
        said = colours.missing_said or f"have a source image that {color_by} does not label"
        say(f"{colours.missing} of {drawn} entries {said}; drawn grey")


@app.command("plot")
def plot(
    run: Path = RUN_ARG,
    out: Path = typer.Option(Path("bank.png"), "--out", "-o", callback=png_file("--out"), help="PNG to write."),
    color_by: str = typer.Option("age", "--color-by", metavar="<age|label|source|MASKS|FILE>",
                                 help="age, label (needs a label payload), source (the source image of each entry), "
                                      "a labels file of whole images (CSV or JSONL of path,label; paths as in "
                                      "RUN/images.txt, absolute, or image_id) or a folder of segmentation masks "
                                      "(each region's own class, for banks of regions such as CrIBo's objects)."),
    bank: Optional[str] = typer.Option(None, "--bank", help="Bank name [default: the run's only bank]."),
    projection: Projection = typer.Option("auto", "--projection", parser=one_of("--projection", Projection), help="pca, tsne (needs scikit-learn), or auto: t-SNE when scikit-learn is installed."),
    sample: int = typer.Option(2000, "--sample", min=2, help="Entries drawn (a fixed random sample)."),
    step: Optional[int] = STEP_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print what was drawn as JSON."),
) -> None:
    """A 2-D projection of a sample of the entries training wrote, coloured by age, label, source image, labels or masks.

    Example: mlsctl bank plot runs/dino_fmnist_quick --out bank.png --color-by source
    """
    from mlsctl.bank_health import sample_rows
    from mlsctl.bank_inspect import (SourceImages, choose_bank, entry_colours, flat_components_note, open_banks,
                                     project_2d)
    from mlsctl.errors import UserError
    from mlsctl.outputs import check_outside_images
    from mlsctl.restore import training_images
    from mlsctl.viz import scatter_plot

    run_, checkpoint, banks = open_banks(run, step)
    check_outside_images(out, training_images(run_), f"the images run {run_.root} trains on (its data.root)")
    name, chosen = choose_bank(banks, bank, run_)
    order = chosen.written_order().cpu()
    rows = order[sample_rows(len(order), sample)]  # a fixed sample of the written entries, oldest first
    if len(order) < 2:
        raise UserError(f"bank '{name}' holds {len(order)} entries written by training at step {checkpoint.step}; "
                        f"nothing to project")
    sources = SourceImages(run_) if color_by not in ("age", "label") else None
    colours = entry_colours(chosen, name, rows, color_by, checkpoint.step, sources)
    if sources is not None and sources.note:
        say(sources.note)
    points, used, shares = project_2d(chosen.vectors.cpu()[rows].float(), projection, held=len(order))
    flat = flat_components_note(len(rows), shares)
    left_out = chosen.filled - len(order)
    title = (f"{run_.root.name} · bank '{name}' · step {checkpoint.step} · {used} of {len(rows)} written entries"
             f"{f' ({left_out} random-start entries left out)' if left_out else ''} · colour: {colours.caption}")
    axes = (("t-SNE 1", "t-SNE 2") if shares is None else  # PCA's shares of the variance, as viz pca says them
            tuple(f"principal component {i + 1} ({100 * share:.0f}% of the variance)" for i, share in enumerate(shares)))
    legend = scatter_plot(points, colours.values, out, title=title, colour_by=colours.mode, axis_names=axes,
                 label_names=colours.names, unlabelled=colours.unlabelled, other_name=colours.other_name, note=flat)
    _say_plot_notes(colours, flat, len(rows), color_by)
    if as_json:  # the numbers the title and the closing line say
        print(json.dumps({"run": str(run_.root), "step": checkpoint.step, "bank": name, "out": str(out),
                          "projection": used, "colour": colours.caption, "drawn": len(rows), "written": len(order),
                          "random_start_left_out": left_out, "not_labelled": colours.missing, "note": colours.note,
                          "variance_shares": None if shares is None else [float(x) for x in shares],
                          "flat_components": flat,  # a principal component without variance, drawn at 0
                          "legend": legend}, indent=2))
        return
    say(f"wrote {out} ({used} of {len(rows)} of {len(order)} written entries)")


@app.command("export")
def export(
    run: Path = RUN_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="safetensors file to write (a name ending in .safetensors)."),
    bank: Optional[list[str]] = typer.Option(None, "--bank", help="Banks to export [default: all]."),
    step: Optional[int] = STEP_OPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier bank export at --out (any other file is refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write the valid entries of the banks (vectors and payload columns, oldest first) to one safetensors file.

    Example: mlsctl bank export runs/cribo_fmnist_quick --out objects.safetensors
    """
    from mlsctl.bank_inspect import check_export_target, choose_bank, export_banks, open_banks
    from mlsctl.errors import UserError
    from mlsctl.restore import open_run

    check_export_target(out, open_run(run), overwrite)  # a run, then --out, before the banks are read
    run_, checkpoint, banks = open_banks(run, step)
    if not banks:  # an empty file would look like an export
        raise UserError(f"run {run_.root} has no memory bank (its method keeps none): nothing to export")
    chosen = dict(choose_bank(banks, b, run_) for b in bank) if bank else banks
    shapes = export_banks(chosen, out, run=run_, checkpoint=checkpoint)
    written = {}
    for name, shape in shapes.items():
        columns = [f"{name}/{c}" for c in ["vectors", *chosen[name].payload]]
        steps = chosen[name].payload.get("step")
        start = int((steps[chosen[name].order()] < 0).sum()) if steps is not None else 0
        written[name] = {"entries": shape[0], "dim": shape[1], "tensors": columns, "random_start": start}
        if not as_json:
            said = f"; {start} of them the random start, step -1" if start else ""  # as bank inspect says it
            say(f"{name}: {shape[0]} entries x {shape[1]} ({', '.join(columns)}{said})")
    if as_json:
        print(json.dumps({"run": str(run_.root), "step": checkpoint.step, "out": str(out), "banks": written}, indent=2))
        return
    say(f"wrote {out}")
