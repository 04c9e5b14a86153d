"""``mlsctl report RUN``: one self-contained static HTML page of a run — the page a researcher
sends a colleague. No server, no network: styles inline, pictures embedded as data URIs.

Sections (each present even when empty, saying why):

* **summary** — method, architecture, training data, steps, dates, the mlsctl version and commit
  and the device that trained it (``summary.json``, the latest checkpoint's ``state.json``; for runs
  from before they were recorded, ``train.log``), final loss, speed, time, and who wrote the report;
* **recipe** — ``config.yaml``;
* **curves** — :func:`mlsctl.curves.plot_runs` of the run;
* **patch maps** — PCA of the teacher's patch tokens on the first training images
  (:func:`mlsctl.viz.pca_rgb`), beside the images as the model saw them;
* **memory banks** — every bank's health (:mod:`mlsctl.bank_health`) and, for banks with a query
  feature, the neighbours of the first training image (:func:`mlsctl.viz.neighbour_grid`);
* **evaluations** — the result JSONs of ``mlsctl eval`` under ``RUN/results/``, in ``RUN`` and in the
  ``--results`` folders, matched to the run by the fingerprint of the weights they evaluated (the sha256 that
  feature manifests and results record, :mod:`mlsctl.models.source`), in three groups: *this
  run's weights* (its final teacher, or the teacher of one of its checkpoints: the fingerprint
  equals theirs); *comparison models* (a random init of the run's architecture, matched by the
  fingerprint of that architecture at the result's seed, the weights the run started from, or any
  other model of a result under ``RUN/results/`` or in ``RUN``), each labelled with what it
  is; *unmatched* (a result that records no fingerprint, from an older mlsctl, or one recorded as
  this run's whose fingerprint is none of its weights: trained again since). Each names its data
  (dataset and root, or image folders, and splits) and when and with which mlsctl it was made.

A small script counts the embedded images that decoded and marks the body with
``data-images-loaded``; the test opens the page in headless Chromium and reads that back.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from mlsctl import atomic
from mlsctl.console import counted, percent
from mlsctl.errors import UserError, first_line
from mlsctl.runs import Run

SECTIONS = ("summary", "recipe", "curves", "patch-maps", "banks", "evaluations")

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1250px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em;max-height:30em}
img{max-width:100%;border:1px solid #eee}.note{color:#777;font-style:italic}.warning{color:#a33;font-weight:bold}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', loaded + '/' + images.length);
});
"""


def png_data_uri(path_or_bytes) -> str:
    """A PNG (a file or its bytes) as a data: URI, so that a page is one self-contained file."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A table of escaped cells (the report's and ``compare``'s pages)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(value) -> str:
    return percent(value, 2, "–")


def html_note(text: str) -> str:
    """A note below a table, escaped."""
    return f'<p class="note">{html.escape(text)}</p>'


def _warning(text: str) -> str:
    """A note that changes what a figure means (the scores of val images the model trained on), set apart."""
    return f'<p class="warning">{html.escape(text)}</p>'


def _number(value, digits: int = 4) -> str:
    """A measured value to ``digits`` significant digits (whole numbers above that, with thousands
    separated), or – when absent."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return "–"
    if isinstance(value, int) or abs(value) >= 10 ** digits:
        return f"{round(value):,}"
    return f"{value:.{digits}g}"


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _when(stamp: str) -> str:
    """An ISO date and time as ``YYYY-MM-DD HH:MM`` (local time, as train.log writes it)."""
    return stamp[:16].replace("T", " ") if isinstance(stamp, str) and len(stamp) >= 16 else "–"


def _commit_text(record: dict) -> str:
    """The commit a record names (12 hex digits, ``-dirty`` kept), or why there is none."""
    if "commit" not in record:
        return "commit not recorded"
    commit = record["commit"]
    if not isinstance(commit, str) or not commit:
        return "no commit (not run from a git checkout)"
    return f"commit {commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}"


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d):\d\d ")
_LOG_DEVICE = re.compile(r"\| (\d+) process(?:es)? on (\S+) \(([^)]+)\)")


def _log_facts(run: Run) -> dict:
    """What train.log says about a run that recorded less (runs of older mlsctl versions): its first
    and last time stamps, and the device, precision and processes of its first start."""
    facts: dict = {}
    if not run.log_path.is_file():
        return facts
    try:
        lines = run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return facts
    times = [m.group(1) for m in map(_LOG_TIME.match, lines) if m]
    if times:
        facts["first"], facts["last"] = times[0], times[-1]
    for line in lines:
        found = _LOG_DEVICE.search(line)
        if found:
            facts.update(processes=int(found.group(1)), device=found.group(2), precision=found.group(3))
            break
    return facts


def _architecture(recipe, model) -> str:
    cfg = recipe.model
    kwargs = ", ".join(f"{k} {v}" for k, v in (cfg.timm_kwargs or {}).items())
    text = f"{cfg.arch}{f' ({kwargs})' if kwargs else ''}, {cfg.img_size} px, patch {cfg.patch_size}"
    if cfg.embedding_dim:
        text += f", embedding layer to {cfg.embedding_dim}"
    if cfg.lora.enabled:
        text += f", LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}"
    if model is not None:
        text += f"; {sum(p.numel() for p in model.backbone.net.parameters()) / 1e6:.2f} M backbone parameters"
    return text


def _method_shape(recipe) -> str:
    """What a run without a backbone trains, from its recipe (refine: T blocks over k neighbours)."""
    method = recipe.method
    if hasattr(method, "blocks") and hasattr(method, "neighbours"):
        return f"T = {method.blocks} cross-attention blocks over k = {method.neighbours} neighbours"
    return f"{method.name}"


