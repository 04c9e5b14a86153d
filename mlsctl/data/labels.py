"""Labels files: the one reader of the CSV and JSONL files that give image paths a class, tags or an object.

Three kinds:

* **labels** (:func:`read_labels_file`): JSONL ``{"path": ..., "label": ...}`` or CSV ``path,label``;
  read by ``eval knn``, ``eval linear``, ``eval recall``, ``train.monitor``, ``method.labels_file``
  (MS, refine) and ``bank plot --color-by FILE``;
* **tags** (:func:`read_multi_labels`): JSONL ``{"path" (or "image"): ..., "labels" (or "tags"):
  [...]}`` or fmnist-scenes' ``scenes.jsonl`` (the ``class_name`` or ``class`` of its ``items``), or
  CSV ``path,tag;tag``; read by ``eval linear --multi-label`` and ``method.tags_file``;
* **objects** (:func:`read_objects_file`): JSONL ``{"object_id": ..., "path": ...}`` or CSV
  ``object_id,path``; MILE's ``method.objects_file``.

One set of rules for all three:

* a file whose name ends in ``.jsonl`` or ``.json`` is JSONL (one object a line), any other CSV;
* the text is UTF-8 (a leading byte-order mark is allowed), or UTF-16 with its byte-order mark;
  any other encoding, UTF-16 without its mark included, is one sentence naming the file;
* blank lines are skipped; in a CSV the first row is a header, and skipped, when its first two
  cells are the column names (any case), or its next two after an empty first cell (pandas'
  ``to_csv`` with its index, whose column is then dropped from every row); cells are stripped and
  columns after the second ignored;
* a row that is not what the kind needs — not a JSON object with those fields (each path, label
  and object id a string or a whole number), fewer than two CSV cells, an empty path, label or
  object id, a CSV row the csv module refuses — is one sentence naming the file and the line
  (``FILE:LINE ...``);
* a path listed twice is refused, naming both lines, even with the same label: a table keyed by
  path would keep one of the two silently, and MILE would put the image twice into a set;
* a file without a row is refused;
* a path names an image relative to the images folder, or absolute, or relative to the file's own
  folder (:class:`ImagePaths`), compared after ``.`` and ``..`` are folded and Unicode is composed
  (``./a.jpg`` is ``a.jpg``; an ``é`` that macOS writes decomposed is the composed one); a path with
  backslashes and no slash that names no file is read with slashes (Windows' ``cat\\1.jpg``).

:func:`labels_of` gives files their class (each file's own folder, however deep, or a labels file)
and :func:`class_ids` turns class names into indices.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
import posixpath
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence, TypeVar

from mlsctl.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json")
# folder names of a data set's splits: a root that holds them was given for one of them (MS, MILE, galleries)
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "gallery", "query"})
T = TypeVar("T")
# the class of an image where no labels file is given, as results record it and the options' help says it: "folder
# names" read as the last folder's name, which two parents may share (a new user's probe, 2026-12-07)
FOLDER_LABELS = "each image's own folder, however deep"


def read_text_file(path: Path, what: str, utf16: bool = False) -> str:
    """A UTF-8 text file (without its byte-order mark), or one sentence saying it is missing or not one.
    ``utf16``: UTF-16 with its byte-order mark is read too, as a user's own files may be (Excel's "Unicode
    text" and Windows tools' exports: a new user's probe, 2026-12-07); mlsctl's own files never are."""
    path = Path(path)
    if not path.is_file():
        if path.exists() and not path.is_dir():  # a FIFO (bash's <(...)) or a device: not read, never unbounded
            raise UserError(f"{what} {path} is not a regular file (a pipe or a device, as <(...) gives); save it to "
                            f"a file and give that")
        raise UserError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    bom = utf16 and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    kind = "UTF-16 text with damaged characters" if bom else "UTF-8 text (a binary or damaged file?)"
    try:
        text = data.decode("utf-16" if bom else "utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not {kind}; give a CSV or JSONL file") from None
    if "\x00" in text:  # UTF-16 without its mark decodes as UTF-8 with a NUL in every other byte (a review)
        if utf16 and not bom:
            raise UserError(f"{what} {path} looks like UTF-16 without a byte-order mark; save it as UTF-8 (or UTF-16 "
                            f"with its byte-order mark)")
        raise UserError(f"{what} {path} is not {kind}; give a CSV or JSONL file")
    return text


