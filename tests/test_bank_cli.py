"""`mlsctl bank inspect | neighbors | plot | export` on a real tiny run and on hand-built banks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import cli, in_process
from mlsctl.bank import Column, MemoryBank, QueryFeature, save_banks


def test_inspect_reports_every_field_of_the_dino_monitor_bank(finished_run):
    run, _ = finished_run
    result = in_process("bank", "inspect", str(run), "--json", check=True)
    report = json.loads(result.stdout)
    cls = report["banks"]["cls"]
    # 8 steps x batch 4 = 32 entries into 20 slots
    assert (report["step"], cls["size"], cls["filled"], cls["n_written"], cls["ptr"]) == (8, 20, 20, 32, 12)
    assert (cls["age_min"], cls["age_max"]) == (1, 5)  # written at steps 3..7, read at step 8
    for key in ("dtype", "norm_min", "norm_mean", "norm_max", "mean_cosine", "effective_rank", "uniformity",
                "near_duplicates", "duplicate_rate", "collapsed"):
        assert key in cls, key
    table = in_process("bank", "inspect", str(run), check=True).stdout
    for line in ("fill", "write pointer", "age min / median / max", "mean pairwise cosine", "effective rank",
                 "uniformity", "near-duplicates", "status"):
        assert line in table, line


def test_inspect_counts_what_training_wrote_into_a_prefilled_queue(finished_run, tmp_path, capsys):
    """An MLS-like queue of 1024 random entries after 48 writes: fill from the written slots, the
    indicators over them alone (here a third near-duplicates: partial collapse)."""
    from mlsctl.runs import Run

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    queue = MemoryBank(1024, 64, {"image_id": Column()}, init="random_unit", generator=torch.Generator().manual_seed(0))
    written = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    written[32:] = written[:16]
    for step in range(3):
        queue.enqueue(written[16 * step:16 * (step + 1)], step=step, gather=False, image_id=torch.arange(16))
    save_banks({"Q_g": queue}, Run(run_dir).latest().banks_path)
    code, out, err = cli("bank", "inspect", str(run_dir), "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(out)["banks"]["Q_g"]
    assert (report["filled"], report["written"], report["fill"], report["n_written"]) == (1024, 48, 48 / 1024, 48)
    assert report["status"] == "partial collapse" and report["duplicate_rate"] == pytest.approx(1 / 3)
    assert report["payload"] == {"step": [], "image_id": []} and report["query_feature"] is None  # the table's rows too
    code, out, err = cli("bank", "inspect", str(run_dir), capsys=capsys)
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "4.7% (48/1024) written by training; 976 slots still hold the random start" in rows["fill"]
    assert "PARTIAL COLLAPSE: near-duplicates 33.3% >= 10%" in rows["status"]


def test_training_logs_bank_health(finished_run):
    run, _ = finished_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    healthy = [r for r in records if "bank/cls/effective_rank" in r]
    assert [r["step"] for r in healthy] == [4, 8]  # train.bank_health_every: 4
    from mlsctl.bank import load_banks
    from mlsctl.bank_health import bank_health
    from mlsctl.runs import Run

    # the step-8 record is the bank of the step-8 checkpoint, measured as the trainer measures (1,024 sampled)
    checkpoint = next(c for c in Run(run).checkpoints() if c.step == 8)
    expected = bank_health(load_banks(checkpoint.banks_path)["cls"], "cls", 8, sample=1024,
                           duplicates_on_sample=True).metrics()
    assert {k: healthy[-1][k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert 1 < healthy[-1]["bank/cls/effective_rank"] < 20 and healthy[-1]["bank/cls/fill"] == 1.0
    assert len((run / "images.txt").read_text().splitlines()) == 16


def test_bad_run_and_step_get_one_line(finished_run, tmp_path):
    run, _ = finished_run
    result = in_process("bank", "inspect", str(tmp_path))
    assert result.returncode == 2 and "not a run folder" in result.stderr and "Traceback" not in result.stderr
    result = in_process("bank", "inspect", str(run), "--step", "5")
    assert result.returncode == 2 and "no checkpoint at step 5" in result.stderr and "Traceback" not in result.stderr
    # a new user (2026-12-06): an incomplete checkpoint was to be deleted, the only resume point of the run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    steps = [int(p.name.split("-")[1]) for p in sorted((copy / "checkpoints").iterdir())]
    (copy / "checkpoints" / f"step-{steps[-1]:08d}" / "banks.safetensors").unlink()
    result = in_process("bank", "inspect", str(copy))
    assert result.returncode == 2 and "delete" not in result.stderr, result.stderr
    assert (f"has no banks.safetensors (it is incomplete); look at another with --step ({steps[-2]})" in result.stderr
            if len(steps) > 1 else "keeps no other checkpoint" in result.stderr)
    result = in_process("bank", "inspect", str(copy / "config.yaml"))
    assert result.returncode == 2 and f"is the run's config.yaml; give its folder {copy}" in result.stderr


@pytest.fixture
def planted_run(finished_run, tmp_path):
    """A copy of the tiny run whose latest checkpoint holds a hand-built bank: entries 0-3 are the
    exact query embeddings of training images 0-3 (with known boxes and regions), entry 4 points
    to an image that is gone, entry 5 is noise."""
    from mlsctl import config as config_lib
    from mlsctl.bank_inspect import SourceImages, embed_query
    from mlsctl.data.images import load_rgb
    from mlsctl.restore import from_checkpoint
    from mlsctl.runs import Run

    source, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    run = Run(run_dir)
    lines = run.images_path.read_text().splitlines()
    lines[4] = "gone.png"
    run.images_path.write_text("\n".join(lines) + "\n")
    recipe = config_lib.load_recipe(str(run.config_path))
    model = from_checkpoint(recipe, run.latest(), run)
    sources = SourceImages(run)
    images = [load_rgb(sources.path(i)) for i in range(4)]
    probe = MemoryBank(1, model.backbone.embed_dim, query_feature=QueryFeature("cls"))
    vectors = embed_query(model, probe, images, recipe.data.global_crops.size)
    bank = MemoryBank(8, vectors.shape[1], {"image_id": Column(), "box": Column((4,), torch.float32),
                                            "region": Column((4,), torch.float32), "label": Column()},
                      query_feature=QueryFeature("cls"))
    boxes = torch.tensor([[0.0, 0.0, 48.0, 40.0], [8.0, 4.0, 40.0, 36.0], [0.0, 0.0, 24.0, 20.0],
                          [24.0, 20.0, 48.0, 40.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 48.0, 40.0]])
    regions = boxes.clone()
    regions[1] = torch.tensor([16.0, 12.0, 32.0, 28.0])
    noise = torch.randn(1, vectors.shape[1], generator=torch.Generator().manual_seed(0))
    bank.enqueue(torch.cat([vectors, 0.9 * vectors[1:2] + 0.1 * noise, noise]), step=7, gather=False,
                 image_id=torch.tensor([0, 1, 2, 3, 4, 5]), box=boxes, region=regions,
                 label=torch.tensor([0, 1, 1, 2, 2, 2]))
    save_banks({"planted": bank}, run.latest().banks_path)
    return run_dir, sources, images, boxes, regions


def test_neighbors_draws_the_right_crops_and_blanks_missing_images(planted_run, tmp_path):
    from mlsctl.bank_inspect import crop_tile

    run, sources, images, boxes, regions = planted_run
    out = tmp_path / "grid.png"
    result = in_process("bank", "neighbors", str(run), "--query", str(sources.path(1)), "-k", "3", "--out", str(out),
                        "--cell", "64", "--json", check=True)
    report = json.loads(result.stdout)
    found = report["neighbours"]
    assert found[0]["image_id"] == 1 and found[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert found[0]["image"] == str(sources.path(1)) and found[0]["box"] == boxes[1].tolist()
    assert found[1]["image_id"] == 4 and found[1]["image"].endswith("gone.png")  # 0.9 x the query + noise
    assert "1 source image missing, drawn blank" in result.stderr
    # what the table shows, for scripts too (a probe, 2026-12-07): the drawn column, and steps as metrics.jsonl's
    assert report["missing"] == 1 and [n["drawn"] for n in found] == [True, False, True][:len(found)]
    assert all(n["written_in_step"] == n["step"] + 1 for n in found)
    grid = Image.open(out).convert("RGB")
    # layout of mlsctl.viz.neighbour_grid: gap 8, title band 18, query first, then the neighbours
    cell, gap, top = 64, 8, 18
    first = grid.crop((gap + cell + gap, top, gap + cell + gap + cell, top + cell))
    expected = crop_tile(images[1], boxes[1].tolist(), regions[1].tolist(), cell)
    assert list(first.getdata()) == list(expected.getdata())
    blank = grid.crop((gap + 2 * (cell + gap), top, gap + 2 * (cell + gap) + cell, top + cell))
    assert blank.getpixel((2, 2)) == (205, 205, 205)
    # a new-user probe (2026-12-05): the table showed the file name alone, and object folders repeat names
    table = in_process("bank", "neighbors", str(run), "--query", str(sources.path(1)), "-k", "3", "--out", str(out),
                       check=True).stdout
    relative = sources.path(1).relative_to(sources.root).as_posix()
    assert f" {relative} " in table and f"image (in {sources.root})" in table


def test_neighbors_says_the_query_is_embedded_at_the_global_crop_size_of_the_bank_s_entries(planted_run, tmp_path):
    """A new user's probe (2026-12-08): the query was embedded at the global crop size (64 px), not the model's
    img_size (96), without a word, and at 96 px its two nearest entries swap. Every method's bank holds teacher
    embeddings of global crops, so the crop size is the one the query is comparable at; the output says it."""
    from types import SimpleNamespace

    from mlsctl.bank_inspect import query_resolution
    from mlsctl.config import read_yaml

    run, sources, *_ = planted_run
    size = read_yaml(Path(run) / "config.yaml")["data"]["global_crops"]["size"]
    result = in_process("bank", "neighbors", str(run), "--query", str(sources.path(1)), "-k", "2", "--out",
                        str(tmp_path / "g.png"), "--json", check=True)
    assert json.loads(result.stdout)["query_resolution"] == size - size % 8
    assert (f"at {size - size % 8}x{size - size % 8} px: the global crop size (data.global_crops.size) of the views "
            f"whose teacher embeddings the bank holds") in result.stderr, result.stderr
    recipe = SimpleNamespace(data=SimpleNamespace(global_crops=SimpleNamespace(size=70)))
    assert query_resolution(recipe, 8) == 64


def test_neighbors_refuses_an_unreadable_query_and_an_unknown_bank(planted_run, tmp_path):
    run, sources, *_ = planted_run
    (tmp_path / "bad.png").write_text("not an image")
    result = in_process("bank", "neighbors", str(run), "--query", str(tmp_path / "bad.png"), "--out",
                        str(tmp_path / "g.png"))
    assert result.returncode == 2 and "--query" in result.stderr and "Traceback" not in result.stderr
    result = in_process("bank", "neighbors", str(run), "--query", str(sources.path(0)), "--bank", "nope",
                        "--out", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "no bank 'nope'" in result.stderr and "planted" in result.stderr


def test_plot_colours_by_label_and_age(planted_run, finished_run, tmp_path):
    run, *_ = planted_run
    for colour in ("label", "age"):
        out = tmp_path / f"{colour}.png"
        result = in_process("bank", "plot", str(run), "--out", str(out), "--color-by", colour, "--projection", "pca",
                            "--json", check=True)
        assert Image.open(out).size[0] > 300
        drawn = json.loads(result.stdout)  # what the title says, for scripts (a left-over of the 18th session)
        assert (drawn["out"], drawn["projection"], drawn["bank"]) == (str(out), "PCA", "planted")
        assert drawn["drawn"] == drawn["written"] > 1 and len(drawn["variance_shares"]) == 2
        # the legend's groups and counts, most frequent first (a probe of the 19th session): labels 0, 1, 1, 2, 2, 2
        expected = [{"kind": "class", "value": v, "name": f"label {v}", "count": c} for v, c in ((2, 3), (1, 2), (0, 1))]
        assert drawn["legend"] == (expected if colour == "label" else [])
    result = in_process("bank", "plot", str(finished_run[0]), "--out", str(tmp_path / "x.png"), "--color-by", "label")
    assert result.returncode == 2 and "no 'label' payload" in result.stderr and "--color-by age" in result.stderr


def test_export_is_readable_with_safetensors_alone(finished_run, tmp_path):
    from safetensors import safe_open

    from mlsctl.bank import load_banks
    from mlsctl.runs import Run

    run, _ = finished_run
    out = tmp_path / "bank.safetensors"
    said = json.loads(in_process("bank", "export", str(run), "--out", str(out), "--json", check=True).stdout)
    bank = load_banks(Run(run).latest().banks_path)["cls"]
    assert said["out"] == str(out) and said["step"] == 8
    assert set(said["banks"]["cls"].pop("tensors")) == {"cls/vectors", "cls/step", "cls/image_id", "cls/box"}
    assert said["banks"] == {"cls": {"entries": bank.filled, "dim": bank.vectors.shape[1], "random_start": 0}}
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"cls/vectors", "cls/step", "cls/image_id", "cls/box"}
        order = bank.order()
        assert torch.equal(f.get_tensor("cls/vectors"), bank.vectors[order])
        assert torch.equal(f.get_tensor("cls/image_id"), bank.payload["image_id"][order])
        steps = f.get_tensor("cls/step")
        assert torch.equal(steps, steps.sort().values)  # oldest first
        assert f.metadata()["step"] == "8"
    # a probe (2026-12-05): a second export replaced the file without a word, and --out x.npy wrote safetensors
    before = out.read_bytes()
    again = in_process("bank", "export", str(run), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr and out.read_bytes() == before
    assert in_process("bank", "export", str(run), "--out", str(out), "--overwrite").returncode == 0
    npy = in_process("bank", "export", str(run), "--out", str(tmp_path / "bank.npy"))
    assert npy.returncode == 2 and "must end in .safetensors" in npy.stderr and not (tmp_path / "bank.npy").exists()


@pytest.fixture
def sourced_run(finished_run, tmp_path):
    """A copy of the tiny run whose latest checkpoint holds one bank of 6 entries from images 0-5
    (two of image 0), over a prefilled random start of 10 slots."""
    from mlsctl.runs import Run

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    bank = MemoryBank(16, 8, {"image_id": Column()}, init="random_unit", generator=torch.Generator().manual_seed(0))
    bank.enqueue(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), step=7, gather=False,
                 image_id=torch.tensor([0, 1, 2, 3, 4, 0]))
    save_banks({"b": bank}, Run(run_dir).latest().banks_path)
    return run_dir


def test_colour_by_source_and_by_a_labels_file_keyed_by_source_image(sourced_run, tmp_path):
    from mlsctl.bank import load_banks
    from mlsctl.bank_inspect import SourceImages, entry_colours
    from mlsctl.runs import Run

    run = Run(sourced_run)
    bank = load_banks(run.latest().banks_path)["b"]
    sources = SourceImages(run)
    slots = bank.written_order()
    by_source = entry_colours(bank, "b", slots, "source", 8, sources)
    assert by_source.values.tolist() == [0, 1, 2, 3, 4, 0]
    assert by_source.names[0] == sources.relpaths[0] and by_source.mode == "label"  # the path under data.root: unambiguous
    labels = tmp_path / "labels.csv"  # keyed by images.txt path, absolute path and image_id; image 4 left out
    labels.write_text(f"path,label\n{sources.relpaths[0]},cat\n{sources.relpaths[1]},dog\n"
                      f"{sources.root / sources.relpaths[2]},dog\n3,cat\n")
    by_file = entry_colours(bank, "b", slots, str(labels), 8, sources)
    assert [by_file.names.get(v, None) for v in by_file.values.tolist()] == ["cat", "dog", "dog", "cat", None, "cat"]
    assert by_file.missing == 1 and by_file.unlabelled == "not in labels.csv"
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": "x"}) + "\n" for p in sources.relpaths))
    assert entry_colours(bank, "b", slots, str(jsonl), 8, sources).missing == 0
    assert entry_colours(bank, "b", slots, "age", 8, sources).values.tolist() == [1] * 6  # written entries only


def test_plot_colour_by_source_and_labels_file_and_bad_files_get_one_sentence(sourced_run, tmp_path, capsys):
    from mlsctl.bank_inspect import SourceImages
    from mlsctl.runs import Run

    relpaths = SourceImages(Run(sourced_run)).relpaths
    good = tmp_path / "labels.csv"
    good.write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate(relpaths[:2])))
    for colour in ("source", str(good)):
        code, _, err = cli("bank", "plot", str(sourced_run), "--color-by", colour, "--projection", "pca",
                           "--out", str(tmp_path / "p.png"), capsys=capsys)
        assert code == 0 and "PCA of 6 of 6 written entries" in err, err
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"path": "a.png", "label": "x"}\n{"path": "b.png"}\n')
    unlabelled = tmp_path / "none.csv"
    unlabelled.write_text("elsewhere/a.png,cat\n")
    one_column = tmp_path / "one.csv"
    one_column.write_text(f"{relpaths[0]}\n")
    tags = tmp_path / "scenes.jsonl"  # a new user's run-through (2026-12-06): told to add bank plot's --multi-label
    tags.write_text(json.dumps({"path": relpaths[0], "labels": ["cat", "dog"]}) + "\n")
    for colour, message in ((str(bad_json), f"{bad_json}:2 is not a JSON object with 'path' and 'label'"),
                            (str(tags), "it lists several tags for an image; bank plot colours one label per image"),
                            (str(unlabelled), f"labels file {unlabelled} labels none of the 6 entries drawn"),
                            (str(one_column), f"{one_column}:1 needs two columns, path and label"),
                            ("colour", "--color-by 'colour' is neither age, label, source, an existing labels file nor "
                                       "a folder of masks")):
        code, _, err = cli("bank", "plot", str(sourced_run), "--color-by", colour, "--out", str(tmp_path / "x.png"),
                           capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_colour_by_source_names_each_image_by_its_path_under_the_data_root():
    """Two images with one file name in two folders are two legend entries that can be told apart."""
    from types import SimpleNamespace

    from mlsctl.bank_inspect import entry_colours

    bank = MemoryBank(4, 8, {"image_id": Column()})
    bank.enqueue(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), step=1, gather=False,
                 image_id=torch.tensor([0, 1, 0]))
    sources = SimpleNamespace(relpaths=["scenes/01.png", "products/01.png"], root=Path("/data"))
    colours = entry_colours(bank, "b", bank.written_order(), "source", 2, sources)
    assert colours.names == {0: "scenes/01.png", 1: "products/01.png"}


def test_colour_by_a_labels_file_reads_its_paths_as_labels_files_are_read(tmp_path):
    """A new user's probe (2026-12-07): ``./`` paths (``find .``) and decomposed Unicode (macOS) had no label;
    bank plot's own lookup matched them as literally as labels_of did, and a file beside images/ not at all."""
    import unicodedata
    from types import SimpleNamespace

    from mlsctl.bank_inspect import entry_colours

    bank = MemoryBank(4, 8, {"image_id": Column()})
    bank.enqueue(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), step=1, gather=False,
                 image_id=torch.tensor([0, 1, 2]))
    sources = SimpleNamespace(relpaths=["café/1.png", "tea/2.png", "tea/3.png"], root=tmp_path / "images")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"./{unicodedata.normalize('NFD', 'café')}/1.png,a\nimages/tea/2.png,b\n")
    colours = entry_colours(bank, "b", bank.written_order(), str(labels), 2, sources)
    assert [colours.names.get(v) for v in colours.values.tolist()] == ["a", "b", None] and colours.missing == 1


