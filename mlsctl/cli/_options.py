"""What the commands share in how they parse and list: options whose value is one of a fixed set,
recipe overrides mistaken for options, and the order of the commands in ``mlsctl --help``.

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
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, get_args

import typer
from typer.core import TyperCommand, TyperGroup

# The model a command embeds images with (mlsctl.restore.choose_model), declared once so that every
# command that takes one (embed and the evaluations) reads the same in --help; each command words
# its own --seed, which seeds more than --random-init in most of them.
RUN_OPTION = typer.Option(None, "--run", help="Run whose teacher embeds the images [default: the newest run under ./runs].")
WEIGHTS_OPTION = typer.Option(None, "--weights", help="Embed the images with this local .safetensors/.pth backbone instead of a run.")
MODEL_OPTION = typer.Option(None, "--model", help="timm architecture of --weights (read from the file when it records it).")
RANDOM_INIT_OPTION = typer.Option(False, "--random-init", help="The architecture of --run (or --weights), randomly initialised (a baseline).")
MODEL_OPTION_NAMES = ("--run", "--weights", "--model", "--random-init")

# A run folder given as an argument (export, report, bank ...).
RUN_ARGUMENT = typer.Argument(..., help="Run folder (written by mlsctl pretrain).")

# `mlsctl --help` lists the commands in the order of the work: build data, pick a recipe, pretrain,
# embed, evaluate, look inside the banks, build a gallery and search it (or serve it), refine
# embeddings, export the backbone, draw and report. A command missing here is listed last.
COMMAND_ORDER = ("data", "recipes", "pretrain", "embed", "eval", "bank", "index", "search", "serve", "refine",
                 "export", "plot", "report", "compare", "viz")


class WorkflowGroup(TyperGroup):
    """The root command group, listing its commands in :data:`COMMAND_ORDER`."""

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


def one_of(option: str, kind: Any, problem: Optional[str] = None) -> Callable[[str], str]:
    """The parser of ``option`` whose values are those of the ``Literal`` ``kind``. ``problem``
    words the refusal (``{option}``, ``{value}``, ``{choices}`` filled in) [default: "OPTION VALUE
    is not one of A, B", or "OPTION VALUE is not available: the only OPTION is A" where there is one]; a close
    value is suggested."""
    choices = tuple(get_args(kind))
    if not choices or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"one_of({option!r}) needs a Literal of strings, got {kind!r}")  # a bug in a command

    def parse(value: Any) -> str:
        from mlsctl.errors import UserError

        if value in choices:
            return value
        text = str(value)
        # one choice: "--format onnx is not one of timm" read wrong (a probe, 2026-12-08)
        default = "{option} {value} is not available: the only {option} is {choices}" if len(choices) == 1 else \
            "{option} {value} is not one of {choices}"
        message = (problem or default).format(
            option=option, value=text if text else "''", choices=", ".join(choices))
        close = difflib.get_close_matches(text, choices, n=1, cutoff=0.6)
        raise UserError(message + (f"; did you mean {close[0]}?" if close else ""))

    parse.choices = choices  # what a test compares with the library's own list
    return parse


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def png_file(option: str) -> Callable:
    """A callback for an option naming the PNG a command draws, checked before any work: a name that
    does not end in .png (PNG data under a .jpg name), a folder, or an existing file that is not a
    picture mlsctl drew (an input image) is refused in one sentence (:mod:`mlsctl.outputs`)."""
    def check(value):
        if value is not None:
            from mlsctl.outputs import check_picture_target

            check_picture_target(Path(value), option)
        return value

    return check


def results_path(option: str = "--out") -> Callable[[str], Path]:
    """The parser of an evaluation's results-file option: a name ending in ``/`` names a folder, so it is refused
    (a new user's probe, 2026-12-08: ``--out newdir2/`` wrote a file called ``newdir2``)."""
    def parse(value: Any) -> Path:
        from mlsctl.errors import UserError

        text = str(value)
        if text.endswith(("/", os.sep)) and text.strip("/" + os.sep):
            stem = text.rstrip("/" + os.sep)
            raise UserError(f"{option} {text} names a folder; give a file such as {stem}/results.json")
        return Path(text)

    return parse


def results_file(option: str = "--out") -> Callable:
    """A callback for an evaluation's results JSON, checked before any work: it may be new or replace
    an earlier results file, never another file (:mod:`mlsctl.outputs`); without it, the default
    folder ``results/`` must be writable (:func:`mlsctl.evaluate.results.check_default_place`)."""
    def check(value):
        if value is not None:
            from mlsctl.outputs import check_results_target

            check_results_target(Path(value), option)
        else:
            from mlsctl.evaluate.results import check_default_place

            check_default_place()
        return value

    return check


def dashed_override(args: Sequence[str], known: set[str], takes_value: set[str]) -> Optional[str]:
    """The sentence for the first token of ``args`` that is a recipe override written as an option
    (``--data.root=/x``, ``--data.root /x``, ``--seed=3``): overrides take no dashes. Tokens that
    are options of the command (``known``) or the values of those that take one are left alone."""
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        name, eq, value = token.partition("=")
        if name in takes_value and not eq:
            i += 2
            continue
        key = name[2:]
        if token.startswith("--") and name not in known and _KEY.fullmatch(key) and ("." in key or _recipe_key(key)):
            shown = token
            if not eq:
                following = args[i + 1] if i + 1 < len(args) else None
                value = following if following is not None and not following.startswith("-") else "VALUE"
                shown = f"{token} {following}" if value == following else token
            import shlex

            return f"overrides take no dashes: write {shlex.quote(f'{key}={value}')} instead of {shown}"
        i += 1
    return None


def _recipe_key(key: str) -> bool:
    from dataclasses import fields

    from mlsctl.config import Recipe

    return key in {f.name for f in fields(Recipe)}


class OverridesCommand(TyperCommand):
    """A command that takes recipe overrides (``key.sub=value``) besides its options: one written
    as an option is refused with the spelling that works, instead of click's "No such option"."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from mlsctl.errors import UserError

        options = [p for p in self.get_params(ctx) if getattr(p, "param_type_name", "") == "option"]
        known = {name for p in options for name in p.opts + p.secondary_opts}
        takes_value = {name for p in options if not (p.is_flag or p.count) for name in p.opts}
        problem = dashed_override(args, known, takes_value)
        if problem:
            raise UserError(problem)
        return super().parse_args(ctx, args)