def csv_rows(text: str, path: Path):
    """(line number, row) of a CSV text; a row the csv module refuses (a field over its 128 KiB
    limit, a NUL byte) is one sentence naming the file and the line."""
    reader = csv.reader(text.splitlines())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num} is not a CSV row mlsctl can read ({exc}); a labels file holds "
                            f"short path and label fields") from None
        yield reader.line_num, row


def json_records(text: str, path: Path, malformed: str):
    """(line number, object) of each non-blank line of a JSONL text; a line that is not a JSON object is one
    sentence, ``FILE:LINE`` and ``malformed``."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number} {malformed}")
        yield number, record


class _Bad(Exception):
    """What is wrong with one row (the rest of a sentence that starts with FILE:LINE)."""


def _scalar(value, name: str, malformed: str) -> str:
    """A path, label or object id: a non-empty string or a whole number."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(malformed)
    text = str(value)
    if not text.strip():
        raise _Bad(f"has an empty {name}; give every row one")
    return text


def _header_index(cells: Sequence[str], headers: Sequence[Sequence[str]]) -> Optional[int]:
    """Whether the stripped cells of a CSV's first row are its header: 0 where its first cells are the column names
    of one of ``headers`` (any case), 1 where they follow an empty cell (pandas' ``to_csv`` writes its index first,
    under an empty name: ",path,label", a new user's probe), None where the row is no header."""
    names = [c.lower() for c in cells]
    for index in (0, 1):
        if names[:index] == [""] * index and any(names[index:index + len(h)] == list(h) for h in headers):
            return index
    return None


def _looks_like_a_header(cells: Sequence[str]) -> bool:
    """Whether a CSV's first row, which is no header this file takes, reads as a header all the same: two or more
    cells, each a name (letters first, no path separator) and none an image file."""
    import re

    named = [c for c in cells if c]
    return (len(named) >= 2 and not any(looks_like_image(c) for c in named)
            and all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_ -]{0,39}", c) for c in named))


def _shown_cells(cells: Sequence[str]) -> str:
    return ",".join(cells[:4]) + (",..." if len(cells) > 4 else "")


def _rows(path: Path, what: str, headers: Sequence[Sequence[str]], from_json: Callable, from_csv: Callable,
          json_fields: str, csv_columns: str, key_name: str) -> list[tuple[str, object]]:
    """(key, value) of every row of a labels file of any kind, in the file's order; ``from_json``
    and ``from_csv`` turn a record or the stripped cells of a row into one and raise :class:`_Bad`."""
    path = Path(path)
    text = read_text_file(path, what, utf16=True)
    malformed_json = f"is not a JSON object with {json_fields}"
    rows, first_line = [], {}

    def add(number: int, parse: Callable) -> None:
        try:
            key, value = parse()
        except _Bad as exc:
            raise UserError(f"{path}:{number} {exc}") from None
        if key in first_line:
            raise UserError(f"{path}:{number} lists {key} again (first on line {first_line[key]}); give each "
                            f"{key_name} one row")
        first_line[key] = number
        rows.append((key, value))

    if path.suffix.lower() in JSON_SUFFIXES:
        for number, record in json_records(text, path, malformed_json):
            add(number, lambda: from_json(record, malformed_json))
    else:
        header_possible, first = True, 0
        for number, row in csv_rows(text, path):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if header_possible:
                header_possible = False
                index = _header_index(cells, headers)
                if index is not None:
                    first = index
                    continue
                if _looks_like_a_header(cells):  # `id,file` was "lists file, which is not an image" (a probe)
                    expected = " or ".join(",".join(h) for h in headers)
                    raise UserError(f"{path}:{number} reads as a header ({_shown_cells(cells)}) with other column "
                                    f"names than {what}s take: name them {expected}, or leave the header out")
            cells = cells[first:]
            if len(cells) < 2:
                raise UserError(f"{path}:{number} needs two columns, {csv_columns}")
            add(number, lambda: from_csv(cells))
    if not rows:
        raise UserError(f"{what} {path} has no rows; give one {csv_columns} per line")
    return rows


