"""mlsctl plot: the curves of one or several runs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from PIL import Image

from mlsctl.curves import ema, plot_runs, short_names, single_term_duplicates, smoothing_span

from conftest import cli, cli_ok


def test_plot_draws_every_panel_of_several_runs(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    other = tmp_path / "b" / "run"
    shutil.copytree(run_dir, other)
    out, _ = cli_ok(capsys, "plot", str(run_dir), str(other), "--out", str(tmp_path / "c.png"), "--json")
    result = json.loads(out)
    assert result["runs"] == ["run/run", "b/run"] or len(set(result["runs"])) == 2
    panels = result["panels"]
    assert panels["training loss"] == ["loss"]
    assert "loss terms" not in panels  # DINO's only term, loss/dino, is its loss: no second panel
    assert panels["learning rate and weight decay"] == ["lr", "weight_decay"]
    assert panels["teacher entropy"] == ["teacher_entropy"]
    assert panels["memory-bank health"] == ["bank/cls/mean_cosine"]
    assert panels["throughput"] == ["images_per_s"]
    assert result["smoothed"] == {} and {"loss", "teacher_entropy", "lr"} <= set(result["markers"])  # 8 steps
    image = Image.open(tmp_path / "c.png")
    assert image.size == (1600, 850)


def fake_run(path, records: list[dict], config: str = "method: {name: x}\n"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_panels_follow_what_the_runs_logged(tmp_path):
    # 200 noisy steps of a two-term loss, no teacher entropy: smoothed, a terms panel, no entropy panel
    noisy = [{"step": s, "loss": 3 - s / 100 + (-1) ** s, "loss/a": 1 + (-1) ** s, "loss/b": 2 - s / 100,
              "lr": 1e-3, "images_per_s": 50.0 + s % 7} for s in range(1, 201)]
    two_terms = fake_run(tmp_path / "two", noisy)
    # 12 steps of MILE: one term equal to the loss, entropy with K from the config, sets and photos per second
    mile = fake_run(tmp_path / "mile", [{"step": s, "loss": 5.0 - s / 10, "loss/mile": 5.0 - s / 10, "teacher_entropy": 2.0,
                                         "momentum": 0.996, "images_per_s": 8.0, "sets_per_s": 8.0, "photos_per_s": 32.0}
                                        for s in range(1, 13)], "method: {name: mile, out_dim: 64}\n")
    result = plot_runs([two_terms], tmp_path / "two.png")
    assert result["panels"]["loss terms"] == ["loss/a", "loss/b"] and "teacher entropy" not in result["panels"]
    assert result["smoothed"] == {"images_per_s": 10.0, "loss": 10.0, "loss/a": 10.0, "loss/b": 10.0}  # 5 % of 200
    assert "loss" not in result["markers"]
    result = plot_runs([mile], tmp_path / "mile.png")
    assert set(result["panels"]) == {"training loss", "learning rate and weight decay", "teacher momentum",
                                     "teacher entropy", "throughput"}  # MILE keeps no bank
    assert result["panels"]["throughput"] == ["photos_per_s", "sets_per_s"]
    assert result["smoothed"] == {} and "loss" in result["markers"]
    result = plot_runs([two_terms, mile], tmp_path / "both.png")  # the terms of the run that has several
    assert result["panels"]["loss terms"] == ["loss/a", "loss/b"]
    assert result["panels"]["throughput"] == ["images_per_s", "photos_per_s", "sets_per_s"]
    assert Image.open(tmp_path / "both.png").size == (1600, 850)  # 6 panels: 2 rows


def test_a_run_without_teacher_or_bank_gets_no_panels_for_them(tmp_path):
    """A new-user probe (2026-12-05): a Multi-Similarity run's plot drew a teacher momentum of 0 and "no bank
    health records (train.bank_health_every)", as if a bank were there to measure."""
    records = [{"step": s, "loss": 2.0 - s / 10, "loss/ms": 2.0 - s / 10, "lr": 1e-3, "weight_decay": 0.05,
                "images_per_s": 20.0} for s in range(1, 9)]
    ms = fake_run(tmp_path / "ms", records, "method: {name: ms}\n")
    older = fake_run(tmp_path / "older", [dict(r, momentum=0.0) for r in records], "method: {name: ms}\n")
    for run in (ms, older):  # runs written before methods without a teacher stopped logging a momentum of 0
        result = plot_runs([run], tmp_path / "ms.png")
        assert set(result["panels"]) == {"training loss", "learning rate and weight decay", "throughput"}


