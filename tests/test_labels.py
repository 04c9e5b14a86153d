"""mlsctl.data.labels: the one reader of labels, tags and objects files, and every command that reads one."""

from __future__ import annotations

import codecs
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mlsctl.data.labels import (FOLDER_LABELS, class_ids, labels_of, listed_files, nested_split_hint,
                                read_labels_file, read_multi_labels, read_objects_file, read_paths_file, read_text_file)
from mlsctl.errors import UserError
from conftest import REPO, cli, make_images, tiny_recipe, write_feature_folder, write_recipe

NOT_UTF8 = b"path,label\ncaf\xe9.png,x\n"  # Latin-1: the bytes of a spreadsheet's "save as CSV" elsewhere

# kind → (reader, a CSV row for key k, a JSONL line for key k, what the reader returns for those rows)
KINDS = {
    "labels": (read_labels_file, "path,label", lambda k: f"{k},cat", lambda k: json.dumps({"path": k, "label": "cat"}),
               lambda keys: {k: "cat" for k in keys}),
    "tags": (read_multi_labels, "path,tags", lambda k: f"{k},cat;dog", lambda k: json.dumps({"path": k, "tags": ["dog", "cat"]}),
             lambda keys: {k: ["cat", "dog"] for k in keys}),
    "objects": (read_objects_file, "object_id,path", lambda k: f"o1,{k}", lambda k: json.dumps({"object_id": "o1", "path": k}),
                lambda keys: [("o1", k) for k in keys]),
}


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ----------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("kind", KINDS)
def test_csv_with_or_without_a_header_bom_and_blank_lines_and_jsonl_read_the_same(kind, tmp_path):
    reader, header, row, line, expected = KINDS[kind]
    want = expected(["a.png", "b/c.png"])
    rows = f"{row('a.png')}\n\n{row('b/c.png')}\n"
    assert reader(write(tmp_path / "plain.csv", rows)) == want
    assert reader(write(tmp_path / "header.csv", f"{header.upper()}\n{rows}")) == want  # any case
    assert reader(write(tmp_path / "late.csv", f"\n  \n{header}\n{rows}")) == want  # the first non-blank row
    assert reader(write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + f"{header}\r\n{rows}".encode())) == want
    assert reader(write(tmp_path / "extra.csv", "".join(f"{row(k)},ignored\n" for k in ("a.png", "b/c.png")))) == want
    assert reader(write(tmp_path / "spaces.csv", f" {row('a.png')} \n{row('b/c.png')}\n")) == want
    assert reader(write(tmp_path / "l.jsonl", f"{line('a.png')}\n\n{line('b/c.png')}\n")) == want
    assert reader(write(tmp_path / "l.json", f"{line('a.png')}\n{line('b/c.png')}")) == want


@pytest.mark.parametrize("kind", KINDS)
def test_not_utf8_is_one_sentence_naming_the_file(kind, tmp_path):
    reader = KINDS[kind][0]
    for name in ("latin1.csv", "latin1.jsonl"):
        with pytest.raises(UserError, match=rf"{name} is not UTF-8 text .*give a CSV or JSONL file"):
            reader(write(tmp_path / name, NOT_UTF8))
    with pytest.raises(UserError, match="missing.csv does not exist"):
        reader(tmp_path / "missing.csv")
    with pytest.raises(UserError, match=r"folder.csv does not exist \(it is a folder\)"):
        (tmp_path / "folder.csv").mkdir()
        reader(tmp_path / "folder.csv")


@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_row_is_one_sentence_naming_file_and_line(kind, tmp_path):
    reader, header, row, line, _ = KINDS[kind]
    fields = {"labels": "'path' and 'label'", "tags": "'path' \\(or 'image'\\)", "objects": "'object_id' and 'path'"}[kind]
    for bad in ("[1, 2]", "null", "{not json", '{"other": 1}', "[" * 100_000 + "]" * 100_000):
        path = write(tmp_path / "bad.jsonl", f"{line('a.png')}\n\n{bad}\n")
        with pytest.raises(UserError, match=rf"bad.jsonl:3 is not a JSON object with {fields}"):
            reader(path)
    with pytest.raises(UserError, match=r"one.csv:3 needs two columns"):
        reader(write(tmp_path / "one.csv", f"{header}\n{row('a.png')}\nb.png\n"))
    with pytest.raises(UserError, match=r"long.csv:2 is not a CSV row mlsctl can read \(field larger than field limit"):
        reader(write(tmp_path / "long.csv", f"{row('a.png')}\n{row('x' * 200_000)}\n"))
    with pytest.raises(UserError, match=r"nopath.csv:1 has an empty path"):
        reader(write(tmp_path / "nopath.csv", f"{row('')}\n"))


