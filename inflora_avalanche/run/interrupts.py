"""Ctrl-C during a run: one line and exit code 130 wherever it lands, never lost, never a traceback.

Torch-free, like the rest of the command line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator

NOTHING_WRITTEN = "before anything was written"
#: Set while a command other than a run (``compare``) has something in its output folder to take back or keep.
WRITING = threading.Event()


def _unsafe_for_interrupts(frame: Any) -> bool:
    """Whether a KeyboardInterrupt raised in ``frame`` could be swallowed or leave a half-imported module: inside an
    import (libraries guard optional imports with bare ``except:``), a garbage-collector callback or a ``__del__``
    (Python drops exceptions raised there)."""
    import gc

    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib") or code in callbacks or code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _nothing_written() -> bool:
    """No run or comparison of this process has anything in an output folder to take back (see ``loop.WRITING``)."""
    if WRITING.is_set():
        return False
    writing = getattr(sys.modules.get(f"{__package__}.loop"), "WRITING", None)  # None: not (fully) imported yet
    return writing is None or not writing.is_set()


@contextlib.contextmanager
def interrupts_not_lost(exit_if_nothing_written: bool = False) -> Iterator[None]:
    """Ctrl-C stops the run, cleanly, wherever it lands. Python's handler raises KeyboardInterrupt in whatever code
    runs at that moment. During an import, a library's bare ``except:`` may swallow it and leave a half-imported
    module (numpy then fails with odd errors, or the run just goes on); in a garbage-collector callback (JAX, which
    Avalanche's dependencies import, runs one after every collection) or a ``__del__``, Python drops it. In those
    places the interrupt is delivered again 20 ms later (from a helper thread), until it lands in ordinary code; a
    KeyboardInterrupt dropped elsewhere is delivered again the same way. ``exit_if_nothing_written`` (the command
    line): in those places, while no run has written anything, the process ends at once instead (exit code 130, one
    line): start-up imports take seconds, and there is nothing to take back. Only where Python's own handler is in
    place (not when SIGINT is ignored), and never after this block has ended."""
    import _thread
    import signal

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    guard = threading.Lock()
    state: dict = {"done": False, "timer": None}

    def deliver() -> None:
        with guard:
            state["timer"] = None
            if not state["done"]:
                _thread.interrupt_main()

    def deliver_later() -> None:
        with guard:
            if state["timer"] is None and not state["done"]:
                state["timer"] = threading.Timer(0.02, deliver)
                state["timer"].daemon = True
                state["timer"].start()

    def handler(signum: int, frame: Any) -> None:
        if not _unsafe_for_interrupts(frame):
            raise KeyboardInterrupt
        if exit_if_nothing_written and _nothing_written():
            sys.stderr.write(f"interrupted {NOTHING_WRITTEN}\n")
            sys.stderr.flush()
            os._exit(130)
        deliver_later()

    def hook(unraisable: Any) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            deliver_later()
        else:
            previous_hook(unraisable)

    previous_hook = sys.unraisablehook
    sys.unraisablehook = hook
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        with guard:
            state["done"] = True
            if state["timer"] is not None:
                state["timer"].cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
