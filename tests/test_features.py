"""Feature shards: format, bad files, exact resume after a kill, damaged folders, model choice,
and two processes writing what one writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsctl import features as feats
from mlsctl.errors import Interrupted, UserError
from mlsctl.features import Features, Preprocessing, embed_folder

from conftest import cli, cli_env, in_process, kill_when, make_images, tiny_model
from test_images import write_bad_files


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def quiet(_line: str) -> None:
    pass


def stopped_at_call(real, n: int):
    """``real`` that raises KeyboardInterrupt (a Ctrl-C) instead of its ``n``-th call."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return wrapper


def test_shards_written_by_every_process_hold_what_one_shard_holds(tmp_path: Path, monkeypatch):
    """A scale review (2026-12-05): process 0 alone wrote every shard while the others waited in a
    barrier (minutes for ImageNet's dense features: past NCCL's timeout). Each process now writes
    shards rank, rank + W, ...: here one part per shard, written as process 1 and then 0 of 2 would."""
    images = make_images(tmp_path / "images", 21)
    write_bad_files(images)
    model = tiny_model()
    args = dict(dense=True, batch_size=2, part_size=4, dtype="fp32", say=quiet)
    embed_folder(images, tmp_path / "one", model, **args)
    write_shards = feats._write_shards
    monkeypatch.setattr(feats, "SHARD_BYTES", 1)
    monkeypatch.setattr(feats, "_write_shards", lambda out, layout, dense, part_path, rank, world: [
        write_shards(out, layout, dense, part_path, r, 2) for r in (1, 0)])
    embed_folder(images, tmp_path / "six", model, **args)
    one, six = (json.loads((tmp_path / f / "manifest.json").read_text()) for f in ("one", "six"))
    assert len(one["shards"]) == 1 and len(six["shards"]) == 6 and sum(s["rows"] for s in six["shards"]) == 21
    assert six["files"] == one["files"] and six["skipped"] == one["skipped"] and len(one["skipped"]) > 0
    a, b = shard_tensors(tmp_path / "one"), shard_tensors(tmp_path / "six")
    assert all(torch.equal(a[k], b[k]) for k in ("row", "global", "dense"))
    assert not (tmp_path / "six" / ".partial").exists()


def test_format_rows_and_values(tmp_path: Path):
    images = make_images(tmp_path / "images", 11)
    model = tiny_model()
    out = tmp_path / "feats"
    summary = embed_folder(images, out, model, dense=True, batch_size=2, part_size=4, dtype="fp32", say=quiet)
    assert summary.rows == 11 and not summary.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("format_version", "files", "skipped", "model", "preprocessing", "dtype", "normalization",
                "mlsctl_version", "shards", "input_root"):
        assert key in manifest, key
    assert manifest["model"]["fingerprint"] == model.fingerprint and len(model.fingerprint) == 64
    assert manifest["files"] == sorted(manifest["files"]) and len(manifest["files"]) == 11
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000-of-00001.safetensors"]
    tensors = shard_tensors(out)
    assert tensors["global"].shape == (11, 32) and tensors["dense"].shape == (11, 4, 4, 32)
    assert torch.equal(tensors["row"], torch.arange(11))
    # row r is files[r]: compare with a direct forward pass of that image
    from mlsctl.data.images import load_rgb

    reader = Features(out)
    row = 7
    pixels = Preprocessing(32)(load_rgb(reader.image_path(row)))[None]
    with torch.inference_mode():
        expected = model.backbone(pixels)
    assert torch.allclose(reader.global_features()[row], expected.cls[0], atol=1e-5)
    dense = torch.cat([d for _, d in reader.iter_dense([row])])
    assert torch.allclose(dense[0], expected.patches[0], atol=1e-5)
    rows, _ = next(reader.iter_dense([9, 2, 5]))
    assert rows.tolist() == [2, 5, 9]


def test_bad_files_are_skipped_with_reasons(tmp_path: Path):
    images = make_images(tmp_path / "images", 4)
    reasons = write_bad_files(images)
    (images / "readme.txt").write_text("notes about these photos\n")
    summary = embed_folder(images, tmp_path / "feats", tiny_model(), batch_size=2, say=quiet)
    manifest = json.loads((tmp_path / "feats" / "manifest.json").read_text())
    skipped = dict(map(tuple, manifest["skipped"]))
    assert {k: skipped[k] for k in reasons} == reasons
    assert skipped["readme.txt"] == "not an image file (extension .txt)"
    assert summary.rows == 4 and len(manifest["files"]) == 4 and not set(manifest["files"]) & set(skipped)
    assert shard_tensors(tmp_path / "feats")["global"].shape[0] == 4


