"""Training curves of one or several runs, drawn with matplotlib from ``RUN/metrics.jsonl``.

:func:`read_metrics` returns every numeric series of a run (``name → (steps, values)``);
:func:`plot_runs` draws, with one colour per run (and one line style per term, bank or monitor),
axes, units and legends, a grid of panels:

* the training loss (with ``refine``'s ``ms_before``, the loss of its batches unrefined, dashed), and
  its terms when a run has several (a run whose only term is its total gets no second panel);
* the learning rate and weight decay, the teacher momentum (methods with a teacher);
* DINO's teacher entropy (``teacher_entropy``, mean entropy of the teacher's output distribution,
  with ``log K`` — uniform outputs, the collapse DINO's centring invites — drawn when the run's
  config gives ``method.out_dim``), when a run logs it;
* memory-bank health (the mean pairwise cosine of every bank; methods that keep one);
* quality monitors (``monitor/...``, in percent as ``eval`` prints them), or else the throughput in the
  method's batch elements per second (images/s, refine's embeddings/s), or for MILE sets/s and photos/s
  (``sets_per_s``, ``photos_per_s``).

Noisy per-step series (the loss and its terms, the teacher entropy, the throughput) of more than
:data:`MARKER_POINTS` points are drawn faint, with a bias-corrected exponential moving average
(span: 5 % of the points, :func:`ema`) on top; a series of at most :data:`MARKER_POINTS` points
is drawn raw with a marker on every point.

Comparing runs (a new user's probe, 2026-12-07, a DINO run beside an MLS run): the loss panel of runs of
different methods says that each is its own objective; a series equal to an earlier run's in its panel is
drawn in loose dashes and says "(same as RUN)"; the momentum axis ends at 1 at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mlsctl.outputs import literal_text, pyplot, save_figure
from mlsctl.errors import UserError
from mlsctl.runs import Run, metrics_record


def read_metrics(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    run = Run(run_dir)
    if not Path(run_dir).exists():
        raise UserError(f"run {run_dir} does not exist; give a run folder written by mlsctl pretrain")
    if not run.metrics_path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give a run folder written by mlsctl pretrain")
    series: dict[str, tuple[list[int], list[float]]] = {}
    from mlsctl.data.labels import read_text_file

    lines = read_text_file(run.metrics_path, "metrics file").splitlines()
    for number, line in enumerate(lines, 1):
        record = metrics_record(line)
        if record is None and number == len(lines):
            break  # a torn last line of a killed run
        if record is None:  # anywhere else: the file is damaged
            shown = line if len(line) <= 40 else line[:40] + "..."
            raise UserError(f"{run.metrics_path} line {number} is not a metrics record ({shown}): mlsctl pretrain "
                            f"writes one JSON object with a numeric 'step' per line; remove the line")
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    if not series:
        torn = bool(lines) and metrics_record(lines[-1]) is None  # the only line, not a record (a new user)
        raise UserError(f"{run.metrics_path} holds no metrics yet" + (
            f" (its last line is not a metrics record: a write cut short, or damage: "
            f"{lines[-1][:40] + ('...' if len(lines[-1]) > 40 else '')})" if torn else ""))
    return series


STYLES = ("-", "--", ":", "-.")
MARKER_POINTS = 30  # a series of at most this many points gets a marker on each, and no smoothing
SMOOTH_SHARE = 1 / 20  # the smoothing span: 5 % of the series' points (at least 2)


def ema(values: Sequence[float], span: float) -> list[float]:
    """Exponential moving average with ``alpha = 2 / (span + 1)``, bias-corrected (each point the
    weighted mean of the points so far, weights ``(1 - alpha)^age``; pandas' ``ewm(span,
    adjust=True)``), so the first points are not pulled towards zero."""
    alpha = 2 / (span + 1)
    out, weighted, weights = [], 0.0, 0.0
    for value in values:
        weighted = (1 - alpha) * weighted + value
        weights = (1 - alpha) * weights + 1
        out.append(weighted / weights)
    return out


def smoothing_span(n: int) -> Optional[float]:
    """The EMA span for a series of ``n`` points; None (drawn raw, with markers) up to
    :data:`MARKER_POINTS`."""
    return None if n <= MARKER_POINTS else max(2.0, n * SMOOTH_SHARE)


def _config_value(run_dir: str | Path, section: str, key: str):
    """``section.key`` of the run's config.yaml (read with the recipes' bounds), None where it has none."""
    from mlsctl.config import read_yaml

    try:
        return read_yaml(Run(run_dir).config_path)[section][key]
    except (UserError, OSError, KeyError, TypeError):
        return None


def _config_int(run_dir: str | Path, section: str, key: str) -> Optional[int]:
    """An integer ``section.key`` of the run's config.yaml, None where it has none."""
    value = _config_value(run_dir, section, key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def throughput_units(run_dir: str | Path, series: dict) -> dict[str, str]:
    """The throughput series a run's panel draws, each with its unit: ``images_per_s`` counts the
    method's batch elements (embeddings for ``refine``, which trains on features: a new user's probe,
    2026-12-07, read "images/s"), MILE's ``sets_per_s`` and ``photos_per_s`` instead. A run whose
    config.yaml names no known method keeps the series' own name as its unit."""
    if "sets_per_s" in series:
        return {key: unit for key, unit in (("sets_per_s", "sets / s"), ("photos_per_s", "photos / s"))
                if key in series}
    if "images_per_s" not in series:
        return {}
    from mlsctl.registry import METHODS, method_class

    method = _config_value(run_dir, "method", "name")
    if method not in METHODS:
        return {"images_per_s": "images_per_s"}
    return {"images_per_s": method_class(method).speed_unit().replace("/", " / ")}


def _output_classes(run_dir: str | Path) -> Optional[int]:
    """``method.out_dim`` of the run's config.yaml (the K of DINO's teacher distribution), when it has one."""
    value = _config_int(run_dir, "method", "out_dim")
    return value if value is not None and value > 1 else None


def _bank_health_reasons(run_dirs: Sequence, runs: list) -> list[str]:
    """Run by run, why a run that keeps a memory bank has no line in the bank-health panel."""
    reasons = []
    for run_dir, (name, series) in zip(run_dirs, runs):
        if not any(key.startswith("bank_fill/") for key in series):  # a run of a method with no bank: no reason
            continue
        if any(key.startswith("bank/") and key.endswith("/mean_cosine") for key in series):  # drawn
            continue
        every = _config_int(run_dir, "train", "bank_health_every")
        last = max((steps[-1] for steps, _ in series.values() if steps), default=0)
        reasons.append(f"{name}: never (train.bank_health_every 0)" if every == 0 else
                       f"{name}: every {every} steps, a run of {last} step{'s' if last != 1 else ''}" if every else f"{name}: not recorded")
    return reasons


def _wrapped_reasons(reasons: list[str]) -> list[str]:
    """Reasons wrapped to fit a panel (a new user, 2026-12-06: one long sentence ran over the next panels)."""
    import textwrap

    return ([textwrap.fill(r, 48) for r in reasons[:4]]
            + ([f"(and {len(reasons) - 4} more runs)"] if len(reasons) > 4 else []))


def _no_bank_health(run_dirs: Sequence, runs: list) -> str:
    """Why the bank-health panel is empty, run by run."""
    return "\n".join(["no bank health recorded"] + _wrapped_reasons(_bank_health_reasons(run_dirs, runs)))


def single_term_duplicates(series: dict[str, tuple[list[int], list[float]]]) -> bool:
    """Whether a run's only loss term is its total loss (the same values at the same steps)."""
    terms = [k for k in series if k.startswith("loss/")]
    if len(terms) != 1 or "loss" not in series:
        return False
    (steps, values), (total_steps, total) = series[terms[0]], series["loss"]
    return steps == total_steps and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(values, total))