def read_labels_file(path: Path, tags_hint: str = "with eval linear, add --multi-label") -> dict[str, str]:
    """``path`` → class label, as written in a JSONL or CSV labels file (see the module's rules).
    ``tags_hint``: what to do instead when the file lists several tags per image (the caller's fix)."""
    def from_json(record: dict, malformed: str):
        if "path" not in record or "label" not in record:
            if any(key in record for key in ("labels", "tags", "items")):  # a tags file (fmnist-scenes' scenes.jsonl)
                raise _Bad(f"{malformed}: it lists several tags for an image; {tags_hint}")
            raise _Bad(malformed)
        if isinstance(record["label"], list):
            raise _Bad(f"{malformed}: its label is a list of tags; {tags_hint}")
        return _scalar(record["path"], "path", malformed), _scalar(record["label"], "label", malformed)

    def from_csv(cells: list[str]):
        return _scalar(cells[0], "path", ""), _scalar(cells[1], "label", "")

    return dict(_rows(path, "labels file", [("path", "label")], from_json, from_csv,
                      json_fields="'path' and 'label' (each a string or a whole number)",
                      csv_columns="path and label", key_name="path"))


def read_multi_labels(path: Path) -> dict[str, list[str]]:
    """``path`` → its sorted tags, as written in a JSONL or CSV tags file (see the module's rules);
    an image may have no tag."""
    def from_json(record: dict, malformed: str):
        key = _scalar(record.get("path", record.get("image")), "path", malformed)
        if "labels" in record or "tags" in record:
            tags = record.get("labels", record.get("tags"))
        else:
            items = record.get("items")
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise _Bad(malformed)
            tags = [item.get("class_name", item.get("class")) for item in items]
        if not isinstance(tags, list):
            raise _Bad(malformed)
        return key, sorted({_scalar(t, "tag", malformed) for t in tags})

    def from_csv(cells: list[str]):
        return _scalar(cells[0], "path", ""), sorted({t.strip() for t in cells[1].split(";") if t.strip()})

    return dict(_rows(path, "labels file", [("path", "labels"), ("path", "tags")], from_json, from_csv,
                      json_fields="'path' (or 'image') and a list of 'labels', 'tags' or 'items'",
                      csv_columns="path and tags separated by ';'", key_name="path"))


def read_objects_file(path: Path) -> list[tuple[str, str]]:
    """(object_id, path) of every row of a JSONL or CSV objects file, in its order (see the module's
    rules: an object has as many rows as images, an image one row)."""
    def from_json(record: dict, malformed: str):
        if "object_id" not in record or "path" not in record:
            raise _Bad(malformed)
        return _scalar(record["path"], "path", malformed), _scalar(record["object_id"], "object_id", malformed)

    def from_csv(cells: list[str]):
        if looks_like_image(cells[0]) and not looks_like_image(cells[1]):  # path,object_id: every id "listed again"
            raise _Bad(f"starts with the image {cells[0]} and then {cells[1]}: the columns are object_id,path; "
                       f"swap them")
        return _scalar(cells[1], "path", ""), _scalar(cells[0], "object_id", "")

    rows = _rows(path, "objects file", [("object_id", "path")], from_json, from_csv,
                 json_fields="'object_id' and 'path' (each a string or a whole number)",
                 csv_columns="object_id and path", key_name="image")
    return [(object_id, relpath) for relpath, object_id in rows]


def looks_like_image(path: str) -> bool:
    """Whether a cell names an image file by its extension (one Pillow reads)."""
    from mlsctl.data.images import IMAGE_EXTENSIONS

    return path.lower().endswith(IMAGE_EXTENSIONS)


def _normal(path: str) -> str:
    """A path as a labels file and a folder's listing are compared: ``.`` and ``..`` folded, Unicode composed."""
    return unicodedata.normalize("NFC", posixpath.normpath(path))


def _location(path: str | Path) -> str:
    """A path made absolute and normal (``..`` folded, Unicode composed) without following links: two links
    to one file are two images, each with its own label (``resolve`` gave both the first one's: a review)."""
    return unicodedata.normalize("NFC", os.path.normpath(os.path.abspath(path)))