def _summary(run: Run, recipe, weights: "RunWeights") -> str:
    from mlsctl import __version__, provenance

    rows = []
    summary = run.summary()
    latest = run.latest()
    state = latest.state() if latest is not None else {}
    log = _log_facts(run)
    rows.append(("run", f"{run.root.name} ({run.root.resolve()})"))
    rows.append(("method", state.get("method", recipe.method.name)))
    rows.append(("description", _description(run, recipe)))
    # a run without a backbone (refine: blocks over features) showed the schema's ViT and counted its embeddings as
    # images (a probe, 2026-12-07)
    rows.append(("architecture", _architecture(recipe, weights.final) if weights.has_backbone else
                 f"no backbone: the method trains on features (data.root) ({_method_shape(recipe)})"))
    images = run.image_list()
    unit = "images" if weights.has_backbone else "embeddings"
    rows.append(("training data", f"{recipe.data.root}" + (f" ({_trained_images(recipe, images, unit)})"
                                                           if images is not None else "")))
    rows.append(("steps", f"{summary.get('steps', state.get('step', '–'))}" +
                 ("" if summary else f" (running or stopped; latest checkpoint {state.get('step', '–')})")))
    if summary.get("finished"):
        date = f"{log.get('first', '–')} to {_when(summary['finished'])}"
    elif summary and log:
        date = f"{log['first']} to {log['last']} (train.log)"
    elif log:
        date = f"started {log['first']}, last logged {log['last']} (not finished)"
    else:
        date = "not recorded (no train.log)"
    rows.append(("date", date))
    made = summary if "mlsctl_version" in summary else state
    rows.append(("trained with", f"mlsctl {made.get('mlsctl_version', '(version not recorded)')}, {_commit_text(made)}"
                 + (f", torch {made['torch_version']}" if made.get("torch_version") else "")))
    device = summary.get("device") or state.get("device") or log.get("device")
    precision = summary.get("precision") or log.get("precision")
    processes = summary.get("processes") or state.get("world_size") or log.get("processes")
    rows.append(("device", (device or "not recorded") + (f", {precision}" if precision else "")
                 + (f", {processes} process{'es' if processes != 1 else ''}" if processes else "")))
    if "final_loss" in summary:
        rows.append(("final loss", _number(summary["final_loss"])))
    if "sets_per_s" in summary:  # MILE: a batch element is a set of photos (images_per_s counts sets)
        rows.append(("sets / s", _number(summary["sets_per_s"], 3)))
        rows.append(("photos / s", _number(summary["photos_per_s"], 3)))
    elif "images_per_s" in summary:
        rows.append((f"{unit} / s", _number(summary["images_per_s"], 3)))
    sessions = summary.get("sessions") if isinstance(summary.get("sessions"), list) else []
    if len(sessions) > 1:  # a resumed run: every session, not the last one's time and commit alone
        total = summary.get("seconds_all_sessions")
        rows.append(("training time", f"{_duration(total) if total is not None else 'not known'} in "
                                      f"{len(sessions)} sessions"))
        rows.append(("sessions", "; ".join(_session_text(s) for s in sessions if isinstance(s, dict))))
    elif "seconds" in summary:
        rows.append(("training time", _duration(summary["seconds"])))
    if summary.get("resumed_from") and len(sessions) <= 1:
        rows.append(("resumed from step", summary["resumed_from"]))
    if summary.get("skipped_files"):
        rows.append(("unreadable training files skipped", summary["skipped_files"]))
    rows.append(("this report", f"written {_when(provenance.now())} by mlsctl {__version__}, "
                                f"{_commit_text({'commit': provenance.commit()})}"))
    return html_table(["", ""], rows)


def _description(run: Run, recipe) -> str:
    """The recipe's description, marked as the recipe's where keys were set on the command line when the
    run started (start.json): a ViT-S "ImageNet-pretrained" recipe run with model.pretrained=false and a tiny
    model kept its description, and the report showed it as the truth (a new user's probe, 2026-12-07)."""
    from mlsctl import config as config_lib

    text = recipe.description or "(none)"
    overridden = run.overridden()
    if overridden is None:
        return f"{text} (the recipe's description; the keys overridden when the run started are not recorded)"
    if not overridden or "description" in overridden:  # none, or the user's own description
        return text
    flat = config_lib.to_dict(recipe)

    def value(key: str) -> str:
        found = flat
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        return found if isinstance(found, str) else json.dumps(found)

    return f"{text} (the recipe's description; overridden: {', '.join(f'{k}={value(k)}' for k in overridden)})"


def _trained_images(recipe, images: list[str], unit: str) -> str:
    """How many of the run's images (images.txt: all under data.root) it trained on: MILE's
    method.objects_file may list a part of them, and the report counted them all (a new user's probe,
    2026-12-07: "240 images" for a run on 160)."""
    from mlsctl import methods

    try:
        part = methods.method_class(recipe.method.name).trained_images(recipe, images)
    except UserError as exc:  # the file that chose them is gone or damaged since: the count cannot be made
        return (f"{len(images):,} {unit} under data.root, of which it trained on a part it cannot count now: "
                f"{exc.message}")
    if part is None:
        return f"{len(images):,} {unit}"
    return f"{part[0]:,} of its {len(images):,} {unit}: {part[1]}"


