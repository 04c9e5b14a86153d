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


from mlsctl.cli import data as _data  # noqa: E402
from mlsctl.cli import pretrain as _pretrain  # noqa: E402,F401
from mlsctl.cli import recipes as _recipes  # noqa: E402,F401

app.add_typer(_data.app, name="data")


def main() -> None:
    try:
        app()
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
