"""``mlsctl compare RUN RUN ...``: the evaluations of several runs side by side (docs/report.md#compare).

A study trains several runs (methods, seeds, budgets) and evaluates each with ``mlsctl eval``; the results
lie as JSON files in ``./results`` or ``RUN/results``. :func:`compare` finds them as ``mlsctl report`` does —
by the fingerprint of the weights each evaluation used (:class:`mlsctl.report.RunWeights`), never by a path
— and lines them up: one table for each evaluation of one data set under the same settings
(:func:`mlsctl.evaluate.results.settings_of`), a row for each model, a column for each headline score
(:func:`mlsctl.evaluate.results.headline`), and last the row of what the data scores by chance where the
results record it (:func:`mlsctl.evaluate.results.chance_headline`).

Rows are each run's own weights (its final teacher, a checkpoint's teacher, a refine run's refiner), then the
comparison models the runs' reports show (a random init of a run's architecture, the weights a run started
from), each model once: a random init of two runs of one architecture at one seed is one model. Where one
model has several results in a table, each score comes from the newest result that has it, and the row says how
many there are. Results no run claims are left out; those a run's report shows as unmatched are named on stderr
with the reason, not shown.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class Row:
    """One model's scores in one table: ``kind`` is ``own`` (a run's weights), ``comparison`` or ``chance``."""

    model: str
    kind: str
    values: dict
    run: Optional[str] = None
    file: Optional[str] = None
    written: str = ""
    results: int = 1
    label: str = ""  # what of the run's weights (``final teacher (step 250)``), for merging seeds
    #: where the row is the mean over runs that differ only in their seed: those runs, and the sample standard
    #: deviation of each column over them
    seeds: list = field(default_factory=list)
    spread: dict = field(default_factory=dict)
    #: the file each value came from (a row merged from several results takes each score from the newest that has
    #: it: ``file`` named the newest alone, a probe, 2026-12-08)
    sources: dict = field(default_factory=dict)
    seed_files: list = field(default_factory=list)  # a mean over seeds: the files of its runs' rows

    def files(self) -> list[str]:
        """Every file the row's values came from, the newest (``file``) first."""
        if self.seeds:
            return list(dict.fromkeys(self.seed_files))
        return list(dict.fromkeys([*([self.file] if self.file else []), *self.sources.values()]))

    def to_dict(self) -> dict:
        return {"model": self.model, "kind": self.kind, "run": self.run, "values": self.values, "file": self.file,
                "files": self.files(), "sources": self.sources,
                "written": self.written or None, "results": self.results,
                **({"seeds": self.seeds, "std": self.spread} if self.seeds else {})}


@dataclass
class Table:
    """The results of one evaluation (``command``) of one data set (``data``, in words) under one ``settings``."""

    command: str
    data: str
    settings: dict
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    #: the settings in words where tables of this command and data differ in them (else "")
    differs: str = ""

    def to_dict(self) -> dict:
        return {"command": self.command, "data": self.data, "settings": self.settings, "columns": self.columns,
                "rows": [row.to_dict() for row in self.rows]}


def _for_run(label: str, name: str) -> str:
    """A comparison model's label from a run's report ("random init (seed 0) of this run's architecture"), said of
    the run it belongs to, as a table of several runs needs."""
    # "random init ...: untrained vit_small_patch16_224": in a table of scores, the arch is enough
    return label.replace("this run's", f"{name}'s").replace("this run", name).replace(": untrained ", ": ")


def _identity(result: dict) -> str:
    """What tells one model from another in a result: the backbone's fingerprint, with the refiner's or the set
    model's where there is one (the same backbone refined, or fine-tuned as a set model, is another model)."""
    model = result.get("model") if isinstance(result.get("model"), dict) else {}
    refiner = model.get("refiner") if isinstance(model.get("refiner"), dict) else {}
    return json.dumps([model.get("fingerprint"), model.get("base_fingerprint"), refiner.get("fingerprint"),
                       model.get("set_fingerprint")])


def _written(result: dict) -> str:
    written = result.get("written")
    return str(written.get("date", "")) if isinstance(written, dict) else ""


def _instant(date: str) -> float:
    """A result's ``written.date`` (ISO, local time with its UTC offset) as seconds since the epoch, so that results
    written in other time zones order by when they were written (a review, 2026-12-07: compared as text, an older
    result in UTC+1 was shown as the newest); -inf where it is missing or unreadable."""
    import datetime

    try:
        when = datetime.datetime.fromisoformat(date)
    except (TypeError, ValueError):
        return float("-inf")
    return when.timestamp()  # one without an offset (written by hand) as this machine's local time


