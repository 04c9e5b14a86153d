"""The ``mlsctl`` command line: parse, call the library, print. No training or math here.

Exit codes: 0 success, 1 failure of a well-formed request, 2 usage error. A
:class:`~mlsctl.errors.UserError` is printed as one line, never as a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mlsctl import __version__
from mlsctl.cli._options import WorkflowGroup
from mlsctl.errors import UserError

app = typer.Typer(
    name="mlsctl",
    help="Self-supervised and metric learning of vision transformers with memory banks.\n\n"
         "Example: mlsctl data fmnist-scenes --out data/fmnist-scenes && "
         "mlsctl pretrain dino_fmnist_quick --out runs/quick",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=WorkflowGroup,  # commands in the order of the work (cli/_options.py)
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (anywhere on the command "
                                                            "line; or set MLSCTL_DEBUG=1).")) -> None:
    pass


from mlsctl.cli import bank as _bank  # noqa: E402
from mlsctl.cli import data as _data  # noqa: E402
from mlsctl.cli import eval as _eval  # noqa: E402
from mlsctl.cli import export as _export  # noqa: E402,F401
from mlsctl.cli import embed as _embed  # noqa: E402,F401
from mlsctl.cli import index as _index  # noqa: E402
from mlsctl.cli import plot as _plot  # noqa: E402,F401
from mlsctl.cli import pretrain as _pretrain  # noqa: E402,F401
from mlsctl.cli import recipes as _recipes  # noqa: E402,F401
from mlsctl.cli import refine as _refine  # noqa: E402
from mlsctl.cli import report as _report  # noqa: E402,F401
from mlsctl.cli import serve as _serve  # noqa: E402,F401
from mlsctl.cli import viz as _viz  # noqa: E402

app.add_typer(_bank.app, name="bank")
app.add_typer(_data.app, name="data")
app.add_typer(_eval.app, name="eval")
app.add_typer(_index.app, name="index")
app.add_typer(_refine.app, name="refine")
app.command("search")(_index.search)
app.add_typer(_viz.app, name="viz")

# Options that take several values accept them space-separated (``--fraction 1/1 1/8``) as well as
# repeated (``--fraction 1/1 --fraction 1/8``); click itself only knows the repeated form.


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _looks_like_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not _is_number(token)


def _takes_numbers(option) -> bool:
    """A multi-value option of whole or real numbers (``list[int]``, ``list[float]``)."""
    import typing

    annotation = getattr(getattr(option, "type_descriptor", None), "annotation", None)
    return any(arg in (int, float) for arg in typing.get_args(annotation))


def _comma_separated_numbers(value: str) -> list[str]:
    """``10,20`` as ``10``, ``20`` where every part is a number; any other value as it is (refused by the option's
    own check: ``Invalid value for '--k': not a whole number``)."""
    parts = value.split(",")
    return parts if len(parts) > 1 and all(_is_number(part) for part in parts) else [value]


def _leaf_command(argv: list[str]):
    """(click command, number of argv tokens naming it) for the command ``argv`` invokes."""
    command = typer.main.get_command(app)  # typer's own copy of click: its classes are not click's
    depth = 0
    while hasattr(command, "commands") and depth < len(argv) and argv[depth] in command.commands:
        command = command.commands[argv[depth]]
        depth += 1
    return (None, 0) if hasattr(command, "commands") else (command, depth)


def expand_multi_values(argv: list[str]) -> list[str]:
    """Rewrite the space-separated form of every multi-value option (``--bank a b``) as the repeated
    form click parses (``--bank a --bank b``). A multi-value option never takes a token that a
    required positional argument still needs: ``bank export --bank cls runs/X`` gives ``cls`` to
    ``--bank`` and ``runs/X`` to RUN."""
    command, depth = _leaf_command(argv)
    if command is None:
        return argv
    options = {name: p for p in command.params if p.param_type_name == "option" for name in p.opts + p.secondary_opts}
    segments: list[list] = []  # ["raw", token] | ["pos", token] | ["multi", option token, values]
    rest = argv[depth:]
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            segments += [["raw", "--"]] + [["pos", t] for t in rest[i + 1:]]
            break
        if not _looks_like_option(token):
            segments.append(["pos", token])
            i += 1
            continue
        option = options.get(token)
        name, equals, value = token.partition("=")
        if option is None and equals and options.get(name) is not None and options[name].multiple \
                and _takes_numbers(options[name]):  # --k=10,20
            segments.append(["multi", name, _comma_separated_numbers(value)])
            i += 1
            continue
        if option is None or option.is_flag or option.count:
            segments.append(["raw", token])  # flags, --name=value and unknown options go to click as they are
            i += 1
        elif not option.multiple:
            segments += [["raw", t] for t in rest[i:i + 2]]
            i += 2
        else:
            values = rest[i + 1:i + 2]  # the first token is the value, whatever it looks like
            j = i + 2
            while j < len(rest) and not _looks_like_option(rest[j]) and rest[j] != "--":
                values.append(rest[j])
                j += 1
            if _takes_numbers(option):  # --k 10,20 as other tools write it: no number holds a comma
                values = [part for value in values for part in _comma_separated_numbers(value)]
            segments.append(["multi", token, values])
            i = j
    needed = sum(1 for p in command.params if p.param_type_name == "argument" and p.required)
    deficit = needed - sum(1 for s in segments if s[0] == "pos")
    out = list(argv[:depth])
    moved: dict[int, list[str]] = {}
    for n in range(len(segments) - 1, -1, -1):  # the latest values are handed back first
        if deficit <= 0:
            break
        if segments[n][0] == "multi" and len(segments[n][2]) > 1:
            give = min(deficit, len(segments[n][2]) - 1)
            moved[n] = segments[n][2][-give:]
            segments[n][2] = segments[n][2][:-give]
            deficit -= give
    for n, segment in enumerate(segments):
        if segment[0] == "multi":
            for value in segment[2] or [None]:
                out += [segment[1]] + ([value] if value is not None else [])
            out += moved.get(n, [])
        else:
            out.append(segment[1])
    return out


def _take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before ``--`` (or MLSCTL_DEBUG=1) shows tracebacks."""
    import os

    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("MLSCTL_DEBUG", "") not in ("", "0")
    return [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)], debug


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler ending a job, `kill`) stops a command the way Ctrl-C does: it says what
    was saved and how to continue (``Terminated`` is a ``KeyboardInterrupt``; `serve` tells them apart)."""
    import signal

    from mlsctl.errors import Terminated

    def stop(signum, frame):
        # Once: the stop is under way. A launcher forwards the signal its process group already
        # delivered (Accelerate, torchrun), and a second one would kill the shutdown mid-way.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding application)
        pass


def _stop_when_orphaned(check_every: float = 1.0) -> None:
    """A process of a job that torchrun started (``accelerate launch`` with several processes) runs
    in a session of its own, so a stop of the launcher's process group does not reach it, and a
    launcher killed outright (SIGKILL, the OOM killer) left it training or embedding into ``--out``
    alone, holding the folder's lock. Such a process watches its parent and, once it is gone, stops
    as on SIGTERM: it says what it saved, and the run continues with the same command."""
    import os
    import signal
    import threading
    import time

    from mlsctl.launch import PARENT_AT_START

    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun for the processes it starts
        return
    parent = PARENT_AT_START

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(check_every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mlsctl-orphan-watch", daemon=True).start()


PLAIN_TYPE_ERRORS = (("Input should be a valid integer, unable to parse string as an integer", "not a whole number"),
                     ("Input should be a valid number, unable to parse string as a number", "not a number"))


def _one_line_usage_errors() -> None:
    """click prints a usage error as four lines (usage, a hint, a blank line, the error); ours are one
    line, ``error: ...``, with where to look: the same for a mistyped option as for a bad value."""
    import click

    def show(self, file=None) -> None:
        where = f"{self.ctx.command_path} -h" if self.ctx is not None else "mlsctl -h"
        message = self.format_message().rstrip(".")
        for typed, plain in PLAIN_TYPE_ERRORS:  # typer's type checks answer in pydantic's words (a probe, 2026-12-07)
            message = message.replace(typed, plain)
        param = getattr(self, "param", None)
        if message.endswith("not a whole number") and "--runs" in (getattr(param, "opts", None) or ()):
            message += "; --runs counts the seeded draws of each fraction, --run names a run folder"
        _tell(f"error: {message} (see {where})")

    try:  # recent typer carries its own copy of click, whose exceptions are the ones raised
        from typer import _click as typer_click
    except ImportError:
        typer_click = click
    for module in {click, typer_click}:
        module.exceptions.UsageError.show = show
        _name_the_command_of_parser_errors(module)


def _name_the_command_of_parser_errors(click_module) -> None:
    """click's parser raises "Option '--k' requires an argument" without the command's context, so the
    line pointed at ``mlsctl -h`` instead of ``mlsctl eval knn -h`` (a probe, 2026-12-06): the context of
    the command whose arguments were being parsed is put on the error."""
    command_class = click_module.core.Command
    if getattr(command_class.parse_args, "mlsctl_names_context", False):
        return
    parse_args = command_class.parse_args

    def parse_args_naming_the_command(self, ctx, args):
        try:
            return parse_args(self, ctx, args)
        except click_module.exceptions.UsageError as exc:
            if exc.ctx is None:
                exc.ctx = ctx
            raise

    parse_args_naming_the_command.mlsctl_names_context = True
    command_class.parse_args = parse_args_naming_the_command


def _run_app(argv: list[str]) -> None:
    """The command; when it ends well, this process's process groups are destroyed
    (:func:`mlsctl.dist.close`), if it made any. Not after an error or a stop: another process may
    still be inside a collective there, and destroying an NCCL group then can wait for it."""
    try:
        app(args=expand_multi_values(argv), prog_name="mlsctl")
    except SystemExit as end:  # click ends every command with one
        if end.code in (None, 0):
            _close_process_groups()
            # the work is done and said: a stop arriving now must not turn it into a failure (a probe, 2026-12-06:
            # a gallery swapped in and "built" said, then exit 143)
            _ignore_further_stops()
        stop = _ctrl_c_behind(end)
        if stop is not None:  # typer turns Ctrl-C into a silent exit 130: say it, as for every stopped command
            raise stop from None
        raise
    _close_process_groups()
    _ignore_further_stops()


def _ctrl_c_behind(end: SystemExit) -> Optional[KeyboardInterrupt]:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM's :class:`~mlsctl.errors.Terminated`) that typer
    turned into ``SystemExit(130)``, found along the exceptions' chain; None for any other exit."""
    seen, link = set(), end
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _close_process_groups() -> None:
    if "torch.distributed" in sys.modules:  # torch loaded: nothing to import for --help
        from mlsctl import dist

        dist.close()


