"""Run many ``python -m revcompile.cli`` invocations with one torch import.

Importing torch costs seconds per process, so the CLI tests send their cases
here: this process imports revcompile once, then runs every case in its own
forked child process exactly as ``python -m revcompile.cli ARGS`` would
(``runpy.run_module(..., run_name="__main__")``; an uncaught exception prints
its traceback and exits 1, as the interpreter does), with the child's stdout
and stderr file descriptors captured. Each case therefore has its own process,
exit status, argv and output streams; only the import cost is shared.

Protocol: a JSON list of argv lists on stdin; a JSON list of
``{"returncode", "stdout", "stderr"}`` on stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback

import revcompile.api  # noqa: F401  (imported once, shared by the forked children)
import revcompile.io  # noqa: F401
import revcompile.memory  # noqa: F401


def _child(argv: list[str], out_fd: int, err_fd: int) -> None:
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.argv = ["revcompile", *argv]
    code = 0
    try:
        runpy.run_module("revcompile.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(argv: list[str]) -> dict[str, object]:
    """Run one invocation in a forked child; return its exit code and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(argv, out.fileno(), err.fileno())
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump([run_case(argv) for argv in cases], sys.stdout)


if __name__ == "__main__":
    main()
