"""``mlsctl report RUN``: one self-contained static HTML page of a run — the page a researcher
sends a colleague. No server, no network: styles inline, pictures embedded as data URIs.

Sections (each present even when empty, saying why):

* **summary** — method, steps, images, processes, final loss, time (``summary.json``, the latest
  checkpoint);
* **recipe** — ``config.yaml``;
* **curves** — :func:`mlsctl.curves.plot_runs` of the run;
* **patch maps** — PCA of the teacher's patch tokens on the first training images
  (:func:`mlsctl.viz.pca_rgb`), beside the images as the model saw them;
* **memory banks** — every bank's health (:mod:`mlsctl.bank_health`) and, for banks with a query
  feature, the neighbours of the first training image (:func:`mlsctl.viz.neighbour_grid`);
* **evaluations** — every result JSON of ``mlsctl eval`` found under ``RUN/results/`` and the
  ``--results`` folders whose model is this run (its teacher file, a checkpoint, or the run folder).

A small script counts the embedded images that decoded and marks the body with
``data-images-loaded``; the test opens the page in headless Chromium and reads that back.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from mlsctl import atomic
from mlsctl.errors import UserError
from mlsctl.runs import Run

SECTIONS = ("summary", "recipe", "curves", "patch-maps", "banks", "evaluations")

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1250px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em;max-height:30em}
img{max-width:100%;border:1px solid #eee}.note{color:#777;font-style:italic}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', loaded + '/' + images.length);
});
"""