def test_a_refine_run_s_throughput_counts_embeddings_and_its_unrefined_loss_is_drawn(tmp_path, monkeypatch):
    """A new user's probe (2026-12-07): a refine run's throughput axis said images/s, where refinement trains on
    embeddings (its progress line says embeddings/s), and its ms_before was drawn in no panel."""
    import mlsctl.curves as curves

    drawn = []
    real = curves.save_figure
    monkeypatch.setattr(curves, "save_figure", lambda figure, *a, **k: (drawn.append(figure), real(figure, *a, **k)))
    records = [{"step": s, "loss": 0.7 - s / 100, "loss/ms": 0.7 - s / 100, "ms_before": 0.72, "lr": 1e-4,
                "images_per_s": 900.0} for s in range(1, 9)]
    refine = fake_run(tmp_path / "refine", records, "method: {name: refine}\n")
    result = plot_runs([refine], tmp_path / "r.png")
    assert result["panels"]["training loss"] == ["loss", "ms_before"]
    assert result["throughput_units"] == {"refine": {"images_per_s": "embeddings / s"}}
    axes = {ax.get_title(): ax for ax in drawn[-1].axes}
    assert axes["throughput"].get_ylabel() == "embeddings / s"
    legend = [t.get_text() for t in axes["training loss"].get_legend().get_texts()]
    assert legend == ["refine", "refine: unrefined embeddings (ms_before)"]
    dino = fake_run(tmp_path / "dino", [{**{k: v for k, v in r.items() if k != "ms_before"}, "images_per_s": 40.0}
                                        for r in records], "method: {name: dino}\n")  # not "same as refine"
    result = plot_runs([refine, dino], tmp_path / "both.png")  # two units: each line says its own
    assert result["throughput_units"] == {"refine": {"images_per_s": "embeddings / s"},
                                          "dino": {"images_per_s": "images / s"}}
    axes = {ax.get_title(): ax for ax in drawn[-1].axes}
    assert axes["throughput"].get_ylabel() == "per second"
    assert [t.get_text() for t in axes["throughput"].get_legend().get_texts()] == ["refine: embeddings / s",
                                                                                   "dino: images / s"]


def test_a_single_term_that_is_not_the_total_keeps_its_panel():
    total = {"loss": ([1, 2], [2.0, 1.0]), "loss/ms": ([1, 2], [2.0, 1.0])}
    weighted = {"loss": ([1, 2], [2.0, 1.0]), "loss/ms": ([1, 2], [1.0, 0.5])}
    assert single_term_duplicates(total) and not single_term_duplicates(weighted)


def test_ema_is_the_bias_corrected_weighted_mean():
    assert ema([1.0, 2.0, 3.0], span=3) == pytest.approx([1.0, 2.5 / 1.5, 4.25 / 1.75])  # alpha 0.5
    assert ema([4.0] * 5, span=7) == pytest.approx([4.0] * 5)  # no pull towards zero at the start
    assert smoothing_span(30) is None and smoothing_span(31) == 2.0 and smoothing_span(1000) == 50.0


def test_short_names_tell_runs_apart():
    assert short_names(["/x/dino/seed0/run", "/x/sove/seed0/run"]) == ["dino/seed0/run", "sove/seed0/run"]
    assert short_names(["/x/a", "/y/b"]) == ["a", "b"]