def test_labels_and_object_ids_must_be_non_empty_strings_or_whole_numbers(tmp_path):
    assert read_labels_file(write(tmp_path / "n.jsonl", '{"path": "a.png", "label": 3}\n{"path": 7, "label": "x"}\n')) \
        == {"a.png": "3", "7": "x"}  # an image_id as the key (bank plot --color-by)
    for value in ("null", "true", "1.5", "[1]", '""', '"  "'):
        with pytest.raises(UserError, match=r"n.jsonl:1 (is not a JSON object with 'path' and 'label'|has an empty label)"):
            read_labels_file(write(tmp_path / "n.jsonl", f'{{"path": "a.png", "label": {value}}}\n'))
    with pytest.raises(UserError, match=r"e.csv:2 has an empty label; give every row one$"):
        read_labels_file(write(tmp_path / "e.csv", "path,label\na.png, \n"))
    with pytest.raises(UserError, match=r"o.csv:1 has an empty object_id"):
        read_objects_file(write(tmp_path / "o.csv", " ,a.png\n"))
    with pytest.raises(UserError, match=r"o.jsonl:1 is not a JSON object with 'object_id' and 'path'"):
        read_objects_file(write(tmp_path / "o.jsonl", '{"object_id": null, "path": "a.png"}\n'))