def _exit_stopped(code: int) -> None:
    """Exit a stopped command. A process of a distributed run leaves without the interpreter's
    teardown: what it saved is on disk and its message printed, and gloo's threads, still running
    at exit, made C++'s runtime print "terminate called without an active exception" after the
    message now and then (once in nine fresh-clone test runs, 2026-12-05)."""
    import os

    if "torch.distributed" in sys.modules and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # torchrun's
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a launcher killed outright took the pipe with it
                pass
        os._exit(code)
    sys.exit(code)


def _tell(line: str) -> None:
    """One line on stderr in one write: other processes of a job (torchrun's agent, the other
    ranks) write to the same stream, and print's separate newline let their lines land inside ours.
    A stderr nobody reads any more (the pipe of a launcher killed outright) is let go quietly."""
    import os

    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # ValueError: a closed stream
        try:  # the interpreter's own flush at exit would fail on it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        except (OSError, ValueError):
            pass


def _end(exc: BaseException, line: str) -> None:
    """The line that ends the command, with how to continue a run the machine stopped after a
    checkpoint; said on stderr and, for a run, at the end of its train.log too."""
    import time

    hint = getattr(exc, "mlsctl_resume_hint", None)
    if hint:
        line = f"{line}; {hint}"
    _tell(line)
    log = getattr(exc, "mlsctl_run_log", None)
    if log:
        try:
            with open(log, "a", encoding="utf-8") as run_log:
                run_log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:  # the disk that stopped the run, perhaps: stderr has said it
            pass