def _scenes_split(root: Path) -> Path:
    """A split in the fmnist-scenes layout (SPLIT/images, SPLIT/masks, meta.json above), two 16 x 16 scenes:
    scene 0 a t-shirt left and a trouser right; scene 1 background under 4 ignored rows. Its labels.csv labels
    each scene by its largest item, as fmnist-scenes' does."""
    import numpy as np

    split = root / "train"
    (split / "images").mkdir(parents=True)
    (split / "masks").mkdir()
    (root / "meta.json").write_text(json.dumps({"classes": ["background", "t-shirt/top", "trouser"]}))
    first = np.zeros((16, 16), np.uint8)
    first[:, :8], first[:, 8:] = 1, 2
    second = np.zeros((16, 16), np.uint8)
    second[:4] = 255
    for name, mask in (("000000.png", first), ("000001.png", second)):
        Image.new("RGB", (16, 16)).save(split / "images" / name)
        Image.fromarray(mask, mode="L").save(split / "masks" / name)
    (split / "labels.csv").write_text("path,label\n000000.png,t-shirt/top\n000001.png,background\n")
    return split


def _object_bank(image_ids: list[int], regions: list[list[float]]) -> MemoryBank:
    bank = MemoryBank(8, 4, {"image_id": Column(), "region": Column((4,), torch.float32)})
    bank.enqueue(torch.randn(len(image_ids), 4, generator=torch.Generator().manual_seed(0)), step=1, gather=False,
                 image_id=torch.tensor(image_ids), region=torch.tensor(regions))
    return bank