def test_interrupted_embed_resumes_to_identical_tensors(tmp_path: Path, monkeypatch):
    images = make_images(tmp_path / "images", 13)
    write_bad_files(images)
    model = tiny_model()
    options = dict(dense=True, batch_size=2, part_size=4, say=quiet)
    embed_folder(images, tmp_path / "full", model, **options)

    real_write = feats._write_part
    monkeypatch.setattr(feats, "_write_part", stopped_at_call(real_write, 3))  # Ctrl-C as it writes its third part
    with pytest.raises(Interrupted, match="2 of 4 parts are saved"):
        embed_folder(images, tmp_path / "cut", model, **options)
    monkeypatch.setattr(feats, "_write_part", real_write)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(UserError, match="unfinished"):
        Features(tmp_path / "cut")
    resumed = embed_folder(images, tmp_path / "cut", model, **options)
    assert resumed.resumed_parts == 2
    a, b = shard_tensors(tmp_path / "full"), shard_tensors(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert full["files"] == cut["files"] and full["skipped"] == cut["skipped"]
    again = embed_folder(images, tmp_path / "cut", model, **options)
    assert again.reused


def test_overwrite_keeps_the_old_features_until_the_new_ones_are_complete(tmp_path: Path, monkeypatch):
    """A probe (2026-12-05) found `embed --overwrite` deleting the features, and a user's files in --out, as it
    started: Ctrl-C left nothing, and the command it said to run again began from zero (--overwrite cleared its
    saved parts). Now the old features stay readable until the new manifest replaces them, other files stay, and
    the same command continues."""
    images = make_images(tmp_path / "images", 13)
    options = dict(dense=True, batch_size=2, part_size=4, say=quiet)
    out = tmp_path / "feats"
    embed_folder(images, out, tiny_model(seed=0), **options)
    old = shard_tensors(out)
    (out / "notes.txt").write_text("the user's")
    embed_folder(images, tmp_path / "reference", tiny_model(seed=1), **options)

    real_write = feats._write_part
    monkeypatch.setattr(feats, "_write_part", stopped_at_call(real_write, 3))
    with pytest.raises(Interrupted, match="2 of 4 parts are saved.*run the same command again"):
        embed_folder(images, out, tiny_model(seed=1), overwrite=True, **options)
    monkeypatch.setattr(feats, "_write_part", real_write)
    kept = shard_tensors(out)  # the features are still the old ones, whole
    assert all(torch.equal(old[k], kept[k]) for k in old) and len(Features(out)) == 13

    real_save = feats.atomic.write_json

    def killed_at_commit(path, *args, **kwargs):  # every new shard written, then the manifest's commit fails
        if Path(path).name == "manifest.json":
            raise KeyboardInterrupt
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(feats.atomic, "write_json", killed_at_commit)
    with pytest.raises(Interrupted, match="4 of 4 parts are saved"):  # said since 2026-12-07, not a bare Ctrl-C
        embed_folder(images, out, tiny_model(seed=1), overwrite=True, **options)
    monkeypatch.setattr(feats.atomic, "write_json", real_save)
    kept = shard_tensors(out)
    assert all(torch.equal(old[k], kept[k]) for k in old)
    resumed = embed_folder(images, out, tiny_model(seed=1), overwrite=True, **options)  # the same command
    assert resumed.resumed_parts == 4
    new, reference = shard_tensors(out), shard_tensors(tmp_path / "reference")
    assert all(torch.equal(new[k], reference[k]) for k in reference)
    assert (out / "notes.txt").read_text() == "the user's"
    listed = {entry["file"] for entry in json.loads((out / "manifest.json").read_text())["shards"]}
    assert {p.name for p in out.glob("shard-*")} == listed and not (out / ".partial").exists()
    assert torch.equal(Features(out).global_features(), reference["global"].float())  # read like any folder


def test_each_shard_takes_the_place_of_its_parts_on_disk(tmp_path: Path, monkeypatch):
    """Noticed 2026-12-05: every part stayed in .partial/ until the manifest was written, so an embed took twice
    its features' size on disk at the end (hundreds of GB for dense features of a large set). Each shard's parts
    now go as soon as it is written."""
    images = make_images(tmp_path / "images", 13)
    write_bad_files(images)
    options = dict(dense=True, batch_size=2, part_size=4, say=quiet)
    monkeypatch.setattr(feats, "SHARD_BYTES", 1)  # one part a shard: 16 files, 4 parts, 4 shards
    parts_seen = []
    real_write_shard = feats.write_shard

    def watching(path, *args, **kwargs):
        parts_seen.append(sorted(p.name for p in (path.parent / ".partial").glob("part-*")))
        return real_write_shard(path, *args, **kwargs)

    monkeypatch.setattr(feats, "write_shard", watching)
    embed_folder(images, tmp_path / "feats", tiny_model(), **options)
    assert parts_seen == [[f"part-{k:05d}.safetensors" for k in range(s, 4)] for s in range(4)]


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_embed_stopped_while_it_assembles_its_shards_continues_without_embedding_again(tmp_path, monkeypatch,
                                                                                         overwrite):
    images = make_images(tmp_path / "images", 13)
    write_bad_files(images)
    options = dict(dense=True, batch_size=2, part_size=4, say=quiet)
    monkeypatch.setattr(feats, "SHARD_BYTES", 1)
    embed_folder(images, tmp_path / "reference", tiny_model(seed=1), **options)
    out = tmp_path / "feats"
    if overwrite:  # features of another model that must stay readable until the new ones are complete
        embed_folder(images, out, tiny_model(seed=0), **options)
        old = shard_tensors(out)
    real_write_shard = feats.write_shard
    monkeypatch.setattr(feats, "write_shard", stopped_at_call(real_write_shard, 3))
    with pytest.raises(Interrupted, match="4 of 4 parts are saved.*run the same command again"):
        embed_folder(images, out, tiny_model(seed=1), overwrite=overwrite, **options)
    monkeypatch.setattr(feats, "write_shard", real_write_shard)
    assert len(list((out / ".partial").glob("part-*"))) == 2 and len(list((out / ".partial").glob("shard-*"))) == 2
    if overwrite:
        kept = shard_tensors(out)
        assert all(torch.equal(old[k], kept[k]) for k in old)

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a part already embedded was embedded again")

    monkeypatch.setattr(feats, "_write_part", no_forward_pass)
    resumed = embed_folder(images, out, tiny_model(seed=1), overwrite=overwrite, **options)
    assert resumed.resumed_parts == 4
    new, reference = shard_tensors(out), shard_tensors(tmp_path / "reference")
    assert all(torch.equal(new[k], reference[k]) for k in reference)
    made, expected = (json.loads((f / "manifest.json").read_text()) for f in (out, tmp_path / "reference"))
    assert made["files"] == expected["files"] and made["skipped"] == expected["skipped"]
    assert {p.name for p in out.glob("shard-*")} == {s["file"] for s in made["shards"]}
    assert not (out / ".partial").exists()


def test_a_shard_removed_before_the_rerun_is_embedded_again(tmp_path: Path, monkeypatch):
    """A review (2026-12-06): a shard assembled before a stop and deleted afterwards (to free space) made every
    rerun fail with advice (--overwrite) that kept the same state. Its record is dropped as the rerun begins and
    its parts are embedded again."""
    images = make_images(tmp_path / "images", 16)
    options = dict(dense=False, batch_size=2, part_size=4, say=quiet)
    monkeypatch.setattr(feats, "SHARD_BYTES", 1)
    embed_folder(images, tmp_path / "reference", tiny_model(), **options)
    out = tmp_path / "feats"
    real_write_shard = feats.write_shard
    monkeypatch.setattr(feats, "write_shard", stopped_at_call(real_write_shard, 3))
    with pytest.raises(Interrupted):
        embed_folder(images, out, tiny_model(), **options)
    monkeypatch.setattr(feats, "write_shard", real_write_shard)
    record = json.loads((out / ".partial" / "shard-00001.json").read_text())
    (out / record["file"]).unlink()
    resumed = embed_folder(images, out, tiny_model(), **options)
    assert resumed.resumed_parts == 3  # parts 0, 2 and 3; part 1 embedded again
    new, reference = shard_tensors(out), shard_tensors(tmp_path / "reference")
    assert all(torch.equal(new[k], reference[k]) for k in reference)


def test_an_unfinished_embed_whose_images_changed_says_so(tmp_path: Path, monkeypatch):
    """A probe (2026-12-06): files removed during an embed that then stopped made the same command answer "holds
    an unfinished embed made differently (image count, image list); run the original command again" - the command
    just run. It now says the images changed and that only --overwrite begins again."""
    images = make_images(tmp_path / "images", 12)
    options = dict(batch_size=2, part_size=4, say=quiet)
    real_write = feats._write_part
    monkeypatch.setattr(feats, "_write_part", stopped_at_call(real_write, 2))
    with pytest.raises(Interrupted):
        embed_folder(images, tmp_path / "feats", tiny_model(), **options)
    monkeypatch.setattr(feats, "_write_part", real_write)
    next(images.rglob("*.png")).unlink()
    with pytest.raises(UserError, match=r"unfinished embed of another list of images \(12 then, 11 now: files were "
                                        r"added to or removed from .*add --overwrite to begin again"):
        embed_folder(images, tmp_path / "feats", tiny_model(), **options)
    done = embed_folder(images, tmp_path / "feats", tiny_model(), overwrite=True, **options)
    assert done.rows == 11


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_is_exact(tmp_path: Path, finished_run):
    run_dir, _ = finished_run
    images = make_images(tmp_path / "images", 60, size=(64, 64))
    args = ["embed", str(images), "--run", str(run_dir), "--dense", "--batch-size", "2", "--part-size", "4"]
    in_process(*args, "--out", str(tmp_path / "full"), check=True)
    killed = tmp_path / "killed"
    process = kill_when([*args, "--out", str(killed)],
                        lambda: len(list((killed / ".partial").glob("part-*.safetensors"))) >= 3)
    assert process.returncode == -signal.SIGKILL, "the embed finished before it could be killed"
    result = in_process(*args, "--out", str(killed), check=True)
    assert "resuming" in result.stderr
    a, b = shard_tensors(tmp_path / "full"), shard_tensors(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / ".partial").exists()


def test_a_folder_replaced_while_it_is_read_is_one_sentence(tmp_path: Path):
    """An evaluation reading a cache another command replaces (a concurrent eval knn-seg of another plan):
    a shard gone was a raw FileNotFoundError; one rewritten under its name was read as if nothing happened."""
    import os
    import shutil

    from conftest import write_feature_folder

    files = [f"c{i % 2}/{i}.png" for i in range(6)]
    out = write_feature_folder(tmp_path / "feats", files, torch.randn(6, 8))
    features = Features(out)
    assert features.global_features().shape == (6, 8)
    shard = features.shards[0].path
    rewritten = tmp_path / "rewritten"
    write_feature_folder(rewritten, files, torch.randn(6, 8))
    os.replace(rewritten / shard.name, shard)  # the same name, another file
    with pytest.raises(UserError, match="changed while it was read .* run the command again"):
        features.global_features()
    shutil.rmtree(out)
    with pytest.raises(UserError, match="changed while it was read"):
        features.global_features([0, 1])
    assert Features(write_feature_folder(out, files, torch.randn(6, 8))).global_features().shape == (6, 8)


def test_damaged_or_foreign_folders_are_clear_errors(tmp_path: Path):
    images = make_images(tmp_path / "images", 5)
    out = tmp_path / "feats"
    embed_folder(images, out, tiny_model(), say=quiet)
    with pytest.raises(UserError, match="no manifest.json"):
        Features(images)
    with pytest.raises(UserError, match="does not exist"):
        Features(tmp_path / "nowhere")
    # a new-user probe (2026-12-05): a file, even the folder's own manifest, "did not exist"
    with pytest.raises(UserError, match=f"manifest.json is a file, not a feature folder; give the folder {out} that"):
        Features(out / "manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    twice = dict(manifest, files=[manifest["files"][0], *manifest["files"][:-1]])  # a probe (2026-12-06)
    (out / "manifest.json").write_text(json.dumps(twice))
    with pytest.raises(UserError, match=f"'files' lists {manifest['files'][0]} twice"):
        Features(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    shard = out / manifest["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is damaged"):
        Features(out)
    import safetensors

    def silent_failure(*args, **kwargs):
        raise safetensors.SafetensorError()  # a library exception without a message still makes one sentence

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safetensors, "safe_open", silent_failure)
        with pytest.raises(UserError, match=r"is damaged \(SafetensorError\); embed the folder again"):
            Features(out)
    shard.unlink()
    with pytest.raises(UserError, match="is missing"):
        Features(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is damaged"):
        Features(out)
    (out / "manifest.json").write_text(json.dumps({"files": []}))
    with pytest.raises(UserError, match="not an mlsctl feature manifest"):
        Features(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserError, match="newer"):
        Features(out)


def test_out_rules(tmp_path: Path):
    images = make_images(tmp_path / "images", 5)
    out = tmp_path / "feats"
    embed_folder(images, out, tiny_model(seed=0), say=quiet)
    with pytest.raises(UserError, match="made differently \\(model\\)"):
        embed_folder(images, out, tiny_model(seed=1), say=quiet)
    embed_folder(images, out, tiny_model(seed=1), overwrite=True, say=quiet)
    assert Features(out).model["fingerprint"] == tiny_model(seed=1).fingerprint
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite replaces feature folders only
        with pytest.raises(UserError, match="not a feature folder"):
            embed_folder(images, other, tiny_model(), overwrite=overwrite, say=quiet)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="multiple of the model's patch size"):
        embed_folder(images, tmp_path / "x", tiny_model(), resolution=30, say=quiet)
    # a new-user probe (2026-12-05): --resolution 4096 on a patch-8 model ran 9.5 minutes in 5 GB, unfinished
    patch = tiny_model().backbone.patch_size
    with pytest.raises(UserError, match=f"gives {(4096 // patch) ** 2:,} patches an image"):
        embed_folder(images, tmp_path / "x", tiny_model(), resolution=4096 // patch * patch, say=quiet)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_model_choice(tmp_path: Path, finished_run, capsys):
    run_dir, _ = finished_run
    images = make_images(tmp_path / "images", 4)
    code, _, err = cli("embed", str(images), cwd=tmp_path, capsys=capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: no model given") and "Traceback" not in err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(run_dir)
    code, _, err = cli("embed", str(images), cwd=tmp_path, capsys=capsys)
    assert code == 0 and "model: teacher of run runs/tiny" in err
    assert "(the newest run under runs/: no --run or --weights given)" in err  # said (a new user's probe, 2026-12-06)
    default_folder = next((tmp_path / "features").glob(f"tiny-*/{feats.folder_label(images)}-global"))
    assert (default_folder / "manifest.json").is_file()
    code, out, _ = cli("embed", str(images), "--weights", str(run_dir / "teacher.safetensors"), "--out",
                       str(tmp_path / "w"), "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["model"]["fingerprint"] == Features(default_folder).model["fingerprint"]
    code, _, err = cli("embed", str(images), "--run", str(run_dir), "--random-init", "--out", str(tmp_path / "r"),
                       capsys=capsys)
    assert code == 0 and "randomly initialised" in err
    assert Features(tmp_path / "r").model["fingerprint"] != Features(tmp_path / "w").model["fingerprint"]


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path: Path, finished_run):
    run_dir, _ = finished_run
    images = make_images(tmp_path / "images", 21)
    write_bad_files(images)
    args = ["embed", str(images), "--run", str(run_dir), "--dense", "--batch-size", "2", "--part-size", "4"]
    in_process(*args, "--out", str(tmp_path / "one"), check=True)
    accelerate = Path(sys.executable).parent / "accelerate"
    two = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "-m", "mlsctl", *args, "--out",
                          str(tmp_path / "two")], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "starting 2 processes" in two.stderr
    a, b = shard_tensors(tmp_path / "one"), shard_tensors(tmp_path / "two")
    assert torch.equal(a["row"], b["row"])
    assert torch.allclose(a["global"].float(), b["global"].float(), atol=1e-3)
    assert torch.allclose(a["dense"].float(), b["dense"].float(), atol=1e-3)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    both = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["files"] == both["files"] and one["skipped"] == both["skipped"]


def test_a_folder_of_unreadable_images_is_an_error_for_embed_and_for_every_evaluation(tmp_path, finished_run, capsys):
    """A probe (2026-12-05): embed wrote 0 rows and exited 0, and eval knn then died on an internal error."""
    from conftest import cli

    run_dir, _ = finished_run
    write_bad_files(tmp_path / "bad")
    code, out, err = cli("embed", str(tmp_path / "bad"), "--run", str(run_dir), "--out", str(tmp_path / "f"), capsys=capsys)
    assert code == 1 and "wrote 0 rows" in out and "could be read as an image" in err and "Traceback" not in err
    good = make_images(tmp_path / "good", 4)
    code, _, err = cli("embed", str(good), "--run", str(run_dir), "--out", str(good / "feats"), capsys=capsys)
    assert code == 2 and "inside the images folder" in err and not (good / "feats").exists()  # later embeds'd list it
    code, _, err = cli("embed", str(good), "--run", str(run_dir), "--out", str(tmp_path / "g"), capsys=capsys)
    assert code == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{p.name},{'ab'[i % 2]}\n" for i, p in enumerate(sorted(good.iterdir()))))
    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "f"), "--val", str(tmp_path / "g"), "--train-labels",
                       str(labels), "--val-labels", str(labels), capsys=capsys)
    assert code == 2 and "hold no rows" in err and "internal error" not in err
    code, _, err = cli("eval", "recall", str(tmp_path / "f"), capsys=capsys)
    assert code == 2 and "hold no rows" in err


def test_features_prepared_differently_are_not_compared(tmp_path: Path):
    """A new-user probe (2026-12-05): eval knn scored 64 px square train features against 32 px centre-crop
    val features without a word, where a different model is refused."""
    from mlsctl.evaluate.knn import evaluate_knn

    images = make_images(tmp_path / "images", 6)
    model = tiny_model()
    embed_folder(images, tmp_path / "a", model, say=quiet)
    embed_folder(images, tmp_path / "b", model, resolution=48, resize="center-crop", say=quiet)
    embed_folder(images, tmp_path / "c", model, say=quiet)
    a, b, c = Features(tmp_path / "a"), Features(tmp_path / "b"), Features(tmp_path / "c")
    a.check_same_model(c)
    with pytest.raises(UserError, match=r"different preprocessing \(resize square vs center-crop, resolution \d+ vs 48\)"):
        evaluate_knn(a, b, None, None, [1], 0.07)


def test_global_features_come_in_the_order_asked(tmp_path: Path):
    """An API probe (2026-12-05): global_features(rows=[5, 2]) returned rows 2 and 5, sorted, so a caller indexing
    the result by its own list read the wrong rows."""
    images = make_images(tmp_path / "images", 9)
    embed_folder(images, tmp_path / "f", tiny_model(), part_size=4, batch_size=2, say=quiet)  # rows in 3 shards
    features = Features(tmp_path / "f")
    every = features.global_features()
    for rows in ([5, 2], [8, 0, 8, 3], [], [4]):
        assert torch.equal(features.global_features(rows), every[rows] if rows else every[:0])
    with pytest.raises(ValueError, match="batch of 1 or more"):
        next(features.iter_dense(batch=0))


def test_embed_decodes_in_workers_by_default_for_large_folders(monkeypatch):
    """A scale review (2026-12-05): embed (and every evaluation that embeds) decoded ImageNet in the
    main process by default, at least an hour while the GPU idled."""
    import mlsctl.data.loader as loader

    monkeypatch.setattr(feats.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(loader, "usable_cores", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert feats.default_workers(999) == 0 and feats.default_workers(1000) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes of this node share its 64 cores (a review: the global
    assert feats.default_workers(1_281_167) == 7  # world size divided them, 1 worker a process on 4 nodes)
    monkeypatch.setattr(loader, "usable_cores", lambda: 4)  # pinned to 4 cores (srun --cpus-per-task=4): its own share
    assert feats.default_workers(1_281_167) == 3
    monkeypatch.setattr(loader, "usable_cores", lambda: 1)
    assert feats.default_workers(1_281_167) == 0


def test_embed_max_image_pixels_is_the_limit_images_are_decoded_under(tmp_path: Path):
    """A review (2026-12-05): --max-image-pixels only raised Pillow's global limit, and each image
    was still checked against the default one, so a lower limit refused nothing."""
    from PIL import Image

    images = make_images(tmp_path / "images", 3)  # 48 x 40 = 1,920 pixels each
    Image.new("RGB", (8, 8)).save(images / "small.png")
    summary = embed_folder(images, tmp_path / "f", tiny_model(), max_image_pixels=100, say=quiet)
    assert summary.rows == 1 and len(summary.skipped) == 3
    assert all("more than 100 pixels" in reason for _, reason in summary.skipped)


def test_images_changed_under_the_same_names_are_not_taken_as_embedded(tmp_path: Path, monkeypatch):
    """A probe (2026-12-06): after the images of a folder were generated again under the same names, embed said
    "already holds these features ... nothing to do", and eval knn reused its cached features (top-1 6.67 % where
    the new images give 15 %). Each image's size and modification time are now part of what a folder was made of."""
    import os

    from PIL import Image

    images = make_images(tmp_path / "images", 6)
    options = dict(batch_size=2, part_size=2, say=quiet)
    out = tmp_path / "feats"
    embed_folder(images, out, tiny_model(), **options)
    assert embed_folder(images, out, tiny_model(), **options).reused
    changed = sorted(images.rglob("*.png"))[2]
    Image.new("RGB", (48, 40), (250, 0, 250)).save(changed)
    os.utime(changed, ns=(10**18, 10**18))  # a new time, whatever the file system's resolution
    with pytest.raises(UserError, match=r"already holds features made differently \(image sizes or modification times\); add --overwrite"):
        embed_folder(images, out, tiny_model(), **options)
    row = Features(out).files.index(changed.relative_to(images).as_posix())
    before = Features(out).global_features()[row]
    embed_folder(images, out, tiny_model(), overwrite=True, **options)
    assert not torch.equal(Features(out).global_features()[row], before)

    # an evaluation's cache is embedded again, not refused and not reused
    lines = []
    cached = feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features",
                                     say=lines.append, batch_size=2)
    assert "embedded 6 images" in lines[-1]
    feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append,
                            batch_size=2)
    assert "already in" in lines[-1]
    os.utime(changed, ns=(2 * 10**18, 2 * 10**18))
    feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append,
                            batch_size=2)
    assert "embedded 6 images" in lines[-1] and Features(cached.path).manifest["plan"]["contents_sha256"]

    # a folder embedded before sizes and times were recorded is still taken as it is
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["plan"]["contents_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert embed_folder(images, out, tiny_model(), **options).reused

    # an unfinished embed whose images changed since it began
    unfinished = tmp_path / "unfinished"
    monkeypatch.setattr(feats, "_write_part", stopped_at_call(feats._write_part, 2))
    with pytest.raises(Interrupted):
        embed_folder(images, unfinished, tiny_model(), **options)
    monkeypatch.undo()
    os.utime(changed, ns=(3 * 10**18, 3 * 10**18))
    with pytest.raises(UserError, match="unfinished embed of images that changed since it began"):
        embed_folder(images, unfinished, tiny_model(), **options)


def test_embed_counts_unreadable_images_apart_from_other_files(tmp_path: Path, finished_run, capsys):
    """A new-user probe (2026-12-06): "embedding 23 images" ended "wrote 20 rows, 4 skipped", a README among them."""
    run_dir, _ = finished_run
    images = make_images(tmp_path / "images", 4)
    write_bad_files(images)
    (images / "README.txt").write_text("about these images")
    (images / "bad\nname.png").write_bytes((images / sorted(p.name for p in images.glob("*.png"))[0]).read_bytes())
    code, out, err = cli("embed", str(images), "--run", str(run_dir), "--out", str(tmp_path / "f"), capsys=capsys)
    assert err.count("skipped bad\\nname.png") == 1  # said when the scan finds it, not again at the end (2026-12-06)
    assert code == 0 and "embedding 7 images" in err
    assert "wrote 4 rows, 4 images skipped and 1 other file left out (listed in manifest.json)" in out, out


def test_each_resolution_an_evaluation_embeds_at_has_a_cache_folder_of_its_own():
    """A review (2026-12-06): knn-seg's hummingbird protocol (512 px) and linear-seg (the model's size) shared one
    cache folder; with caches embedded again when made otherwise, each would have replaced the other's."""
    from types import SimpleNamespace

    model = SimpleNamespace(info={"source": "weights", "path": "/w/b.safetensors", "arch": "vit", "img_size": 96,
                                  "fingerprint": "a" * 64}, fingerprint="a" * 64)
    base = feats.cache_dir("/data/x", model)
    assert feats.cache_dir("/data/x", model, resolution=96) == base
    assert feats.cache_dir("/data/x", model, resolution=512) == base.with_name(base.name + "-r512")


def test_a_log_gets_a_progress_line_every_half_minute():
    """A new-user probe (2026-12-06): with stderr in a log file, embed said nothing for 69 s between its first
    and last lines."""
    from mlsctl.console import LogProgress

    now, lines = [0.0], []
    progress = LogProgress(1000, "embed", every=30.0, say=lines.append, clock=lambda: now[0])
    for _ in range(9):
        now[0] += 10.0
        progress.update(100)
    assert lines == ["embed: 300 of 1,000 images, 10/s, about 70 s left",
                     "embed: 600 of 1,000 images, 10/s, about 40 s left",
                     "embed: 900 of 1,000 images, 10/s, about 10 s left"]
    progress.update(100)  # done: the command's own last line says so
    assert len(lines) == 3


def test_a_cache_from_before_sizes_and_times_were_recorded_is_embedded_once_more(tmp_path: Path):
    """A probe (2026-12-06): an evaluation's cache written by an earlier mlsctl (no contents digest) kept serving
    images changed since; `embed` itself still takes such a folder as it is."""
    images = make_images(tmp_path / "images", 4)
    lines = []
    cached = feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features",
                                     say=lines.append, batch_size=2)
    manifest = json.loads((cached.path / "manifest.json").read_text())
    del manifest["plan"]["contents_sha256"]
    (cached.path / "manifest.json").write_text(json.dumps(manifest))
    feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append,
                            batch_size=2)
    assert "embedded 4 images" in lines[-1]
    feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append,
                            batch_size=2)
    assert "already in" in lines[-1]