def _ignore_further_stops() -> None:
    """The command is ending: a second SIGTERM (a launcher forwarding the one its group already got)
    must not raise inside the interpreter's shutdown ("Exception ignored in threading ... Terminated")."""
    import signal

    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def run() -> None:
    """The program (``mlsctl``, ``python -m mlsctl``): :func:`main`, then out of the process at once
    (:func:`_leave`). In-process callers (tests, notebooks) call :func:`main`."""
    try:
        main()
        code = 0
    except SystemExit as end:
        code = end.code
    _leave(code)


def _leave(code) -> None:
    """Exit as the interpreter does — its atexit handlers run, the streams flushed — without tearing
    every module down one by one, which took 0.5 s once torch was loaded and 1.3 s after training, for
    nothing (measured on a 2-core CPU, 2026-12-06). A Ctrl-C or SIGTERM meanwhile ends the process with
    the command's exit code: its work is done and said (a new user's probe: a Ctrl-C just after
    ``done:`` gave exit 130 and no word). With a thread still running that is not a daemon, Python's
    own exit, which waits for it."""
    import atexit
    import os
    import signal
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("text"): said, exit code 1
        _tell(str(code))
        code = 1
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)

    def at_once(signum, frame) -> None:
        _flush_streams()
        os._exit(code)

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, at_once)
        except (ValueError, OSError):
            pass
    atexit._run_exitfuncs()
    flushed = _flush_streams()
    os._exit(code if flushed or code else 120)  # 120: what Python exits with when it cannot flush stdout


