"""The result files of the evaluations: one JSON object each, ``results/<evaluation>-<time>-<pid>.json``
unless named, stamped (``written``: date, mlsctl version, commit). ``mlsctl report`` finds a run's
results among them by the ``model`` fingerprint they record (docs/report.md), so a script that
calls an evaluation function and writes its result here gets the same treatment as the CLI's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from mlsctl.console import to_stderr
from mlsctl.errors import UserError

DEFAULT_FOLDER = Path("results")


def default_path(evaluation: str) -> Path:
    """``results/<evaluation>-<YYYYmmdd-HHMMSS>-<process id>.json``, relative to the working directory:
    two evaluations ending in the same second (a sweep's jobs) wrote one file, and the first one's
    results were lost (a probe, 2026-12-06). :func:`write_result` never replaces a file of this name:
    it adds ``-2``, ``-3``, … (two results of one process in one second, or jobs on two machines
    with the same process id)."""
    return DEFAULT_FOLDER / f"{evaluation}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"


def check_default_place() -> None:
    """Before the work of an evaluation without ``--out``: the default folder ``results/`` can be made
    or written into (said before the work, not after it)."""
    folder = DEFAULT_FOLDER.absolute()
    if folder.is_symlink() and not folder.exists():  # a dangling link: making the folder would fail after the work
        raise UserError(f"results are written to {DEFAULT_FOLDER}/ by default, but {folder} is a link to "
                        f"{os.readlink(folder)}, which does not exist; create it, or give --out FILE")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"results are written to {DEFAULT_FOLDER}/ by default, but {folder} is a file; give --out FILE "
                        f"to write them elsewhere")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"results are written to {DEFAULT_FOLDER}/ by default, but this process cannot write into "
                        f"{existing} (read-only or not permitted); give --out FILE to write them elsewhere", exit_code=1)


def _claim_default_path(evaluation: str) -> Path:
    """A new file of :func:`default_path`'s name (or with ``-2``, ``-3``, …), created empty and
    exclusively, so that no other writer picks it; the atomic write then fills it."""
    check_default_place()
    first = default_path(evaluation)
    first.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = first if attempt == 1 else first.with_name(f"{first.stem}-{attempt}.json")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise UserError(f"{first.parent} holds 999 results named {first.stem}-N.json; give --out FILE")


def say_replacing(out: Optional[Path], command: str, say=to_stderr) -> Optional[str]:
    """Before the work of ``command`` (``eval knn``): say where ``out`` holds another evaluation's
    results, which it will replace, so that a user can stop it and give another ``--out`` (a review,
    2026-12-07: it was said only once they were gone). Returns the command whose results ``out``
    holds, for :func:`write_result`'s ``replacing``. Replaced, not refused: an evaluation's ``--out``
    replaces an earlier results file of mlsctl, as scripts that rerun into one file rely on."""
    replaced = _command_of(Path(out)) if out is not None else None
    if replaced is not None and replaced != command:
        say(f"note: {out} holds the results of {replaced}; this {command} replaces them when it is done "
            f"(give another --out to keep them)")
    return replaced


def write_result(payload: dict, out: Optional[Path], evaluation: str, say=to_stderr,
                 replacing: Optional[str] = None) -> Path:
    """Stamp ``payload`` (``written``) and write it atomically to ``out`` (or a new file of
    :func:`default_path`'s name, never an existing one); returns the path written. Replacing the
    results of another evaluation is said, unless they are those of ``replacing``, said before the
    work (:func:`say_replacing`)."""
    from mlsctl import atomic, provenance

    from mlsctl.outputs import check_results_target

    payload["written"] = provenance.stamp()
    if out is None:
        path = _claim_default_path(evaluation)
        try:
            atomic.write_json(path, payload)
        except BaseException:
            path.unlink(missing_ok=True)  # the empty file it claimed
            raise
        return path
    path = Path(out)
    # checked again now the work is done: the command may have made the file since (a cache manifest of its own)
    check_results_target(path)
    replaced = _command_of(path)
    atomic.write_json(path, payload)
    # knn over knn-seg's file went without a word (a new user's probe, 2026-12-07); here, what was not said before
    if replaced is not None and replaced not in (payload.get("command"), replacing):
        say(f"note: {path} held the results of {replaced}; replaced by these")
    return path


def results_writer(out: Optional[Path], evaluation: str, say=to_stderr,
                   say_path: bool = False) -> Callable[[dict], Path]:
    """How an ``mlsctl eval`` command (``eval knn``: ``evaluation`` "knn") writes its results, the one way for
    all of them: called after its refusals and before its work, it says where ``out`` holds another
    evaluation's results, which it will replace (:func:`say_replacing`); what it returns writes the payload
    when the work is done (:func:`write_result`, which does not say it again) and returns the path written.
    ``say_path``: say where they were written (with ``--json``, whose stdout is the payload alone: a new user's
    probe, 2026-12-07, found a script could not tell which results/knn-TIME-PID.json was its own)."""
    replacing = say_replacing(out, f"eval {evaluation}", say)

    def write(payload: dict) -> Path:
        path = write_result(payload, out, evaluation, say, replacing=replacing)
        if say_path:
            say(f"results written to {path}")
        return path

    return write


def _command_of(path: Path) -> Optional[str]:
    """The ``command`` of the results file at ``path``, or None (no file, or none recorded)."""
    import json

    try:
        command = json.loads(path.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return command if isinstance(command, str) else None


def headline(result: dict) -> dict[str, Optional[float]]:
    """The scores of an eval result that a comparison of models shows, by column name, as shares (0.131 for
    13.1 %; None where the result has none, such as top-5 of fewer than 5 classes): what each evaluation
    reports first (docs/formats.md#result-files). ``mlsctl compare`` lines up the results of one evaluation of
    one data set by these names, so results with other settings (other k, fractions, noise) get other columns.

    * ``eval knn``: ``top-1 k=K`` for every k;
    * ``eval linear``: ``top-1`` and ``top-5``, or ``mAP`` (multi-label);
    * ``eval knn-seg``: ``mIoU`` and ``foreground IoU`` (where the classes have a background), with `` F`` for
      each label fraction F but 1/1;
    * ``eval linear-seg``: ``mIoU``, ``foreground IoU``, ``pixel accuracy``;
    * ``eval retrieval``: ``AR@10`` and ``R@1`` of each scoring of the trained model (``mile``, ...), with
      ``noise N%`` where noise was added; the start backbone's rows are its own model and left out; of a gallery
      (``--index``), its search's rows, and its exact rows as ``mile exact``;
    * ``eval recall``: ``R@K`` for every K, and ``MAP@R``.

    Raises KeyError or TypeError for a result not of the form its command writes (a score that is no number
    included: a review, 2026-12-07, found one crash the whole comparison)."""
    scores = _headline(result)
    for name, value in scores.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} is {type(value).__name__}, not a number")
    return scores


def _headline(result: dict) -> dict[str, Optional[float]]:
    command, rows = result.get("command"), result.get("results")
    if command == "eval knn":
        return {f"top-1 k={row['k']}": row["top1"] for row in rows}
    if command == "eval linear":
        return {"mAP": rows["mAP"]} if result.get("multi_label") else {"top-1": rows["top1"], "top-5": rows["top5"]}
    if command == "eval knn-seg":
        return _knn_seg_columns(rows, lambda row, key: row[key])
    if command == "eval linear-seg":
        return {"mIoU": result["miou"], **({"foreground IoU": result["foreground_iou"]} if "foreground_iou" in result
                                           else {}), "pixel accuracy": result["pixel_accuracy"]}
    if command == "eval retrieval":
        out = {}
        for row in rows:
            if row.get("backbone") == "start":
                continue
            noise = f", noise {100 * row['noise']:.0f}%" if row.get("noise") else ""
            exact = " exact" if row.get("search") == "exact" else ""  # --index: the gallery's search, and exact
            out[f"AR@10 {row['method']}{exact}{noise}"] = row["AR@10"]
            out[f"R@1 {row['method']}{exact}{noise}"] = row["R@1"]
        return out
    if command == "eval recall":
        return {**{f"R@{k}": value for k, value in result["recall"].items()}, "MAP@R": result["map_at_r"]}
    raise KeyError("command")


def _knn_seg_columns(rows: list[dict], score: Callable[[dict, str], Optional[float]]) -> dict[str, Optional[float]]:
    """``eval knn-seg``'s :func:`headline` columns: ``mIoU`` and, where a row has it, ``foreground IoU`` of each
    label-fraction row, with `` F`` for each fraction F but 1/1; ``score(row, key)`` reads the row's score of
    ``key`` (``miou``, ``foreground_iou``): the model's, or what chance scores."""
    out: dict[str, Optional[float]] = {}
    for row in rows:
        suffix = "" if row["fraction"] == "1/1" else f" {row['fraction']}"
        out[f"mIoU{suffix}"] = score(row, "miou")
        if "foreground_iou" in row:
            out[f"foreground IoU{suffix}"] = score(row, "foreground_iou")
    return out


def chance_headline(result: dict) -> Optional[tuple[str, dict[str, Optional[float]]]]:
    """What the data of an eval result scores by chance, in :func:`headline`'s columns, and its label; None where
    the result records none (knn, linear, knn-seg and linear-seg record it since 2026-12-07). It depends on
    the data alone (the labels, the masks, the gallery's objects), not on the model."""
    from mlsctl.evaluate.retrieval import chance_scores

    command, chance = result.get("command"), result.get("chance")
    if command == "eval retrieval":
        chance = chance or chance_scores(result["objects"])  # exact from the objects, for results before it was kept
        columns = headline(result)
        return "chance (a random ranking)", {name: chance[name.split()[0]] for name in columns}
    if not isinstance(chance, dict):
        return None
    if command == "eval knn":
        return (f"chance (every image the majority class, {chance['majority_class']})",
                {name: chance["top1"] for name in headline(result)})
    if command == "eval linear":
        if "mAP" in chance:
            return "chance (a random ranking)", {"mAP": chance["mAP"]}
        return (f"chance (every image the majority class, {chance['majority_class']})",
                {"top-1": chance["top1"], "top-5": chance["top5"]})
    if command == "eval recall":
        return "chance (a random ranking)", {**{f"R@{k}": value for k, value in chance.items()},
                                             "MAP@R": result.get("chance_map_at_r")}
    if command == "eval knn-seg":  # each fraction's own constant rule (its training subset's majority class)
        def fraction_chance(row: dict) -> dict:
            return row["chance"] if isinstance(row.get("chance"), dict) else chance

        out = _knn_seg_columns(result["results"], lambda row, key: fraction_chance(row).get(key))
        classes = {(row.get("chance") or chance).get("majority_class") for row in result["results"]
                   if isinstance(row.get("chance") or chance, dict)}  # one class named only where every fraction has it
        named = f", {classes.pop()}" if len(classes) == 1 else ""
        return f"chance (every pixel the majority class{named})", out
    if command == "eval linear-seg":
        return (f"chance (every pixel the majority class, {chance.get('majority_class')})",
                {name: chance.get(key) for name, key in (("mIoU", "miou"), ("foreground IoU", "foreground_iou"),
                                                         ("pixel accuracy", "pixel_accuracy"))
                 if name in headline(result)})
    return None


def settings_of(result: dict) -> dict:
    """The settings of an eval result that change what its scores measure (k-NN's temperature, knn-seg's k,
    memory and patch labels, the probes' epochs and learning rates, retrieval's query sets), not those that
    only draw another sample of the same (seeds, the device): two results of one evaluation and data set are
    compared side by side only where these are equal."""
    command = result.get("command")
    if command == "eval knn":
        return {"temperature": result.get("temperature")}
    if command == "eval knn-seg":
        settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
        protocol = result.get("protocol")
        resolution = protocol.get("resolution") if isinstance(protocol, dict) else None
        how = ("fractions", "seed", "device", "search", "query_batch")  # what is drawn, or how the search runs
        return {**{key: value for key, value in settings.items() if key not in how},
                "resolution": resolution}
    if command == "eval linear":
        protocol = result.get("protocol") if isinstance(result.get("protocol"), dict) else {}
        sweep = result.get("sweep") or []
        return {**{key: protocol.get(key) for key in ("epochs", "batch_size", "holdout")},
                "lrs": sorted({row.get("lr") for row in sweep}) if sweep else [(result.get("chosen") or {}).get("lr")],
                "weight_decays": (sorted({row.get("weight_decay") for row in sweep}) if sweep else
                                  [(result.get("chosen") or {}).get("weight_decay")])}
    if command == "eval linear-seg":
        settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
        return {key: value for key, value in settings.items() if key not in ("seed", "protocol")}
    if command == "eval retrieval":
        return {"query_size": result.get("query_size")}
    return {}