def test_plot_of_a_folder_that_is_not_a_run_is_one_sentence(tmp_path, capsys):
    code, _, err = cli("plot", str(tmp_path), capsys=capsys)
    assert code != 0 and "has no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("plot", str(tmp_path / "nope"), capsys=capsys)  # a typo is said as such (a probe, 2026-12-06)
    assert code == 2 and f"run {tmp_path / 'nope'} does not exist" in err


def test_an_empty_bank_health_panel_says_why_run_by_run_within_its_panel(tmp_path):
    """A new user (2026-12-06): one 95-character sentence ran over the neighbouring panels."""
    from mlsctl.curves import _no_bank_health

    records = [{"step": s, "loss": 1.0, "bank_fill/cls": 0.5} for s in (20, 40, 72)]
    rare = fake_run(tmp_path / "rare", records, "train: {bank_health_every: 1000}\n")
    never = fake_run(tmp_path / "never", records, "train: {bank_health_every: 0}\n")
    fill = {"bank_fill/cls": ([20], [0.5])}
    runs = [("rare", {"loss": ([20, 40, 72], [1.0] * 3), **fill}), ("never", {"loss": ([20], [1.0]), **fill}),
            ("nobank", {"loss": ([20], [1.0])})]  # a method that keeps no bank gives no reason (a review)
    said = _no_bank_health([rare, never, rare], runs)
    assert said.splitlines() == ["no bank health recorded", "rare: every 1000 steps, a run of 72 steps",
                                 "never: never (train.bank_health_every 0)"]
    assert all(len(line) <= 48 for line in said.splitlines())
    result = plot_runs([rare, never], tmp_path / "p.png")
    assert result["panels"]["memory-bank health"] == []
    # beside a run with records, the runs without are said in the panel and in --json (a new user's probe,
    # 2026-12-07: they were left out without a word)
    kept = fake_run(tmp_path / "kept", [{"step": s, "loss": 1.0, "bank_fill/cls": 0.5, "bank/cls/mean_cosine": 0.3}
                                        for s in (20, 40)])
    result = plot_runs([kept, rare], tmp_path / "q.png")
    assert result["panels"]["memory-bank health"] == ["bank/cls/mean_cosine"]
    assert result["not_recorded"] == {"memory-bank health": ["rare: every 1000 steps, a run of 72 steps"]}


def test_dollar_signs_in_a_title_or_a_run_name_are_drawn_as_written(tmp_path):
    """A probe (2026-12-07): ``plot --title '$x^$'`` and a run folder named ``exp$^_1$`` ended in matplotlib's
    math-text error ("internal error"); a balanced pair of ``$`` was drawn as math."""
    records = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3} for s in range(1, 9)]
    run = fake_run(tmp_path / "exp$^_1$", records)
    result = plot_runs([run], tmp_path / "c.png", title="$x^$ and $\\alpha$")
    assert result["runs"] == ["exp$^_1$"] and Image.open(tmp_path / "c.png").size[0] > 300
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"] is True  # for the drawing only: a caller's figures keep math text


def test_an_empty_panel_says_why_and_a_log_axis_names_what_it_cannot_draw(tmp_path):
    """A probe (2026-12-07): a weight decay of 0 was listed in the legend but invisible on the log axis, and
    `plot --json` gave an empty bank-health panel without the reason the picture shows."""
    records = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "weight_decay": 0.0, "bank_fill/q": 0.5}
               for s in range(1, 9)]
    result = plot_runs([fake_run(tmp_path / "r", records)], tmp_path / "c.png")
    assert result["panels"]["learning rate and weight decay"] == ["lr"]
    assert result["not_drawn"] == {"learning rate and weight decay": ["r: weight_decay: 0 throughout"]}
    assert result["panels"]["memory-bank health"] == []
    assert "no bank health recorded" in result["empty"]["memory-bank health"]


