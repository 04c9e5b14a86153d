from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import typer

from mlsctl.cli._options import one_of
from mlsctl.data import DEFAULT_FMNIST_SOURCE, FMNIST_SOURCE_ENV

Layout = Literal["retrieval", "sop"]  # fmnist_products.LAYOUTS

app = typer.Typer(rich_markup_mode=None, help="Build benchmark data sets.", no_args_is_help=True)


@app.command("fmnist-scenes")
def fmnist_scenes(
    out: Path = typer.Option(Path("data/fmnist-scenes"), "--out", "-o", help="Output folder."),
    n_train: int = typer.Option(2000, "--n-train", min=1, max=1_000_000, help="Train scenes (items from the Fashion-MNIST train split)."),
    n_val: int = typer.Option(500, "--n-val", min=1, max=1_000_000, help="Val scenes (items from the Fashion-MNIST test split)."),
    size: int = typer.Option(96, "--size", min=32, max=2048, help="Canvas side in pixels."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed; a build is deterministic for a seed."),
    source: Path = typer.Option(Path(DEFAULT_FMNIST_SOURCE), "--source", envvar=FMNIST_SOURCE_ENV,
                                help="Folder with the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild even if --out holds other scenes."),
    as_json: bool = typer.Option(False, "--json", help="Print the meta record as JSON."),
) -> None:
    """Scenes of 2-5 real Fashion-MNIST items with segmentation masks (0 = background, 1..10 = class).

    Example: mlsctl data fmnist-scenes --out data/fmnist-scenes --n-train 2000 --n-val 500
    """
    from mlsctl.data.fmnist import build_scenes

    meta = build_scenes(out, n_train=n_train, n_val=n_val, size=size, seed=seed, source=source, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    p = meta["parameters"]
    state = "already built" if meta.get("reused") else "built"
    typer.echo(f"{state}: {out} ({p['n_train']} train / {p['n_val']} val scenes of {p['size']}x{p['size']}, seed {p['seed']})")
    typer.echo(f"  images: {out}/train/images  masks: {out}/train/masks  (val: {out}/val/...)")


@app.command("fmnist-products")
def fmnist_products(
    out: Path = typer.Option(Path("data/fmnist-products"), "--out", "-o", help="Output folder."),
    n_train: int = typer.Option(1000, "--n-train", min=1, max=60_000, help="Training objects (items of the Fashion-MNIST train split)."),
    n_eval: int = typer.Option(200, "--n-eval", min=2, max=10_000, help="Evaluation objects (items of the Fashion-MNIST test split)."),
    photos: int = typer.Option(8, "--photos", min=2, max=1000, help="Photos per object."),
    gallery_photos: int = typer.Option(4, "--gallery-photos", min=1, help="Photos of an evaluation object in the gallery; the rest are queries."),
    size: int = typer.Option(64, "--size", min=32, max=2048, help="Photo side in pixels."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed; a build is deterministic for a seed."),
    source: Path = typer.Option(Path(DEFAULT_FMNIST_SOURCE), "--source", envvar=FMNIST_SOURCE_ENV,
                                help="Folder with the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)."),
    layout: Layout = typer.Option("retrieval", "--layout", parser=one_of("--layout", Layout), help="retrieval: evaluation photos split into gallery/ and query/ (image-set retrieval); sop: all of them in test/, every object a class (Stanford Online Products, deep metric learning)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild even if --out holds other data."),
    as_json: bool = typer.Option(False, "--json", help="Print the meta record as JSON."),
) -> None:
    """Objects photographed several times (one real Fashion-MNIST item each), for image-set retrieval
    or, with --layout sop, for deep metric learning (every object a class; test objects unseen).

    Example: mlsctl data fmnist-products --out data/fmnist-products --n-train 1000 --n-eval 200

    Metric learning: mlsctl data fmnist-products --layout sop --out data/fmnist-sop
    """
    from mlsctl.data.fmnist_products import build_products

    meta = build_products(out, n_train=n_train, n_eval=n_eval, photos=photos, gallery_photos=gallery_photos, size=size,
                          seed=seed, source=source, overwrite=overwrite, layout=layout)
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    p = meta["parameters"]
    state = "already built" if meta.get("reused") else "built"
    typer.echo(f"{state}: {out} ({p['n_train']} train objects, {p['n_eval']} evaluation objects, {p['photos']} photos "
               f"each of {p['size']}x{p['size']}, seed {p['seed']})")
    if layout == "sop":
        typer.echo(f"  train: {out}/train/<object>/  test: {out}/test/<object>/ (every object a class)")
    else:
        typer.echo(f"  train: {out}/train/<object>/  gallery: {out}/gallery/<object>/  query: {out}/query/<object>/")