def compare(runs: Sequence[str | Path], results: Sequence[str | Path] = ("results",), *,
            over_seeds: bool = False) -> dict:
    """The tables of :mod:`mlsctl.compare` for the run folders ``runs`` and the result folders ``results`` (each
    run's ``results/`` and its own folder are read too): ``{"runs", "tables", "unmatched", "skipped"}``, tables as
    :class:`Table`. ``over_seeds``: the rows of runs whose recipes differ only in their ``seed`` become one row,
    their mean, with the standard deviation over them (:func:`merge_seeds`)."""
    from mlsctl.evaluate.results import chance_headline, headline, settings_of
    from mlsctl.report import RunWeights, classify, data_text, not_its_form, read_results
    from mlsctl.restore import open_run, recipe_of
    from mlsctl.runs import check_distinct

    runs = [Path(r) for r in runs]
    check_distinct(runs)
    weights = []
    for path in runs:
        run = open_run(path)
        weights.append((str(path).rstrip("/") or str(path), RunWeights(run, recipe_of(run))))
    folders = [folder for _, w in weights for folder in (w.run.root / "results", w.run.root)]
    found, skipped = read_results([*folders, *(Path(r) for r in results)])
    tables: dict[str, Table] = {}
    chosen: dict[tuple[str, str], tuple[Row, dict]] = {}
    unmatched: list[str] = []
    for path, result in found:
        placed = _place(result, path, weights, classify)
        if placed is None:
            continue
        name, group, label = placed
        if group == "unmatched":
            unmatched.append(f"{path} ({label})")
            continue
        try:
            values, data, settings = headline(result), data_text(result), settings_of(result)
            chance = chance_headline(result)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            skipped.append(not_its_form(path, result, exc))
            continue
        key = json.dumps([result["command"], data, settings], sort_keys=True, default=str)
        table = tables.setdefault(key, Table(result["command"], data, settings))
        for column in [*values, *(chance[1] if chance else ())]:
            if column not in table.columns:
                table.columns.append(column)
        model = f"{name}: {label}" if group == "own" else _for_run(label, name)
        row = Row(model, group, values, run=name if group == "own" else None, file=str(path),
                  written=_written(result), label=label, sources={column: str(path) for column in values})
        earlier = chosen.get((key, _identity(result)))
        if earlier is not None:  # each score from the newest result that has it (k = 10 in one file, 20 in another)
            later = _instant(earlier[0].written) > _instant(row.written)
            older, newer = (row, earlier[0]) if later else (earlier[0], row)
            row = Row(**{**newer.__dict__, "values": {**older.values, **newer.values},
                         "sources": {**older.sources, **newer.sources}, "results": earlier[0].results + 1})
        chosen[(key, _identity(result))] = (row, chance)
    for (key, _), (row, chance) in chosen.items():
        tables[key].rows.append(row)
        if chance and not any(r.kind == "chance" for r in tables[key].rows):
            tables[key].rows.append(Row(chance[0], "chance", chance[1]))
    if over_seeds:
        arms = seed_arms(weights)
        for table in tables.values():
            table.rows = merge_seeds(table.rows, arms)
    ordered = _ordered(tables.values(), [name for name, _ in weights])
    return {"runs": [name for name, _ in weights], "tables": ordered, "unmatched": unmatched, "skipped": skipped}