class ImagePaths:
    """The images ``files`` (relative to ``root``) as a labels or objects file ``listed_in`` names them:
    relative to ``root``, absolute, or relative to the file's own folder (a file beside ``images/``, as
    linear --multi-label reads it), compared as :func:`_normal` writes them (``find .`` writes ``./a.jpg``,
    macOS an ``é`` decomposed: a new user's probe, 2026-12-07)."""

    def __init__(self, files: Sequence[str], root: Path, listed_in: Path, kind: str = "labels file", option: str = ""):
        self.files, self.root, self.listed_in, self.kind = files, Path(root), Path(listed_in), kind
        self.option = option  # the option that gave the file, where messages name it ("--files")
        self._relative = {_normal(f): f for f in files}
        self._located: Optional[dict[str, str]] = None  # _location(root / file) → file
        self._beside: Optional[dict[str, str]] = None  # a file's path relative to the listing file's folder → file
        self._named: dict[str, str] = {}  # file → the path that first named it (find_once)

    def find(self, path: str) -> Optional[str]:
        """The file of ``files`` that ``path`` names, or None. A path with backslashes and no slash that names no
        file is read with ``/`` for ``\\`` (Windows' ``cat\\1.jpg``, "no label" without a hint: a review); a file
        whose name holds a backslash is found first."""
        found = self._find(path)
        if found is None and "\\" in path and "/" not in path:
            return self._find(path.replace("\\", "/"))
        return found

    def find_once(self, path: str, unit: str) -> Optional[str]:
        """:meth:`find`, refusing a file that an earlier path named otherwise (``a.jpg`` and ``./a.jpg``: one image
        put twice into a set, or listed twice for embed); ``unit``: what the file gives each image, a row or a line."""
        found = self.find(path)
        if found is not None and self._named.setdefault(found, path) != path:
            given = f"{self.option} " if self.option else ""
            raise UserError(f"{given}{self.listed_in} lists the image {found} twice, as {self._named[found]} and "
                            f"{path}; give each image one {unit}")
        return found

    def _find(self, path: str) -> Optional[str]:
        key = _normal(path)
        relative = not os.path.isabs(key)
        if relative and key in self._relative:
            return self._relative[key]
        if self._located is None:
            self._located = {_location(self.root / f): f for f in self.files}
        if relative and key != ".." and not key.startswith("../"):
            # under the file's folder, compared as text: what _location of that folder / key is for a normal key
            # without "..", at a dictionary lookup a row (a 1.28 M-row tags file: 9 µs a row through _location)
            if self._beside is None:
                folder = _location(self.listed_in.parent).rstrip("/") + "/"
                self._beside = {at[len(folder):]: f for at, f in self._located.items() if at.startswith(folder)}
            return self._beside.get(key)
        return self._located.get(_location(key if not relative else self.listed_in.parent / key))

    def rows(self, table: dict[str, T]) -> dict[str, T]:
        """The value of each file that a row of ``table`` (a labels or tags file's, by path) names; a file may
        have none (the caller says so), and one two rows name with two values is refused."""
        found: dict[str, tuple[str, T]] = {}  # file → (the row's path, its value)
        for key, value in table.items():
            relpath = self.find(key)
            if relpath is None:
                continue  # a labels file may list more images than the folder holds
            other = found.setdefault(relpath, (key, value))
            if other[1] != value:
                raise UserError(f"{self.kind} {self.listed_in} labels {self.root / relpath} twice, as '{other[1]}' "
                                f"({other[0]}) and '{value}' ({key}); give each image one row")
        return {relpath: value for relpath, (_, value) in found.items()}

    def where(self) -> str:
        """Where the paths are read from, for a message."""
        return (f"its paths are read relative to the images folder {self.root}, then to the {self.kind}'s folder, "
                f"or as absolute paths")