def test_progress_lines_read_well_at_any_speed():
    from mlsctl.console import LogProgress

    now, lines = [0.0], []
    slow = LogProgress(100_000, "embed", every=30.0, say=lines.append, clock=lambda: now[0])
    now[0] = 10.0
    slow.update(13)
    now[0] = 40.0
    slow.update(39)
    assert lines == ["embed: 52 of 100,000 images, 1.3/s, about 21.4 h left"]


def test_progress_estimates_leave_the_start_up_out():
    """A new user's run-through (2026-12-06): knn-seg's first line, a minute into building its memory, said
    far more time left than the run took; the rate now runs from the first update."""
    from mlsctl.console import LogProgress

    now, lines = [0.0], []
    progress = LogProgress(10_000, "knn-seg", every=30.0, say=lines.append, clock=lambda: now[0])
    now[0] = 60.0  # start-up, then 100 images a second
    progress.update(100)
    assert lines == ["knn-seg: 100 of 10,000 images so far"]  # one update: no rate to estimate from yet
    for _ in range(30):
        now[0] += 1.0
        progress.update(100)
    assert lines[1:] == ["knn-seg: 3,100 of 10,000 images, 100/s, about 69 s left"]
    lone, said = LogProgress(10, "x", every=30.0, say=lines.append, clock=lambda: now[0]), len(lines)
    now[0] += 61.0
    lone.update(1)  # a single huge batch still shows life after two intervals
    assert lines[said:] == ["x: 1 of 10 images so far"]