def seed_arms(weights) -> dict[str, str]:
    """Run name → the run's recipe without its ``seed`` and ``description`` (canonical JSON): runs of one arm of a
    study, repeated with other seeds, have the same."""
    import yaml

    arms = {}
    for name, run_weights in weights:
        try:
            config = yaml.safe_load(run_weights.run.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            config = None
        if not isinstance(config, dict):
            arms[name] = f"unreadable {name}"  # an arm of its own
            continue
        arms[name] = json.dumps({k: v for k, v in config.items() if k not in ("seed", "description")}, sort_keys=True,
                                default=str)
    return arms


def merge_seeds(rows: list, arms: dict[str, str]) -> list:
    """The rows of runs of one arm (:func:`seed_arms`) and the same weights of theirs (``final teacher``, else
    the same checkpoint step) as one row: each column the mean over the runs, ``spread`` the sample standard deviation
    (n - 1), both None where a run lacks the score; ``seeds`` the runs. A run alone in its arm keeps its row."""
    import statistics

    def what(label: str) -> str:
        # the final teachers of one recipe's seeds are one arm's, whatever step each ended at; a checkpoint's teacher
        # only beside the same step's (a review, 2026-12-07: unfinished runs at steps 100 and 124 were averaged)
        return re.sub(r"^final teacher \(step \d+\)$", "final teacher", label)

    groups: dict[tuple, list] = {}
    for row in rows:
        if row.kind == "own":
            groups.setdefault((arms.get(row.run, row.run), what(row.label)), []).append(row)
    out = []
    for row in rows:
        group = groups.get((arms.get(row.run, row.run), what(row.label))) if row.kind == "own" else None
        if group is None or len(group) < 2:
            out.append(row)
            continue
        if row is not group[0]:
            continue
        columns = [c for c in dict.fromkeys(c for member in group for c in member.values)]
        values, spread = {}, {}
        for column in columns:  # a score only where every seed has it: one seed's value is no mean (a review)
            found = [m.values[column] for m in group if isinstance(m.values.get(column), (int, float))]
            values[column] = statistics.fmean(found) if len(found) == len(group) else None
            spread[column] = statistics.stdev(found) if len(found) == len(group) else None
        names = [m.run for m in group]
        label = what(row.label)
        out.append(Row(f"{', '.join(names)}: {label} (mean of {len(names)} seeds)", "own", values, run=names[0],
                       written=max(m.written for m in group), results=sum(m.results for m in group), label=label,
                       seeds=names, spread=spread,
                       seed_files=[f for m in group for f in m.files()]))
    return out


def _place(result: dict, path: Path, weights, classify) -> Optional[tuple[str, str, str]]:
    """(run name, group, label) of a result among the runs: the run whose own weights it evaluated, else the first
    run whose report shows it (a comparison model, or unmatched); None where none does."""
    first = None
    for name, run_weights in weights:
        placed = classify(result, path, run_weights.run, run_weights)
        if placed is None:
            continue
        if placed[0] == "own":
            return name, *placed
        first = first or (name, *placed)
    return first


def _ordered(tables, run_names: list[str]) -> list[Table]:
    """Tables by command and data; in each, the runs' rows in the order the runs were given (then by label), the
    comparison models after them, the chance row last; the settings said where tables of a command and data
    differ in them."""
    kinds = {"own": 0, "comparison": 1, "chance": 2}
    order = {name: i for i, name in enumerate(run_names)}
    out = sorted(tables, key=lambda t: (t.command, t.data, json.dumps(t.settings, sort_keys=True, default=str)))
    for table in out:
        table.rows.sort(key=lambda r: (kinds[r.kind], order.get(r.run, len(order)),
                                       re.sub(r"\d+", lambda m: m.group().zfill(12), r.model)))  # step 200 < 1000
        siblings = [t for t in out if (t.command, t.data) == (table.command, table.data)]
        if len(siblings) > 1:
            differing = sorted({key for t in siblings for key in {**t.settings, **table.settings}
                                if t.settings.get(key) != table.settings.get(key)})
            table.differs = ", ".join(f"{key} {table.settings.get(key)}" for key in differing)
    return out


def table_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a :class:`Table` as text (scores in %; a merged row's with ± its spread)."""
    from mlsctl.console import percent

    def cell(row: Row, column: str) -> str:
        spread = row.spread.get(column)
        return percent(row.values.get(column), 1, "–") + (f" ± {percent(spread, 1)}" if spread is not None else "")

    headers = ["model", *(f"{column} %" for column in table.columns)]
    rows = [[row.model + (f" (newest of {row.results} results)" if row.results > 1 and not row.seeds else ""),
             *(cell(row, column) for column in table.columns)] for row in table.rows]
    return headers, rows


def title(table: Table) -> str:
    """``eval knn · train data/x/train, val data/x/val (labels: ...)``, with the settings where they tell it apart."""
    return f"{table.command} · {table.data}" + (f" · {table.differs}" if table.differs else "")


def write_page(compared: dict, out: Path, curves: Optional[Path] = None) -> None:
    """The comparison as one self-contained HTML page (the report's style), with the runs' curves overlaid."""
    from mlsctl import atomic
    from mlsctl.report import REPORT_HEAD, STYLE, html_note, html_table, png_data_uri

    names = ", ".join(compared["runs"])
    parts = [f"<h1>mlsctl compare: {html.escape(names)}</h1>"]
    if curves is not None:
        parts.append(f'<h2>Training curves</h2><img alt="training curves" src="{png_data_uri(curves)}">')
    parts.append("<h2>Evaluations</h2>")
    for table in compared["tables"]:
        parts.append(f"<h3>{html.escape(title(table))}</h3>" + html_table(*table_rows(table)))
    if not compared["tables"]:
        parts.append(html_note(NO_RESULTS))
    parts.extend(html_note(line) for line in [*compared["skipped"], *unmatched_notes(compared)])
    atomic.write_text(out, f"{REPORT_HEAD}compare {html.escape(names)}</title><style>{STYLE}</style></head><body>"
                           f"{''.join(parts)}</body></html>")


NO_RESULTS = ("no evaluation of these runs found (results of mlsctl eval under RUN/results/, in RUN or in --results); "
              "evaluate them with mlsctl eval ... --run RUN")


def unmatched_notes(compared: dict) -> list[str]:
    if not compared["unmatched"]:
        return []
    return [f"left out, not known to be a run's weights: {entry}" for entry in compared["unmatched"]]


def to_json(compared: dict) -> dict:
    return {**compared, "tables": [table.to_dict() for table in compared["tables"]]}
