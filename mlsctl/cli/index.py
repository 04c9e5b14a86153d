from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli._format import table

app = typer.Typer(rich_markup_mode=None, help="Build and grow galleries of objects for image-set search (MILE set embeddings in faiss).",
                  no_args_is_help=True)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _set_model(run: Optional[Path]):
    from mlsctl.errors import UserError
    from mlsctl.gallery import load_set_model
    from mlsctl.models.source import newest_run

    if run is None:
        found = newest_run("runs")
        if found is None:
            raise UserError("no --run given and no run under ./runs; train one with mlsctl pretrain mile_fmnist_quick")
        run = found.root
    model = load_set_model(run)
    _say(f"model: {model.backbone.description} (fingerprint {model.fingerprint[:12]})")
    return model


@app.command("build")
def build(
    source: Path = typer.Argument(..., help="Images in one folder per object (ROOT/<object_id>/*), or their feature folder from mlsctl embed."),
    run: Optional[Path] = typer.Option(None, "--run", help="MILE run whose teacher embeds the objects [default: the newest run under ./runs]."),
    out: Path = typer.Option(Path("gallery"), "--out", "-o", help="Gallery folder to write."),
    index: str = typer.Option("flat", "--index", help="flat (exact) or ivfpq (compressed, for large galleries)."),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, help="IVF-PQ lists [default: sqrt(objects)]."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", min=1, help="IVF-PQ sub-quantisers (must divide the width) [default: width / 8]."),
    pq_bits: int = typer.Option(8, "--pq-bits", min=1, max=16, help="Bits per PQ code."),
    nprobe: int = typer.Option(32, "--nprobe", min=1, help="IVF lists searched per query."),
    refine: int = typer.Option(10, "--refine", min=1, help="IVF-PQ candidates per result, re-ranked with exact cosines."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a gallery already in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the gallery record as JSON."),
) -> None:
    """One MILE set embedding per object, indexed with faiss.

    Example: mlsctl index build data/fmnist-products/gallery --run runs/mile_fmnist_quick --out galleries/products
    """
    from mlsctl.gallery import IndexSettings, build_gallery

    settings = IndexSettings(index, nlist, pq_m, pq_bits, nprobe, refine)
    record = build_gallery(source, _set_model(run), out, settings, overwrite=overwrite)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    print(f"built {out}: {record['objects']} objects from {record['images']} images, index {index}"
          + (f" (nlist {settings.nlist}, m {settings.m}, {pq_bits} bits, nprobe {nprobe})" if index == "ivfpq" else ""))


@app.command("add")
def add(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    object_id: str = typer.Option(..., "--object", help="Object to add to; a new id creates the object."),
    images: list[Path] = typer.Argument(..., help="Images to fold into the object, in order."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run to embed with [default: the gallery's run]."),
) -> None:
    """Fold new images into an object's stored latent state (earlier images are not recomputed).

    Example: mlsctl index add galleries/products --object ev00007 new1.png new2.png
    """
    from mlsctl.gallery import Gallery, check_object_id, load_images

    check_object_id(object_id)
    target = Gallery(gallery)
    model = _set_model(run or Path(target.manifest["model"]["run"]))
    created, count = target.add(model, object_id, load_images(images))
    print(f"{'created' if created else 'updated'} {object_id} in {gallery}: {count} images folded, "
          f"{len(target.ids)} objects")


def search(
    images: list[Path] = typer.Option(..., "--set", help="Photos of one object (space-separated)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Gallery folder [default: the newest gallery under the current directory]."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Objects to return."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run to embed with [default: the gallery's run]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Find the objects of a gallery that a set of photos shows, ranked by cosine of MILE set embeddings.

    Example: mlsctl search --set a.png b.png --index galleries/products -k 10
    """
    from mlsctl.errors import UserError
    from mlsctl.gallery import Gallery, load_images, newest_gallery

    if index is None:
        index = newest_gallery(".")
        if index is None:
            raise UserError("no --index given and no gallery under the current directory; build one with mlsctl index build")
        _say(f"gallery: {index} (the newest under the current directory)")
    target = Gallery(index)
    model = _set_model(run or Path(target.manifest["model"]["run"]))
    target.check_model(model)
    cls, tokens = model.image_tokens(load_images(images))
    found = target.search(model.fold(None, cls, tokens), k)
    if as_json:
        print(json.dumps({"gallery": str(index), "set": [str(p) for p in images],
                          "results": [{"rank": i + 1, "object": o, "score": s} for i, (o, s) in enumerate(found)]},
                         indent=2))
        return
    print(table(["rank", "object", "cosine"], [[i + 1, o, f"{s:.4f}"] for i, (o, s) in enumerate(found)],
                right=[True, False, True]))