def test_an_object_bank_is_coloured_by_each_region_s_class_in_the_masks_and_image_labels_are_said_as_such(tmp_path):
    """A new user's probe (2026-12-07): fmnist-scenes' labels.csv (each scene's largest item) coloured CrIBo's
    objects by their scene's class, without a word. A labels file of images now says it labels whole images (and
    where each object's own class is); a folder of masks colours each region by the class covering most of it."""
    from types import SimpleNamespace

    from mlsctl.bank_inspect import entry_colours
    from mlsctl.errors import UserError

    split = _scenes_split(tmp_path / "scenes")
    sources = SimpleNamespace(relpaths=["000000.png", "000001.png"], root=split / "images")
    bank = _object_bank([0, 0, 1, 1, 0], [[0, 0, 8, 16], [6, 0, 16, 16], [0, 0, 16, 16], [0, 0, 16, 4],
                                          [0, 0, 8.4, 15.2]])
    slots = bank.written_order()
    by_file = entry_colours(bank, "objects", slots, str(split / "labels.csv"), 2, sources)
    assert [by_file.names[v] for v in by_file.values.tolist()] == ["t-shirt/top"] * 2 + ["background"] * 2 + [
        "t-shirt/top"]  # the scene's label, as before; now said
    assert by_file.note == (f"note: bank 'objects' holds regions of images (objects, patches) and "
                            f"{split / 'labels.csv'} labels whole images, so each entry is drawn in its image's label, "
                            f"not its own class; --color-by {split / 'masks'} colours each by the class covering most "
                            f"of its region")
    by_mask = entry_colours(bank, "objects", slots, str(split / "masks"), 2, sources)
    assert [by_mask.names.get(v) for v in by_mask.values.tolist()] == ["t-shirt/top", "trouser", "background", None,
                                                                       "t-shirt/top"]  # an all-ignored region: none
    assert by_mask.missing == 1 and by_mask.note is None and "no class of" in by_mask.missing_said
    whole = MemoryBank(4, 4, {"image_id": Column()})  # whole crops: no region to take a class of
    whole.enqueue(torch.randn(1, 4), step=1, gather=False, image_id=torch.tensor([0]))
    with pytest.raises(UserError, match="bank 'cls' has no 'region' payload"):
        entry_colours(whole, "cls", whole.written_order(), str(split / "masks"), 2, sources)
    assert entry_colours(whole, "cls", whole.written_order(), str(split / "labels.csv"), 2, sources).note is None
    (split / "masks" / "000001.png").unlink()
    with pytest.raises(UserError, match="has no mask for 1 of 2 images"):
        entry_colours(bank, "objects", slots, str(split / "masks"), 2, sources)