def test_global_features_are_read_from_a_complete_dense_cache_of_the_same_images(tmp_path: Path):
    """eval knn after eval knn-seg on one folder embedded it a second time for its global features."""
    import os

    images = make_images(tmp_path / "images", 4)
    lines = []
    dense = feats.features_or_embed(images, lambda: tiny_model(), dense=True, what="train features", say=lines.append)
    found = feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append)
    assert found.path == dense.path and f"already in {dense.path}" in lines[-1]
    assert not dense.path.with_name(dense.path.name + "-global").exists()
    assert torch.equal(found.global_features(), dense.global_features())
    # another precision asked: a folder of its own (-fp32), never the float16 one replaced (a new user, 2026-12-06)
    other = feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append,
                                    dtype="fp32")
    assert other.path == dense.path.with_name(dense.path.name + "-global-fp32") and other.dtype == "float32"
    # made otherwise (an image changed since): global features of their own, the dense cache untouched
    changed = sorted(images.rglob("*.png"))[0]
    os.utime(changed, ns=(10**18, 10**18))
    again = feats.features_or_embed(images, lambda: tiny_model(), dense=False, what="train features", say=lines.append)
    assert again.path == dense.path.with_name(dense.path.name + "-global") and "embedded 4 images" in lines[-1]
    # the dense cache itself, asked for again: replaced, and said why (a new user, 2026-12-06: without a word)
    feats.features_or_embed(images, lambda: tiny_model(), dense=True, what="train features", say=lines.append)
    assert f"{dense.path}: the features there were made otherwise (image sizes or modification times); embedding again" \
        in lines and "embedded 4 images" in lines[-1]
    assert (dense.path / "manifest.json").is_file()


