from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from mlsctl.cli._format import say
from mlsctl.cli._options import OverridesCommand, one_of, png_file
from mlsctl.runs import RUNS_ROOT

app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                  help="Context refinement: embeddings attend to their nearest neighbours (train, apply, plot).")


Dtype = Literal["fp16", "fp32"]  # features.DTYPES
Projection = Literal["pca", "tsne"]  # refine.plot.PROJECTIONS


@app.command("train", context_settings={"allow_interspersed_args": True}, cls=OverridesCommand)
def train(
    features: Path = typer.Argument(..., help="Feature folder of the training embeddings (mlsctl embed)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides of the refine recipe: optim.epochs=5 method.mlp_ratio=1", show_default=False),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV/JSONL of path,label [default: each image's own folder, however deep]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder [default: runs/refine-<features folder name>]."),
    blocks: Optional[int] = typer.Option(None, "--blocks", min=1, help="T, cross-attention blocks [recipe: 8]."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Neighbours each embedding attends to [recipe: 8]."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the training embeddings [recipe: 20]."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed of the initialisation and the batches [recipe: 0]."),
    recipe: str = typer.Option("refine", "--recipe", help="Recipe the options and overrides apply to."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint stopped."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from the weights of another refine run (or one of its checkpoints)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
) -> None:
    """Train T cross-attention blocks on the training embeddings with the Multi-Similarity loss.

    Example: mlsctl refine train features/ms-train --out runs/refine

    Each embedding attends to its k nearest neighbours among the training embeddings (itself
    excluded); the shared training loop (checkpoints, --resume, metrics.jsonl) runs recipes/refine.yaml
    with data.root set to FEATURES. With --resume it continues from the run's own config.yaml: the
    options it started with need not be given again.
    """
    from mlsctl import config, train as train_lib
    from mlsctl.runs import Run

    out = out if out is not None else Path(RUNS_ROOT) / f"refine-{features.resolve().name}"
    if resume and recipe == "refine" and Run(out).has_config():
        # the run's own recipe, as `pretrain RUN/config.yaml --resume`: the options it started with need not be
        # given again (a probe, 2026-12-06: without them the shipped recipe's batch of 128 was refused)
        recipe_path = out / "config.yaml"
    else:
        recipe_path = config.resolve_recipe_path(recipe)
    items = [f"data.root={features}"]
    given_overrides = config.parse_overrides(list(overrides or []))
    # read once: its method for the notes and the check below (as written: the file is checked whole with the
    # overrides when it loads), then the recipe
    raw = config.read_yaml(recipe_path)
    method = config.method_named(raw)
    for note in config.repeated_overrides(list(overrides or []), method):  # said
        say(note)
    for option, key, value in (("--labels", "method.labels_file", labels), ("--blocks", "method.blocks", blocks),
                               ("--k", "method.neighbours", k), ("--epochs", "optim.epochs", epochs),
                               ("--seed", "seed", seed), ("FEATURES", "data.root", features)):
        if value is not None and key in given_overrides:  # the override won, silently
            from mlsctl.errors import UserError

            raise UserError(f"{option} and the override {key}=... both set {key}; give one of them")
        if value is not None and key != "data.root":
            items.append(f"{key}={value}")
    # the recipe's method first: another method's recipe met --labels as "unknown key method.labels_file" (a probe,
    # 2026-12-07), a key the user never typed
    if method is None or method == "refine":
        loaded = config.load_recipe_or_run(recipe_path, items + list(overrides or []), raw)
        method = loaded.method.name
    if method != "refine":
        from mlsctl.errors import UserError

        if recipe_path == out / "config.yaml":
            raise UserError(f"--out {out} holds a run of method {method} ({recipe_path}); refine train "
                            f"--resume continues a refine run: give the --out of one")
        raise UserError(f"--recipe {recipe} is a {method} recipe; refine train runs a refine recipe "
                        f"(recipes/refine.yaml)")
    import shlex

    # --resume reads the run's own config.yaml: the options and overrides it started with need not be given
    continue_with = shlex.join(["refine", "train", str(features), "--out", str(out), "--resume"])
    train_lib.pretrain(loaded, out, resume=resume, init_from=init_from, overwrite=overwrite,
                       recipe_source=str(recipe_path),
                       overridden=list(config.parse_overrides(items + list(overrides or []))),
                       resume_command=continue_with)


@app.command("apply")
def apply(
    run: Path = typer.Argument(..., help="Run folder of mlsctl refine train."),
    features: Path = typer.Argument(..., help="Feature folder to refine."),
    context: Optional[Path] = typer.Option(None, "--context", help="Feature folder the neighbours come from (the gallery) [default: FEATURES itself]."),
    out: Path = typer.Option(..., "--out", "-o", help="Feature folder of the refined embeddings."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Neighbours per embedding [default: the run's]."),
    dtype: Dtype = typer.Option("fp32", "--dtype", parser=one_of("--dtype", Dtype), help="Stored precision."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it holds features."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Refine embeddings with a context set; writes the shard format every eval and search command reads.

    Example: mlsctl refine apply runs/refine features/ms-test --out features/ms-test-refined

    A query never attends to itself: when the context holds its own image, that row is excluded.
    """
    from mlsctl.refine.apply import apply_refinement

    summary = apply_refinement(run, features, out, context_dir=context, k=k, overwrite=overwrite, dtype=dtype,
                               progress=sys.stderr.isatty(), say=say)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    if summary["reused"]:
        typer.echo(f"{summary['out']} already holds these refined features ({summary['rows']} rows); nothing to do")
        return
    excluded = f", itself excluded for {summary['self_excluded']}" if summary["self_excluded"] else ""
    typer.echo(f"wrote {summary['rows']} refined embeddings ({summary['dim']}-d) to {summary['out']}/ (run "
               f"{summary['run']} at step {summary['step']}, k = {summary['k']} neighbours from {summary['context']}, "
               f"{summary['context_rows']} rows{excluded})")


@app.command("plot")
def plot(
    run: Path = typer.Argument(..., help="Run folder of mlsctl refine train."),
    features: Path = typer.Argument(..., help="Feature folder whose embeddings are followed through the blocks."),
    context: Optional[Path] = typer.Option(None, "--context", help="Feature folder the neighbours come from [default: FEATURES itself]."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV/JSONL of path,label [default: each image's own folder, however deep]."),
    out: Path = typer.Option(Path("refine-drift.png"), "--out", "-o", callback=png_file("--out"), help="PNG of the drift picture."),
    points: int = typer.Option(500, "--points", min=2, help="Embeddings drawn (a seeded sample)."),
    projection: Projection = typer.Option("pca", "--projection", parser=one_of("--projection", Projection), help="pca, or tsne (PCA to 50 dimensions, then t-SNE; needs scikit-learn)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and of t-SNE."),
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="Sweep JSON (blocks x k x seeds, from benchmarks/refine_fidelity.py): also draw the R@1 grid."),
    grid_out: Optional[Path] = typer.Option(None, "--grid-out", callback=png_file("--grid-out"), help="PNG of the R@1 grid (with --sweep) [default: refine-grid.png]."),
    as_json: bool = typer.Option(False, "--json", help="Print what was drawn as JSON."),
) -> None:
    """Draw how embeddings move from e0 to eT (tracks coloured by class; one query with its neighbours),
    and with --sweep the R@1 grid over blocks x neighbours.

    Example: mlsctl refine plot runs/refine features/ms-test --out drift.png --sweep benchmarks/results/refine/cpu/grid.json
    """
    from mlsctl.features import Features
    from mlsctl.outputs import check_outside_images, same_file
    from mlsctl.refine.plot import drift_figure, grid_figure

    from mlsctl.errors import UserError

    if sweep is None and grid_out is not None:  # taken without a word, and nothing drawn (a probe, 2026-12-07)
        raise UserError(f"--grid-out {grid_out} names the R@1 grid of a sweep; give the sweep with --sweep FILE, or "
                        f"leave --grid-out out")
    if sweep is not None and grid_out is None:  # the default, checked as a given one is (before anything is drawn)
        from mlsctl.outputs import check_picture_target

        grid_out = Path("refine-grid.png")
        check_picture_target(grid_out, "--grid-out")
    if sweep is not None and same_file(out, grid_out):  # the second replaced the first
        raise UserError(f"--out and --grid-out are both {out}; give the two pictures two names")
    for folder in dict.fromkeys([features, context or features]):
        images = Features(folder).input_root
        for option, picture in (("--out", out), *((("--grid-out", grid_out),) if sweep is not None else ())):
            check_outside_images(picture, images, f"the images of the feature folder {folder}", option)
    drawn = {"drift": drift_figure(run, features, out, context_dir=context, labels_file=labels, points=points,
                                   projection=projection, seed=seed)}
    if sweep is not None:
        drawn["grid"] = grid_figure(sweep, grid_out)
    if as_json:
        typer.echo(json.dumps(drawn, indent=2))
        return
    typer.echo(f"wrote {drawn['drift']['out']} ({drawn['drift']['points']} embeddings through {drawn['drift']['blocks']} "
               f"blocks, {projection})")
    if "grid" in drawn:
        typer.echo(f"wrote {drawn['grid']['out']} (R@1 over blocks {drawn['grid']['blocks']} x k {drawn['grid']['k']})")
