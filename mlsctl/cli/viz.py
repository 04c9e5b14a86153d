from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(rich_markup_mode=None, help="Draw features as pictures (PNG).", no_args_is_help=True)


@app.command("pca")
def pca(
    features: Path = typer.Argument(..., help="Feature folder with dense features (mlsctl embed --dense)."),
    out: Path = typer.Option(Path("pca.png"), "--out", "-o", help="PNG to write."),
    n: int = typer.Option(16, "--n", min=1, help="Images to show (the first n rows)."),
    cell: int = typer.Option(128, "--cell", min=16, help="Side of each drawn image in pixels."),
) -> None:
    """PCA of dense features as RGB patch maps, each beside its image.

    Example: mlsctl viz pca features/val --out pca.png --n 16
    """
    from mlsctl.features import Features
    from mlsctl.viz import features_pca

    written = features_pca(Features(features), out, n=n, cell=cell)
    typer.echo(f"wrote {written}")