def _flush_streams() -> bool:
    """Flush stdout and stderr; False where stdout could not be (a reader that went away)."""
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with it closed (`>&-`): nothing to flush (a review, 2026-12-06)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            flushed = flushed and stream is not sys.stdout
    return flushed


def main() -> None:
    from mlsctl import threads

    threads.prepare_environment()  # before torch or faiss loads its OpenMP runtime (mlsctl/threads.py)

    from mlsctl.errors import Interrupted, describe_environment_error, environment_exit_code

    from mlsctl.data.images import unreported_skips

    _stop_on_sigterm()
    _stop_when_orphaned()
    unreported_skips()  # a fresh command (tests run several in one process)
    argv, debug = _take_debug_flag(sys.argv[1:])
    _one_line_usage_errors()
    try:
        _run_app(argv)
    except Interrupted as exc:
        _ignore_further_stops()
        if exc.message:
            _end(exc, f"interrupted: {exc.message}")
        _exit_stopped(130)
    except UserError as exc:
        if debug:
            raise
        _ignore_further_stops()
        for line in unreported_skips():  # files a scan left out may be why (too few images)
            _tell(line)
        _end(exc, f"error: {exc.message}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _ignore_further_stops()
        _tell("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        _ignore_further_stops()
        message = describe_environment_error(exc)
        if message is None:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            message = (f"internal error ({type(exc).__name__}{': ' + first if first else ''}); run the command again "
                       f"with --debug for the traceback and report it")
        _end(exc, f"error: {message}")
        sys.exit(environment_exit_code(exc))
