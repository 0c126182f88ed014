"""Running `jpadapt` from tests: in this process (`run_cli`, fast) or as a real subprocess (`jpadapt`).

`run_cli` calls `pipeline.cli.main(argv)` the way `python -m pipeline.cli` would, and gives back what a user would
see: the exit code, stdout and stderr (captured at the file-descriptor level, so a worker process the command starts
is captured too). An exception that escapes `main` becomes exit code 1 with its traceback on stderr, as the
interpreter would print it, so `assert_one_line_error` fails on it the same way. Whatever a call changes is put back
before it returns: the working directory, os.environ, signal handlers, logging handlers and levels, warning filters.

Use `jpadapt` (a subprocess) for what only a real process shows: exit codes end to end, signals, imports at start-up,
and every command that launches DeepSpeed workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

# The warning filters of a fresh interpreter without -W (pytest's own filters would record or show other ones).
_STARTUP_FILTERS = [
    ("default", None, DeprecationWarning, "__main__"),
    ("ignore", None, DeprecationWarning, None),
    ("ignore", None, PendingDeprecationWarning, None),
    ("ignore", None, ImportWarning, None),
    ("ignore", None, ResourceWarning, None),
]


@dataclass(frozen=True)
class Result:
    """What a `jpadapt` command gave back; the same attribute names as subprocess.CompletedProcess."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def code(self) -> int:
        return self.returncode


def jpadapt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli ARGS` as a real subprocess in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )


def run_cli(*args: str, cwd: Path) -> Result:
    """`jpadapt ARGS` run in `cwd` inside this process: `pipeline.cli.main(list(args))`."""
    from pipeline.cli import main

    argv = [str(arg) for arg in args]
    with _restored_state(), _captured(1, "stdout") as out, _captured(2, "stderr") as err:
        os.chdir(cwd)
        os.environ["PYTHONPATH"] = str(REPO)  # what a worker the command starts needs, as for `jpadapt`
        try:
            code = main(argv)
        except SystemExit as exc:  # --help, --version
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what escapes main is a traceback and exit code 1, as in a process
            traceback.print_exc(file=sys.stderr)
            code = 1
    return Result(int(code), out.text, err.text)


def assert_one_line_error(result: Result | subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def state_of(status_stdout: str, stage: str) -> str:
    """The state column of `jpadapt status` for one stage."""
    for line in status_stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == stage:
            return re.split(r"\s{2,}", parts[1].strip())[0]
    raise AssertionError(f"{stage} not in status output:\n{status_stdout}")


# ------------------------------------------------------------------------------------ in-process plumbing


class _Capture:
    text = ""


@contextlib.contextmanager
def _captured(fd: int, name: str) -> Iterator[_Capture]:
    """Point file descriptor `fd` and sys.<name> at a temporary file; its text is in the capture afterwards."""
    capture = _Capture()
    previous = getattr(sys, name)
    previous.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        stream = open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
        setattr(sys, name, stream)
        try:
            yield capture
        finally:
            stream.flush()
            setattr(sys, name, previous)
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            capture.text = tmp.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def _restored_state() -> Iterator[None]:
    cwd = os.getcwd()
    environ = dict(os.environ)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    loggers = _logger_state()
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, message, category, module in reversed(_STARTUP_FILTERS):
            warnings.filterwarnings(action, message or "", category, module or "")
        warnings.showwarning = _show_warning  # on stderr, as in a fresh process (pytest would record them)
        try:
            yield
        finally:
            os.chdir(cwd)
            if dict(os.environ) != environ:
                os.environ.clear()
                os.environ.update(environ)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            _restore_loggers(loggers)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _all_loggers() -> dict[str, logging.Logger]:
    named = {name: obj for name, obj in logging.root.manager.loggerDict.items() if isinstance(obj, logging.Logger)}
    return {"": logging.getLogger(), **named}


def _logger_state() -> dict[str, tuple[list[logging.Handler], int]]:
    return {name: (list(logger.handlers), logger.level) for name, logger in _all_loggers().items()}


def _restore_loggers(state: dict[str, tuple[list[logging.Handler], int]]) -> None:
    for name, logger in _all_loggers().items():
        handlers, level = state.get(name, ([], logging.NOTSET))
        for handler in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)

