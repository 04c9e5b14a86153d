"""What the commands share in how they parse and list: options whose value is one of a fixed set,
and the order of the commands in ``mlsctl --help``.

Such an option is annotated with a ``Literal`` of its values, so ``--help`` lists them
(``--resize <square|center-crop>``), and parsed by :func:`one_of`, so a wrong value is one sentence
naming the option and its values, printed as every other :class:`~mlsctl.errors.UserError`
(exit code 2) rather than as click's usage block::

    Resize = Literal["square", "center-crop"]
    resize: Resize = typer.Option("square", "--resize", parser=one_of("--resize", Resize), help=...)

Kept free of heavy imports: every command module imports it at start-up.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional, get_args

from typer.core import TyperGroup

# `mlsctl --help` lists the commands in the order of the work: build data, pick a recipe, pretrain,
# embed, evaluate, look inside the banks, build a gallery and search it (or serve it), refine
# embeddings, export the backbone, draw and report. A command missing here is listed last.
COMMAND_ORDER = ("data", "recipes", "pretrain", "embed", "eval", "bank", "index", "search", "serve", "refine",
                 "export", "plot", "report", "viz")


class WorkflowGroup(TyperGroup):
    """The root command group, listing its commands in :data:`COMMAND_ORDER`."""

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


def one_of(option: str, kind: Any, problem: Optional[str] = None) -> Callable[[str], str]:
    """The parser of ``option`` whose values are those of the ``Literal`` ``kind``. ``problem``
    words the refusal (``{option}``, ``{value}``, ``{choices}`` filled in) [default: "OPTION VALUE
    is not one of A, B"]; a close value is suggested."""
    choices = tuple(get_args(kind))
    if not choices or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"one_of({option!r}) needs a Literal of strings, got {kind!r}")  # a bug in a command

    def parse(value: Any) -> str:
        from mlsctl.errors import UserError

        if value in choices:
            return value
        text = str(value)
        message = (problem or "{option} {value} is not one of {choices}").format(
            option=option, value=text if text else "''", choices=", ".join(choices))
        close = difflib.get_close_matches(text, choices, n=1, cutoff=0.6)
        raise UserError(message + (f"; did you mean {close[0]}?" if close else ""))

    parse.choices = choices  # what a test compares with the library's own list
    return parse
