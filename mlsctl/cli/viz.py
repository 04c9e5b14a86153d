from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli._format import say
from mlsctl.cli._options import png_file

app = typer.Typer(rich_markup_mode=None, help="Draw features as pictures (PNG).", no_args_is_help=True)


@app.command("pca")
def pca(
    features: Path = typer.Argument(..., help="Feature folder with dense features (mlsctl embed --dense)."),
    out: Path = typer.Option(Path("pca.png"), "--out", "-o", callback=png_file("--out"), help="PNG to write."),
    n: int = typer.Option(16, "--n", min=1, help="Images to show (the first n rows)."),
    cell: Optional[int] = typer.Option(None, "--cell", min=16, max=1024, help="Side of each drawn image in pixels "
                                       "[default: the model's input size times the smallest whole factor reaching 128]."),
) -> None:
    """PCA of dense features as RGB patch maps, each beside its image as the model saw it, with a legend.

    The first three principal components of the patch features (fitted over all the images drawn) become red, green and blue.

    Example: mlsctl viz pca features/val --out pca.png --n 16
    """
    from mlsctl.features import Features
    from mlsctl.viz import features_pca

    from mlsctl.outputs import check_outside_images

    folder = Features(features)
    check_outside_images(out, folder.input_root, f"the images of the feature folder {features}")
    written = features_pca(folder, out, n=n, cell=cell, say=say)
    typer.echo(f"wrote {written}")