def test_plot_of_an_object_bank_says_what_a_labels_file_colours(finished_run, tmp_path, capsys):
    import numpy as np

    from mlsctl.bank_inspect import SourceImages
    from mlsctl.runs import Run

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    relpaths = SourceImages(Run(run_dir)).relpaths[:2]
    save_banks({"objects": _object_bank([0, 1, 0], [[0, 0, 24, 40], [24, 0, 48, 40], [24, 0, 48, 40]])},
               Run(run_dir).latest().banks_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{p},scene{i}\n" for i, p in enumerate(relpaths)))
    masks = tmp_path / "masks"
    for i, relpath in enumerate(relpaths):
        mask = np.zeros((40, 48), np.uint8)
        mask[:, 24:] = 1 + i
        (masks / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(masks / relpath)
    code, _, err = cli("bank", "plot", str(run_dir), "--color-by", str(labels), "--projection", "pca",
                       "--out", str(tmp_path / "p.png"), capsys=capsys)
    assert code == 0 and f"and {labels} labels whole images, so each entry is drawn in its image's label" in err, err
    code, out, err = cli("bank", "plot", str(run_dir), "--color-by", str(masks), "--projection", "pca", "--json",
                         "--out", str(tmp_path / "m.png"), capsys=capsys)
    assert code == 0 and "labels whole images" not in err, err
    legend = {group["name"]: group["count"] for group in json.loads(out)["legend"]}
    assert legend == {"class 0": 1, "class 1": 1, "class 2": 1}


def test_export_of_a_run_without_banks_is_refused(mile_run, tmp_path, capsys):
    """A docs probe (2026-12-05): bank export of a MILE run wrote a 192-byte file with no tensors and said 'wrote'."""
    from conftest import cli

    code, _, err = cli("bank", "export", str(mile_run / "run"), "--out", str(tmp_path / "b.safetensors"), capsys=capsys)
    assert code == 2 and "has no memory bank" in err and not (tmp_path / "b.safetensors").exists()


def test_export_into_the_run_folder_is_refused(finished_run, tmp_path, capsys):
    """A new-user probe (2026-12-05): bank export --out RUN/checkpoints/step-N/banks.safetensors --overwrite
    replaced the checkpoint's banks with the export (the run could no longer resume), and --out
    RUN/teacher.safetensors its teacher."""
    from conftest import cli

    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    targets = [run / "teacher.safetensors", *sorted(run.glob("checkpoints/*/banks.safetensors"))[-1:]]
    assert len(targets) == 2
    before = {t: t.read_bytes() for t in targets}
    for target in targets:
        code, _, err = cli("bank", "export", str(run), "--out", str(target), "--overwrite", capsys=capsys)
        assert code == 2 and "inside the run folder" in err, err
    assert {t: t.read_bytes() for t in targets} == before
    # a new user (2026-12-06): the same --overwrite replaced ANOTHER run's teacher and checkpoint banks, a feature
    # shard, a copied weights file: it replaces only a file bank export wrote
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    foreign = [other / "teacher.safetensors", *sorted(other.glob("checkpoints/*/banks.safetensors"))[-1:],
               tmp_path / "not-even-safetensors.safetensors"]
    foreign[-1].write_text("hello")
    before = {t: t.read_bytes() for t in foreign}
    for target in foreign:
        code, _, err = cli("bank", "export", str(run), "--out", str(target), "--overwrite", capsys=capsys)
        assert code == 2 and "is not a bank export" in err, err
    assert {t: t.read_bytes() for t in foreign} == before
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")  # its header read waited for ever (a review, 2026-12-06)
    code, _, err = cli("bank", "export", str(run), "--out", str(tmp_path / "pipe.safetensors"), "--overwrite",
                       capsys=capsys)
    assert code == 2 and "is not a regular file" in err
    mine = tmp_path / "mine.safetensors"
    for overwrite in ((), ("--overwrite",)):
        code, _, err = cli("bank", "export", str(run), "--out", str(mine), *overwrite, capsys=capsys)
        assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(mine), "pt") as opened:  # provenance a moved file keeps
        assert opened.metadata()["run"] == str(run.resolve()) and Path(opened.metadata()["images"]).is_absolute()


def test_the_neighbour_grid_never_replaces_its_own_query(finished_run, tmp_path, capsys):
    """A probe (2026-12-06): `bank neighbors -q grid.png --out grid.png` (a grid drawn before) replaced its query."""
    from PIL import Image

    from conftest import cli
    from mlsctl.outputs import save_image

    run, _ = finished_run
    grid = tmp_path / "grid.png"
    save_image(Image.new("RGB", (48, 40), (10, 120, 10)), grid)
    before = grid.read_bytes()
    code, _, err = cli("bank", "neighbors", str(run), "--query", str(grid), "--out", str(grid), capsys=capsys)
    assert code == 2 and "is the --query image" in err and grid.read_bytes() == before
    # a review (2026-12-06): through a symbolic or a hard link it was not seen
    (tmp_path / "soft.png").symlink_to(grid)
    (tmp_path / "hard.png").hardlink_to(grid)
    for other in ("soft.png", "hard.png"):
        code, _, err = cli("bank", "neighbors", str(run), "--query", str(grid), "--out", str(tmp_path / other),
                           capsys=capsys)
        assert code == 2 and "is the --query image" in err and grid.read_bytes() == before, (other, err)


def test_pictures_are_never_drawn_among_the_images_the_run_trains_on(finished_run, tmp_path, monkeypatch, capsys):
    """A new user (2026-12-06): `bank plot` run from inside the run's data.root wrote bank.png there (so did
    `bank neighbors` and `plot`); the pictures became training images and the run's --resume was refused."""
    from conftest import cli

    run, _ = finished_run
    images = run.parent / "images"
    query = next(images.iterdir())
    before = sorted(p.name for p in images.iterdir())
    monkeypatch.chdir(images)  # the default --out lands here
    for args in (("bank", "plot", str(run), "--projection", "pca"), ("bank", "neighbors", str(run), "-q", str(query)),
                 ("plot", str(run)), ("bank", "plot", str(run), "--out", str(images / "sub" / "b.png"))):
        code, _, err = cli(*args, capsys=capsys)
        assert code == 2 and f"the images run {run} trains on (its data.root)" in err, (args, err)
    assert sorted(p.name for p in images.iterdir()) == before
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("plot", str(run), capsys=capsys)
    assert code == 0 and (tmp_path / "curves.png").is_file(), err


def test_a_projection_of_fewer_entries_than_t_sne_takes_is_pca_or_one_sentence():
    """A new user (2026-12-06): bank plot --sample 2 (which --help allows) crashed inside t-SNE."""
    from mlsctl.bank_inspect import TSNE_SMALLEST, project_2d
    from mlsctl.errors import UserError

    pytest.importorskip("sklearn")
    for n in range(2, TSNE_SMALLEST + 2):
        points, used, shares = project_2d(torch.randn(n, 8))
        assert points.shape == (n, 2) and used == ("PCA" if n < TSNE_SMALLEST else "t-SNE")
        assert (shares is None) == (used == "t-SNE") and (shares is None or 0 <= shares[1] <= shares[0] <= 1)
        assert shares is None or (shares[1] == 0) == (n == 2)  # 2 entries span one direction: PC2 flat
    with pytest.raises(UserError, match=f"t-SNE needs at least {TSNE_SMALLEST} entries"):
        project_2d(torch.randn(2, 8), "tsne")


def test_a_pca_of_two_entries_draws_its_second_component_flat_and_says_so():
    """A new user's probe (2026-12-08): PC2 of 2 entries, rounding noise at 1e-16, was drawn as if it were spread."""
    from mlsctl.bank_inspect import flat_components_note, project_2d

    points, used, shares = project_2d(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), "pca")
    assert used == "PCA" and shares == (pytest.approx(1.0), 0.0) and points[:, 1].tolist() == [0.0, 0.0]
    assert flat_components_note(2, shares) == ("principal component 2 has no variance (2 entries span one "
                                               "direction): every point drawn at 0 on it")
    points, _, shares = project_2d(torch.ones(3, 8), "pca")
    assert shares == (0.0, 0.0) and not points.any() and "one vector" in flat_components_note(3, shares)
    _, _, shares = project_2d(torch.randn(6, 8), "pca")
    assert shares[1] > 0 and flat_components_note(6, shares) is None