def labels_of(files: Sequence[str], root: Path, labels_file: Optional[Path], what: str,
              option: str = "a labels file option") -> list[str]:
    """The label of each file (relative to ``root``): its own folder (however deep), or its row of ``labels_file``
    (keyed by paths as :class:`ImagePaths` reads them); ``option`` names where the user gives that file."""
    names = _labels(files, root, labels_file, what, option)
    if labels_file is None:
        for line in nested_class_notes(names, what, option):
            logging.getLogger("mlsctl").warning(line)
    return names


def check_labels(files: Sequence[str], root: Path, labels_file: Optional[Path], what: str, option: str) -> None:
    """:func:`labels_of`'s refusals alone (its notes are said once, with the labels): an evaluation checks the images
    it is about to embed, since a new user's probe (2026-12-07) saw 500 images embedded, then refused."""
    _labels(files, root, labels_file, what, option)


def _labels(files: Sequence[str], root: Path, labels_file: Optional[Path], what: str, option: str) -> list[str]:
    if labels_file is None:
        names = [Path(f).parent.as_posix() for f in files]
        if any(n in ("", ".") for n in names):
            example = next(f for f, n in zip(files, names) if n in ("", "."))
            # fmnist-scenes writes train/labels.csv beside train/images/
            candidates = (Path(root) / "labels.csv", Path(root).parent / "labels.csv")
            beside = next((c for c in candidates if c.is_file()), None)
            raise UserError(f"{what}: {example} is not inside a class folder; images outside class folders need a "
                            f"labels file (CSV or JSONL of path,label): give it with {option}"
                            + (f" (there is one beside the images: {beside})" if beside is not None else ""))
        return names
    paths = ImagePaths(files, root, Path(labels_file))
    found = paths.rows(read_labels_file(Path(labels_file)))
    missing = [f for f in files if f not in found]
    if missing:
        raise UserError(f"labels file {labels_file} has no label for {len(missing)} image{'s' if len(missing) != 1 else ''} "
                        f"of {what} (first: {missing[0]}); {paths.where()}")
    return [found[f] for f in files]


def nested_class_notes(names: Sequence[str], what: str, option: str) -> list[str]:
    """A note where a class folder holds another class's folder (``cat/1.png`` and ``cat/kitten/2.png``).

    Each image's own folder is its class, however deep (``img/MEN/Denim/id_00000080/`` is one class of
    In-shop, a layout torchvision's ImageFolder would fold into the class ``img``), so two folders are
    never merged; but a folder holding images beside sub-folders of images is ambiguous, and is said."""
    classes = set(names)
    nested = sorted((outer, inner) for inner in classes for outer in map(str, PurePosixPath(inner).parents)
                    if outer in classes)
    if not nested:
        return []
    outer, inner = nested[0]
    others = len({inner for _, inner in nested}) - 1
    more = f" ({others} more class folder{'s' if others > 1 else ''} inside class folders)" if others else ""
    return [f"{what}: the images in {outer}/ and those in {inner}/ are two classes, as each image's own folder "
            f"is its class{more}; to put them in one class, give a labels file (CSV or JSONL of path,label) with "
            f"{option}"]


def nested_split_hint(train: Sequence[str], val: Sequence[str], options: str) -> str:
    """Why val classes none of which training holds may be the same objects: a val class folder that holds
    training class folders (``val/Boots/`` against ``train/Boots/sub0/``), or one inside a training class folder;
    "" where none is. Each image's own folder is its class, so the two splits name such classes apart, and the fix
    is labels files (``options``), not another evaluation."""
    train_set, val_set = set(train), set(val)
    holding: dict[str, list[str]] = {}  # a folder → the training classes inside it
    for name in sorted(train_set):
        for parent in map(str, PurePosixPath(name).parents):
            holding.setdefault(parent, []).append(name)
    unseen = sorted(val_set - train_set)
    holders = [v for v in unseen if v in holding]
    inside = [(v, t) for v in unseen for t in map(str, PurePosixPath(v).parents) if t in train_set]
    if holders:
        example, held = holders[0], holding[holders[0]]
        shown = " and ".join(held) if len(held) <= 2 else f"{held[0]}, {held[1]} and {len(held) - 2} more"
        count = f" ({len(holders)} val classes are such folders)" if len(holders) > 1 else ""
        where = f"the val class {example} is a folder holding the training classes {shown}{count}"
    elif inside:
        (example, outer), count = inside[0], len({v for v, _ in inside})
        more = f" ({count} val classes lie inside training class folders)" if count > 1 else ""
        where = f"the val class {example} lies inside the training class folder {outer}{more}"
    else:
        return ""
    return (f"{where}, as each image's own folder is its class; to compare them as one class, give labels files "
            f"(CSV or JSONL of path,label) with {options}")


