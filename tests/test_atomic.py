"""Whole folders put in place by mlsctl.atomic.swap_folder: a reader sees the old folder or the new one,
and a kill at any moment loses neither (exports, data builds, refined features and checkpoints use it)."""

from __future__ import annotations

import os
import shutil

import pytest

from mlsctl import atomic


class Killed(Exception):
    pass


def _folder(path, text):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def _state(path):
    return (path / "file.txt").read_text() if path.is_dir() else None


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_folder_replaces_in_one_step_and_a_kill_loses_nothing(tmp_path, monkeypatch, exchange):
    if exchange and not atomic._exchange(_folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")):
        pytest.skip("this file system cannot exchange two folders (renameat2 RENAME_EXCHANGE)")
    shutil.rmtree(tmp_path / "a", ignore_errors=True)
    shutil.rmtree(tmp_path / "b", ignore_errors=True)
    real_replace, real_exchange = os.replace, atomic._exchange
    for n in range(1, 2 if exchange else 3):  # the exchange is one call; the fallback two renames
        out = tmp_path / "out"
        if out.exists():
            atomic.swap_folder(_folder(tmp_path / "reset", "old"), out)
        else:
            _folder(out, "old")
        new = _folder(tmp_path / "new", "new")
        calls = []

        def kill_at_call_n(real):
            def wrapped(*args):
                calls.append(args)
                result = real(*args)
                if len(calls) == n:
                    raise Killed
                return result
            return wrapped

        monkeypatch.setattr(os, "replace", kill_at_call_n(real_replace))
        monkeypatch.setattr(atomic, "_exchange", kill_at_call_n(real_exchange) if exchange else lambda a, b: False)
        with pytest.raises(Killed):
            atomic.swap_folder(new, out)
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(atomic, "_exchange", real_exchange)
        atomic.recover_swap(out)  # what the next writer of out does first
        assert _state(out) in ("old", "new") and not atomic.aside_of(out).exists()
        if new.exists():
            shutil.rmtree(new)
    atomic.swap_folder(_folder(tmp_path / "new", "last"), out)
    assert _state(out) == "last" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_swap_folder_into_a_missing_place_is_a_rename(tmp_path):
    atomic.swap_folder(_folder(tmp_path / "new", "new"), tmp_path / "out")
    assert _state(tmp_path / "out") == "new" and not (tmp_path / "new").exists()


def test_a_checkpoint_replacement_cut_short_is_put_back_by_the_writer(finished_run, tmp_path):
    """A review (2026-12-06): a kill between swap_folder's two renames of a checkpoint saved again left no step-N,
    so a resume took an older checkpoint, and a later save of that step failed on the folder left aside."""
    from mlsctl.runs import Run

    run = Run(shutil.copytree(finished_run[0], tmp_path / "run", symlinks=True))
    latest = run.latest()
    latest.path.rename(latest.path.parent / f".{latest.path.name}.swap-old")
    assert run.latest().step < latest.step  # what a reader sees meanwhile: the checkpoint before
    run.recover_checkpoint_swaps()  # the writer's first act, under the run's lock
    assert run.latest().step == latest.step and not list(run.checkpoints_dir.glob(".*"))


def test_swap_folder_refuses_a_link(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(ValueError, match="symbolic link"):
        atomic.swap_folder(_folder(tmp_path / "new", "new"), tmp_path / "link")


def test_foreign_entries_walk_the_whole_tree_hidden_names_included(tmp_path):
    """A new user's probe, 2026-12-07: refuse_others looked at the top level only and skipped every hidden name, so
    --overwrite deleted a `.git/`, a folder inside a split and a stray image. Only names are read, never contents."""
    layout = {r"meta\.json": None, "train": {"images": {r"\d{6}\.png": None}, r"labels\.csv": None}}
    out = tmp_path / "build"
    (out / "train" / "images").mkdir(parents=True)
    for name in ("meta.json", "train/labels.csv", "train/images/000000.png", "train/images/000001.png"):
        (out / name).write_text("x")
    assert atomic.foreign_entries(out, layout) == []
    # the tools' own: a lock taken inside, an atomic write of a listed file killed before its rename
    (out / ".mlsctl.lock").write_text("")
    (out / "train" / ".labels.csv.a1b2c3d4.tmp").write_text("")
    assert atomic.foreign_entries(out, layout) == []
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref")
    (out / "train" / "my_feats").mkdir()
    (out / "train" / "images" / "my_extra.png").write_text("x")
    (out / "train" / "images" / ".mlsctl.lock").write_text("")  # a lock file's name is the tools' at the top only
    (out / "train" / ".notes.a1b2c3d4.tmp").write_text("")  # the temporary name of a file the build does not write
    (out / "train" / "images" / "000002.png").mkdir()  # a folder where a file belongs
    (out / "meta.json").unlink()
    (out / "meta.json").symlink_to(tmp_path / "elsewhere")  # a link, even with a listed name
    assert atomic.foreign_entries(out, layout, limit=10) == [
        ".git/", "meta.json", "train/.notes.a1b2c3d4.tmp", "train/images/.mlsctl.lock", "train/images/000002.png/",
        "train/images/my_extra.png", "train/my_feats/"]
    assert atomic.foreign_entries(out, layout) == [".git/", "meta.json", "train/.notes.a1b2c3d4.tmp",
                                                   "train/images/.mlsctl.lock"]
    with pytest.raises(Exception, match=r"^B holds \.git/, meta\.json, train/\.notes\.a1b2c3d4\.tmp and more; "
                                        r"--overwrite replaces the whole folder, so move them out first$"):
        atomic.refuse_others(out, layout, "B", "")


def test_a_file_browsers_litter_is_not_foreign_but_only_by_its_exact_names(tmp_path):
    """A folder looked at in Finder or Explorer holds a .DS_Store (._NAME on a non-Apple disk, Thumbs.db, desktop.ini,
    .directory), which blocked every --overwrite though nothing of the user's is in it: it goes with the folder. A
    name that only resembles one, or a folder under one of those names, is still the user's."""
    layout = {r"meta\.json": None, "train": {"images": {r"\d{6}\.png": None}}}
    out = tmp_path / "build"
    (out / "train" / "images").mkdir(parents=True)
    (out / "meta.json").write_text("{}")
    apple_double = atomic.APPLE_DOUBLE_HEADER + b"Mac OS X        "
    litter = [".DS_Store", "Thumbs.db", "desktop.ini", ".directory", "._meta.json", "train/.DS_Store",
              "train/images/._000000.png", "train/images/Thumbs.db"]
    for name in litter:
        (out / name).write_bytes(apple_double if "/._" in f"/{name}" else b"x")
    assert atomic.foreign_entries(out, layout) == []
    assert all(atomic.is_litter_file(out / name) for name in litter)
    for name in ("thumbs.db", "DS_Store", "notes.DS_Store", "._", "desktop.ini.bak", ".directory2"):
        (out / "train" / name).write_bytes(apple_double)
        assert not atomic.is_litter_file(out / "train" / name), name
    (out / "train" / "images" / "Thumbs.db").unlink()
    (out / "train" / "images" / "Thumbs.db").mkdir()  # a folder under a litter name: the user's
    assert atomic.foreign_entries(out, layout, limit=10) == [
        "train/._", "train/.directory2", "train/DS_Store", "train/desktop.ini.bak", "train/images/Thumbs.db/",
        "train/notes.DS_Store", "train/thumbs.db"]


def test_a_hidden_file_named_like_apple_double_is_the_users_unless_it_is_one(tmp_path):
    """A helper's finding (2026-12-07): every ``._NAME`` was litter by its name, so a user's hidden ``.__x`` or
    ``._notes`` went with the folder an --overwrite replaced and made a folder "empty". macOS names an AppleDouble
    file ``._`` + the name it describes (``.__x`` is _x's), so its header tells, not its name."""
    layout = {r"meta\.json": None}
    out = tmp_path / "build"
    out.mkdir()
    for name in (".__x", "._notes", "._meta.json"):
        (out / name).write_text("my own notes, long enough to hold a header")
    (out / "._short").write_bytes(atomic.APPLE_DOUBLE_HEADER[:4])  # the magic number alone
    assert [atomic.is_litter_file(p) for p in sorted(out.iterdir())] == [False] * 4
    assert atomic.foreign_entries(out, layout) == [".__x", "._meta.json", "._notes", "._short"]
    assert atomic.holds_anything(out)
    for path in out.iterdir():  # what macOS writes: the header, then its filler and entries
        path.write_bytes(atomic.APPLE_DOUBLE_HEADER + b"Mac OS X        " + bytes(16))
    assert [atomic.is_litter_file(p) for p in sorted(out.iterdir())] == [True] * 4
    assert atomic.foreign_entries(out, layout) == [] and not atomic.holds_anything(out)
    os.chmod(out / ".__x", 0)  # unreadable: what it holds cannot be vouched for
    if os.geteuid() != 0:
        assert not atomic.is_litter_file(out / ".__x") and atomic.holds_anything(out)


def test_a_folder_with_only_litter_counts_as_empty(tmp_path):
    # a helper's finding (2026-12-07): a new folder opened in Finder was "not empty" to pretrain, embed, the
    # data builds, export and refine apply
    folder = tmp_path / "out"
    folder.mkdir()
    assert not atomic.holds_anything(folder)
    (folder / ".DS_Store").write_text("x")
    (folder / "Thumbs.db").write_text("x")
    (folder / ".mlsctl.lock").write_text("1")
    assert not atomic.holds_anything(folder, besides=(".mlsctl.lock",))
    assert atomic.holds_anything(folder)  # the lock, unless named
    (folder / ".mlsctl.lock").unlink()
    (folder / "desktop.ini").mkdir()  # a folder under a litter name: the user's
    assert atomic.holds_anything(folder)
    (folder / "desktop.ini").rmdir()
    (folder / "._photo.png").symlink_to(tmp_path)  # a link under a litter name: the user's
    assert atomic.holds_anything(folder)