def _session_text(session: dict) -> str:
    """One training session in words: its steps, seconds, commit and device."""
    first, device = session.get("from_step"), session.get("device") or "device not recorded"
    if first is None:  # before sessions were kept: what wrote the checkpoint it resumed from, not all before it
        return (f"steps up to {session.get('to_step', '?')} (time not recorded; its checkpoint written with "
                f"{_commit_text(session)}, {device})")
    seconds = _duration(session["seconds"]) if session.get("seconds") is not None else "time not recorded"
    return f"steps {first}–{session.get('to_step', '?')} ({seconds}, {_commit_text(session)}, {device})"


def _patch_maps(run: Run, recipe, n: int, model) -> str:
    from PIL import Image

    from mlsctl.bank_inspect import SourceImages
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.features import Preprocessing
    from mlsctl.viz import pca_figure, pca_rgb

    sources = SourceImages(run)
    paths = [sources.path(i) for i in range(min(n, len(sources.relpaths)))]
    images, read, skipped = [], [], []  # each tile is captioned with the file it shows
    for path in paths:
        try:
            images.append(load_rgb(path))
            read.append(path)
        except (BadImage, OSError, TypeError) as exc:
            skipped.append(f"{sources.shown(path)} ({exc if isinstance(exc, BadImage) else first_line(exc, 80)})")
    if not images:
        return html_note(f"no training image of {run.root} could be read (data.root {sources.root}), so no patch map")
    if model is None:
        return html_note(f"{run.root} has neither teacher.safetensors nor a checkpoint yet, so no patch map")
    size = model.info["img_size"] - model.info["img_size"] % model.backbone.patch_size
    preprocessing = Preprocessing(size, "square")
    with torch.no_grad():
        dense = model.backbone(torch.stack([preprocessing(img) for img in images])).patches.float()
    seen = [Image.fromarray(preprocessing.pixels(img).permute(1, 2, 0).numpy()) for img in images]
    with tempfile.TemporaryDirectory() as tmp:
        # under data.root, as the bank's neighbours are named: 00.png repeats in every object folder (a new user)
        out = pca_figure(seen, pca_rgb(dense), [sources.shown(p) for p in read], Path(tmp) / "pca.png")
        uri = png_data_uri(out)
    unread = f" Left out, unreadable: {html.escape(', '.join(skipped))}." if skipped else ""
    return (f"<p>{html.escape(model.description)}: {len(images)} of the first {len(paths)} training images at {size} px, "
            f"each patch coloured by the first three principal components of the teacher's patch tokens.{unread}</p>"
            f'<img alt="PCA patch maps" src="{uri}">')


def _banks(run: Run, recipe) -> str:
    from mlsctl.bank_health import bank_health
    from mlsctl.bank_inspect import SourceImages, embed_query, nearest_entries, neighbour_tiles, open_banks
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.restore import from_checkpoint
    from mlsctl.viz import neighbour_grid

    if run.latest() is None:
        return html_note("no checkpoint yet, so no bank to show")
    try:
        _, checkpoint, banks = open_banks(run.root, has_step_option=False)
    except UserError as exc:  # an incomplete latest checkpoint: a note in this section, not a failed page (a review)
        return html_note(str(exc))
    if not banks:
        return html_note(f"the method {recipe.method.name} keeps no memory bank")
    # bank inspect's sample (its default), so that the two give the same figures (a probe, 2026-12-07: 0.272 here,
    # 0.276 there, from samples of 1,024 and 2,048 entries)
    healths = {name: bank_health(bank, name, checkpoint.step) for name, bank in banks.items()}
    # in bank inspect's words and units (a new user, 2026-12-06: raw keys and a rate of 0.078 here, 7.81% there)
    def number(value: float, digits: int, scale: float = 1.0, unit: str = "") -> str:
        return "–" if value != value else f"{scale * value:.{digits}f}{unit}"  # nan: too few entries

    rows = [[name, h.written, h.size, h.dim, number(h.mean_cosine, 3), number(h.effective_rank, 1),
             number(h.uniformity, 3), number(h.duplicate_rate, 2, 100, "%"), h.status_line()]
            for name, h in healths.items()]
    parts = [html_table(["bank", "entries written", "slots", "width", "mean pairwise cosine", "effective rank",
                     "uniformity", "near-duplicates", "status"], rows),
             html_note("the pairwise indicators over a fixed sample of "
                   + ", ".join(f"{h.sample:,} entries of '{name}'" for name, h in healths.items())
                   + f", as mlsctl bank inspect {run.root} computes them")]
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
            # the query is a training image, so the bank may hold entries of its own earlier views (a new user's
            # run-through, 2026-12-06, took the top hit at cosine 0.98 for a finding): how many, and how many of
            # them are among the 8, counted, not assumed (a probe, 2026-12-07: "come first" held for none)
            shown = html.escape(sources.shown(query_path))
            own = int((bank.payload["image_id"][bank.written_mask()] == 0).sum()) if "image_id" in bank.payload else 0
            among = sum(n.image_id == 0 for n in found)
            parts.append(f"<h3>bank '{html.escape(name)}': nearest entries of {shown}</h3>"
                         f"<p class=\"note\">{shown} is the first training image: the bank holds "
                         f"{counted(own, 'entry', 'entries')} written from its own earlier views, {among} of them "
                         f"among these {len(found)}.</p>"
                         f'<img alt="neighbours in {html.escape(name)}" src="{png_data_uri(out)}">')
    return "".join(parts)


