from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlsctl.data.images import BadImage, ImageFolder, SkipLog, find_images, load_rgb
from mlsctl.data.loader import MultiCropDataset, collate
from mlsctl.data.multicrop import MultiCrop
from mlsctl.errors import UserError


def write_bad_files(root: Path) -> dict[str, str]:
    """Zero-byte, truncated JPEG and a text file with an image extension."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "notes.jpg").write_text("this is not an image\n")
    return {"empty.png": "empty file (0 bytes)", "truncated.jpg": "truncated image data", "notes.jpg": "not an image file"}


def test_find_images_is_recursive_sorted_and_filtered(tmp_path: Path):
    for name in ["b.png", "a/z.JPG", "a/y.webp", "c.txt", ".hidden/x.png", "d.tiff", "e.bmp", "f.jpeg"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/y.webp", "a/z.JPG", "b.png", "d.tiff", "e.bmp", "f.jpeg"]


def test_missing_and_empty_folders_are_clear_errors(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="contains no images"):
        find_images(tmp_path / "empty")


def test_a_missing_benchmark_folder_names_the_command_that_builds_it(tmp_path: Path, capsys):
    """A new-user probe (2026-12-06): `pretrain ms_fmnist_products` without its data said only "check the path"."""
    from conftest import cli

    for root, command in ((tmp_path / "data" / "fmnist-sop" / "train", "mlsctl data fmnist-products --layout sop --out "),
                          (tmp_path / "data" / "fmnist-scenes" / "train" / "images", "mlsctl data fmnist-scenes --out "),
                          (tmp_path / "data" / "fmnist-products" / "train", "mlsctl data fmnist-products --out ")):
        with pytest.raises(UserError, match=f"does not exist; build it with: {command}"):
            find_images(root)
    with pytest.raises(UserError, match="does not exist; check the path"):
        find_images(tmp_path / "mine")
    # embed says so before it loads a model (it used to ask for one first)
    code, _, err = cli("embed", str(tmp_path / "nope"), "--out", str(tmp_path / "f"), capsys=capsys)
    assert code == 2 and f"image folder {tmp_path / 'nope'} does not exist" in err


def test_bad_files_raise_bad_image_with_reasons(tmp_path: Path):
    expected = write_bad_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(BadImage) as info:
            load_rgb(tmp_path / name)
        assert str(info.value) == reason


def test_a_file_the_file_system_refuses_is_skipped_with_its_reason(tmp_path: Path, monkeypatch):
    """Noticed 2026-12-05: an unreadable file read 'cannot decode ([Errno 13] Permission denied: ...)', and a file
    removed after the listing stopped training with a traceback from a loader worker. Both are now skipped with
    their reason. What is the machine's, not the file's, still stops the command (a review, 2026-12-06: skipping
    them would commit a whole folder as unreadable while its mount is gone): too many open files, an I/O error,
    and a file whose folder is gone too."""
    import errno

    import PIL.Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(BadImage, match=r"^no such file$"):
        load_rgb(tmp_path / "removed.png")
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "unmounted" / "a.png")
    real_open = PIL.Image.open

    def refuse(code):
        def open_(fp, *args, **kwargs):
            if isinstance(fp, (str, Path)):
                raise OSError(code, os.strerror(code), str(fp))
            return real_open(fp, *args, **kwargs)
        return open_

    monkeypatch.setattr(PIL.Image, "open", refuse(errno.EACCES))
    with pytest.raises(BadImage, match=r"^cannot read it \(permission denied\)$"):
        load_rgb(tmp_path / "ok.png")
    for machine_error in (errno.EMFILE, errno.EIO):
        monkeypatch.setattr(PIL.Image, "open", refuse(machine_error))
        with pytest.raises(OSError) as raised:
            load_rgb(tmp_path / "ok.png")
        assert not isinstance(raised.value, BadImage) and raised.value.errno == machine_error


def test_training_skips_a_file_removed_after_the_listing(tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 40), (0, 128, 0)).save(root / name)
    folder = ImageFolder(root)
    (root / "a.png").unlink()
    dataset = MultiCropDataset(folder, MultiCrop(16, (0.5, 1.0), n_local=0, photometric="none"), seed=0)
    batch = collate([dataset[(0, 0)]])
    assert batch.image_ids.tolist() == [1]
    assert batch.skipped == [("a.png", "no such file")]


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_8bit_rgb(tmp_path: Path, mode: str):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
        assert image.mode.startswith("I;16")
    elif mode == "F":
        image = Image.fromarray(np.linspace(-1, 1, 600, dtype=np.float32).reshape(20, 30))
    else:
        image = rgb.convert(mode)
    suffix = ".tif" if mode in ("CMYK", "I", "F", "LA") else ".png"
    if mode == "CMYK":
        suffix = ".jpg"
    path = tmp_path / f"img{suffix}"
    image.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped: the brightest pixel maps near 255
        array = np.asarray(out)[..., 0]
        assert array.max() >= 250 * (59900 / 65535) - 2 and array.min() == 0


def test_transparent_pixels_become_white(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


@pytest.mark.parametrize("file_format", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_equals_pillows_for_every_orientation(file_format):
    """The orientation is read in place from the EXIF block (exif_orientation), no longer by Pillow's
    ImageOps.exif_transpose: the same pictures, for each of the 8 orientations."""
    from PIL import ImageOps

    from mlsctl.data.images import decode_rgb

    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = base.getexif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        base.save(buffer, file_format, exif=exif if file_format == "TIFF" else exif.tobytes())
        with Image.open(io.BytesIO(buffer.getvalue())) as opened:
            expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        assert np.array_equal(np.asarray(decode_rgb(buffer.getvalue())), expected), orientation


def test_an_exif_block_of_tags_sharing_one_value_costs_no_memory():
    """An attacker's probe (2026-12-05): Pillow's EXIF reader copies a tag's data once per tag pointing at it, so a
    1 MB PNG whose EXIF block held 1,500 tags sharing one 1 MiB value took gigabytes to turn upright. The
    orientation is read in place: here 400 tags x 256 KiB (100 MiB through Pillow's reader) cost under 8 MiB."""
    import struct
    import tracemalloc
    import zlib

    from mlsctl.data.images import decode_rgb

    tags, size = 400, 256 * 1024
    data_at = 8 + 2 + 12 * (tags + 1) + 4
    entries = struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)  # orientation 6 ...
    entries += b"".join(struct.pack("<HHII", 0x9000 + i, 7, size, data_at) for i in range(tags))  # ... and the bomb
    block = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", tags + 1) + entries + b"\0" * 4 + b"\0" * size
    buffer = io.BytesIO()
    Image.new("L", (40, 20), 7).save(buffer, "PNG")
    png = buffer.getvalue()
    chunk = struct.pack(">I", len(block)) + b"eXIf" + block + struct.pack(">I", zlib.crc32(b"eXIf" + block))
    at = png.index(b"IDAT") - 4
    tracemalloc.start()
    try:
        decoded = decode_rgb(png[:at] + chunk + png[at:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.size == (20, 40) and peak < 8 * 2**20, peak


def test_dataset_skips_bad_files_and_reports_each_once(tmp_path: Path, caplog):
    root = tmp_path / "data"
    expected = write_bad_files(root)
    Image.new("RGB", (40, 40), (0, 128, 0)).save(root / "ok.png")
    folder = ImageFolder(root)
    dataset = MultiCropDataset(folder, MultiCrop(16, (0.5, 1.0), n_local=0, photometric="none"), seed=0)
    batch = collate([dataset[(0, i)] for i in range(len(folder))])
    assert len(batch) == 4  # every sample came back, bad ones replaced by the next readable image
    ok_index = folder.relpaths().index("ok.png")
    assert batch.image_ids.tolist() == [ok_index] * 4
    skips = SkipLog(root)
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        skips.extend(batch.skipped)
    assert skips.reasons == expected
    assert len([r for r in caplog.records if r.message.startswith("skipped ")]) == 3
    assert skips.summary() == f"skipped 3 unreadable files in {root}"


def test_a_folder_of_only_unreadable_images_says_why(tmp_path: Path):
    """A new-user probe (2026-12-05): data.max_image_pixels below every image said only 'none of the 48 files could
    be decoded', naming neither a file nor the limit."""
    from mlsctl.data.loader import load_or_next
    from mlsctl.errors import UserError

    for i in range(3):
        Image.new("RGB", (40, 40)).save(tmp_path / f"{i}.png")
    folder = ImageFolder(tmp_path, max_pixels=100)
    with pytest.raises(UserError, match=r"could be decoded as an image \(the first, \d.png: 40x40 is more than 100 "
                                        r"pixels .*data.max_image_pixels"):
        load_or_next(folder, [0, 1, 2], 0, None, "3 files")


def test_an_image_folder_keeps_its_paths_in_one_array_that_workers_share(tmp_path: Path):
    """A scale review (2026-12-05): the list of Path objects grew into a private copy in every forked
    loader worker (reference counts written on every read): about 300 MB a worker for ImageNet."""
    import numpy as np

    from conftest import make_images

    root = make_images(tmp_path / "data", 5)
    (root / "sub" / "café é.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "sub" / "café é.png")
    folder = ImageFolder(root)
    assert isinstance(folder._relpaths, np.ndarray) and folder._relpaths.dtype.kind == "S"
    assert folder.relpaths() == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert "sub/café é.png" in folder.relpaths()
    assert folder.load(folder.relpaths().index("sub/café é.png")).size == (8, 8)


def test_a_typo_under_a_built_benchmark_is_no_call_to_build_it(tmp_path: Path):
    """A probe (2026-12-06): `embed data/fmnist-scenes/val/imagess` advised building fmnist-scenes, which was there."""
    (tmp_path / "data" / "fmnist-scenes" / "val" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="does not exist; check the path"):
        find_images(tmp_path / "data" / "fmnist-scenes" / "val" / "imagess")


def test_files_that_are_not_images_are_one_line_and_heic_photos_name_their_plugin(tmp_path, finished_run, capsys,
                                                                                    monkeypatch):
    """A new user's probe (2026-12-07): embed said each of 300 annotation files on a line of its own and pretrain
    none; a phone's .HEIC photos were "not an image file" and "no images (bmp, gif, ...)". Both say one line now,
    naming the plugin HEIC needs (pillow-heif, which mlsctl registers where it is installed)."""
    import sys
    import types

    from conftest import cli, make_images
    from mlsctl.data import images as images_module
    from mlsctl.data.images import IMAGE_EXTENSIONS, require_images, scan_images

    if ".heic" in IMAGE_EXTENSIONS:
        pytest.skip("pillow-heif is installed here: HEIC photos are images")
    images = make_images(tmp_path / "images", 3, size=(32, 32))
    for i in range(30):
        (images / f"ann_{i:02d}.txt").write_text("a box\n")
    (images / "sub" / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(16))
    (images / "Thumbs.db").write_bytes(b"\0")  # a file browser's, and no one's file
    hint = "HEIC photos need a Pillow plugin: pip install pillow-heif (mlsctl reads them once it is installed)"
    note = f"left out 31 files that are not images (30 .txt, 1 .heic; e.g. ann_00.txt); {hint}"
    assert scan_images(images).notes("data.root") == [f"data.root {images}: {note}"]  # pretrain's notes
    code, _, err = cli("embed", str(images), "--run", str(finished_run[0]), "--out", str(tmp_path / "f"), capsys=capsys)
    assert code == 0 and err.count("left out 31 files") == 1 and "ann_01" not in err, err
    code, out, err = cli("embed", str(images), "--run", str(finished_run[0]), "--out", str(tmp_path / "f"),
                         capsys=capsys)  # reused: the scan's line is not said, the manifest's is
    assert code == 0 and "already holds" in out and err.count(note) == 1 and "ann_01" not in err, err
    with pytest.raises(BadImage, match=re.escape(f"not an image file Pillow here reads: {hint}")):
        load_rgb(images / "sub" / "phone.HEIC")
    heic_only = tmp_path / "phone"
    heic_only.mkdir()
    (heic_only / "a.heic").write_bytes(b"\0")
    with pytest.raises(UserError, match=re.escape(f"image folder {heic_only} contains no images Pillow here reads; {hint}")):
        require_images(scan_images(heic_only), "image folder")
    registered = []
    monkeypatch.setitem(sys.modules, "pillow_heif", types.SimpleNamespace(register_heif_opener=lambda: registered.append(1)))
    images_module._register_plugins()
    assert registered == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux")
def test_loader_workers_are_forked_whatever_the_default_start_method():
    """Python 3.14 makes forkserver Linux's default start method: a loader's workers would then be children of the
    forkserver, outliving a command killed with SIGKILL (a review, 2026-12-07, saw ~700 MB workers left running);
    the loader forks them, and they stop with the command."""
    import multiprocessing

    from mlsctl.data.loader import Loader

    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        loader = Loader(list(range(4)), batch_size=2, num_workers=1)
        assert loader.multiprocessing_context.get_start_method() == "fork"
        assert Loader(list(range(4)), batch_size=2, num_workers=0).multiprocessing_context is None
    finally:
        multiprocessing.set_start_method(before, force=True)


def test_read_rgb_refuses_a_huge_image_by_its_header_before_reading_the_file_whole(tmp_path):
    """read_rgb (a gallery's photos: hashed and decoded from one read) checks the header of the file it opened
    first: a file whose header is over the pixel limit is refused without its bytes in memory (a review,
    2026-12-08: the whole file was read, then refused)."""
    import tracemalloc

    from mlsctl.data.images import read_rgb

    path = tmp_path / "bomb.png"
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")  # 16 M pixels, a few KB of PNG
    path.write_bytes(buffer.getvalue() + os.urandom(8 << 20))  # and 8 MB after it that a decoder never needs
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match="pixels"):
            read_rgb(path, max_pixels=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), peak
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(small)
    digest, image = read_rgb(small)
    assert digest == hashlib.sha256(small.read_bytes()).digest()
    assert image.size == (8, 6) and image.getpixel((0, 0)) == (200, 10, 10)
    # a photo within the limit, padded: hashed whole, in chunks, never held whole (a review, 2026-12-08: 300 MB of
    # padding cost 600 MB)
    padded = tmp_path / "padded.png"
    padded.write_bytes(small.read_bytes() + os.urandom(8 << 20))
    tracemalloc.start()
    try:
        digest, image = read_rgb(padded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(padded.read_bytes()).digest() and image.size == (8, 6)
    assert peak < (3 << 20), peak


def test_read_rgb_refuses_a_fifo_or_a_device_named_png_without_waiting(tmp_path):
    """A probe (2026-12-08): index build hung for good on a FIFO named .png among an object's photos (read_rgb
    opened it and waited for a writer); a device link was "empty file (0 bytes)". Both are no regular file."""
    import signal

    from mlsctl.data.images import read_rgb

    fifo = tmp_path / "zz.png"
    os.mkfifo(fifo)
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("read_rgb waited on a FIFO"))
    signal.alarm(10)
    try:
        for path in (fifo, device):
            with pytest.raises(BadImage, match=r"^not a regular file \(a pipe or a device\)$"):
                read_rgb(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_load_rgb_names_a_device_as_no_regular_file_not_as_empty(tmp_path):
    """A probe (2026-12-08): a link to /dev/zero named .png was "empty file (0 bytes)" in index build and embed,
    "not a file" elsewhere; it is named as what it is."""
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    with pytest.raises(BadImage, match=r"^not a regular file \(a pipe or a device\)$"):
        load_rgb(device)