def test_a_run_folder_given_as_features_says_to_embed_with_it(tmp_path):
    """A new user (2026-12-06): `eval recall runs/x` and `viz pca runs/x` said only "is not a feature folder"."""
    from mlsctl.data.shards import Features
    from mlsctl.errors import UserError

    (tmp_path / "config.yaml").write_text("method: {name: dino}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match=rf"features {tmp_path} is a run folder, not a feature folder; embed images "
                                        rf"with it first: mlsctl embed IMAGES --run {tmp_path}$"):
        Features(tmp_path, "features")


def test_embed_files_embeds_the_images_a_split_file_lists_and_no_others(tmp_path: Path, finished_run, capsys):
    """A new user's probe (2026-12-07): CUB's and In-shop's splits are files, not folders, and nothing
    embedded part of a folder (a folder of links was the way round, and no doc said it)."""
    run_dir, _ = finished_run
    images = make_images(tmp_path / "images", 6)  # img_000, img_003 in sub/
    (images / "notes.txt").write_text("not listed, not said")
    split = tmp_path / "train.csv"  # a labels file serves: paths relative to the images, or to its own folder
    split.write_text("path,label\nimg_001.png,a\nimages/sub/img_003.png,b\n./img_004.png,a\n")
    code, out, err = cli("embed", str(images), "--run", str(run_dir), "--files", str(split), "--out",
                         str(tmp_path / "f"), "--json", capsys=capsys)
    assert code == 0, err
    assert Features(tmp_path / "f", "f").files == ["img_001.png", "img_004.png", "sub/img_003.png"]
    assert "notes.txt" not in err + out
    whole = tmp_path / "whole"  # the same images embedded with the whole folder: the same rows
    assert cli("embed", str(images), "--run", str(run_dir), "--out", str(whole), capsys=capsys)[0] == 0
    part, every = Features(tmp_path / "f", "f"), Features(whole, "w")
    rows = [every.files.index(f) for f in part.files]
    assert torch.equal(part.global_features(), every.global_features()[rows])
    (tmp_path / "list.txt").write_text("img_001.png\nmissing.png\nsub/nope.png\n")  # find's output: one a line
    code, _, err = cli("embed", str(images), "--run", str(run_dir), "--files", str(tmp_path / "list.txt"), "--out",
                       str(tmp_path / "g"), capsys=capsys)
    assert code == 2 and ("--files " + str(tmp_path / "list.txt") + " lists 2 paths that are no image under "
                          f"{images} (first: missing.png)") in err
    code, _, err = cli("embed", str(images), "--run", str(run_dir), "--files", str(split), capsys=capsys)
    assert code == 2 and "give the features their own --out" in err
    (tmp_path / "twice.txt").write_text("img_001.png\nimg_001.png\n")
    code, _, err = cli("embed", str(images), "--run", str(run_dir), "--files", str(tmp_path / "twice.txt"), "--out",
                       str(tmp_path / "h"), capsys=capsys)
    assert code == 2 and "twice.txt:2 lists img_001.png again (first on line 1)" in err