class RunWeights:
    """The weights of a run, known by their fingerprints: the final teacher (``teacher.safetensors``,
    else the latest checkpoint's teacher), built once; the teacher of another checkpoint, built when
    a result names that checkpoint."""

    def __init__(self, run: Run, recipe):
        from mlsctl.restore import from_run

        from mlsctl import methods

        self.run, self.recipe = run, recipe
        self.root = run.root.resolve()
        latest = run.latest()
        has_teacher = run.teacher_weights_path.is_file()
        #: False for a method on features (refine): no backbone, so no teacher, patch map or fingerprint
        self.has_backbone = methods.method_class(recipe.method.name).has_backbone
        self.final = from_run(run.root) if self.has_backbone and (has_teacher or latest is not None) else None
        self.final_step = run.final_teacher_step()
        self.final_label = ("final teacher" if has_teacher else "teacher of the latest checkpoint") + \
            (f" (step {self.final_step})" if self.final_step is not None else "")
        self._checkpoints: dict[int, Optional[str]] = {}
        start = [recipe.model.weights, run.init_from()]
        self.start_paths = {str(Path(p).resolve()) for p in start if p}

    def refiner_fingerprint(self, step) -> Optional[str]:
        """The fingerprint of a refine run's refiner at checkpoint ``step`` (else its latest), as ``refine
        apply`` records it; None where it cannot be read (another method, no such checkpoint kept, a
        damaged file: the report goes on)."""
        key = step if isinstance(step, int) and not isinstance(step, bool) else None
        cache = self.__dict__.setdefault("_refiner_fingerprints", {})
        if key not in cache:
            from mlsctl.refine.apply import load_refiner

            try:
                found = load_refiner(self.run.root, step=key)
                cache[key] = found.fingerprint if key is None or found.step == key else None
            except (UserError, OSError, RuntimeError, ValueError):  # a report lists what it can: then unmatched
                cache[key] = None  # (a checkpoint unreadable, of other shapes, or not a refinement; a bug still shows)
        return cache[key]

    def random_init_fingerprint(self, model: dict) -> Optional[str]:
        """The fingerprint of this run's architecture randomly initialised with the seed of a result's
        ``model``, as ``--run RUN --random-init --seed`` builds it: a random-init result of this run is
        matched by it, not by the path it recorded (a new user, 2026-12-06: a copied run's report dropped
        its random-init comparison). Built only where the result's architecture is this run's (its
        name, width and patch), each seed once, without touching the report's random state."""
        seed = model.get("seed")
        if not self.has_backbone or not isinstance(seed, int) or isinstance(seed, bool):
            return None
        ours = self.final.info if self.final is not None else {}
        if any(key in model and key in ours and model[key] != ours[key] for key in ("arch", "embed_dim", "patch_size")):
            return None
        cache = self.__dict__.setdefault("_random_fingerprints", {})
        if seed not in cache:
            from mlsctl.restore import choose_model

            try:
                with torch.random.fork_rng(devices=[]):  # the CPU's state alone: no GPU woken by a report
                    cache[seed] = choose_model(run=self.run.root, random_init=True, seed=seed).fingerprint
            except (UserError, OSError, RuntimeError, ValueError):  # the report goes on without the match
                cache[seed] = None
        return cache[seed]

    def start_fingerprint(self) -> Optional[str]:
        """The fingerprint of the backbone this run started from, where it started from weights (``model.weights``,
        ``--init-from``), rebuilt exactly (:func:`~mlsctl.restore.from_run_start`); None where it started from none,
        or they cannot be rebuilt (a file gone since)."""
        if not self.start_paths or not self.has_backbone:
            return None
        if "_start_fingerprint" not in self.__dict__:
            from mlsctl.restore import from_run_start

            try:
                with torch.random.fork_rng(devices=[]):  # from_run_start seeds the CPU's generator
                    self._start_fingerprint = from_run_start(self.run.root).fingerprint
            except (UserError, OSError, RuntimeError, ValueError):  # the report goes on, matching by path alone
                self._start_fingerprint = None
        return self._start_fingerprint

    def started_from(self, model: dict) -> bool:
        """Whether a result's model is the weights this run started from: by path, or by fingerprint however the
        result reached them (an export folder, its model.safetensors, the run that made them). A new user's probe
        (2026-12-07): matched by resolved path only, a run started from `model.weights=exports/mls` (the folder)
        dropped the results of exports/mls/model.safetensors and of runs/mls, those very weights."""
        path, fingerprint = model.get("path"), model.get("fingerprint")
        if isinstance(path, str) and path and str(Path(path).resolve()) in self.start_paths:
            return True
        return isinstance(fingerprint, str) and bool(fingerprint) and fingerprint == self.start_fingerprint()

    def inside(self, path) -> bool:
        """Whether ``path`` (a result's model path) is the run folder or a file in it."""
        if not isinstance(path, str) or not path:
            return False
        resolved = str(Path(path).resolve())
        return resolved == str(self.root) or resolved.startswith(str(self.root) + "/")

    def checkpoint_fingerprint(self, step: int) -> Optional[str]:
        from mlsctl.restore import from_checkpoint

        if step not in self._checkpoints:
            found = [c for c in self.run.checkpoints() if c.step == step]
            try:
                self._checkpoints[step] = (from_checkpoint(self.recipe, found[0], self.run).fingerprint if found
                                           else None)
            except (UserError, OSError, RuntimeError, ValueError):  # a damaged checkpoint: its results unmatched, the
                self._checkpoints[step] = None  # report and compare go on (a review, 2026-12-07: one aborted both)
        return self._checkpoints[step]

    def named_step(self, model: dict) -> Optional[int]:
        """The checkpoint step of this run a result's model names (its ``step``, or a ``step-N``
        folder), or None; a model of another run names none."""
        path = model.get("path")
        if not self.inside(path):
            return None
        if isinstance(model.get("step"), int) and not isinstance(model.get("step"), bool):
            return model["step"]
        found = re.search(r"/checkpoints/step-(\d+)(/|$)", str(Path(path).resolve()))
        return int(found.group(1)) if found else None

    def match(self, model: dict) -> Optional[str]:
        """What of this run's weights a result's model is (by fingerprint), or None."""
        fingerprint = model.get("fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint:
            return None
        if self.final is not None and fingerprint == self.final.fingerprint:
            return self.final_label
        step = self.named_step(model)
        if step is not None and self.checkpoint_fingerprint(step) == fingerprint:
            return f"teacher of the checkpoint at step {step}"
        return None


def _compared_model(model: dict, weights: RunWeights) -> str:
    """A comparison model in words, from what the result records."""
    source, path, arch = model.get("source"), model.get("path"), model.get("arch", "?")
    if isinstance(model.get("embed_dim"), int) and isinstance(model.get("patch_size"), int):
        arch += f" (width {model['embed_dim']}, patch {model['patch_size']})"  # timm's template alone misled (a probe)
    if source == "random-init":  # the architecture of the start weights, by path (its fingerprint is another)
        started = isinstance(path, str) and str(Path(path).resolve()) in weights.start_paths
        seed = f"seed {model['seed']}" if "seed" in model else "seed not recorded"
        of = ("this run's architecture" if weights.inside(path) else
              f"the architecture of {path}" + (", the weights this run started from" if started else ""))
        return f"random init ({seed}) of {of}: untrained {arch}"
    started = " (the weights this run started from)" if weights.started_from(model) else ""
    if source == "weights":
        return f"weights {path}{started}"
    if source in ("run", "run-checkpoint"):
        return f"teacher of another run: {path}{started}"
    if source == "run-start":
        return "the backbone this run started from" if weights.inside(path) else f"the start of run {path}"
    if source == "dinov2":
        return f"timm's DINOv2 ViT-S/14 ({path})"
    return f"{source or 'unknown source'}: {path or arch}"


def classify(result: dict, path: Path, run: Run, weights: RunWeights) -> Optional[tuple[str, str]]:
    """(group, label) of a result for this run's report, or None when it is another model's result
    that has no place in it: ``own`` (the run's weights, by fingerprint), ``comparison`` (labelled
    with what it is) or ``unmatched`` (with the reason)."""
    model = result.get("model") if isinstance(result.get("model"), dict) else {}
    in_run = path.parent.resolve() in ((run.root / "results").resolve(), run.root.resolve())
    if isinstance(model.get("refiner"), dict):
        return _classify_refined(model, in_run, weights)
    claims = weights.inside(model.get("path"))
    fingerprint = model.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        if in_run or claims:
            return "unmatched", ("records no fingerprint of the weights it evaluated (written by an older mlsctl), so "
                                 "it cannot be told from another model's result")
        return None
    own = weights.match(model)
    if own is not None:
        return "own", own
    if model.get("source") == "random-init" and fingerprint == weights.random_init_fingerprint(model):
        return "comparison", _compared_model(dict(model, path=str(weights.root)), weights)
    if claims and model.get("source") in ("run", "run-checkpoint", "weights"):
        step = weights.named_step(model)
        what = f"the checkpoint at step {step}" if step is not None else "its teacher"
        return "unmatched", (f"recorded as {model.get('path')}, but its fingerprint {fingerprint[:12]} is not that of "
                             f"{what} now: the run was trained again, or the checkpoint removed, since it was evaluated")
    if in_run or claims or weights.started_from(model):
        return "comparison", _compared_model(model, weights)
    return None


def _classify_refined(model: dict, in_run: bool, weights: RunWeights) -> Optional[tuple[str, str]]:
    """A result on features ``refine apply`` wrote (``model.refiner``): the refine run's own result, or a
    comparison in the report of the run whose features were refined (a new user's run-through,
    2026-12-06: it was "unmatched: ... the run was trained again", and the refine run's report showed
    none)."""
    refiner = model["refiner"]
    step = f" at step {refiner['step']}" if isinstance(refiner.get("step"), int) else ""
    source = model.get("path") or model.get("arch") or "?"
    if weights.inside(refiner.get("run")):
        recorded, now = refiner.get("fingerprint"), weights.refiner_fingerprint(refiner.get("step"))
        if not isinstance(recorded, str) or not recorded:
            return "unmatched", "records no fingerprint of the refiner (written by an older mlsctl)"
        if now is None:
            return "unmatched", (f"refined by this run's refiner{step}, a checkpoint this run no longer keeps (or "
                                 f"cannot read), so it cannot be told from another training of it")
        if recorded != now:
            return "unmatched", (f"refined by this run's refiner{step}, whose fingerprint is not that of its checkpoint "
                                 f"there now: the run was trained again since")
        return "own", f"this run's refiner{step}, on the features of {source}"
    base = weights.match(dict(model, fingerprint=model.get("base_fingerprint")))
    if base is not None:
        return "comparison", f"this run's features ({base}) refined by {refiner.get('run')}{step}"
    if weights.inside(model.get("path")) and model.get("source") in ("run", "run-checkpoint", "weights"):
        return "unmatched", (f"features of {source} refined by {refiner.get('run')}{step}, but they were not embedded "
                             f"with this run's weights now: the run was trained again since")
    if in_run:
        return "comparison", f"the features of {source} refined by {refiner.get('run')}{step}"
    return None


def _features_root(features) -> Optional[str]:
    """The image folder a feature folder was embedded from (its manifest's input_root), or None."""
    try:
        root = json.loads((Path(features) / "manifest.json").read_text(encoding="utf-8")).get("input_root")
    except (OSError, TypeError, ValueError, AttributeError, RecursionError):
        return None
    return root if isinstance(root, str) else None


def data_text(result: dict) -> str:
    """The data an evaluation ran on, in words: benchmark, root and splits, or the image folders."""
    command = result.get("command")
    if command == "eval retrieval":
        return f"gallery {result.get('gallery')}, query sets from {result.get('query')}"
    if command == "eval recall":
        features = result.get("features")
        root = result.get("input_root") if isinstance(result.get("input_root"), str) else (  # since 2026-12-07
            _features_root(features) if isinstance(features, str) else None)
        return f"{root or features} (labels: {result.get('labels', '–')})"
    dataset = result.get("dataset") if isinstance(result.get("dataset"), dict) else {}
    name = dataset.get("name")
    if name and name != "folders":
        return (f"{name} at {dataset.get('root', '–')}, train split {dataset.get('train_split', '–')}, "
                f"val split {dataset.get('val_split', '–')}")
    side = {}
    for split in ("train", "val"):
        entry = result.get(split)
        features = entry.get("features") if isinstance(entry, dict) else entry
        side[split] = dataset.get(f"{split}_root") or (_features_root(features) if isinstance(features, str) else None) \
            or (f"features {features}" if features else "–")
    text = f"train {side['train']}, val {side['val']}"
    if dataset.get("masks"):
        val_masks = dataset.get("val_masks")
        text += (f" (masks {dataset['masks']}, val {val_masks})" if val_masks and val_masks != dataset["masks"]
                 else f" (masks {dataset['masks']})")
    elif dataset.get("labels"):
        val_labels = dataset.get("val_labels")  # recorded since 2026-12-07
        text += (f" (labels: {dataset['labels']}, val: {val_labels})" if val_labels and val_labels != dataset["labels"]
                 else f" (labels: {dataset['labels']})")
    return text


def _made(result: dict, source: Path) -> str:
    written = result.get("written") if isinstance(result.get("written"), dict) else {}
    if written:
        return (f"evaluated {_when(written.get('date'))} with mlsctl {written.get('mlsctl_version', '–')}, "
                f"{_commit_text(written)}")
    return "date and mlsctl version not recorded"


def _memorised(result: dict) -> bool:
    """The result scored val images that are training images too (``dataset.val_images_in_train``)."""
    dataset = result.get("dataset")
    return isinstance(dataset, dict) and bool(dataset.get("val_images_in_train"))


def _shared_warning(result: dict) -> str:
    """The console's note on val images that are training images too (``dataset.val_images_in_train``), as a
    warning: the report listed such a result as any other (a new user's probe, 2026-12-07); the note that the
    images were compared by path only (``dataset.val_images_compared``) as a plain note: it finds none shared."""
    from mlsctl.evaluate.inputs import shared_images_note

    dataset = result.get("dataset")
    if not isinstance(dataset, dict):
        return ""
    text = ""
    if _memorised(result):
        val = result.get("val")
        shared = {key: value for key, value in dataset.items() if key != "val_images_compared"}
        note = shared_images_note(shared, val["images"] if isinstance(val, dict) else result["val_images"])
        text += "".join(_warning(line) for line in note.splitlines())
    if dataset.get("val_images_compared"):
        text += html_note(shared_images_note({"val_images_compared": dataset["val_images_compared"]}, 0))
    return text


def _retrieval(result: dict) -> str:
    """eval retrieval's scores with a random ranking's (its gallery's objects decide both) and the noise's
    replaced photos."""
    from mlsctl.evaluate.retrieval import chance_scores, objects_note, replaced_text

    objects = result["objects"]
    chance = result.get("chance") or chance_scores(objects)  # exact from the objects, for results before it was kept
    rows = [[f"{r.get('method')} ({r['search']})" if r.get("search") else r.get("method"), r.get("backbone"),
             replaced_text(r, result.get("query_set_sizes")), _pct(r.get("AR@10")),
             _pct(r.get("R@1"))]
            for r in result.get("results", [])]
    rows.append(["chance", "(a random ranking)", "", _pct(chance["AR@10"]), _pct(chance["R@1"])])
    note = objects_note(objects)
    return (f"<p>{objects} gallery objects</p>" + html_table(["score", "backbone", "noise", "AR@10 %", "R@1 %"], rows)
            + (html_note(note) if note else ""))


def _recall(result: dict) -> str:
    """eval recall's scores, with a random ranking's where the result records it (since 2026-12-07)."""
    from mlsctl.evaluate.recall import certain_note

    recalls = result["recall"]
    rows = [["scores", *(_pct(v) for v in recalls.values()), _pct(result.get("map_at_r"))]]
    chance = result.get("chance")
    if isinstance(chance, dict):
        rows.append(["chance (a random ranking)", *(_pct(chance.get(k)) for k in recalls),
                     _pct(result.get("chance_map_at_r"))])  # "–" in results written before it was kept
    certain = certain_note(result.get("ks_certain") or [])
    note = html_note(certain) if certain else ""
    return (f"<p>{result.get('embeddings', '?')} embeddings of {result.get('classes', '?')} classes</p>"
            + html_table(["", *(f"R@{k} %" for k in recalls), "MAP@R %"], rows) + note)


def _evaluation(result: dict, source: Path, label: str) -> str:
    from mlsctl.evaluate.baselines import interval_text
    from mlsctl.evaluate.knn import score_table
    from mlsctl.evaluate.linear import chance_line

    command = result.get("command", "?")
    title = (f"<h4>{html.escape(command)} · {html.escape(label)}</h4>"
             f"<p>data: {html.escape(data_text(result))}<br><span class=\"note\">{html.escape(_made(result, source))}; "
             f"{html.escape(str(source))}</span></p>") + _shared_warning(result)
    if command == "eval knn-seg":
        # foreground IoU where the classes have a background (results since 2026-12-05): at small budgets it
        # moves before the per-class mIoU does (a new user, 2026-12-06: the page left it out)
        foreground = any("foreground_iou" in r for r in result.get("results", []))
        # the console's order (a probe, 2026-12-07: the page put Hungarian mIoU before the foreground IoU)
        rows = [[r["fraction"], r["train_images"], len(r.get("runs", [])) or 1,
                 _pct(r["miou"]) + (f" ± {_pct(r['miou_std'])}" if len(r.get("runs", [])) > 1 else ""),
                 *([_pct(r.get("foreground_iou"))] if foreground else []), _pct(r.get("miou_hungarian"))]
                for r in result.get("results", [])]
        chance = result.get("chance")  # recorded since 2026-12-07
        if isinstance(chance, dict):
            rows.append([f"chance: every pixel {chance.get('majority_class')}", "", "", _pct(chance.get("miou")),
                         *([_pct(chance.get("foreground_iou"))] if foreground else []), ""])
        return title + html_table(["fraction", "train images", "runs", "mIoU %",
                               *(["foreground IoU %"] if foreground else []), "(Hungarian mIoU %)"], rows)
    if command == "eval linear-seg":
        from mlsctl.evaluate.linear_seg import one_class_note

        note = one_class_note(result)
        rows = [["scores", _pct(result.get("miou")), _pct(result.get("foreground_iou")),
                 _pct(result.get("pixel_accuracy"))]]
        chance = result.get("chance")  # recorded since 2026-12-07
        if isinstance(chance, dict):
            rows.append([f"chance: every pixel {chance.get('majority_class')}", _pct(chance.get("miou")),
                         _pct(chance.get("foreground_iou")), _pct(chance.get("pixel_accuracy"))])
        return title + html_table(["", "mIoU %", "foreground IoU %", "pixel accuracy %"], rows) + (
            _warning(note) if note else "")
    if command == "eval knn":
        return title + html_table(*score_table(result, _pct))
    if command == "eval linear":
        scores = result.get("results", {})
        chosen = f"{result['chosen']['lr']:g}", f"{result['chosen']['weight_decay']:g}"
        chance = chance_line(result)  # recorded since 2026-12-07
        chance = html_note(chance) if chance else ""
        if result.get("multi_label"):
            return title + html_table(["mAP %", "lr", "weight decay"], [[_pct(scores.get("mAP")), *chosen]]) + chance
        return title + html_table(["top-1 %", "top-1 95 % interval", "top-5 %", "lr", "weight decay"],
                              [[_pct(scores.get("top1")), interval_text(scores.get("top1_interval95")),
                                _pct(scores.get("top5")), *chosen]]) + chance
    if command == "eval retrieval":
        return title + _retrieval(result)
    if command == "eval recall":
        return title + _recall(result)
    return title + f"<pre>{html.escape(json.dumps(result, indent=1)[:4000])}</pre>"


GROUPS = (("own", "This run's weights"),
          ("comparison", "Comparison models (not this run's weights)"),
          ("unmatched", "Unmatched (not known to be this run's weights)"))


RESULT_READ_LIMIT = 64 * 2**20  # the largest JSON the report reads as a result (results are kilobytes to a few MB)


def read_result_text(path: Path) -> tuple[str, str]:
    """The text of the result file ``path``, or ``("", why)`` where it is not read: not a regular file (a FIFO
    would hang the read, a link to a device would be read until memory runs out: a probe), or larger than any
    eval result. At most :data:`RESULT_READ_LIMIT` + 1 bytes are read, whatever the size the file reports."""
    handle = atomic.open_regular(path)
    if handle is None:
        return "", "not a regular file"
    with handle:
        status = os.fstat(handle.fileno())
        data = handle.read(RESULT_READ_LIMIT + 1)
    if len(data) > RESULT_READ_LIMIT:  # not read whole: no eval result is this large (a review)
        return "", f"{max(status.st_size, len(data)):,} bytes, more than any eval result holds"
    return data.decode("utf-8"), ""


def read_results(folders: Sequence[Path]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Every mlsctl eval result (a JSON object whose ``command`` starts with ``eval``) in ``folders``, each file
    once, in the folders' order and by name, and one note per file skipped: a JSON file that cannot be read,
    or one larger than any result (a stranger's file in ./results must not cost the whole report). Folders
    that do not exist are passed over."""
    results: list[tuple[Path, dict]] = []
    skipped: list[str] = []
    seen: set = set()
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                text, why = read_result_text(path)
                if why:
                    skipped.append(f"skipped {path}: {why}")
                    continue
                result = json.loads(text)
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                reason = ("nested too deep" if isinstance(exc, RecursionError) else
                          getattr(exc, "strerror", None) or first_line(exc, 80))
                skipped.append(f"skipped {path}: not readable JSON ({reason})")
                continue
            if isinstance(result, dict) and str(result.get("command", "")).startswith("eval "):
                results.append((path, result))  # else not an mlsctl eval result
    return results, skipped


def not_its_form(path: Path, result: dict, exc: Exception) -> str:
    """The note on a result that is not of the form its command writes (a key missing, a value of another type)."""
    what = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {str(exc)[:60]}"
    return f"skipped {path}: not the result that {str(result['command'])[:40]} writes ({what})"


def _evaluations(run: Run, folders: Sequence[Path], weights: RunWeights) -> tuple[str, dict, list[str], list[str]]:
    """The evaluations section, the files shown in each group (:data:`GROUPS`), one note per
    file skipped (a JSON file that cannot be read, or an eval result that is not of the form its
    command writes: a stranger's file in ./results must not cost the whole report), and the files
    shown whose val images are training images too (:func:`_memorised`)."""
    found: dict[str, list] = {group: [] for group, _ in GROUPS}
    memorised: list[str] = []
    # RUN itself: results kept beside the run's files
    results, skipped = read_results([run.root / "results", run.root, *folders])
    for path, result in results:
        placed = classify(result, path, run, weights)
        if placed is None:
            continue  # another model's result
        group, label = placed
        try:
            found[group].append((path, _evaluation(result, path, label if group != "unmatched" else
                                                   f"unmatched: {label}")))
            if _memorised(result):
                memorised.append(str(path))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            skipped.append(not_its_form(path, result, exc))
    notes = "".join(html_note(line) for line in skipped)
    shown = {group: [str(path) for path, _ in entries] for group, entries in found.items()}
    if not any(found.values()):
        return notes + html_note("no evaluation of this run found (results of mlsctl eval under RUN/results/, in RUN "
                             "or in --results)"), shown, skipped, memorised
    parts = []
    for group, title in GROUPS:
        if found[group]:
            parts.append(f"<h3>{html.escape(title)}</h3>" + "".join(text for _, text in found[group]))
        elif group == "own":
            parts.append(f"<h3>{html.escape(title)}</h3>" + html_note(
                f"no evaluation of this run's weights found: evaluate them with mlsctl eval ... --run {run.root}"))
    return "".join(parts) + notes, shown, skipped, memorised


REPORT_HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mlsctl report: '


def is_report(path: Path) -> bool:
    """``path`` is a page :func:`write_report` wrote (its first bytes say so)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(REPORT_HEAD.encode())) == REPORT_HEAD.encode()
    except OSError:
        return False


def check_report_target(out: Path, overwrite: bool = False) -> None:
    """``--out`` names an HTML file that is new, or an earlier report (replaced), or anything else
    with ``overwrite``: a report written over a run's weights or a user's notes destroyed them."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out} must end in .html: the report is one HTML page")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .html")
    from mlsctl.outputs import check_place

    check_place(out, "--out", "report")  # a folder it cannot write into, said before the work (a probe, 2026-12-06)
    if out.exists() and not overwrite and not is_report(out):
        raise UserError(f"--out {out} exists and is not an mlsctl report; add --overwrite to replace it, or choose "
                        f"another --out")


def write_report(run_dir: str | Path, out: str | Path, *, results: Sequence[str | Path] = ("results",),
                 patch_images: int = 8, overwrite: bool = False) -> dict:
    """The report of ``run_dir`` written to ``out`` (see :func:`check_report_target`); what it holds."""
    from mlsctl.curves import plot_runs
    from mlsctl.restore import open_run, recipe_of

    check_report_target(Path(out), overwrite)
    run = open_run(run_dir)
    recipe = recipe_of(run)
    body = {}
    weights = RunWeights(run, recipe)
    body["summary"] = _summary(run, recipe, weights)
    body["recipe"] = f"<pre>{html.escape(run.config_path.read_text())}</pre>"
    if run.metrics_path.is_file() and run.metrics_path.stat().st_size:
        with tempfile.TemporaryDirectory() as tmp:
            plot_runs([run.root], Path(tmp) / "curves.png", title=f"training curves of {run.root.name}")
            body["curves"] = f'<img alt="training curves" src="{png_data_uri(Path(tmp) / "curves.png")}">'
    else:
        body["curves"] = html_note("no metrics.jsonl yet")
    body["patch-maps"] = (_patch_maps(run, recipe, patch_images, weights.final) if weights.has_backbone else
                          html_note(f"a {recipe.method.name} run trains on features and has no backbone, so no "
                                    f"patch map"))
    body["banks"] = _banks(run, recipe)
    body["evaluations"], shown, skipped, memorised = _evaluations(run, [Path(r) for r in results], weights)
    titles = {"summary": "Summary", "recipe": "Recipe", "curves": "Training curves", "patch-maps": "PCA patch maps",
              "banks": "Memory banks", "evaluations": "Evaluations"}
    sections = "".join(f'<section id="{key}"><h2>{titles[key]}</h2>{body[key]}</section>' for key in SECTIONS)
    page = (f"{REPORT_HEAD}{html.escape(run.root.name)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>"
            f"<h1>mlsctl report: {html.escape(run.root.name)}</h1>{sections}</body></html>")
    atomic.write_text(out, page)
    return {"out": str(out), "sections": list(SECTIONS), "images": page.count("<img "),
            "evaluations": len(shown["own"]), "comparisons": len(shown["comparison"]),
            "unmatched": len(shown["unmatched"]), "results": shown, "bytes": len(page.encode()), "skipped": skipped,
            "val_images_in_train": memorised}
