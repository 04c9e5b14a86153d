from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import typer

from mlsctl.cli import app
from mlsctl.cli._format import say
from mlsctl.cli._options import MODEL_OPTION, RANDOM_INIT_OPTION, RUN_OPTION, WEIGHTS_OPTION, one_of
from mlsctl.errors import UserError

Dataset = Literal["voc", "ade20k", "cityscapes", "coco-stuff", "coco-things", "imagenet"]  # datasets.DATASETS
Split = Literal["train", "val", "trainval", "trainaug"]  # every dataset's SPLITS
Resize = Literal["square", "center-crop"]  # features.RESIZE_MODES
Dtype = Literal["fp16", "fp32"]  # features.DTYPES


@app.command()
def embed(
    images: Optional[Path] = typer.Argument(None, help="Folder of images (searched recursively); or give --dataset."),
    dataset: Optional[Dataset] = typer.Option(None, "--dataset", parser=one_of("--dataset", Dataset), help="Embed one split of a benchmark read from --root."),
    root: Optional[Path] = typer.Option(None, "--root", help="The dataset's folder, or its .tar/.zip read in place (with --dataset)."),
    split: Optional[Split] = typer.Option(None, "--split", parser=one_of("--split", Split), help="Split of --dataset (trainval, trainaug: voc only) [default: val]."),
    files: Optional[Path] = typer.Option(None, "--files", help="Embed only the images this file lists (a split file): one path a line, or a CSV whose first column is the path (a labels file path,label), or a JSONL with \"path\"; paths relative to the images folder, to the file's folder, or absolute. Needs --out."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Feature folder [default: features/<model>-<fingerprint>/<last three parts of the images path>-<hash of it>, or .../<dataset>-<split>-<root label>, with -global without --dense: the folder the evaluations read]."),
    run: Optional[Path] = RUN_OPTION,
    weights: Optional[Path] = WEIGHTS_OPTION,
    model: Optional[str] = MODEL_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init."),
    dense: bool = typer.Option(False, "--dense", help="Also store the patch-token maps [n, h, w, D]."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=1, help="Input side in pixels [default: the model's img_size]."),
    resize: Resize = typer.Option("square", "--resize", parser=one_of("--resize", Resize), help="square: whole image to R x R (for dense work); center-crop: DINO k-NN protocol."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0, help="Image-decoding worker processes [default: none below 1,000 images, else one per usable core but one, at most 8 a process]."),
    dtype: Dtype = typer.Option("fp16", "--dtype", parser=one_of("--dtype", Dtype), help="Stored precision."),
    part_size: Optional[int] = typer.Option(None, "--part-size", min=1, help="Images per resumable part (a multiple of --batch-size) [default: 8 batches]."),
    max_image_pixels: int = typer.Option(89_478_485, "--max-image-pixels", min=1, help="Larger images are skipped as decompression bombs (Pillow's own limit)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it holds other features."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Extract global (and dense) features of a folder of images into safetensors shards.

    Example: mlsctl embed data/fmnist-scenes/val/images --run runs/dino_fmnist_quick --dense --out features/val

    A benchmark split, read in place from its archive: mlsctl embed --dataset voc --root VOCtrainval_11-May-2012.tar
    --split val --dense --resolution 512 --run runs/x (then eval knn-seg --dataset voc --root ... --val FEATURES)

    Part of a folder (a split file): mlsctl embed CUB_200_2011/images --files train.csv --out features/cub-train --run RUN

    Killed and run again, it continues where it stopped. Several processes:
    accelerate launch --num_processes 2 -m mlsctl embed IMAGES --run RUN
    """
    from mlsctl import dist
    from mlsctl.features import (CACHE_ROOT, cache_dir, check_feature_target, check_images_folder,
                                 check_outside_images_folder, embed_folder, embed_split, split_cache_dir)
    from mlsctl.restore import choose_model

    if (images is None) == (dataset is None):
        raise UserError("give a folder of images, or --dataset with --root and --split (not both)")
    if files is not None:
        if dataset is not None:
            raise UserError("--files chooses images of a folder; a --dataset split lists its own: drop one")
        if out is None:  # the default --out is the whole folder's, which the evaluations would take for it
            raise UserError(f"--files embeds part of {images}: give the features their own --out")
        from mlsctl.data.labels import read_paths_file

        read_paths_file(files, "--files")  # its mistakes before the model loads; matched to the images as they scan
    benchmark = None
    if dataset is not None:
        from mlsctl.data.datasets import open_split

        benchmark = open_split(dataset, root, split or "val")
    elif not Path(images).is_dir():  # what is cheap to check goes before the model loads (a probe, 2026-12-06)
        from mlsctl.data.images import scan_images

        scan_images(images, "image folder")  # its sentence for a missing folder or a file
    else:
        check_images_folder(Path(images))
        check_outside_images_folder(CACHE_ROOT if out is None else out, images,
                                    default="the default --out" if out is None else None)
    if out is not None:
        check_feature_target(out)
    if part_size is not None and part_size % batch_size:
        raise UserError(f"--part-size {part_size} must be a multiple of --batch-size {batch_size}")
    dist.init_from_environment()
    choice = choose_model(run=run, weights=weights, arch=model, random_init=random_init, seed=seed)
    main = dist.rank() == 0
    if main:
        say(f"model: {choice.description} (backbone fingerprint {choice.fingerprint[:12]})")
    said: set[str] = set()  # the scan's "skipped" lines, said as it starts: not repeated at the end

    def say_once(line: str) -> None:
        said.add(line)
        say(line)

    options = dict(dense=dense, resolution=resolution, resize=resize, batch_size=batch_size, workers=workers,
                   dtype=dtype, part_size=part_size, overwrite=overwrite, max_image_pixels=max_image_pixels,
                   say=say_once, raise_with="--max-image-pixels")
    # the default --out is the folder the evaluations keep these features in (an embed, then an eval of the same
    # images, embedded them twice: a code-health review, 2026-12-06)
    where = dict(dense=dense, resize=resize, resolution=resolution, dtype=dtype)
    if benchmark is not None:
        out = out if out is not None else split_cache_dir(benchmark, choice, **where)
        summary = embed_split(benchmark, out, choice, **options)
    else:
        if out is None:
            out = cache_dir(images, choice, **where)
            check_outside_images_folder(out, images, default="the default --out")  # a link inside, at most
        summary = embed_folder(images, out, choice, listed=files, listed_what="--files", **options)
    if main:
        _report(summary, choice, benchmark, said, as_json)


def _report(summary, choice, benchmark, said: set[str], as_json: bool) -> None:
    """What ``embed`` wrote, as JSON or lines (the skipped files not said already as the scan went);
    no row at all is an error (exit code 1): a script must not take the folder for features."""
    from mlsctl.data.images import NOT_AN_IMAGE, others_note

    no_rows = (f"none of the {len(summary.skipped)} files could be read as an image (reasons in "
               f"{summary.out}/manifest.json); no evaluation can use {summary.out}")
    if as_json:
        # null, not 0.0, when nothing was embedded this time (reused, or every part embedded before)
        rate = None if summary.reused or not summary.images_per_s else round(summary.images_per_s, 2)
        typer.echo(json.dumps({"out": str(summary.out), "rows": summary.rows, "skipped": summary.skipped,
                               "seconds": round(summary.seconds, 3), "images_per_s": rate,
                               "model": choice.info, "reused": summary.reused,
                               "dataset": benchmark.describe() if benchmark is not None else None}, indent=2))
        if summary.rows == 0:
            raise UserError(no_rows, exit_code=1)
        return
    others = [path for path, reason in summary.skipped if reason.startswith(NOT_AN_IMAGE)]
    for path, reason in summary.skipped:
        if f"skipped {path}: {reason}" not in said and not reason.startswith(NOT_AN_IMAGE):  # said twice (2026-12-06)
            typer.echo(f"skipped {path}: {reason}", err=True)
    note = others_note(others)  # one line for them all, as the scan says it (300 lines for 300 .txt files: a probe)
    if note and not any(line.endswith(note) for line in said):
        typer.echo(note, err=True)
    if summary.reused:
        typer.echo(f"{summary.out} already holds these features ({summary.rows} rows); nothing to do")
        return
    # "embedding 23 images" then "20 rows, 4 skipped" (a probe, 2026-12-06): files that are no images apart
    bad = len(summary.skipped) - len(others)
    parts = ([f"{bad} image{'s' if bad != 1 else ''} skipped"] if bad else []) + \
        ([f"{len(others)} other file{'s' if len(others) != 1 else ''} left out"] if others else [])
    skipped = f", {' and '.join(parts)} (listed in manifest.json)" if parts else ""
    rate = (f"{summary.images_per_s:.1f} images/s" if summary.images_per_s
            else "every part was embedded before: joined into shards only")
    typer.echo(f"wrote {summary.rows} rows{skipped} to {summary.out}/ in {summary.seconds:.1f}s ({rate})")
    if summary.rows == 0:  # the folder records why
        raise UserError(no_rows.replace("(reasons in", "(the reasons are above and in"), exit_code=1)