def short_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """The fewest trailing path parts that tell the runs apart (``dino/seed0/run``, ``sove/seed0/run``)."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(Path(r)) for r in run_dirs]


MONITOR_NAMES = {"monitor/knn_top1": "k-NN top-1", "monitor/knn_seg_miou": "k-NN segmentation mIoU"}


def monitor_label(key: str) -> str:
    """A quality monitor's legend name with its unit, percent as every ``eval`` prints it (a new user's probe,
    2026-12-07: the panel drew fractions on an axis labelled "score")."""
    return f"{MONITOR_NAMES.get(key, key[len('monitor/'):])} %"


def methods_of(run_dirs: Sequence[str | Path]) -> list[str]:
    """The distinct method names of the runs' recipes (config.yaml's ``method.name``), in the runs' order; runs
    whose config names none are left out."""
    names = [_config_value(r, "method", "name") for r in run_dirs]
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def same_series(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> bool:
    """Whether two series have the same values at the same steps (one drawn over the other hides it)."""
    return a[0] == b[0] and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) for x, y in zip(a[1], b[1]))


SAME_STYLE = (0, (3, 3))  # a series equal to an earlier run's: loose dashes, the earlier line shows in the gaps


def _uniform_entropy_lines(ax, runs: list[tuple[str, str, Optional[int]]]) -> Optional[float]:
    """log K, the entropy of uniform outputs over a run's K classes, as a dotted line: one grey line
    where the runs share K (four runs drew four lines and four legend entries on one height, and the
    legend covered the panel's note: a probe, 2026-12-07), else one in each run's colour → the highest
    log K drawn (None where no run gives K), which the panel's y-limits must hold."""
    known = [(name, colour, k) for name, colour, k in runs if k is not None]
    if not known:
        return None
    if len({k for _, _, k in known}) == 1:
        k = known[0][2]
        ax.axhline(math.log(k), color="0.4", linewidth=1, linestyle=(0, (1, 2)),
                   label=f"log K = {math.log(k):.2f} (uniform over K = {k}" + (", every run)" if len(known) > 1 else ")"))
        return math.log(k)
    for name, colour, k in known:
        ax.axhline(math.log(k), color=colour, linewidth=1, linestyle=(0, (1, 2)),
                   label=f"{name}: log K = {math.log(k):.2f} (uniform over K = {k})")
    return max(math.log(k) for _, _, k in known)


def _finite_points(steps: list[int], values: list[float]) -> tuple[list[int], list[float], list[int]]:
    """A series without its non-finite values (NaN, inf), and the steps of those left out."""
    bad = [s for s, v in zip(steps, values) if not math.isfinite(v)]
    if not bad:
        return steps, values, []
    kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept], bad