def test_bank_plot_of_two_entries_says_its_flat_component(planted_run, tmp_path):
    run, *_ = planted_run
    result = in_process("bank", "plot", str(run), "--sample", "2", "--projection", "pca", "--out",
                        str(tmp_path / "b.png"), "--json", check=True)
    flat = "principal component 2 has no variance (2 entries span one direction): every point drawn at 0 on it"
    assert json.loads(result.stdout)["flat_components"] == flat and f"note: {flat}" in result.stderr


def test_t_sne_of_a_bank_that_holds_too_few_entries_does_not_advise_drawing_more():
    """A new user's probe (2026-12-08): "draw more with --sample" to a bank that holds 2 entries."""
    from mlsctl.bank_inspect import project_2d
    from mlsctl.errors import UserError

    with pytest.raises(UserError, match="the bank holds only 2 written entries; use --projection pca$"):
        project_2d(torch.randn(2, 8), "tsne", held=2)
    with pytest.raises(UserError, match="draw more with --sample"):  # a sample of 2 of a bank of 100
        project_2d(torch.randn(2, 8), "tsne", held=100)


def test_inspect_refuses_a_duplicate_threshold_that_is_no_near_duplicate_cosine(finished_run, capsys):
    # a new user's probe (2026-12-07): -1 called a healthy bank a partial collapse; nan was refused for another reason
    from conftest import cli

    run_dir, _ = finished_run
    for value in ("-1", "0", "nan", "1.5"):
        code, _, err = cli("bank", "inspect", str(run_dir), "--duplicate-threshold", value, capsys=capsys)
        assert code == 2 and "is not a cosine of near-duplicates: give one above 0 and at most 1" in err, (value, err)
    code, _, err = cli("bank", "inspect", str(run_dir), "--duplicate-threshold", "1", capsys=capsys)
    assert code == 0, err