def test_runs_that_share_k_get_one_uniform_entropy_line_and_notes_head_the_legend():
    """A probe (2026-12-07): four DINO runs drew four log K lines at one height, four legend entries,
    and the legend covered the panel's note on what log K and 0 mean."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from mlsctl.curves import _uniform_entropy_lines

    figure, ax = plt.subplots()
    _uniform_entropy_lines(ax, [(n, "C0", 64) for n in "abcd"] + [("e", "C1", None)])
    assert [(line.get_ydata()[0], line.get_label()) for line in ax.lines] == [
        (math.log(64), "log K = 4.16 (uniform over K = 64, every run)")]
    figure, ax = plt.subplots()
    _uniform_entropy_lines(ax, [("a", "C0", 64), ("b", "C1", 256)])
    assert [line.get_label() for line in ax.lines] == ["a: log K = 4.16 (uniform over K = 64)",
                                                       "b: log K = 5.55 (uniform over K = 256)"]
    plt.close("all")


def test_a_panels_note_heads_its_legend(tmp_path, monkeypatch):
    import matplotlib.legend

    titles = []
    original = matplotlib.legend.Legend.set_title
    monkeypatch.setattr(matplotlib.legend.Legend, "set_title",
                        lambda self, title, prop=None: (titles.append(title), original(self, title, prop))[1])
    records = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "weight_decay": 0.0} for s in range(1, 9)]
    plot_runs([fake_run(tmp_path / "r", records)], tmp_path / "c.png")
    assert "r: weight_decay: 0 throughout (not drawn on a log axis)" in titles


def _drawn_axes(monkeypatch):
    """The axes of every figure plot_runs draws, by panel title (the figure is caught before it is closed)."""
    import mlsctl.curves as curves

    drawn = []
    real = curves.save_figure
    monkeypatch.setattr(curves, "save_figure", lambda figure, *a, **k: (drawn.append(figure), real(figure, *a, **k)))
    return lambda: {ax.get_title(): ax for ax in drawn[-1].axes}


def _dino_and_mls(tmp_path):
    """A DINO run and an MLS run of one schedule (lr, wd), each its own loss, momentum and k-NN monitor."""
    dino = fake_run(tmp_path / "dino", [{"step": s, "loss": 6.6 - s / 100, "lr": 1e-3 * s, "weight_decay": 0.04,
                                         "momentum": 0.996 + s / 2000, "monitor/knn_top1": 0.1 + s / 100}
                                        for s in range(1, 9)], "method: {name: dino}\n")
    mls = fake_run(tmp_path / "mls", [{"step": s, "loss": 2.0 - s / 100, "lr": 1e-3 * s, "weight_decay": 0.04,
                                       "momentum": 0.995, "monitor/knn_top1": 0.12 + s / 100}
                                      for s in range(1, 9)], "method: {name: mls}\n")
    return dino, mls


def test_the_loss_panel_of_runs_of_different_methods_says_their_objectives_differ(tmp_path, monkeypatch):
    """A new user's probe (2026-12-07): DINO's cross-entropy and MLS's InfoNCE + BCE on one axis read as
    "MLS has the lower loss"."""
    axes = _drawn_axes(monkeypatch)
    dino, mls = _dino_and_mls(tmp_path)
    note = "each method's own objective (dino, mls): not comparable across methods"
    result = plot_runs([dino, mls], tmp_path / "c.png")
    assert result["notes"]["training loss"] == [note]
    assert axes()["training loss"].get_legend().get_title().get_text() == note
    other = fake_run(tmp_path / "dino2", [{"step": 1, "loss": 6.0}], "method: {name: dino}\n")
    assert "training loss" not in plot_runs([dino, other], tmp_path / "d.png")["notes"]  # one method: comparable


def test_the_quality_monitor_is_drawn_in_percent(tmp_path, monkeypatch):
    """A new user's probe (2026-12-07): the panel drew fractions on a "score" axis where every eval prints %."""
    axes = _drawn_axes(monkeypatch)
    dino, _ = _dino_and_mls(tmp_path)
    plot_runs([dino], tmp_path / "c.png")
    ax = axes()["quality monitor"]
    assert ax.get_ylabel() == "%"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dino: k-NN top-1 %"]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([100 * (0.1 + s / 100) for s in range(1, 9)])