def _non_finite_note(label: str, key: str, bad: list[int]) -> str:
    """What a panel says of the points of a series it could not draw (a NaN loss left out silently: a probe,
    2026-12-08)."""
    shown = ", ".join(str(s) for s in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    plural = "s" if len(bad) != 1 else ""
    return f"{label}: {len(bad)} step{plural} with a non-finite {key} not drawn: step{plural} {shown}"


@dataclass
class _Drawn:
    """What :func:`plot_runs` drew and said, panel by panel, for the summary it returns."""

    panels: dict[str, list[str]] = field(default_factory=dict)  # panel → the series keys drawn in it
    smoothed: dict[str, float] = field(default_factory=dict)  # key → its largest EMA span, in points
    markers: set[str] = field(default_factory=set)  # keys drawn raw with a marker on every point
    empty: dict[str, str] = field(default_factory=dict)  # panel → why nothing is drawn in it
    not_drawn: dict[str, list[str]] = field(default_factory=dict)  # panel → the lines a log axis left out
    not_finite: dict[str, list[str]] = field(default_factory=dict)  # panel → the NaN / inf points left out
    not_recorded: dict[str, list[str]] = field(default_factory=dict)  # panel → the runs without a line, and why
    same_as: dict[str, list[str]] = field(default_factory=dict)  # panel → the lines equal to an earlier run's
    notes: dict[str, list[str]] = field(default_factory=dict)  # panel → what heads its legend


def _panel_specs(run_dirs: list, runs: list) -> tuple[list[tuple], dict[str, dict[str, str]]]:
    """The panels the runs' series fill, as (title, which keys of a run, y label, options), and the units of each
    run's throughput series ({} where the quality monitors take the throughput's place). A panel that only some
    methods log is left out when no run logs it; the others say "not logged"."""
    any_key = lambda test: any(test(k) for _, s in runs for k in s)  # noqa: E731

    # refine's ms_before, the Multi-Similarity loss of its batches unrefined, beside the refined loss it is the baseline
    # of (a new user's probe, 2026-12-07: it was drawn in no panel)
    # runs of different methods minimise different objectives (DINO's cross-entropy near log K, MLS's InfoNCE + BCE):
    # one axis invited "MLS has the lower loss" (a new user's probe, 2026-12-07), so the panel says they differ
    methods = methods_of(run_dirs)
    loss_note = (f"each method's own objective ({', '.join(methods)}): not comparable across methods"
                 if len(methods) > 1 else None)
    specs = [("training loss", lambda s: ["loss", "ms_before"], "loss",
              dict(smooth=True, label=lambda n, k: n if k == "loss" else f"{n}: unrefined embeddings ({k})",
                   note=loss_note))]
    terms = lambda s: [] if single_term_duplicates(s) else sorted(k for k in s if k.startswith("loss/"))  # noqa: E731
    if any(terms(s) for _, s in runs):
        specs.append(("loss terms", terms, "loss term", dict(smooth=True)))
    specs.append(("learning rate and weight decay", lambda s: ["lr", "weight_decay"], "value (log scale)",
                  dict(log=True)))
    # runs of methods without a teacher (ms, refine) logged a momentum of 0 before they logged none
    momentum = lambda s: ["momentum"] if "momentum" in s and any(v != 0 for v in s["momentum"][1]) else []  # noqa: E731
    if any(momentum(s) for _, s in runs):
        # a momentum is at most 1: a constant 0.995 (MLS) got an autoscaled axis up to 1.04 (a new user's probe)
        specs.append(("teacher momentum", momentum, "EMA momentum", dict(label=lambda n, k: n, top=1.0)))
    if any_key(lambda k: k == "teacher_entropy"):
        specs.append(("teacher entropy", lambda s: ["teacher_entropy"], "entropy of the teacher's output (nats)",
                      dict(smooth=True, label=lambda n, k: n, entropy=True)))
    if any_key(lambda k: k.startswith(("bank/", "bank_fill/"))):  # a method that keeps a bank
        specs.append(("memory-bank health",
                      lambda s: sorted(k for k in s if k.startswith("bank/") and k.endswith("/mean_cosine")),
                      "mean pairwise cosine (1 = collapsed)",
                      dict(label=lambda n, k: f"{n}: {k[len('bank/'):]}",
                           empty=_no_bank_health(run_dirs, runs), unrecorded=_bank_health_reasons(run_dirs, runs))))
    throughput: dict[str, dict[str, str]] = {}
    if any_key(lambda k: k.startswith("monitor/")):
        specs.append(("quality monitor", lambda s: sorted(k for k in s if k.startswith("monitor/")), "%",
                      dict(scale=100.0, top=100.0, label=lambda n, k: f"{n}: {monitor_label(k)}")))
    else:
        throughput = {name: throughput_units(run_dir, series) for run_dir, (name, series) in zip(run_dirs, runs)}
        said = {unit for per_run in throughput.values() for unit in per_run.values()}
        one = next(iter(said)) if len(said) == 1 else None  # one unit: the axis says it, else each line
        specs.append(("throughput",
                      lambda s: ["sets_per_s", "photos_per_s"] if "sets_per_s" in s else ["images_per_s"],
                      one or "per second",
                      dict(smooth=True, label=(lambda n, k: n) if one else (lambda n, k: f"{n}: {throughput[n][k]}"))))
    return specs, throughput


def _draw_lines(ax, panel: str, keys_of, options: dict, runs: list, colours: list, record: _Drawn) -> list[str]:
    """Each run's series of one panel on ``ax`` (one colour per run, one line style per key): raw with markers
    when short, else faint with their EMA on top; a series equal to an earlier run's dashed, and said → the keys
    drawn."""
    label_of = options.get("label", lambda n, k: f"{n}: {k}")
    drawn, earlier = [], {}  # earlier: key → [(run name, series)] drawn in this panel
    for r, (name, series) in enumerate(runs):
        colour = colours[r % len(colours)]
        for i, key in enumerate(k for k in keys_of(series) if k in series):
            steps, values, bad = _finite_points(*series[key])
            if bad:
                record.not_finite.setdefault(panel, []).append(_non_finite_note(label_of(name, key), key, bad))
            if not values:
                continue
            scale = options.get("scale", 1.0)
            values = [v * scale for v in values] if scale != 1.0 else values
            # a weight decay of 0 was listed in the legend and invisible on the log axis (a probe, 2026-12-07)
            if options.get("log") and all(v <= 0 for v in values):
                record.not_drawn.setdefault(panel, []).append(
                    f"{label_of(name, key)}: {'0' if all(v == 0 for v in values) else 'not above 0'} throughout")
                continue
            style = STYLES[i % len(STYLES)]
            label = label_of(name, key)
            # a series equal to an earlier run's lay exactly over it, and the legend listed a line the reader
            # could not see (a new user's probe, 2026-12-07: DINO's lr and wd under MLS's): dashed, and said
            twin = next((n for n, s in earlier.get(key, []) if same_series(s, (steps, values))), None)
            earlier.setdefault(key, []).append((name, (steps, values)))
            if twin is not None:
                style, label = SAME_STYLE, f"{label} (same as {twin})"
                record.same_as.setdefault(panel, []).append(label)
            span = smoothing_span(len(values)) if options.get("smooth") else None
            if span is None:
                few = len(values) <= MARKER_POINTS
                ax.plot(steps, values, linestyle=style, color=colour, linewidth=1.2, label=label,
                        marker="o" if few else None, markersize=3.5)
                if few:
                    record.markers.add(key)
            else:  # the raw values faint, the trend on top
                ax.plot(steps, values, linestyle=style, color=colour, linewidth=0.7, alpha=0.25)
                ax.plot(steps, ema(values, span), linestyle=style, color=colour, linewidth=1.8,
                        label=f"{label} (EMA, span {span:.0f})")
                record.smoothed[key] = max(span, record.smoothed.get(key, 0.0))
            drawn.append(key)
    return drawn


def _set_axes(ax, ylabel: str, options: dict, drawn: list[str]) -> None:
    """A panel's axis labels, its log scale (with plain tick text) and its top where the quantity has one; steps
    get integer ticks (a run of 4 steps got ticks at 2.25, 2.5: a probe, 2026-12-08)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if options.get("log") and drawn:
        ax.set_yscale("log")
        # plain tick text: the default log labels are math text ("$\\mathdefault{10^{-3}}$"), which
        # literal_text draws as written
        from matplotlib.ticker import LogFormatter

        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    if options.get("top") is not None and drawn and ax.get_ylim()[1] > options["top"]:
        ax.set_ylim(top=options["top"])  # no room above what the quantity can take (a momentum above 1)


def _say_panel_notes(ax, panel: str, options: dict, drawn: list[str], record: _Drawn) -> None:
    """A panel's notes, as its legend's title where it has lines (the legend covered them: a probe), else as text
    in its corner; an empty panel says why in its middle."""
    notes = []
    if options.get("note") and drawn:
        notes.append(options["note"])
    if options.get("entropy"):
        ax.set_ylim(bottom=0)
        notes.append("log K: uniform outputs (collapse to uniform)\n0: one-hot outputs (a collapse "
                     "when all pick the same one)")
    if panel in record.not_drawn:  # a log axis has no place for them
        notes.append("\n".join(record.not_drawn[panel]) + " (not drawn on a log axis)")
    if panel in record.not_finite:
        notes.append("\n".join(_wrapped_reasons(record.not_finite[panel])))
    if drawn and options.get("unrecorded"):  # runs with a bank but no record, beside runs with (a probe, 2026-12-07)
        record.not_recorded[panel] = options["unrecorded"]
        notes.append("\n".join(["no bank health recorded:"] + _wrapped_reasons(record.not_recorded[panel])))
    if drawn:
        record.notes[panel] = notes
        legend = ax.legend(fontsize=7, loc="best", title="\n".join(notes) or None, title_fontsize=7,
                           alignment="left")
        legend.get_title().set_color("0.35")
    elif notes:
        ax.text(0.01, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, color="0.35")
    if not drawn:
        record.empty[panel] = ("nothing above 0 to draw on a log axis" if panel in record.not_drawn
                               else options.get("empty") or "not logged by these runs")
        ax.text(0.5, 0.5, record.empty[panel], ha="center", va="center", transform=ax.transAxes, color="grey")


@literal_text
def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> dict:
    """Draw the runs' curves to ``out`` (PNG); returns what each panel shows, which series were
    smoothed (with their EMA span in points) and which were drawn with markers."""
    plt = pyplot()

    run_dirs = list(run_dirs)
    runs = list(zip(short_names(run_dirs), (read_metrics(r) for r in run_dirs)))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    specs, throughput = _panel_specs(run_dirs, runs)
    columns = 3
    rows = (len(specs) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(16, 4.25 * rows), squeeze=False)
    record = _Drawn()
    for ax, (panel, keys_of, ylabel, options) in zip(axes.flat, specs):
        drawn = _draw_lines(ax, panel, keys_of, options, runs, colours, record)
        uniform = None
        if options.get("entropy"):  # the entropy of the uniform distribution: collapse to uniform
            uniform = _uniform_entropy_lines(ax, [(name, colours[r % len(colours)], _output_classes(run_dirs[r]))
                                                  for r, (name, series) in enumerate(runs) if "teacher_entropy" in series])
        _set_axes(ax, ylabel, options, drawn)
        _say_panel_notes(ax, panel, options, drawn, record)
        if uniform is not None:  # the dotted log K line sat on the panel's top border (a probe, 2026-12-08)
            ax.set_ylim(top=max(ax.get_ylim()[1], uniform * 1.08))
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        record.panels[panel] = sorted(set(drawn))
    for ax in list(axes.flat)[len(specs):]:
        ax.axis("off")
    figure.suptitle(title or ("training curves of " + ", ".join(n for n, _ in runs)))
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (4.25 * rows)))  # room for the title
    save_figure(figure, out, dpi=100)
    plt.close(figure)
    return {"out": str(out), "runs": [n for n, _ in runs], "panels": record.panels,
            "smoothed": {k: round(v, 2) for k, v in sorted(record.smoothed.items())}, "markers": sorted(record.markers),
            "empty": record.empty, "not_drawn": record.not_drawn,  # why a panel is empty, and what a log axis left out
            "not_finite": record.not_finite,  # the NaN / inf points each panel left out, by series
            "not_recorded": record.not_recorded,  # runs a panel has no line of, and why
            "same_as": record.same_as,  # the lines equal to an earlier run's, dashed over it, as their legend says
            "notes": {p: n for p, n in record.notes.items() if n},  # what heads each panel's legend
            "throughput_units": throughput}  # run → its throughput series → unit ({} where monitors are drawn)