def test_a_shard_whose_row_column_is_not_its_rows_in_order_is_named_as_damaged(tmp_path, capsys):
    """A new user's probe (2026-12-08): a shard's rows reversed together with its row column (a tampered or buggy
    writer) made eval knn score 33 % instead of 100 % without a word; the row column was never read."""
    from safetensors.torch import load_file, save_file

    from conftest import write_feature_folder

    files = [f"{c}/{i}.png" for i, c in enumerate("aabbcc")]
    x = torch.eye(3)[torch.tensor([0, 0, 1, 1, 2, 2])] + 0.01 * torch.randn(6, 3)
    folder = write_feature_folder(tmp_path / "f", files, x)
    assert len(Features(folder)) == 6
    shard = folder / "shard-00000-of-00001.safetensors"
    tensors = load_file(str(shard))
    save_file({k: v.flip(0).contiguous() for k, v in tensors.items()}, str(shard))
    with pytest.raises(UserError, match=r"^feature folder .* is damaged: shard-00000-of-00001.safetensors's row "
                                        r"column is not the rows 0 to 5 in order \(position 0 holds row 5\)"):
        Features(folder)
    code, _, err = cli("eval", "knn", "--train", str(folder), "--val", str(folder), capsys=capsys)
    assert code == 2 and "row column is not the rows 0 to 5 in order" in err and "Traceback" not in err, err
    # a second shard numbered from 0, as if it were the first
    manifest = json.loads((folder / "manifest.json").read_text())
    for i, part in enumerate((slice(0, 4), slice(4, 6))):
        save_file({"global": x[part].half().contiguous(), "row": torch.arange(part.stop - part.start)},
                  str(folder / f"shard-0000{i}-of-00002.safetensors"))
    shard.unlink()
    manifest["shards"] = [{"file": "shard-00000-of-00002.safetensors", "rows": 4},
                          {"file": "shard-00001-of-00002.safetensors", "rows": 2}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shard-00001-of-00002.safetensors's row column is not the rows 4 to 5"):
        Features(folder)
    save_file({"global": x[4:].half().contiguous(), "row": torch.arange(4, 6)},
              str(folder / "shard-00001-of-00002.safetensors"))
    assert len(Features(folder)) == 6


def test_a_raised_max_image_pixels_is_another_plan_where_it_admits_more(tmp_path: Path):
    """A new user's probe (2026-12-08): embed again with a raised --max-image-pixels (as the skip message advises)
    said "nothing to do" and the image stayed skipped; eval knn reused such a cache without a word."""
    from PIL import Image

    images = make_images(tmp_path / "images", 3)  # 48 x 40 = 1,920 pixels each
    Image.new("RGB", (8, 8)).save(images / "small.png")
    out = tmp_path / "f"
    assert embed_folder(images, out, tiny_model(), max_image_pixels=100, say=quiet).rows == 1
    with pytest.raises(UserError, match=r"made differently \(--max-image-pixels, 100 then\); add --overwrite"):
        embed_folder(images, out, tiny_model(), say=quiet)
    assert embed_folder(images, out, tiny_model(), overwrite=True, say=quiet).rows == 4
    assert embed_folder(images, out, tiny_model(), say=quiet).reused

    # an evaluation's cache: one of a lower limit is embedded again, and said; one of a higher limit serves
    lines = []
    cached = feats.features_or_embed(images, tiny_model, dense=False, what="train features", say=lines.append,
                                     max_image_pixels=100)
    assert len(cached.files) == 1
    cached = feats.features_or_embed(images, tiny_model, dense=False, what="train features", say=lines.append)
    assert len(cached.files) == 4
    assert any("made otherwise (--max-image-pixels, 100 then); embedding again" in line for line in lines)
    cached = feats.features_or_embed(images, tiny_model, dense=False, what="train features", say=lines.append,
                                     max_image_pixels=10**9)
    assert len(cached.files) == 4 and "embedded" in lines[-1]
    cached = feats.features_or_embed(images, tiny_model, dense=False, what="train features", say=lines.append)
    assert len(cached.files) == 4 and "already in" in lines[-1]


def test_a_hand_edited_pixel_limit_in_a_plan_is_made_otherwise_not_a_type_error():
    """A review (2026-12-08): an evaluation compared the folder's and its own --max-image-pixels with `<`; a plan
    edited by hand to text ended in an internal TypeError. Such a plan is made otherwise."""
    from mlsctl.features import _differs

    key = "max_image_pixels"
    assert _differs({key: "many"}, {key: 5}, key, reading=True)
    assert not _differs({key: 10}, {key: 5}, key, reading=True) and _differs({key: 1}, {key: 5}, key, reading=True)
    assert not _differs({}, {key: 5}, key, reading=True)  # recorded before the limit was: the same
