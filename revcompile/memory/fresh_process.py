"""Run one function in a fresh ``spawn`` process, with a time limit.

The one process-isolation runner of the project: :func:`peak_step_memory`
measures in it (nothing from the caller's allocator state leaks in) and the
benchmarks run slow or fragile measurements in it (crashes, memory and global
state such as torch.compile caches stay in the child). Failures are typed,
so callers branch on the class, never on message text.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

#: Seconds a child that has sent its result gets to exit before it is killed.
_EXIT_GRACE_S = 10


class FreshProcessError(RuntimeError):
    """The fresh process gave no result (base of the specific failures below)."""


class WorkerFailed(FreshProcessError):
    """The function raised in the child; the message is its last line, then the traceback."""


class WorkerDied(FreshProcessError):
    """The child exited without sending a result (a signal, e.g. killed for memory)."""


class WorkerTimedOut(FreshProcessError):
    """No result within the time limit; the child was killed."""


def _child(fn: Callable[..., Any], kwargs: dict[str, Any], conn: Any) -> None:
    """Spawn entry point: send ``{"ok": fn(**kwargs)}`` or ``{"error": traceback}``."""
    try:
        result: dict[str, Any] = {"ok": fn(**kwargs)}
    except BaseException:  # everything goes back to the parent
        result = {"error": traceback.format_exc()}
    try:
        conn.send(result)
    finally:
        conn.close()


def run_in_fresh_process(
    fn: Callable[..., Any], /, *, timeout: float | None = None, **kwargs: Any
) -> Any:
    """``fn(**kwargs)`` in a fresh process started with the ``spawn`` method.

    Preconditions: ``fn`` and ``kwargs`` are picklable (``fn`` a module-level
    function or a ``functools.partial`` of one; a function of a script's
    ``__main__`` needs an ``if __name__ == "__main__":`` guard, since spawn
    re-imports the script); the result is picklable.

    Postcondition: the child has exited (it is killed on timeout, or when it
    does not exit within 10 s of sending its result).

    Args:
        fn: the function to call in the child.
        timeout: seconds to wait for the result (``None``: no limit).
        **kwargs: its keyword arguments.

    Returns:
        What ``fn`` returned.

    Raises:
        FreshProcessError: the child could not be started (pickling failed).
        WorkerFailed: ``fn`` raised (its traceback is in the message).
        WorkerDied: the child died without a result.
        WorkerTimedOut: no result within ``timeout`` seconds.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(fn, kwargs, sender), daemon=True)
    try:
        process.start()
    except Exception as exc:  # pickling fn or kwargs fails here
        raise FreshProcessError(f"could not start the worker: {exc!r}") from exc
    finally:
        sender.close()
    try:
        if not receiver.poll(timeout):
            raise WorkerTimedOut(f"worker timed out after {timeout:g} s")
        try:
            result = receiver.recv()
        except EOFError:
            process.join(_EXIT_GRACE_S)
            raise WorkerDied(
                f"worker died without a result (exit code {process.exitcode}; "
                "a negative code is the signal, -9 usually means killed for memory)"
            ) from None
        process.join(_EXIT_GRACE_S)
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
        process.join()
    if "error" in result:
        last = result["error"].strip().splitlines()[-1]
        raise WorkerFailed(f"{last}\n{result['error']}")
    return result["ok"]