def class_ids(names: list[str], what: str):
    """Class names → indices [n] (a torch tensor) and the sorted class list; refuses fewer than two classes."""
    import torch

    classes = sorted(set(names))
    if len(classes) < 2:
        raise UserError(f"{what} has a single class ({classes[0] if classes else 'none'}); metric learning needs at "
                        f"least two (one folder per class, or a labels file naming them)")
    lookup = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lookup[n] for n in names], dtype=torch.long), classes


PATH_HEADERS = ("path", "image", "file", "filename")


def read_paths_file(path: Path, what: str) -> list[str]:
    """The image paths a list file names, in its order (``embed --files``): a JSONL of records with a
    ``path`` (or ``image``); a CSV (a name ending in ``.csv``) whose first column is the path (a labels
    file serves as it is: a first row whose first cell is ``path``, ``image``, ``file`` or ``filename`` is
    its header, pandas' index before it dropped as the labels files' rule drops it); or else a plain list
    such as ``find``'s output, one path a line, taken whole (a comma or a quote is part of the name) but
    for the spaces around it (a name that starts or ends with a space is listed in a JSONL), a first line
    that is one of those header names skipped. A path listed twice is refused, as in the other labels files."""
    path = Path(path)
    text = read_text_file(path, what, utf16=True)
    found: dict[str, int] = {}
    headers = [(name,) for name in PATH_HEADERS]
    if path.suffix.lower() in JSON_SUFFIXES:
        numbered, malformed = [], "is not a JSON object with a \"path\" (a string)"
        for number, record in json_records(text, path, malformed):
            value = record.get("path", record.get("image"))
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{path}:{number} {malformed}")
            numbered.append((number, value))
    else:
        if path.suffix.lower() == ".csv":
            rows = [(number, [c.strip() for c in row]) for number, row in csv_rows(text, path)]
        else:  # a comma or a leading quote in a name is no CSV syntax (a review)
            rows = [(number, [line.strip()]) for number, line in enumerate(text.splitlines(), 1)]
        rows = [(number, cells) for number, cells in rows if any(cells)]
        index = _header_index(rows[0][1], headers) if rows else None
        if index is not None:
            rows = rows[1:]
        column = index or 0  # after pandas' index, where its header says so
        numbered = [(number, cells[column] if len(cells) > column else "") for number, cells in rows]
    for number, value in numbered:
        if not value:
            raise UserError(f"{path}:{number} has an empty path; give every line one")
        if value in found:
            raise UserError(f"{path}:{number} lists {value} again (first on line {found[value]}); give each image "
                            f"one line")
        found[value] = number
    if not found:
        raise UserError(f"{what} {path} lists no image; give one path a line")
    return list(found)


def listed_files(files: Sequence[str], root: Path, list_file: Path, what: str) -> list[str]:
    """Those of ``files`` (paths relative to ``root``) that ``list_file`` names (:func:`read_paths_file`),
    in the order of ``files``. A listed path is read as :class:`ImagePaths` reads them (relative to ``root``,
    then to the list file's folder, or absolute); one that is none of ``files`` (missing, or not an image) is
    refused, naming the first, and so is an image two paths name (``a.jpg`` and ``./a.jpg``)."""
    paths = ImagePaths(files, root, Path(list_file), "list file", option=what)
    chosen, missing = set(), []
    for key in read_paths_file(list_file, what):
        hit = paths.find_once(key, "line")
        if hit is None:
            missing.append(key)
        else:
            chosen.add(hit)
    if missing:
        raise UserError(f"{what} {list_file} lists {len(missing)} path{'s' if len(missing) != 1 else ''} that "
                        f"{'are' if len(missing) != 1 else 'is'} no image under {root} (first: {missing[0]}); "
                        f"{paths.where()}")
    return [f for f in files if f in chosen]
