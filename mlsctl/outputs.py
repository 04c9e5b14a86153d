"""What a command's ``--out`` may replace: nothing but an earlier output of the same kind.

A results JSON or a picture written over the file a command reads — a feature folder's manifest or
shard, a run's weights, a labels file, a training image — destroyed it and the command said
"written" (a probe, 2026-12-06). These checks run when the command line is read, before any work:

* :func:`check_results_target`: a results file (``eval --out``) may replace only an earlier results
  file of mlsctl (a JSON object with ``command`` and ``written``, as
  :func:`mlsctl.evaluate.results.write_result` writes, or an older one whose ``command`` is an eval);
* :func:`check_picture_target`: a picture (``plot``, ``viz pca``, ``bank plot``, ``bank neighbors``,
  ``refine plot``) may replace only a PNG that mlsctl drew (its ``Software`` text chunk, which
  :func:`save_figure` and :func:`save_image` write);
* :func:`check_outside_images`: nor is it drawn among the images the command reads or its run
  trains on (checked once the inputs are open).

Both refuse an empty path, a folder, something that is not a regular file (a FIFO would make the
check wait for ever), a path under a file, and a folder this process cannot write into (a read-only
file system: said before the work, not after it), naming the user's path, never the temporary file
an atomic write would have used. :func:`mlsctl.evaluate.results.write_result` checks again when the
work is done, for a file the command itself made meanwhile (a feature cache's manifest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlsctl import atomic
from mlsctl.errors import UserError

PNG_SOFTWARE = "mlsctl"  # the PNG text chunk "Software" of every picture mlsctl draws (matplotlib's own mark is
# not enough: plt.imsave writes it into data sets' images and masks too, a probe found on 2026-12-06)
_RESULTS_READ_LIMIT = 512 * 2**20  # a results file is JSON of at most a few MB; a larger file is something else


def check_place(out: Path, option: str, what: str) -> None:
    """``out`` can be a file: not empty, not a folder, not under a file."""
    if not str(out).strip():
        raise UserError(f"{option} is empty; give the path of the {what} to write")
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; give the path of the {what} to write inside it, such as "
                        f"{out / ('results.json' if what == 'results file' else 'picture.png')}")
    if out.exists() and not out.is_file():
        raise UserError(f"{option} {out} is not a regular file (a device, a pipe or a socket); give a file path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {out}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK):
                raise UserError(f"{option} {out}: this process cannot write into {parent} (read-only or not "
                                f"permitted); choose another path", exit_code=1)  # the machine's, as elsewhere
            break


def is_results_file(path: Path) -> bool:
    """``path`` holds a results JSON that mlsctl wrote (an object with ``command`` and ``written``)."""
    try:
        if path.stat().st_size > _RESULTS_READ_LIMIT:
            return False
        with open(path, "rb") as f:
            if f.read(1) != b"{":
                return False
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    command = record.get("command")  # results written before 2026-12-05 have no "written" stamp
    return "written" in record and "command" in record or isinstance(command, str) and command.startswith("eval ")


def check_results_target(out: Path, option: str = "--out") -> None:
    check_place(out, option, "results file")
    if out.exists() and not is_results_file(out):
        raise UserError(f"{option} {out} exists and is not a results file of mlsctl (it may be one of the inputs); "
                        f"choose another path, or delete it first if it is not needed")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``a`` and ``b`` name one file: the same path, through a symbolic link, or a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def drawn_by_us(path: Path) -> bool:
    """``path`` is a PNG that mlsctl wrote (since 2026-12-06: its ``Software`` text chunk)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            software = image.info.get("Software", "") if image.format == "PNG" else ""
    except (OSError, UnidentifiedImageError, ValueError):
        return False
    return isinstance(software, str) and software.startswith(PNG_SOFTWARE)


def check_picture_target(out: Path, option: str = "--out") -> None:
    if not str(out).lower().endswith(".png"):
        raise UserError(f"{option} {out} must end in .png: the picture is written as a PNG")
    check_place(out, option, "picture")
    if out.exists() and not drawn_by_us(out):
        raise UserError(f"{option} {out} exists and is not a picture mlsctl drew (it may be an input image); choose "
                        f"another path, or delete it first if it is not needed")


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, links resolved (neither need exist)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_outside_images(out: Path, images, whose: str, option: str = "--out") -> None:
    """A picture is never drawn inside ``images``, a folder of images a command reads or a run trains
    on (``whose`` says which): there it would become one of them (a new user, 2026-12-06: ``bank plot``'s
    default bank.png landed in the run's data.root, which its ``--resume`` then refused)."""
    if images is None:
        return
    if inside(out, images):
        raise UserError(f"{option} {out} is inside {images}, {whose}: a picture there would become one of its "
                        f"images; write it elsewhere with {option}")


def pyplot():
    """matplotlib's pyplot, drawing to files (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def literal_text(draw):
    """A drawer whose text is drawn as written: no ``$...$`` math (a probe, 2026-12-07: ``plot --title
    '$x^$'`` and a run folder named ``exp$^_1$`` ended in an internal error, and a balanced pair of ``$``
    came out as math). Set for the drawing only, so a caller's own figures keep their math text."""
    import functools

    @functools.wraps(draw)
    def drawing(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawing


def save_figure(figure, out: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG, atomically, marked as mlsctl's (never over a file it did not
    draw: :func:`check_picture_target`, asked again for library callers)."""
    from mlsctl import __version__

    check_picture_target(Path(out))

    atomic.write_with(out, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi,
                                                      metadata={"Software": f"{PNG_SOFTWARE} {__version__}"}))


def save_image(image, out: Path) -> None:
    """A PIL image as a PNG, atomically, marked as mlsctl's (as :func:`save_figure`, never over a file
    it did not draw)."""
    from PIL.PngImagePlugin import PngInfo

    from mlsctl import __version__

    check_picture_target(Path(out))

    info = PngInfo()
    info.add_text("Software", f"{PNG_SOFTWARE} {__version__}")
    atomic.write_with(out, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