def test_a_constant_momentum_gets_no_axis_above_1(tmp_path, monkeypatch):
    """A new user's probe (2026-12-07): MLS's constant momentum 0.995 got an axis up to 1.04, which a momentum
    cannot reach."""
    axes = _drawn_axes(monkeypatch)
    _, mls = _dino_and_mls(tmp_path)
    plot_runs([mls], tmp_path / "c.png")
    bottom, top = axes()["teacher momentum"].get_ylim()
    assert top == 1.0 and bottom < 0.995


def test_a_series_equal_to_an_earlier_run_s_is_dashed_and_says_so(tmp_path, monkeypatch):
    """A new user's probe (2026-12-07): DINO's lr and wd lay exactly under MLS's; the legend listed lines the
    reader could not see."""
    axes = _drawn_axes(monkeypatch)
    dino, mls = _dino_and_mls(tmp_path)
    result = plot_runs([dino, mls], tmp_path / "c.png")
    assert result["same_as"] == {"learning rate and weight decay": ["mls: lr (same as dino)",
                                                                    "mls: weight_decay (same as dino)"]}
    ax = axes()["learning rate and weight decay"]
    styles = {line.get_label(): line.get_linestyle() for line in ax.lines}
    assert styles["dino: lr"] == "-" and styles["mls: lr (same as dino)"] == "--"  # matplotlib names any dashes "--"
    assert [line.get_label() for line in axes()["teacher momentum"].lines] == ["dino", "mls"]  # they differ


def test_steps_get_integer_ticks_and_the_uniform_entropy_line_is_inside_the_panel(tmp_path, monkeypatch):
    """A new user's probe (2026-12-08): a run of 4 steps got step ticks at 2.25, 2.5, and the dotted log K line sat
    on the teacher-entropy panel's top border."""
    axes = _drawn_axes(monkeypatch)
    run = fake_run(tmp_path / "r", [{"step": s, "loss": 6.5, "teacher_entropy": 5.8 + s / 40} for s in (2, 4)],
                   "method: {name: dino, out_dim: 1024}\n")
    plot_runs([run], tmp_path / "c.png")
    for ax in axes().values():
        if ax.get_xlabel() == "step":
            assert all(float(t).is_integer() for t in ax.get_xticks())
    bottom, top = axes()["teacher entropy"].get_ylim()
    assert bottom == 0 and top > 1.05 * math.log(1024)


def test_a_non_finite_loss_is_said_not_dropped_silently(tmp_path, monkeypatch):
    """A new user's probe (2026-12-08): a NaN loss planted in metrics.jsonl was left out of the panel with no note."""
    axes = _drawn_axes(monkeypatch)
    path = tmp_path / "r"
    path.mkdir()
    (path / "config.yaml").write_text("method: {name: x}\n")
    (path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {"NaN" if s in (3, 5) else 6.0 - s / 10}}}\n'
                                                for s in range(1, 8)))
    result = plot_runs([path], tmp_path / "c.png")
    note = "r: 2 steps with a non-finite loss not drawn: steps 3, 5"
    assert result["not_finite"] == {"training loss": [note]}
    assert note in axes()["training loss"].get_legend().get_title().get_text().replace("\n", " ")
    assert list(axes()["training loss"].lines[0].get_xdata()) == [1, 2, 4, 6, 7]


def test_a_run_of_one_step_is_not_said_in_the_plural(tmp_path):
    run = fake_run(tmp_path / "r", [{"step": 1, "loss": 6.0, "bank_fill/cls": 0.1}],
                   "method: {name: x}\ntrain: {bank_health_every: 50}\n")
    empty = plot_runs([run], tmp_path / "c.png")["empty"]["memory-bank health"]
    assert empty.endswith("r: every 50 steps, a run of 1 step")
