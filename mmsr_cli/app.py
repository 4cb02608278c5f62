"""The `mmsr` Typer application: shared options, config files, and one-line error handling.

Commands live in ``mmsr_cli/commands/<stage>.py``; each is thin: it parses options, calls the
stage's library function and prints a one-line summary.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses the click package
    from click import exceptions as click_exc

from . import __version__
from . import contracts as C
from .entry import INTERRUPTED
from .errors import (MmsrError, Range, allocator_failure, out_of_memory_message,  # noqa: F401  (parse_list: for the commands)
                     parse_list)
from .runtime import console  # noqa: F401  (the commands print through the library's console)
from .workdir import read_file_text

app = typer.Typer(
    name="mmsr",
    help="Multi-modal sequential recommendation (MMSR, CIKM 2023): from raw logs, images and "
    "texts to a trained recommender and ranked next-item lists.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"mmsr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version."),
    ] = False,
) -> None:
    """Multi-modal sequential recommendation: download -> preprocess -> extract-features ->
    build-codes -> build-graphs -> train -> evaluate / recommend."""


def _load_config(ctx: typer.Context, param: object, value: Optional[Path]) -> Optional[Path]:
    """Eager ``--config`` callback: the file's options become this command's defaults.

    The TOML file may hold top-level keys (shared by all commands, e.g. ``dataset``) and one
    table per command (``[train]``, ``[build-codes]``); the command's table wins over top-level
    keys, and flags given on the command line win over both.
    """
    if value is None:
        return None
    try:
        data = tomllib.loads(read_file_text(Path(value)))
    except FileNotFoundError:
        raise typer.BadParameter(f"{value}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"{value}: not valid TOML ({e})") from None
    except OSError as e:  # a directory, no read permission, ...
        raise typer.BadParameter(f"{value}: cannot read ({e.strerror or e})") from None
    name = ctx.command.name
    params = {p.name: p for p in ctx.command.params if p.name and p.name != "config"}
    known = set(params)
    _check_config_names(value, data, ctx)
    defaults: dict = {}
    for key, val in data.items():
        if isinstance(val, dict):
            continue
        key = key.replace("-", "_")
        if key in known:
            defaults[key] = val
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise typer.BadParameter(f"{value}: [{name}] must be a table")
    for key, val in section.items():
        key_ = key.replace("-", "_")
        if key_ not in known:
            raise typer.BadParameter(f"{value}: [{name}] has unknown option '{key}'{_did_you_mean(key, params)}")
        defaults[key_] = val
    for key, val in defaults.items():
        # true/false only for on/off flags: `core = true` would otherwise quietly become 1.
        is_flag, shown = bool(getattr(params[key], "is_flag", False)), key.replace("_", "-")
        if isinstance(val, bool) and not is_flag:
            raise typer.BadParameter(f"{value}: '{shown}' takes a value, not {str(val).lower()}")
        if is_flag and not isinstance(val, bool):
            raise typer.BadParameter(f"{value}: '{shown}' is a flag: expected true or false, got {val!r}")
        if isinstance(val, list):  # TOML lists become the comma-separated form our flags take
            defaults[key] = ",".join(str(v) for v in val)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word.replace("_", "-"), [c.replace("_", "-") for c in candidates], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_config_names(path: Path, data: dict, ctx: typer.Context) -> None:
    """Every table must be a command and every top-level key an option of some command: a
    misspelt name would otherwise be ignored without a word."""
    group = ctx.parent.command if ctx.parent is not None else None
    commands = getattr(group, "commands", {}) if group is not None else {}
    if not commands:
        return
    options = {p.name for c in commands.values() for p in c.params if p.name and p.name != "config"}
    for key, val in data.items():
        if isinstance(val, dict):
            if key not in commands:
                raise typer.BadParameter(f"{path}: [{key}] is not a command{_did_you_mean(key, commands)}")
        elif key in commands:
            raise typer.BadParameter(f"{path}: [{key}] must be a table")
        elif key.replace("-", "_") not in options:
            raise typer.BadParameter(f"{path}: unknown top-level option '{key}'{_did_you_mean(key, options)}")


# Options every command takes. Use as annotations: ``workdir: WorkdirOpt = None``.
WorkdirOpt = Annotated[
    Optional[Path],
    typer.Option("--workdir", envvar="MMSR_WORKDIR", help="Working directory [default: ./workdir]."),
]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (folder under the workdir).")]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        is_eager=True,
        callback=_load_config,
        help="TOML file of options (top-level keys and a [command] table); flags win.",
    ),
]


def ranged(*decls: str, rng: Range, help: str):
    """A numeric option checked against ``rng`` where it is parsed, from the command line or a
    --config file alike: one line naming the option, exit 2, before the command runs. Every
    int and float option of every command is declared through here (tests/test_bad_inputs.py
    walks the commands to hold that)."""
    name = max(decls, key=len)

    def check(value):
        if value is not None:
            rng.check(name, value)
        return value

    return typer.Option(*decls, callback=check, help=f"{help} [{rng.describe()}]")


# Seeds reach numpy, which takes 0 .. 2**32 - 1.
SeedOpt = Annotated[int, ranged("--seed", rng=C.RANGE_SEED, help="Random seed.")]


def _crash_log(exc: BaseException) -> Path:
    fd, path = tempfile.mkstemp(prefix=f"mmsr-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(exc, file=f)
    return Path(path)


def _error_line(message: str) -> None:
    """One line on stderr, whatever the message holds (no wrapping, no markup)."""
    print(" ".join(message.split()), file=sys.stderr, flush=True)


# OSErrors that say something about the machine (space, permissions, read-only mounts) rather
# than about mmsr: reported as user errors, in one line naming the file.
# A path that is not what it should be (a directory or a dangling or looping link where a file
# belongs, a name too long) is the user's file system too: the same one line naming the path.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR,
                       errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO, errno.ENOENT, errno.EIO}


class _Interrupted(BaseException):
    """SIGINT or SIGTERM during a command. Not a KeyboardInterrupt: typer turns that into a
    returned exit status, which the console script reported as a silent success (exit 0)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one line on stderr and a non-zero exit for every failure.

    Ctrl-C (SIGINT) and SIGTERM (`kill`, `timeout`, a scheduler stopping the job) end the command
    the same way: the temporaries of the writes in progress are removed on the way out, one line,
    exit 128 + the signal number (130, 143)."""
    main_thread = threading.current_thread() is threading.main_thread()
    # Only where the signal has its default meaning (not when it is ignored, e.g. SIGINT under `nohup`).
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    caught = [s for s, default in defaults.items() if main_thread and signal.getsignal(s) is default]
    for signum in caught:
        signal.signal(signum, _raise_interrupted)
    try:
        _main(argv)
    except _Interrupted as e:
        _error_line(INTERRUPTED)
        sys.exit(128 + e.signum)
    finally:
        for signum in caught:
            signal.signal(signum, defaults[signum])


def _main(argv: list[str] | None) -> None:
    # A log line that cannot be written (disk full, read-only logs/) must not print a traceback
    # in the middle of the output; the stage's own writes report the problem in one line.
    logging.raiseExceptions = False

    # Library deprecation chatter (PyG's use of torch.jit.script, torch's sparse-CSR notice) says
    # nothing a user of the CLI can act on; it would bury the one-line summaries. Set before the
    # commands are imported: they import the library, and PyG warns as it is imported.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.script.*")
    warnings.filterwarnings("ignore", message=r"Sparse invariant checks are implicitly disabled")

    try:
        from . import commands  # noqa: F401  (registers the commands; inside main's Ctrl-C handling)
    except (ImportError, MemoryError) as e:  # torch's libraries not mapped under a memory limit
        if allocator_failure(e) is None:
            raise
        _out_of_memory(e)

    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv, prog_name="mmsr", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click_exc.ClickException as e:  # usage errors, bad parameters
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `mmsr`: show the help
            print(e.format_message())
            sys.exit(e.exit_code)
        _error_line(f"mmsr: error: {e.format_message()}")
        sys.exit(e.exit_code)
    except MmsrError as e:
        if allocator_failure(e.__cause__) is not None:  # a reader that called it an unreadable file
            _out_of_memory(e.__cause__)
        _error_line(f"mmsr: error: {e}")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _error_line(INTERRUPTED)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    except MemoryError as e:
        _out_of_memory(e)
    except OSError as e:
        if allocator_failure(e) is not None:
            _out_of_memory(e)
        if e.errno not in _ENVIRONMENT_ERRNOS:
            _internal_error(e)
        # The machine, not mmsr: a full disk, a read-only or foreign folder. Every output is
        # written to a temporary file and renamed, so earlier outputs are intact.
        where = f"{e.filename}: " if e.filename is not None else ""
        _error_line(f"mmsr: error: {where}{e.strerror or e}")
        sys.exit(MmsrError.exit_code)
    except Exception as e:  # a bug: keep the traceback for the report, show one line
        if allocator_failure(e) is not None:  # torch's allocator, std::bad_alloc, a failed mmap
            _out_of_memory(e)
        _internal_error(e)


def _out_of_memory(e: BaseException) -> None:
    """The machine, not mmsr: an allocation was refused. One line naming what ran out, exit 2."""
    _error_line(f"mmsr: error: {out_of_memory_message(allocator_failure(e))}")
    sys.exit(MmsrError.exit_code)


def _internal_error(e: BaseException) -> None:
    try:
        saved = f"traceback in {_crash_log(e)}"
    except OSError as log_error:  # e.g. /tmp is full as well
        saved = f"traceback not saved: {log_error.strerror or log_error}"
    _error_line(f"mmsr: internal error: {type(e).__name__}: {e} ({saved})")
    sys.exit(1)
