"""Training curves of one or several runs, drawn with matplotlib from ``RUN/metrics.jsonl``.

:func:`read_metrics` returns every numeric series of a run (``name → (steps, values)``);
:func:`plot_runs` draws six panels — the loss, its terms, the learning rate and weight decay,
the teacher momentum, memory-bank health (the mean pairwise cosine of every bank)
and quality monitors (``monitor/...``; throughput when a run has none) — with one colour per run
(and one line style per term, bank or monitor), axes, units and legends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from mlsctl import atomic
from mlsctl.errors import UserError
from mlsctl.runs import Run


def read_metrics(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    run = Run(run_dir)
    if not run.metrics_path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give a run folder written by mlsctl pretrain")
    series: dict[str, tuple[list[int], list[float]]] = {}
    from mlsctl.evaluate.knn import read_text_file

    for number, line in enumerate(read_text_file(run.metrics_path, "metrics file").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line of a killed run
        except RecursionError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            shown = line if len(line) <= 40 else line[:40] + "..."
            raise UserError(f"{run.metrics_path} line {number} is not a metrics record ({shown}): mlsctl pretrain "
                            f"writes one JSON object with a numeric 'step' per line; remove the line")
        for key, value in record.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    if not series:
        raise UserError(f"{run.metrics_path} holds no metrics yet")
    return series


STYLES = ("-", "--", ":", "-.")


def short_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """The fewest trailing path parts that tell the runs apart (``dino/seed0/run``, ``sove/seed0/run``)."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(Path(r)) for r in run_dirs]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> dict:
    """Draw the runs' curves to ``out`` (PNG); returns what each panel shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(zip(short_names(run_dirs), (read_metrics(r) for r in run_dirs)))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = {}

    def draw(ax, key_filter, ylabel, panel, label_of=lambda name, key: f"{name}: {key}", log=False, empty=""):
        drawn = []
        for r, (name, series) in enumerate(runs):
            keys = sorted(k for k in series if key_filter(k))
            for i, key in enumerate(keys):
                steps, values = series[key]
                ax.plot(steps, values, STYLES[i % len(STYLES)], color=colours[r % len(colours)], linewidth=1.2,
                        label=label_of(name, key))
                drawn.append(key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log and drawn:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, empty or "not logged by these runs", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        panels[panel] = sorted(set(drawn))

    draw(axes[0, 0], lambda k: k == "loss", "loss", "training loss", label_of=lambda n, k: n)
    draw(axes[0, 1], lambda k: k.startswith("loss/"), "loss term", "loss terms",
         empty="the method logs a single loss term")
    draw(axes[0, 2], lambda k: k in ("lr", "weight_decay"), "value (log scale)", "learning rate and weight decay",
         log=True)
    draw(axes[1, 0], lambda k: k == "momentum", "EMA momentum", "teacher momentum", label_of=lambda n, k: n)
    draw(axes[1, 1], lambda k: k.startswith("bank/") and k.endswith("/mean_cosine"),
         "mean pairwise cosine (1 = collapsed)", "memory-bank health",
         label_of=lambda n, k: f"{n}: {k[len('bank/'):]}", empty="no bank health records (train.bank_health_every)")
    monitors = any(k.startswith("monitor/") for _, s in runs for k in s)
    if monitors:
        draw(axes[1, 2], lambda k: k.startswith("monitor/"), "score", "quality monitor")
    else:
        draw(axes[1, 2], lambda k: k == "images_per_s", "images / s", "throughput", label_of=lambda n, k: n)
    figure.suptitle(title or ("training curves of " + ", ".join(n for n, _ in runs)))
    figure.tight_layout()
    atomic.write_with(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return {"out": str(out), "runs": [n for n, _ in runs], "panels": panels}