def _png_uri(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(value) -> str:
    return "–" if value is None or value != value else f"{100 * value:.2f}"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _summary(run: Run) -> str:
    rows = []
    summary = _read_summary(run)
    latest = run.latest()
    state = latest.state() if latest is not None else {}
    rows.append(("method", state.get("method", "–")))
    rows.append(("steps", f"{summary.get('steps', state.get('step', '–'))}" +
                 ("" if summary else f" (running or stopped; latest checkpoint {state.get('step', '–')})")))
    images = run.image_list()
    rows.append(("training images", len(images) if images is not None else "–"))
    for key, label in (("processes", "processes"), ("final_loss", "final loss"), ("images_per_s", "images / s"),
                       ("seconds", "training seconds"), ("resumed_from", "resumed from step")):
        if key in summary:
            rows.append((label, summary[key]))
    rows.append(("run folder", str(run.root.resolve())))
    return _table(["", ""], rows)


def _read_summary(run: Run) -> dict:
    """summary.json (written when a run finishes), or {} for a run that has not finished."""
    if not run.summary_path.is_file():
        return {}
    try:
        summary = json.loads(run.summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = getattr(exc, "strerror", None) or ("nested too deep" if isinstance(exc, RecursionError) else
                                                    str(exc).splitlines()[0][:100])
        raise UserError(f"{run.summary_path} is damaged ({reason}); mlsctl pretrain writes it when the run ends: "
                        f"remove it to report the run as unfinished") from None
    if not isinstance(summary, dict):
        raise UserError(f"{run.summary_path} is damaged (a JSON {type(summary).__name__}, not an object); remove it "
                        f"to report the run as unfinished")
    return summary


def _patch_maps(run: Run, recipe, n: int) -> str:
    from PIL import Image

    from mlsctl.bank_inspect import SourceImages
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.features import Preprocessing
    from mlsctl.models.source import from_run
    from mlsctl.viz import pca_figure, pca_rgb

    sources = SourceImages(run)
    paths = [sources.path(i) for i in range(min(n, len(sources.relpaths)))]
    images = []
    for path in paths:
        try:
            images.append(load_rgb(path))
        except (BadImage, OSError, TypeError):
            pass
    if not images:
        return _note(f"no training image of {run.root} could be read (data.root {sources.root}), so no patch map")
    model = from_run(run.root)
    size = model.info["img_size"] - model.info["img_size"] % model.backbone.patch_size
    preprocessing = Preprocessing(size, "square")
    with torch.no_grad():
        dense = model.backbone(torch.stack([preprocessing(img) for img in images])).patches.float()
    seen = [Image.fromarray(preprocessing.pixels(img).permute(1, 2, 0).numpy()) for img in images]
    with tempfile.TemporaryDirectory() as tmp:
        out = pca_figure(seen, pca_rgb(dense), [p.name for p in paths[:len(images)]], Path(tmp) / "pca.png")
        uri = _png_uri(out)
    return (f"<p>{html.escape(model.description)}: the first {len(images)} training images at {size} px, each patch "
            f"coloured by the first three principal components of the teacher's patch tokens.</p>"
            f'<img alt="PCA patch maps" src="{uri}">')


def _banks(run: Run, recipe) -> str:
    from mlsctl.bank_health import bank_health
    from mlsctl.bank_inspect import SourceImages, embed_query, nearest_entries, neighbour_tiles, open_banks
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.models.source import from_checkpoint
    from mlsctl.viz import neighbour_grid

    if run.latest() is None:
        return _note("no checkpoint yet, so no bank to show")
    _, checkpoint, banks = open_banks(run.root)
    if not banks:
        return _note(f"the method {recipe.method.name} keeps no memory bank")
    healths = {name: bank_health(bank, name, checkpoint.step, sample=1024) for name, bank in banks.items()}
    keys = ("written", "size", "dim", "mean_cosine", "effective_rank", "uniformity", "duplicate_rate")
    rows = [[name, *(f"{getattr(h, k):.3f}" if isinstance(getattr(h, k), float) else getattr(h, k) for k in keys),
             h.status_line()] for name, h in healths.items()]
    parts = [_table(["bank", *keys, "status"], rows)]
    sources = SourceImages(run)
    query_path = sources.path(0)
    try:
        query = load_rgb(query_path)
    except (BadImage, OSError, TypeError):
        query = None
    model = None
    for name, bank in banks.items():
        if bank.query_feature is None or query is None or bank.written == 0:
            continue
        model = model or from_checkpoint(recipe, checkpoint, run)
        vector = embed_query(model, bank, [query], recipe.data.global_crops.size)[0]
        found = nearest_entries(bank, vector, 8, sources)
        with tempfile.TemporaryDirectory() as tmp:
            out = neighbour_grid(query, neighbour_tiles(found, sources, 96), Path(tmp) / "n.png",
                                 title=f"bank '{name}' · step {checkpoint.step} · 8 nearest of {bank.written}", cell=96)
            parts.append(f"<h3>bank '{html.escape(name)}': nearest entries of {html.escape(query_path.name)}</h3>"
                         f'<img alt="neighbours in {html.escape(name)}" src="{_png_uri(out)}">')
    return "".join(parts)


def _belongs(result: dict, run: Run) -> bool:
    model = result.get("model") if isinstance(result.get("model"), dict) else {}
    root = str(run.root.resolve())
    path = str(model.get("path") or "")
    return bool(path) and (path == root or path.startswith(root + "/"))


def _evaluation(result: dict, source: Path) -> str:
    command = result.get("command", "?")
    title = f"<h3>{html.escape(command)} <span class=\"note\">({html.escape(str(source))})</span></h3>"
    if command == "eval knn-seg":
        rows = [[r["fraction"], r["train_images"], _pct(r["miou"]), _pct(r.get("miou_hungarian"))]
                for r in result.get("results", [])]
        return title + _table(["fraction", "train images", "mIoU %", "Hungarian mIoU %"], rows)
    if command == "eval linear-seg":
        return title + _table(["mIoU %", "foreground IoU %", "pixel accuracy %"],
                              [[_pct(result.get("miou")), _pct(result.get("foreground_iou")),
                                _pct(result.get("pixel_accuracy"))]])
    if command == "eval knn":
        return title + _table(["k", "top-1 %", "top-5 %"],
                              [[r["k"], _pct(r["top1"]), _pct(r["top5"])] for r in result.get("results", [])])
    if command == "eval linear":
        scores = result.get("results", {})
        if result.get("multi_label"):
            return title + _table(["mAP %", "lr", "weight decay"], [[_pct(scores.get("mAP")), result["chosen"]["lr"],
                                                                     result["chosen"]["weight_decay"]]])
        return title + _table(["top-1 %", "top-5 %", "lr", "weight decay"],
                              [[_pct(scores.get("top1")), _pct(scores.get("top5")), result["chosen"]["lr"],
                                result["chosen"]["weight_decay"]]])
    if command == "eval retrieval":
        rows = [[r.get("method"), r.get("backbone"), r.get("noise"), _pct(r.get("AR@10"))] for r in result.get("results", [])]
        return title + _table(["score", "backbone", "noise", "AR@10 %"], rows)
    return title + f"<pre>{html.escape(json.dumps(result, indent=1)[:4000])}</pre>"


def _evaluations(run: Run, folders: Sequence[Path]) -> tuple[str, int, list[str]]:
    """The evaluations section, how many evaluations it shows, and one note per file skipped: a
    JSON file that cannot be read, or an eval result that is not of the form its command writes (a
    stranger's file in ./results must not cost the whole report)."""
    found, skipped = [], []
    for folder in [run.root / "results", *folders]:
        for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                reason = ("nested too deep" if isinstance(exc, RecursionError) else
                          getattr(exc, "strerror", None) or str(exc).splitlines()[0][:80])
                skipped.append(f"skipped {path}: not readable JSON ({reason})")
                continue
            if not (isinstance(result, dict) and str(result.get("command", "")).startswith("eval ")):
                continue  # not an mlsctl eval result
            if not (path.parent == run.root / "results" or _belongs(result, run)):
                continue
            try:
                found.append((path, _evaluation(result, path)))
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                what = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {str(exc)[:60]}"
                skipped.append(f"skipped {path}: not the result that {str(result['command'])[:40]} writes ({what})")
    notes = "".join(_note(line) for line in skipped)
    if not found:
        return notes + _note("no evaluation of this run found (results of mlsctl eval under RUN/results/ or "
                             "--results)"), 0, skipped
    return "".join(html for _, html in found) + notes, len(found), skipped


def write_report(run_dir: str | Path, out: str | Path, *, results: Sequence[str | Path] = ("results",),
                 patch_images: int = 8) -> dict:
    from mlsctl import config as config_lib
    from mlsctl.curves import plot_runs

    run = Run(run_dir)
    if not run.config_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); give a folder written by mlsctl pretrain")
    recipe = config_lib.load_recipe(str(run.config_path))
    body = {}
    body["summary"] = _summary(run)
    body["recipe"] = f"<pre>{html.escape(run.config_path.read_text())}</pre>"
    if run.metrics_path.is_file() and run.metrics_path.stat().st_size:
        with tempfile.TemporaryDirectory() as tmp:
            plot_runs([run.root], Path(tmp) / "curves.png", title=f"training curves of {run.root.name}")
            body["curves"] = f'<img alt="training curves" src="{_png_uri(Path(tmp) / "curves.png")}">'
    else:
        body["curves"] = _note("no metrics.jsonl yet")
    body["patch-maps"] = _patch_maps(run, recipe, patch_images)
    body["banks"] = _banks(run, recipe)
    body["evaluations"], n_evals, skipped = _evaluations(run, [Path(r) for r in results])
    titles = {"summary": "Summary", "recipe": "Recipe", "curves": "Training curves", "patch-maps": "PCA patch maps",
              "banks": "Memory banks", "evaluations": "Evaluations"}
    sections = "".join(f'<section id="{key}"><h2>{titles[key]}</h2>{body[key]}</section>' for key in SECTIONS)
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mlsctl report: "
            f"{html.escape(run.root.name)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>"
            f"<h1>mlsctl report: {html.escape(run.root.name)}</h1>{sections}</body></html>")
    atomic.write_text(out, page)
    return {"out": str(out), "sections": list(SECTIONS), "images": page.count("<img "), "evaluations": n_evals,
            "bytes": len(page.encode()), "skipped": skipped}