@pytest.mark.parametrize("kind", KINDS)
def test_a_path_listed_twice_is_refused_naming_both_lines(kind, tmp_path):
    """Even with the same label: a table keyed by path would keep one silently, MILE would put the
    image twice into a set."""
    reader, header, row, line, _ = KINDS[kind]
    with pytest.raises(UserError, match=r"twice.csv:4 lists a.png again \(first on line 2\); give each (path|image) one row"):
        reader(write(tmp_path / "twice.csv", f"{header}\n{row('a.png')}\n{row('b.png')}\n{row('a.png')}\n"))
    with pytest.raises(UserError, match=r"twice.jsonl:2 lists a.png again \(first on line 1\)"):
        reader(write(tmp_path / "twice.jsonl", f"{line('a.png')}\n{line('a.png')}\n"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_without_rows_is_refused(kind, tmp_path):
    reader, header = KINDS[kind][:2]
    for name, text in (("empty.csv", ""), ("header.csv", f"{header}\n\n"), ("blank.jsonl", "\n \n")):
        with pytest.raises(UserError, match=rf"file .*{name} has no rows; give one .* per line"):
            reader(write(tmp_path / name, text))


def test_tags_read_scenes_items_and_allow_an_image_without_tags(tmp_path):
    scene = {"image": "images/000000.png", "items": [{"class": 5, "class_name": "sandal"}, {"class": 8}]}
    assert read_multi_labels(write(tmp_path / "s.jsonl", json.dumps(scene) + "\n")) == {"images/000000.png": ["8", "sandal"]}
    assert read_multi_labels(write(tmp_path / "t.csv", "a.png,\nb.png, x ; ;y\n")) == {"a.png": [], "b.png": ["x", "y"]}
    with pytest.raises(UserError, match=r"i.jsonl:1 is not a JSON object"):
        read_multi_labels(write(tmp_path / "i.jsonl", '{"image": "a.png", "items": [{"color": 1}]}\n'))


def test_an_object_has_as_many_rows_as_images_in_file_order(tmp_path):
    path = write(tmp_path / "o.csv", "object_id,path\nx,a/0.png\ny,a/3.png\nx,b/1.png\n")
    assert read_objects_file(path) == [("x", "a/0.png"), ("y", "a/3.png"), ("x", "b/1.png")]


def test_paths_as_find_and_macos_write_them_and_relative_to_an_objects_file_name_the_images(tmp_path):
    """A new user's probe (2026-12-07): ``./`` paths (``find .``) and decomposed Unicode (macOS's é) had "no label";
    method.objects_file refused paths relative to its own folder, which labels files accept."""
    import unicodedata

    from mlsctl.data.images import ImageFolder
    from mlsctl.data.objects import find_objects

    files = ["café/1.png", "tea/2.png"]
    nfd = unicodedata.normalize("NFD", "café")
    write(tmp_path / "dot.csv", f"./{nfd}/1.png,a\n./tea/./2.png,b\n")
    assert labels_of(files, tmp_path, tmp_path / "dot.csv", "x") == ["a", "b"]
    write(tmp_path / "both.csv", f"{nfd}/1.png,a\ncafé/1.png,b\ntea/2.png,b\n")  # one image, two labels
    with pytest.raises(UserError, match=r"labels .*café/1.png twice, as 'a' \(.*\) and 'b' \(café/1.png\)"):
        labels_of(files, tmp_path, tmp_path / "both.csv", "x")
    # an objects file beside img/, as a labels file may lie
    for name in ("img/WOMEN/id_1/a.png", "img/WOMEN/id_1/b.png", "img/MEN/id_2/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    folder = ImageFolder(tmp_path / "img")
    write(tmp_path / "objects.csv", "object_id,path\nw,img/WOMEN/id_1/a.png\nw,./img/WOMEN/id_1/b.png\nm,MEN/id_2/c.png\n")
    assert [(o.object_id, [folder.relpath(r) for r in o.rows]) for o in find_objects(folder, tmp_path / "objects.csv")] == [
        ("m", ["MEN/id_2/c.png"]), ("w", ["WOMEN/id_1/a.png", "WOMEN/id_1/b.png"])]
    write(tmp_path / "twice.csv", "w,WOMEN/id_1/a.png\nv,./WOMEN/id_1/a.png\n")
    with pytest.raises(UserError, match=r"lists the image WOMEN/id_1/a.png twice, as WOMEN/id_1/a.png and "
                                        r"./WOMEN/id_1/a.png; give each image one row"):
        find_objects(folder, tmp_path / "twice.csv")
    write(tmp_path / "elsewhere.csv", "w,other/a.png\n")
    with pytest.raises(UserError, match=r"lists other/a.png, which is not an image under .*img; its paths are read "
                                        r"relative to the images folder .*img, then to the objects file's folder"):
        find_objects(folder, tmp_path / "elsewhere.csv")


def test_pandas_index_utf16_exports_and_swapped_object_columns_are_read_or_said(tmp_path):
    """A new user's probe (2026-12-07): pandas' to_csv (",path,label") had "an empty path", an Excel UTF-16 export
    was "not UTF-8 text", and an objects file of path,object_id said "lists id_1 again"."""
    pandas = "\n".join([",path,label", "0,cat/1.png,cat", "1,dog/2.png,dog"]) + "\n"
    assert read_labels_file(write(tmp_path / "pandas.csv", pandas)) == {"cat/1.png": "cat", "dog/2.png": "dog"}
    objects = "\n".join([",object_id,path", "0,o1,a.png", "1,o1,b.png"]) + "\n"
    assert read_objects_file(write(tmp_path / "pandas_objects.csv", objects)) == [("o1", "a.png"), ("o1", "b.png")]
    for encoding in ("utf-16-le", "utf-16-be"):
        bom = "\ufeff".encode(encoding)
        path = write(tmp_path / "excel.csv", bom + "path,label\r\ncafé/1.png,cat\r\n".encode(encoding))
        assert read_labels_file(path) == {"café/1.png": "cat"}, encoding
    with pytest.raises(UserError, match=r"excel.csv is not UTF-16 text with damaged characters; give a CSV or JSONL"):
        read_labels_file(write(tmp_path / "excel.csv", codecs.BOM_UTF16_LE + "\ud800x".encode("utf-16-le", "surrogatepass")))
    swapped = write(tmp_path / "swapped.csv", "img/id_1/a.jpg,id_1\nimg/id_1/b.jpg,id_1\n")
    with pytest.raises(UserError, match=r"swapped.csv:1 starts with the image img/id_1/a.jpg and then id_1: the columns "
                                        r"are object_id,path; swap them"):
        read_objects_file(swapped)
    assert read_objects_file(write(tmp_path / "ids.csv", "a.jpg.d,img/b.jpg\n")) == [("a.jpg.d", "img/b.jpg")]


def test_utf16_without_a_byte_order_mark_is_said_and_a_nul_in_mlsctls_own_files_is_damage(tmp_path):
    """A review (2026-12-07): ``iconv -t UTF-16LE`` of a labels CSV decoded as UTF-8 with NULs, then "needs two
    columns"; it is one sentence naming the fix, and a NUL in one of mlsctl's own files is "not UTF-8 text"."""
    for encoding in ("utf-16-le", "utf-16-be"):
        path = write(tmp_path / "u16nobom.csv", "path,label\ncat/1.png,cat\n".encode(encoding))
        with pytest.raises(UserError, match=r"^labels file .*u16nobom.csv looks like UTF-16 without a byte-order "
                                            r"mark; save it as UTF-8 \(or UTF-16 with its byte-order mark\)$"):
            read_labels_file(path)
    with pytest.raises(UserError, match=r"^metrics file .*m.jsonl is not UTF-8 text \(a binary or damaged file\?\)"):
        read_text_file(write(tmp_path / "m.jsonl", b'{"step": 1}\n\x00\x00\n'), "metrics file")


def test_windows_backslash_paths_name_their_images_and_a_file_named_with_a_backslash_wins(tmp_path):
    """A review (2026-12-07): a labels CSV written on Windows (``cat\\1.png``) had "no label for 3 images"."""
    files = ["cat/1.png", "cat/sub/2.png", "dog/3.png"]
    write(tmp_path / "win.csv", "path,label\ncat\\1.png,a\ncat\\sub\\2.png,a\n.\\dog\\3.png,b\n")
    assert labels_of(files, tmp_path, tmp_path / "win.csv", "x") == ["a", "a", "b"]
    write(tmp_path / "odd.csv", "path,label\ncat\\1.png,a\ncat/1.png,b\n")  # a Linux file named cat\1.png
    assert labels_of(["cat/1.png", "cat\\1.png"], tmp_path, tmp_path / "odd.csv", "x") == ["b", "a"]


def test_a_list_file_for_embed_reads_pandas_labels_whole_plain_lines_and_refuses_an_image_named_twice(tmp_path):
    """A review (2026-12-07) of ``embed --files``: a pandas labels CSV (",path,label") said "first: 0"; ``a.png`` and
    ``./a.png`` were merged silently; a plain list went through the csv module (no comma or leading quote in a
    name); and the refusal said where paths are read in its own words, not ImagePaths'."""
    files = ["cat/1.png", "cat/a,b.png", 'cat/"q.png', "dog/2.png"]
    pandas = write(tmp_path / "pandas.csv", ",path,label\n0,cat/1.png,a\n1,dog/2.png,b\n")
    assert read_paths_file(pandas, "--files") == ["cat/1.png", "dog/2.png"]
    assert listed_files(files, tmp_path, pandas, "--files") == ["cat/1.png", "dog/2.png"]
    plain = write(tmp_path / "list.txt", 'path\n  cat/a,b.png \n"cat/\"q.png\ncat/"q.png\r\n\n')
    assert read_paths_file(plain, "--files") == ["cat/a,b.png", '"cat/"q.png', 'cat/"q.png']
    assert read_paths_file(write(tmp_path / "l.csv", 'path\n"cat/a,b.png"\n'), "--files") == ["cat/a,b.png"]
    with pytest.raises(UserError, match=r"l.csv:2 has an empty path; give every line one"):
        read_paths_file(write(tmp_path / "l.csv", "path,label\n,a\n"), "--files")
    twice = write(tmp_path / "twice.txt", "cat/1.png\n./cat/1.png\n")
    with pytest.raises(UserError, match=r"^--files .*twice.txt lists the image cat/1.png twice, as cat/1.png and "
                                        r"./cat/1.png; give each image one line$"):
        listed_files(files, tmp_path, twice, "--files")
    with pytest.raises(UserError, match=r"^--files .*list.txt lists 1 path that is no image under .* \(first: "
                                        r"\"cat/\"q.png\); its paths are read relative to the images folder .*, "
                                        r"then to the list file's folder, or as absolute paths$"):
        listed_files(files, tmp_path, plain, "--files")


def test_labels_of_folders_or_a_file_and_class_ids(tmp_path):
    assert labels_of(["cat/1.png", "dog/2.png"], tmp_path, None, "x") == ["cat", "dog"]
    write(tmp_path / "l.csv", f"cat/1.png,a\n{tmp_path / 'dog/2.png'},b\n")  # relative or absolute keys
    assert labels_of(["cat/1.png", "dog/2.png"], tmp_path, tmp_path / "l.csv", "x") == ["a", "b"]
    with pytest.raises(UserError, match=r"has no label for 1 image of x \(first: c/3.png\); its paths are read "
                                        r"relative to the images folder .*, then to the labels file's folder"):
        labels_of(["cat/1.png", "c/3.png"], tmp_path, tmp_path / "l.csv", "x")
    # relative to the labels file's folder, as linear --multi-label reads them (a new user's probe, 2026-12-07)
    (tmp_path / "split").mkdir()
    write(tmp_path / "split" / "labels.csv", "images/000.png,a\nimages/001.png,b\n")
    assert labels_of(["000.png", "001.png"], tmp_path / "split" / "images", tmp_path / "split" / "labels.csv",
                     "x") == ["a", "b"]
    # two links to one file are two images with their own labels (a review: resolve() gave both the first one's)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(b"x")
    for name in ("cat", "pet"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "1.png").symlink_to(tmp_path / "pool" / "a.png")
    write(tmp_path / "links.csv", "data/cat/1.png,cat\ndata/pet/1.png,pet\n")
    assert labels_of(["cat/1.png", "pet/1.png"], tmp_path / "data", tmp_path / "links.csv", "x") == ["cat", "pet"]
    write(tmp_path / "twice.csv", "data/cat/1.png,cat\ndata/./cat/1.png,dog\n")
    with pytest.raises(UserError, match=r"labels .*cat/1.png twice, as 'cat' \(data/cat/1.png\) and 'dog'"):
        labels_of(["cat/1.png"], tmp_path / "data", tmp_path / "twice.csv", "x")
    ids, classes = class_ids(["b", "a", "b"], "x")
    assert ids.tolist() == [1, 0, 1] and classes == ["a", "b"]
    with pytest.raises(UserError, match="x has a single class"):
        class_ids(["a", "a"], "x")


def test_each_images_own_folder_is_its_class_and_a_class_folder_inside_another_is_said(tmp_path, caplog):
    # In-shop's layout: the leaf folder is the object, its parents are shared (ImageFolder would give "img")
    files = ["img/MEN/Denim/id_1/a.jpg", "img/MEN/Denim/id_2/b.jpg", "img/WOMEN/Skirts/id_3/c.jpg"]
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        assert labels_of(files, tmp_path, None, "x") == ["img/MEN/Denim/id_1", "img/MEN/Denim/id_2",
                                                         "img/WOMEN/Skirts/id_3"]
    assert not caplog.records
    # a folder holding images beside a sub-folder of images: two classes, said once with the fix
    files = ["cat/1.png", "cat-x/1.png", "cat/kitten/2.png", "cat/kitten/young/3.png", "dog/4.png", "dog/pup/5.png"]
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        names = labels_of(files, tmp_path, None, "train folder t", "--train-labels")
    assert names == ["cat", "cat-x", "cat/kitten", "cat/kitten/young", "dog", "dog/pup"]
    assert [r.getMessage() for r in caplog.records] == [
        "train folder t: the images in cat/ and those in cat/kitten/ are two classes, as each image's own folder is "
        "its class (2 more class folders inside class folders); to put them in one class, give a labels file (CSV "
        "or JSONL of path,label) with --train-labels"]


def test_val_classes_that_are_folders_of_training_classes_are_named_with_the_fix():
    """A new user's probe (2026-12-07): val/Boots/ against train/Boots/sub0/ was refused with only "e.g. Boots" and the
    advice to use eval recall."""
    options = "--train-labels and --val-labels"
    assert nested_split_hint(["Boots/sub0", "Boots/sub1", "Shoes/a"], ["Boots", "Shoes"], options) == (
        "the val class Boots is a folder holding the training classes Boots/sub0 and Boots/sub1 (2 val classes are "
        "such folders), as each image's own folder is its class; to compare them as one class, give labels files "
        "(CSV or JSONL of path,label) with --train-labels and --val-labels")
    assert nested_split_hint(["a/x", "a/y", "a/z"], ["a"], options).startswith(
        "the val class a is a folder holding the training classes a/x, a/y and 1 more,")
    assert nested_split_hint(["Boots"], ["Boots/sub0", "Boots/sub1"], options).startswith(
        "the val class Boots/sub0 lies inside the training class folder Boots (2 val classes lie inside training class "
        "folders), as each")
    assert nested_split_hint(["cat", "dog"], ["cow", "cat/x/y"], options).startswith(
        "the val class cat/x/y lies inside the training class folder cat,")
    assert nested_split_hint(["cat", "dog"], ["cow", "bird"], options) == ""


def test_knn_of_nested_folders_names_the_training_classes_and_the_images_folder(tmp_path, capsys, caplog):
    """The probe's tree: train/Boots/sub0, train/Boots/sub1 and val/Boots; the note on a class folder beside its
    sub-folders named the features' cache folder, not the images folder the user gave."""
    write_feature_folder(tmp_path / "train", [f"Boots/sub{s}/{j}.png" for s in (0, 1) for j in range(2)]
                         + ["Shoes/1.png", "Shoes/x/2.png"], torch.randn(6, 8), input_root=tmp_path / "images" / "train")
    write_feature_folder(tmp_path / "val", ["Boots/0.png", "Boots/1.png", "Sandals/2.png"], torch.randn(3, 8),
                         input_root=tmp_path / "images" / "val")
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        code, _, err = cli("eval", "knn", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                           capsys=capsys)
    assert code == 2, err
    assert ("none of the 2 val classes occurs in training (e.g. Boots; training has Boots/sub0): the val class Boots "
            "is a folder holding the training classes Boots/sub0 and Boots/sub1") in err
    assert "--train-labels and --val-labels" in err and "eval recall" not in err
    notes = [r.getMessage() for r in caplog.records]
    assert any(n.startswith(f"train images {tmp_path / 'images' / 'train'}: the images in Shoes/ and those in Shoes/x/")
               for n in notes), notes


def test_every_default_of_class_labels_says_the_same_rule(capsys):
    """The docs and help said "folder names", "sub-folder name" and "each file's folder"; results recorded
    "folder names" (a new user's probe, 2026-12-07)."""
    for args in (("eval", "knn"), ("eval", "linear"), ("eval", "recall"), ("refine", "train"), ("refine", "plot")):
        code, out, _ = cli(*args, "--help", capsys=capsys)
        assert code == 0 and "folder names" not in out and "each file's folder" not in out, args
        assert FOLDER_LABELS in " ".join(out.replace("│", " ").split()), args
    for doc in ("README.md", "docs/commands.md", "docs/formats.md", "docs/recipes.md", "docs/datasets.md"):
        text = (REPO / doc).read_text()
        assert "folder names" not in text.replace("features folder name", "") and "sub-folder name" not in text, doc


def test_the_old_names_still_import():
    from mlsctl.evaluate import knn, linear
    from mlsctl.methods import ms

    assert knn.read_labels_file is read_labels_file and knn.labels_of is labels_of and knn.read_text_file is read_text_file
    assert linear.read_multi_labels is read_multi_labels and ms.class_ids is class_ids


def test_no_reader_of_labels_reaches_up_a_layer():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from layers import upward_imports
    finally:
        sys.path.remove(str(REPO / "scripts"))
    upward, unmapped, _ = upward_imports(REPO)
    assert unmapped == []
    readers = {"mlsctl.data.labels", "mlsctl.evaluate.knn", "mlsctl.evaluate.linear", "mlsctl.methods.ms.method"}
    assert [u for u in upward if u["imports"] in readers or u["module"] == "mlsctl.data.labels"] == []


# ----------------------------------------------------------------------------------- every command that reads one


def _features(tmp_path: Path) -> Path:
    files = [f"c{i % 2}/{i:02d}.png" for i in range(8)]
    return write_feature_folder(tmp_path / "feats", files, torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))


def _objects(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for o in range(2):
        (root / f"obj{o}").mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"obj{o}" / f"{k}.png")
    return root


def _mile_recipe(root: Path, objects_file: Path) -> dict:
    raw = tiny_recipe(root, data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]}, optim__batch_size=2,
                      optim__epochs=1)
    raw["method"] = {"name": "mile", "set_length": 2, "cross_heads": 2, "out_dim": 64, "hidden_dim": 64,
                     "bottleneck_dim": 32, "warmup_teacher_temp_epochs": 0, "objects_file": str(objects_file)}
    return raw


