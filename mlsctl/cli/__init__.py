"""The ``mlsctl`` command line: parse, call the library, print. No training or math here.

Exit codes: 0 success, 1 failure of a well-formed request, 2 usage error. A
:class:`~mlsctl.errors.UserError` is printed as one line, never as a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mlsctl import __version__
from mlsctl.errors import UserError

app = typer.Typer(
    name="mlsctl",
    help="Self-supervised and metric learning of vision transformers with memory banks.\n\n"
         "Example: mlsctl data fmnist-scenes --out data/fmnist-scenes && "
         "mlsctl pretrain dino_fmnist_quick --out runs/quick",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    pass


from mlsctl.cli import bank as _bank  # noqa: E402
from mlsctl.cli import data as _data  # noqa: E402
from mlsctl.cli import eval as _eval  # noqa: E402
from mlsctl.cli import embed as _embed  # noqa: E402,F401
from mlsctl.cli import index as _index  # noqa: E402
from mlsctl.cli import pretrain as _pretrain  # noqa: E402,F401
from mlsctl.cli import recipes as _recipes  # noqa: E402,F401
from mlsctl.cli import viz as _viz  # noqa: E402

app.add_typer(_bank.app, name="bank")
app.add_typer(_data.app, name="data")
app.add_typer(_eval.app, name="eval")
app.add_typer(_index.app, name="index")
app.command("search")(_index.search)
app.add_typer(_viz.app, name="viz")

# Options that take several values accept them space-separated (``--fraction 1/1 1/8``) as well as
# repeated (``--fraction 1/1 --fraction 1/8``); click itself only knows the repeated form.
MULTI_VALUE_OPTIONS = {("eval", "knn"): ("--k",), ("eval", "knn-seg"): ("--fraction",), ("bank", "export"): ("--bank",),
                       ("search",): ("--set",), ("eval", "retrieval"): ("--noise",)}


def expand_multi_values(argv: list[str]) -> list[str]:
    for path, options in MULTI_VALUE_OPTIONS.items():
        if tuple(argv[:len(path)]) == path:
            break
    else:
        return argv
    out: list[str] = []
    current, pending = None, False
    for token in argv:
        if token.startswith("-") and not _is_number(token):
            current, pending = (token, True) if token in options else (None, False)
            out.append(token)
        elif pending:
            out.append(token)
            pending = False
        elif current is not None:
            out += [current, token]
        else:
            out.append(token)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def main() -> None:
    try:
        app(args=expand_multi_values(sys.argv[1:]), prog_name="mlsctl")
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
