"""Command lines run in a process of their own, as a user runs them, without paying Python's start-up each time.

Most of a command line's start here is importing pytorch_lightning (which pulls in torch, torchmetrics and, through
it, transformers): 3-5 s on the 2-core CI machine, for each of the suite's ~60 launches. A fork server imports those
third-party libraries once; each command is then forked from it and runs its script's `__main__` (or `-m module`)
with its own argv, working directory, environment and `sys.path` as a fresh `python` would have them, its stdout and
stderr in files, and its exit status as the process's. The project's own modules are never preloaded, so every
command imports the code under test afresh.

Inside the command, multiprocessing is as in a fresh interpreter (this process the main one, the default start
method), so DataLoader workers and process pools are the command's own children with its environment; at exit,
non-daemon threads are joined and atexit handlers run, as the interpreter does.

What differs from `subprocess.run([sys.executable, ...])`: environment variables that a preloaded library reads at
import (not ours: `CONTROLNET_DEBUG` is read when a command runs) keep the server's values, and what those libraries
print while importing is not the command's output. Tests about the user's environment itself (the exact stderr of
a command with a minimal environment) keep a real subprocess. `CONTROLNET_TEST_FRESH=1` runs every command as a
real subprocess.
"""

from __future__ import annotations

import atexit
import io
import json
import multiprocessing
import multiprocessing.process
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from functools import cache
from pathlib import Path

#: Third-party libraries the commands import; importing them once is the whole saving.
PRELOAD = ["pytorch_lightning", "transformers", "safetensors.torch", "omegaconf", "numpy", "PIL.Image", "cv2",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "datasets", "webdataset"]
FRESH_ENV = "CONTROLNET_TEST_FRESH"


@cache
def _fresh_sys_path() -> tuple[str, ...]:
    """`sys.path` of a fresh interpreter, less its first entry (the script's folder or the working directory)."""
    probe = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                           capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return tuple(json.loads(probe.stdout))


@cache
def _server() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([m for m in PRELOAD if _importable(m)])
    return context


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_command(argv: Sequence[str], cwd: Path | str, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *argv` in `cwd` with `env` (default: this process's), captured as text like `subprocess.run`.

    Raises subprocess.TimeoutExpired when it runs past `timeout` seconds (the command is killed)."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    if os.environ.get(FRESH_ENV) == "1":
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        out.touch()
        err.touch()
        process = _server().Process(target=_run_as_main,
                                    args=(argv, str(Path(cwd).resolve()), env, str(out), str(err), _fresh_sys_path()))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if process.exitcode != 0 and not stdout and not stderr:
            stderr = (f"(tests/launcher.py: the command ended with status {process.exitcode} before its output was "
                      f"redirected; its traceback went to the fork server's stderr. Rerun with {FRESH_ENV}=1.)")
        return subprocess.CompletedProcess([sys.executable, *argv], process.exitcode, stdout, stderr)


def _run_as_main(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str,
                 base_path: tuple[str, ...]) -> None:
    """In the forked child: become `python *argv` and exit with its status."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _become_a_main_process()
    module = argv[1] if argv[0] == "-m" else None
    sys.argv = argv[1:] if module else list(argv)
    sys.path[:] = [cwd if module else os.path.dirname(os.path.abspath(argv[0])), *base_path]
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(os.path.abspath(argv[0]), run_name="__main__")  # __main__.__file__ is absolute
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:  # as the interpreter does: the traceback on stderr, status 1
        traceback.print_exc()
        status = 1
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's exit: join non-daemon threads,
    atexit._run_exitfuncs()  # then the atexit handlers
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def _become_a_main_process() -> None:
    """Undo what being a multiprocessing child set: the forkserver start method and this process's child role."""
    multiprocessing.set_start_method(None, force=True)
    me = multiprocessing.current_process()
    me._name, me._identity, me._parent_pid = "MainProcess", (), None  # type: ignore[attr-defined]
    multiprocessing.process._parent_process = None  # type: ignore[attr-defined]
    multiprocessing.process._children = set()  # type: ignore[attr-defined]


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