def _ms_recipe(root: Path, labels_file: Path) -> dict:
    raw = tiny_recipe(root, data__global_crops={"count": 1, "size": 32, "scale": [0.5, 1.0]},
                      data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]}, data__photometric="none")
    raw["model"]["embedding_dim"] = 16
    raw["optim"].update(batch_size=4, warmup_epochs=0, freeze_last_layer_epochs=0)
    raw["method"] = {"name": "ms", "m_per_class": 2, "labels_file": str(labels_file)}
    return raw


COMMANDS = {  # what reads the file → its mlsctl arguments (given a folder for its inputs and the bad file)
    "eval knn --train-labels": lambda t, bad: ["eval", "knn", "--train", str(_features(t)), "--val", str(t / "feats"),
                                               "--train-labels", str(bad), "--out", str(t / "o.json")],
    "eval linear --train-labels": lambda t, bad: ["eval", "linear", "--train", str(_features(t)), "--val", str(t / "feats"),
                                                  "--train-labels", str(bad), "--out", str(t / "o.json")],
    "eval linear --multi-label": lambda t, bad: ["eval", "linear", "--train", str(_features(t)), "--val", str(t / "feats"),
                                                 "--multi-label", "--train-labels", str(bad), "--out", str(t / "o.json")],
    "eval recall --labels": lambda t, bad: ["eval", "recall", str(_features(t)), "--labels", str(bad), "--out",
                                            str(t / "o.json")],
    "refine train --labels": lambda t, bad: ["refine", "train", str(_features(t)), "--labels", str(bad), "--k", "2",
                                             "--out", str(t / "run")],
    "pretrain train.monitor.train_labels": lambda t, bad: [
        "pretrain", str(write_recipe(t / "r.yaml", tiny_recipe(make_images(t / "images", 8)))), "train.monitor.every=2",
        f"train.monitor.train={t / 'images'}", f"train.monitor.val={t / 'images'}", f"train.monitor.train_labels={bad}",
        "--out", str(t / "run")],
    "pretrain ms method.labels_file": lambda t, bad: [
        "pretrain", str(write_recipe(t / "r.yaml", _ms_recipe(_objects(t / "images"), bad))), "--out", str(t / "run")],
    "pretrain mile method.objects_file": lambda t, bad: [
        "pretrain", str(write_recipe(t / "r.yaml", _mile_recipe(_objects(t / "images"), bad))), "--out", str(t / "run")],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_says_a_labels_file_is_not_utf8_in_one_sentence(command, tmp_path, capsys):
    bad = write(tmp_path / ("latin1.jsonl" if "multi" in command else "latin1.csv"), NOT_UTF8)
    code, _, err = cli(*COMMANDS[command](tmp_path, bad), capsys=capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert f"{bad} is not UTF-8 text" in lines[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_bank_plot_colour_by_a_file_that_is_not_utf8_is_one_sentence(tmp_path):
    from mlsctl.bank import Column, MemoryBank
    from mlsctl.bank_inspect import entry_colours

    bank = MemoryBank(4, 8, {"image_id": Column()}, init="random_unit", generator=torch.Generator().manual_seed(0))
    bank.enqueue(torch.randn(2, 8), step=1, gather=False, image_id=torch.tensor([0, 1]))
    bad = write(tmp_path / "latin1.csv", NOT_UTF8)
    with pytest.raises(UserError, match=rf"labels file {bad} is not UTF-8 text"):
        entry_colours(bank, "b", torch.tensor([0, 1]), str(bad), 1, None)


def test_mls_bank_inspect_shows_a_tags_file_that_is_not_utf8_as_its_sentence(tmp_path):
    from mlsctl.methods.mls.views import queue_views

    bad = write(tmp_path / "latin1.jsonl", NOT_UTF8)
    recipe = SimpleNamespace(method=SimpleNamespace(tags_file=str(bad)), data=SimpleNamespace(root=None))
    views = queue_views(recipe, {"q_y": None}, [tmp_path / "a.png"])
    assert views == {"q_y": [("tags", f"not shown: labels file {bad} is not UTF-8 text (a binary or damaged file?); "
                                      f"give a CSV or JSONL file", None)]}


def test_a_tags_file_given_as_class_labels_says_to_add_multi_label(tmp_path):
    """A probe (2026-12-06): fmnist-scenes' scenes.jsonl given to a plain eval linear said only that a row is not
    {path, label}."""
    from mlsctl.data.labels import read_labels_file

    for record in ({"path": "a.png", "tags": ["x", "y"]}, {"path": "a.png", "label": ["x", "y"]}):
        (tmp_path / "s.jsonl").write_text(json.dumps(record) + "\n")
        with pytest.raises(UserError, match="add --multi-label"):
            read_labels_file(tmp_path / "s.jsonl")


def test_the_imagenet_preset_takes_the_folder_under_the_split_and_says_where_images_lie_deeper(tmp_path, caplog):
    """--dataset imagenet reads ImageNet's definition (the folder under train/), which the docs called "folder name"
    like the folders' own rule: it stays, and a deeper image is said with the other way (a new user's probe)."""
    from mlsctl.data.datasets import open_split

    for name in ("train/Boots/sub0/1.png", "train/Boots/sub1/2.png", "train/Shoes/3.png", "val/Boots/4.png"):
        (tmp_path / "inet" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "inet" / name)
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        train = open_split("imagenet", tmp_path / "inet", "train")
        open_split("imagenet", tmp_path / "inet", "val")
    assert sorted(set(train.labels)) == ["Boots", "Shoes"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'inet' / 'train'}: 2 images lie below their class folder (e.g. Boots/sub0/1.png, of the class "
        f"Boots): --dataset imagenet takes the folder under the split as the class, as ImageNet does; give "
        f"--train/--val folders instead to make each image's own folder its class"]


def test_a_labels_or_files_list_given_as_a_pipe_or_a_device_is_named_so(tmp_path):
    """``--labels <(...)`` said "does not exist" (a new user's probe): it is a pipe; a device is never read."""
    import os

    os.mkfifo(tmp_path / "pipe.csv")
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    for read in (read_labels_file, lambda path: read_paths_file(path, "--files")):
        for name in ("pipe.csv", "zero.csv"):
            with pytest.raises(UserError, match=rf"{name} is not a regular file .*save it to a file"):
                read(tmp_path / name)


def test_labels_and_objects_options_given_a_pipe_say_so_before_the_model(tmp_path):
    """``--train-labels <(...)`` said "is not a file", ``--gallery-objects <(...)`` "does not exist" (a probe)."""
    import os

    from mlsctl.data.objects import check_objects_file
    from mlsctl.evaluate.inputs import check_inputs_exist

    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(UserError, match=r"--train-labels .*pipe.csv is not a regular file .*save it to a file"):
        check_inputs_exist(("--train-labels", tmp_path / "pipe.csv", "labels"))
    with pytest.raises(UserError, match=r"--gallery-objects .*pipe.csv is not a regular file .*save it to a file"):
        check_objects_file(tmp_path / "pipe.csv", "--gallery-objects")
