from __future__ import annotations

import difflib
import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import typer
from typer.core import TyperCommand

from mlsctl.cli._format import say, table
from mlsctl.console import counted, stops_deferred
from mlsctl.errors import UserError
from mlsctl.cli._options import one_of

app = typer.Typer(rich_markup_mode=None,
                  help="Build, grow and prune galleries of objects for image-set search (set embeddings in faiss: "
                       "MILE's, or the mean of the photos' CLS).",
                  no_args_is_help=True)


GalleryIndex = Literal["flat", "ivfpq"]  # gallery.INDEX_KINDS
StorageDtype = Literal["fp32", "fp16"]  # gallery.STORAGE_DTYPES


@app.command("build")
def build(
    source: Path = typer.Argument(..., help="Images in one folder per object (ROOT/<object_id>/*), or their feature folder from mlsctl embed."),
    objects: Optional[Path] = typer.Option(None, "--objects", help="CSV/JSONL of object_id,path (paths relative to SOURCE) naming the objects instead of SOURCE's folders, as MILE's method.objects_file."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run whose teacher embeds the objects: a MILE run folds sets with its set encoder, a run of any other method takes the mean of the photos' CLS embeddings [default: the run that embedded a feature folder given, else the newest MILE run under ./runs]."),
    out: Path = typer.Option(Path("gallery"), "--out", "-o", help="Gallery folder to write."),
    index: GalleryIndex = typer.Option("flat", "--index", parser=one_of("--index", GalleryIndex), help="flat (exact) or ivfpq (compressed, for large galleries)."),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, max=2**31 - 1, help="IVF-PQ lists [default: sqrt(objects), at most objects / 39]."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", min=1, help="IVF-PQ sub-quantisers (must divide the width) [default: width / 8]."),
    pq_bits: int = typer.Option(8, "--pq-bits", min=1, max=16, help="Bits per PQ code."),
    nprobe: int = typer.Option(32, "--nprobe", min=1, max=2**31 - 1, help="IVF lists searched per query."),
    refine: int = typer.Option(10, "--refine", min=1, max=10_000, help="IVF-PQ candidates per result, re-ranked with exact cosines."),
    dtype: StorageDtype = typer.Option("fp32", "--dtype", parser=one_of("--dtype", StorageDtype), help="Stored latents: fp32, or fp16 (half the disk; later adds fold from rounded latents)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0, help="Image-decoding worker processes, for a folder of images [default: as mlsctl embed's]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a gallery already in --out (refused where it holds objects or photos added since its build that the source lacks, unless --drop-added)."),
    drop_added: bool = typer.Option(False, "--drop-added", help="With --overwrite: rebuild even though the gallery holds objects or photos added since its build (index add, serve) that the source lacks; they are dropped."),
    restore_removed: bool = typer.Option(False, "--restore-removed", help="With --overwrite: build back the objects removed from the gallery (index remove, DELETE) that the source still holds [default: they are skipped, and stay removed]."),
    restore_ids: Optional[list[str]] = typer.Option(None, "--restore-removed-id", metavar="ID", help="With --overwrite: build back this one removed object of the source, the others staying removed; give it again for more."),
    as_json: bool = typer.Option(False, "--json", help="Print the gallery record as JSON."),
) -> None:
    """One set embedding per object, indexed with faiss: MILE's with a MILE run, else the mean of the CLS.

    A MILE run's set encoder folds each object's photos; a run of any other method (DINO, CrIBo, SOVE, MLS or MoCo, MS)
    sums its teacher's CLS embeddings of them, whose cosine is that of their mean (eval retrieval's mean-cls).
    Example: mlsctl index build data/fmnist-products/gallery --run runs/mile_fmnist_quick --out galleries/products
    """
    from mlsctl.gallery import IndexSettings, build_gallery, choose_set_model, unfinished_run_note

    settings = IndexSettings(index, nlist, pq_m, pq_bits, nprobe, refine)
    restore_ids = restore_ids or []
    groups = _check_build_before_the_model(source, objects, out, settings, overwrite, drop_added, restore_removed,
                                           restore_ids)
    model = choose_set_model(run, say=say, features=source)
    unfinished = unfinished_run_note(model)
    if unfinished:
        say(unfinished)
    record = build_gallery(source, model, out, settings, overwrite=overwrite, storage_dtype=dtype, workers=workers,
                           say=say, objects_file=objects, groups=groups, drop_added=drop_added,
                           restore_removed=restore_removed, restore_ids=restore_ids)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    # faiss searches min(nprobe, nlist) lists: "nlist 3, ... nprobe 32" read as 32 lists searched (a new user's probe)
    probed = min(nprobe, settings.nlist or nprobe)
    probes = f"nprobe {probed}" + (f": every list, of the {nprobe} asked" if probed < nprobe else "")
    print(f"built {out}: {record['objects']} objects from {record['images']} images, index {index}"
          + (f" (nlist {settings.nlist}, m {settings.m}, {pq_bits} bits, {probes})" if index == "ivfpq" else ""))


def _check_build_before_the_model(source: Path, objects: Optional[Path], out: Path, settings, overwrite: bool,
                                  drop_added: bool, restore_removed: bool, restore_ids: list[str]
                                  ) -> Optional[dict]:
    """What ``index build`` checks before its model loads (a new user waited for the model to hear of a typo):
    ``--out``, the source and its objects (an objects file's rows too), the index settings and whether they fit
    the objects (those a rebuild skips, removed from the gallery it replaces, left out), a server holding ``--out``,
    and what a rebuild would drop. Returns the source's object folders (None for a feature folder), which the build
    embeds."""
    from mlsctl.data.kinds import folder_kind
    from mlsctl.features import is_feature_folder
    from mlsctl.gallery import (check_gallery_free, check_gallery_target, check_index_fits, check_objects_source,
                                count_source_objects, object_folders, removals_of_rebuild)

    check_gallery_target(out, overwrite, source)  # before the model loads
    if not source.exists():  # so is a source that is not there (a new user, 2026-12-06: said after the model line)
        raise UserError(f"gallery images {source} does not exist; give a folder with one sub-folder of photos per "
                        f"object, or their feature folder")
    kind = folder_kind(source)
    if kind in ("a run folder", "a gallery"):  # said before the model loads, not after (a probe, 2026-12-06)
        raise UserError(f"gallery images {source} is {kind}; give a folder with one sub-folder of photos per object, "
                        f"or their feature folder" + (" (a run goes to --run)" if kind == "a run folder" else ""))
    settings.check()  # before the model loads
    check_objects_source(source, objects)
    # the objects and their photos (an objects file's rows too) before the model loads (a review, 2026-12-07)
    groups = None if is_feature_folder(source) else object_folders(source, objects)
    check_gallery_free(out)  # a server holding --out: before the model loads, as index add says it
    if drop_added and not overwrite:
        raise UserError("--drop-added goes with --overwrite: it lets a rebuild drop what was added to the gallery")
    # what the rebuild would drop, refused before the model loads; the removed objects it skips (said by the build)
    _, skipped = removals_of_rebuild(source, groups, out, overwrite, drop_added, restore_removed, say=lambda _: None,
                                     restore_ids=restore_ids)
    check_index_fits(settings, count_source_objects(source, groups) - len(skipped))  # IVF-PQ's least objects
    return groups


SET_MODEL_NAMES = {"mile": "MILE sets", "mean-cls": "mean-CLS sets"}  # what index info calls each kind
RETRAIN_SHARE = 0.2  # objects written since the IVF quantiser was trained, above which `index add` says so


@app.command("add")
def add(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    object_id: str = typer.Option(..., "--object", help="Object to add to; a new id creates the object."),
    images: list[Path] = typer.Argument(..., help="Images to fold into the object, in order; a folder gives its images in the order index build folds an object folder's."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run to embed with [default: the gallery's run]."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON (the fields of serve's answer)."),
) -> None:
    """Fold new images into an object's stored latent state (earlier images are not recomputed).

    Appends one row to the gallery, whatever its size. Example:
    mlsctl index add galleries/products --object ev00007 new1.png new2.png
    """
    from mlsctl.gallery import add_to_gallery

    # the id, the gallery and the photos (paths, headers) are checked first, in that order; then the lock and the
    # model. Each photo is decoded and resized to the model's input in turn (a probe, 2026-12-07: 40 phone photos,
    # all decoded first, took 2.65 GB). A folder gives its photos in the order index build folds an object folder's
    target, created, count, added, skipped = add_to_gallery(gallery, object_id, images, run=run, say=say)
    share = target.added_since_training()
    if as_json:
        print(json.dumps({"gallery": str(gallery), "object": object_id, "created": created, "photos": count,
                          "added": added, "skipped": skipped, "objects": len(target),
                          "written_since_training": round(share, 4)},
                         indent=2))
    else:
        # "4 photos folded" after adding 2 read as 4 added (a new user); photos skipped: said by add_to_gallery
        done = "created" if created else "updated" if added else "left unchanged"
        print(f"{done} {object_id} in {gallery}: {counted(added, 'photo')} added"
              + ("" if created else f", {count} folded in all") + f"; {len(target)} objects")
    if share > RETRAIN_SHARE:
        say(f"{100 * share:.0f}% of the objects were written after the IVF index was trained, so recall may have "
             f"dropped: run mlsctl index retrain {gallery}")


@app.command("info")
def info(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    objects: bool = typer.Option(False, "--objects", help="List every object with its photo count, oldest first."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """What a gallery holds: objects, photos, the model that embeds it, its index; with --objects, every object.

    Example: mlsctl index info galleries/products --objects
    """
    from mlsctl.gallery import describe_gallery, printable

    record = describe_gallery(gallery, objects=objects)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    index, model = record["index"], record["model"]
    # faiss searches min(nprobe, nlist) lists: "nprobe 32" of a gallery of 1 list read as 32 searched (a review)
    probed, asked = index.get("nprobe_effective"), index.get("nprobe")
    probes = f"nprobe {probed}" + (f": every list, of the {asked} asked" if probed != asked else "")
    settings = "" if index["kind"] == "flat" else (
        f" (nlist {index.get('nlist')}, m {index.get('m')}, {index.get('nbits')} bits, {probes}, "
        f"refine {index.get('refine')}; {100 * record['written_since_training']:.0f}% of the objects written since "
        f"it was trained)")
    superseded = record["superseded_rows"]
    kept_out = record["removed_objects"]  # a takedown's ids, kept past a purge: what a rebuild skips
    lines = [("objects", f"{record['objects']:,} ({record['photos']:,} photos folded)"
                         + (f"; {counted(kept_out, 'object')} removed, whose ids alone are kept so that index build "
                            f"--overwrite skips them" if kept_out else "")),
             ("rows", f"{record['rows']:,}" + (f" ({superseded:,} superseded: mlsctl index retrain {gallery} drops "
                                                f"them)" if superseded else "")),
             ("model", f"{SET_MODEL_NAMES[model['set_model']]} of run {model['run']} at step {model['step']} "
                       f"(fingerprint {model['fingerprint'][:12]}, {model.get('arch')}"
                       + (f", attends to {model.get('attend')})" if model["set_model"] == "mile" else ")")),
             ("latents", f"width {record['dim']}, {record['storage_dtype']}"),
             ("index", f"{index['kind']}{settings}"),
             ("built", f"{record['created']} from {record['source']}"
              + (f" (objects file {record['objects_file']})" if record["objects_file"] else "")),
             ("on disk", f"{record['bytes'] / 1e6:.1f} MB")]
    if record["photo_digests"]:  # what lets an add skip a photo its object holds already
        lines.insert(1, ("known", f"{record['photo_digests']:,} photos by their bytes (sha256): adding one again to "
                                  f"its object folds nothing"))
    if record["removed_rows"]:  # a takedown is not done until the latents leave the files: said where it is not
        lines.insert(2, ("removed", f"{counted(record['removed_rows'], 'removal')} since the last purge or retrain, "
                                    f"whose latents stay in the files until mlsctl index remove {gallery} --purge (or "
                                    f"index retrain) purges them"))
    width = max(len(name) for name, _ in lines)
    print(f"gallery {gallery}")
    for name, value in lines:
        print(f"  {name:<{width}}  {value}")
    if record.get("damaged"):
        print(f"  damaged  {record['damaged']}")
    if objects:
        print("")
        print(table(["object", "photos"], [[printable(o["object"]), o["photos"]] for o in record["object_photos"]]))


@app.command("retrain")
def retrain(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    as_json: bool = typer.Option(False, "--json", help="Print what the text reports as JSON, with the new gallery record."),
) -> None:
    """Re-train a gallery's IVF-PQ quantiser on its current objects (and drop superseded rows).

    After many objects from clusters the index never saw, recall falls; this restores it, atomically.
    Example: mlsctl index retrain galleries/products
    """
    from mlsctl.gallery import retrain_gallery

    started = time.perf_counter()
    before, manifest = retrain_gallery(gallery)
    seconds = time.perf_counter() - started
    if as_json:
        print(json.dumps({"gallery": str(gallery), "objects": manifest["objects"], "rows_before": before,
                          "rows": manifest["rows"], "index": manifest["index"]["kind"], "seconds": round(seconds, 3),
                          "manifest": manifest}, indent=2))
        return
    flat = manifest["index"]["kind"] == "flat"  # no quantiser to train: its superseded rows dropped (a new user)
    print(f"{'compacted' if flat else 'retrained'} {gallery}: {manifest['objects']} objects ({before} rows before, "
          f"{manifest['rows']} now), index {manifest['index']['kind']}"
          f"{' (exact: nothing to train)' if flat else ''}, {seconds:.1f}s")


_NO_OBJECTS = ("index remove takes no --objects: give the ids to remove (index remove GALLERY ID ...), or a text "
               "file of them, one per line, with --ids-file FILE")


class DashedIdsCommand(TyperCommand):
    """``index remove``: an argument beginning with one '-' that is none of its options, before ``--``, is said to be
    an id to give after ``--`` (``index remove GALLERY -- -neg``), instead of click's "No such option: -n"."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        options = [p for p in self.get_params(ctx) if getattr(p, "param_type_name", "") == "option"]
        known = {name for p in options for name in p.opts + p.secondary_opts}
        takes_value = {name for p in options if not p.is_flag for name in p.opts}
        value_next = False
        for arg in args:
            if arg == "--":
                break
            if not value_next and arg.startswith("--") and arg.split("=", 1)[0] == "--objects":
                raise UserError(_NO_OBJECTS)  # --objects=FILE too (a probe, 2026-12-07: click's "takes no value")
            # an id such as -neg or --neg; a misspelt --option is click's to say, with the option it reads like
            if not value_next and arg.startswith("-") and arg != "-" and arg not in known and not (
                    arg.startswith("--") and difflib.get_close_matches(arg.split("=", 1)[0], sorted(known))):
                raise UserError(f"index remove has no option {arg}; an id beginning with '-' goes after --: mlsctl "
                                f"index remove GALLERY -- {arg}")
            value_next = not value_next and arg in takes_value
        return super().parse_args(ctx, args)


@app.command("remove", cls=DashedIdsCommand)
def remove(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    ids: Optional[list[str]] = typer.Argument(None, help="Ids of the objects to remove (an id beginning with '-' "
                                                         "goes after --: index remove GALLERY -- -neg)."),
    ids_file: Optional[list[str]] = typer.Option(None, "--ids-file", metavar="FILE", help="A text file of ids to remove, one per "
                                                                           "line (blank lines skipped), besides or "
                                                                           "instead of IDS; give it again for more "
                                                                           "files, '-' alone reads standard input "
                                                                           "(./- is a file named '-')."),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="Pass over ids that are not in the gallery instead of "
                                                                "refusing the whole removal."),
    purge: bool = typer.Option(False, "--purge", help="Then compact the gallery, keeping its trained index, so that "
                                                      "the removed latents leave its files at once (a takedown); "
                                                      "without IDS, purges earlier removals [default: they stay until "
                                                      "the next purge or retrain]."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON: gallery, removed and missing "
                                                       "(ids), objects (left) and purged."),
    objects_option: bool = typer.Option(False, "--objects", hidden=True),  # refused, pointing to --ids-file
) -> None:
    """Remove objects from a gallery: searches never return them again.

    All or none: every id is checked before anything is written, and one not in the gallery refuses the
    whole removal (unless --missing-ok). Appends one tombstone row per object; the removed latents stay
    in the files until --purge (or mlsctl index retrain). An id beginning with '-' goes after --
    (mlsctl index remove galleries/products -- -neg). Example:
    mlsctl index remove galleries/products ev00007 ev00012 --purge
    """
    from mlsctl.gallery import printable, remove_from_gallery

    if objects_option:  # index build's option, tried here (a new user's probe: typer said "No such option" alone)
        raise UserError(_NO_OBJECTS)

    from_file = _ids_of_files(ids_file or [])  # id -> its file and line, for the sentences
    wanted = list(ids or []) + list(from_file)
    given = set(ids or [])  # an id given as IDS and in the file is named as given
    named = {object_id: where for object_id, where in from_file.items() if object_id not in given}
    if not wanted and not purge:
        raise UserError("give the ids of the objects to remove (index remove GALLERY ID ...), or a file of them, one "
                        "per line, with --ids-file FILE; --purge alone purges earlier removals")
    outcome: dict = {}
    target, removed, missing = remove_from_gallery(gallery, wanted, missing_ok=missing_ok, purge=purge, named=named,
                                                   outcome=outcome)
    if as_json:
        print(json.dumps({"gallery": str(gallery), "removed": removed, "missing": missing, "objects": len(target),
                          "purged": outcome["purged"]}, indent=2))
        return
    shown = ", ".join(printable(i) for i in removed[:5]) + (", ..." if len(removed) > 5 else "")
    if wanted:
        print(f"removed {counted(len(removed), 'object')} from {gallery}" + (f" ({shown})" if removed else "")
              + f"; {counted(len(target), 'object')} left")
    _say_missing(target, missing)
    if purge and not outcome["purged"]:  # every row live: nothing written (a probe, 2026-12-07)
        print(f"nothing to purge in {gallery}: it holds no removed object's latent")
    elif purge:  # a takedown is done when the latents left the files: said (a probe: only --json said "purged")
        what = ("the removed objects' latents, and any of earlier removals," if removed else
                "the latents of objects removed earlier")
        print(f"purged {gallery}: {what} left its files")
    if removed and not purge:
        say(f"note: the removed latents stay in the gallery's files until mlsctl index remove {gallery} --purge (or "
            f"index retrain) purges them")


def _say_missing(target, missing: list[str]) -> None:
    """The note on the ids ``--missing-ok`` passed over: those removed before ("removed already", as a refusal
    says: a probe, 2026-12-07, found them said "not in the gallery"), and those the gallery never held."""
    from mlsctl.gallery import printable

    before = [object_id for object_id in missing if target.was_removed(object_id)]
    removed_before = set(before)
    never = [object_id for object_id in missing if object_id not in removed_before]
    for ids, what in ((before, "removed already"), (never, "not in the gallery")):
        if ids:
            shown = ", ".join(printable(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            say(f"note: {counted(len(ids), 'id')} {what}, passed over (--missing-ok): {shown}")


def _ids_of_files(paths: list[str]) -> dict[str, str]:
    """The ids of every ``--ids-file`` given (each read: a probe, 2026-12-07, found the last alone used), in order,
    each named by the first file and line that lists it; ``-`` is standard input, read once. The values are the
    strings typed, not Paths: ``Path('./-')`` prints as ``-``, so ``./-`` (the file named '-') read standard input (a
    review, 2026-12-07)."""
    if sum(path == "-" for path in paths) > 1:
        raise UserError("--ids-file - (standard input) is given more than once; standard input can be read once")
    named: dict[str, str] = {}
    for path in paths:
        for object_id, where in _ids_of_file(path).items():
            named.setdefault(object_id, where)
    return named


def _ids_of_file(given: str) -> dict[str, str]:
    """The ids of ``index remove --ids-file FILE``, each with where it is (``--ids-file FILE line N: the id``, for the
    sentences about it): one a line, blank lines skipped, nothing else trimmed (a stored id may end in a space; a
    typo is told by the gallery, naming the id it reads like, and the line); an id that is no valid id is said with
    its file and line."""
    from mlsctl.gallery import check_object_id

    stdin, path = given == "-", given  # named as typed (./- stays ./-)
    try:  # lines end at \n alone (read_text would end them at a lone \r too, splitting an id: a probe, 2026-12-07)
        data = sys.stdin.buffer.read() if stdin else Path(given).read_bytes()
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not an id
    except UnicodeDecodeError:
        raise UserError(f"--ids-file {path} is not UTF-8 text; save it as UTF-8, one object id per line") from None
    except OSError as exc:
        raise UserError(f"--ids-file {path} cannot be read ({exc.strerror or exc})") from None
    if stdin:
        path = "- (standard input)"
    lines = [(number, line[:-1] if line.endswith("\r") else line)  # CRLF: the \r of the line break alone
             for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise UserError(f"--ids-file {path} lists no object id; give one id per line")
    for number, line in lines:
        if "," in line and "/" in line:  # index build's object_id,path CSV, given here (a probe, 2026-12-07)
            raise UserError(f"--ids-file {path} line {number} reads '{line}': the file lists one object id a line, "
                            f"not index build's object_id,path rows; give a file of the ids alone")
        check_object_id(line, f"--ids-file {path} line {number}: the id")
    named: dict[str, str] = {}
    for number, line in lines:  # an id given twice is removed once: its first line is named
        named.setdefault(line, f"--ids-file {path} line {number}: the id")
    return named


def search(
    images: Optional[list[Path]] = typer.Option(None, "--set", help="Photos of one object (space-separated), folded in the order given: the set embedding depends on it, and index build folds an object's photos in file-name order; a folder gives its photos in that order."),
    sets: Optional[Path] = typer.Option(None, "--sets", help="JSONL of query sets, one per line: {\"photos\": [...], \"id\": ...} (photos folded in the order listed); one JSON line out per set, with 'error' where a photo cannot be read."),
    index: Optional[Path] = typer.Option(None, "--index", help="Gallery folder [default: the newest gallery under the current directory]."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Objects to return."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run to embed with [default: the gallery's run]."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0, help="Image-decoding worker processes for --sets [default: as mlsctl embed's]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Find the objects of a gallery that a set of photos shows, ranked by cosine of set embeddings.

    The set embedding is the gallery's kind: MILE's (a MILE run's set encoder) or the mean of the photos' CLS.

    Example: mlsctl search --set a.png b.png --index galleries/products -k 10

    Many sets, one model load: mlsctl search --sets queries.jsonl --index galleries/products > results.jsonl
    """
    from mlsctl.gallery import (Gallery, check_photos, choose_set_model, long_set_note, missing_sets,
                                newest_gallery, photos_of_folders, printable, ranked, read_query_sets, search_sets)

    if images is not None and sets is not None:
        raise UserError("give the photos of one set with --set or a JSONL file of sets with --sets, not both")
    if images is None and sets is None:
        raise UserError("give the photos of one set with --set, or a JSONL file of sets with --sets")
    if index is None:
        index = newest_gallery(".")
        if index is None:
            raise UserError("no --index given and no gallery under the current directory; build one with mlsctl index build")
        say(f"gallery: {index} (the newest under the current directory)")
    target = Gallery(index)
    if not len(target):  # every object removed, or none added yet: said, where it printed a bare header (a probe)
        say(f"note: gallery {index} holds no objects: every search answers nothing")
    queries = read_query_sets(sets) if sets is not None else None  # a bad file is told before the model loads
    images = photos_of_folders(images, "--set") if images else images  # a folder: its photos, as build folds them
    missing = [str(p) for p in (images or []) if not Path(p).is_file()]
    if missing and missing[0].startswith("-"):  # `search --set --index G`: an option taken for a photo
        raise UserError(f"--set got '{missing[0]}' where a photo should be: give the photos right after --set "
                        f"(search --set a.png b.png --index G)")
    # paths and headers, as index add checks them: before the model loads (new users' probes, 2026-12-06 and -07)
    check_photos(images or [], option="--set")
    unsearchable = missing_sets(queries, source=f"--sets {sets}") if queries is not None else None
    model = None if unsearchable else choose_set_model(run or target.built_with_run(), say=say, gallery=target)
    if model is not None:
        target.check_model(model)
    if queries is not None:
        started = time.perf_counter()
        failed, writing = [], []

        def write(records: list) -> None:  # each record leaves the list as it is printed: never printed twice
            while records:
                with stops_deferred():  # nor lost: a stop between the print and the pop is held till both are done
                    number, record = records[0]
                    print(json.dumps(record), flush=True)
                    records.pop(0)
                if "error" in record:
                    failed.append(number)

        try:
            for writing in ([unsearchable] if unsearchable else  # every set misses a photo: no model loaded
                            search_sets(target, model, queries, k, workers=workers, source=f"--sets {sets}")):
                write(writing)
        except KeyboardInterrupt:  # stopped while printing a batch: its other lines still come out
            write(writing)
            raise
        seconds = time.perf_counter() - started
        searched = len(queries) - len(failed)
        say(f"searched {counted(searched, 'set')} in {seconds:.2f}s ({searched / max(seconds, 1e-9):.1f} sets/s)")
        if failed:
            raise UserError(f"{len(failed)} of the {counted(len(queries), 'set')} of {sets} could not be searched "
                            f"(line{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed[:10]))}"
                            f"{', ...' if len(failed) > 10 else ''}): "
                            f"{'their output lines say' if len(failed) > 1 else 'its output line says'} why under 'error'")
        return
    cls, tokens = model.image_tokens(images)  # each photo resized as it is decoded: only those copies are kept
    found = target.search(model.fold(None, cls, tokens), k)
    note = long_set_note(model, len(images))
    if as_json:
        print(json.dumps({"gallery": str(index), "set": [str(p) for p in images], "results": ranked(found),
                          **({"note": note[len("note: "):]} if note else {})}, indent=2))
        return
    if note:
        say(note)
    # ids as messages show them: invisible characters spelt out, so 'x' and 'x' + U+200B read apart (a new user's probe)
    rows = [[i + 1, printable(o, None), f"{s:.4f}"] for i, (o, s) in enumerate(found)]
    print(table(["rank", "object", "cosine"], rows,
                right=[True, False, True]))
