from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli import app
from mlsctl.cli._format import say
from mlsctl.cli._options import OverridesCommand
from mlsctl.runs import RUNS_ROOT


def _note_weights_of_the_run(recipe_path: Path) -> None:
    """A run's RUN/config.yaml given again reproduces its run only with the weights it started from,
    which its start.json holds, not the recipe: say so when they are not given again."""
    import sys

    from mlsctl.errors import UserError
    from mlsctl.runs import Run

    if recipe_path.name != "config.yaml":
        return
    source = Run(recipe_path.parent)
    try:
        started_from = source.init_from()
    except UserError:  # a damaged start.json: nothing to tell
        return
    if started_from:
        print(f"mlsctl: note: {source.root} started from the weights of {started_from} (its start.json; the recipe "
              f"does not hold them), and this run starts without them: add --init-from {started_from} to "
              f"reproduce it", file=sys.stderr)


@app.command(context_settings={"allow_interspersed_args": True}, cls=OverridesCommand)
def pretrain(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe (see `mlsctl recipes`)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides: optim.lr=1e-4 data.root=/x", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder [default: runs/<recipe name>; for a run's RUN/config.yaml, runs/<RUN's name>]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint stopped."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from the weights of a run, checkpoint or .safetensors/.pth file (weights only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what is in --out."),
) -> None:
    """Pretrain a model as a recipe describes.

    Example: mlsctl pretrain recipes/dino_fmnist_quick.yaml optim.epochs=2 --out runs/quick

    Several processes: accelerate launch --num_processes 2 -m mlsctl pretrain RECIPE --out DIR
    """
    from mlsctl import config, train

    recipe_path = config.resolve_recipe_path(recipe)
    data = config.read_yaml(recipe_path)  # read once: its method for the notes below, then the recipe
    for note in config.repeated_overrides(overrides or [], config.method_named(data)):  # said, not silent
        say(note)
    # a run's resolved recipe (RUN/config.yaml): read as the run saved it (keys it predates take the values it
    # was trained with), and a default --out named after its run, not "config"
    run_recipe = config.is_run_recipe(recipe_path)
    loaded = config.load_recipe_or_run(recipe_path, overrides or [], data)
    if out is None:
        out = Path(RUNS_ROOT) / (recipe_path.resolve().parent.name if run_recipe else recipe_path.stem)
    if not resume and init_from is None:
        _note_weights_of_the_run(recipe_path)
    train.pretrain(loaded, out, resume=resume, init_from=init_from, overwrite=overwrite, recipe_source=str(recipe_path),
                   overridden=list(config.parse_overrides(overrides or [])))
