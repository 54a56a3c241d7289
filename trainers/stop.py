"""Stop requests: the first SIGINT/SIGTERM asks the run to stop at the next step boundary (saving a
checkpoint), a second one aborts at once. The CLI installs this first thing, before the imports that take
seconds, so a stop during start-up ends the run cleanly too; the Trainer installs it for library callers.

Standard library only: it must be importable before torch.
"""

from __future__ import annotations

import contextlib
import signal
import sys

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested = False


def _request(signum, frame) -> None:
    global _requested
    if _requested:  # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    _requested = True
    print("\nstopping after this step (saving a checkpoint); press Ctrl-C again to abort", file=sys.stderr)


def install() -> dict:
    """Route SIGINT and SIGTERM to the stop request; returns the handlers they had (for `restore`)."""
    previous = {}
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            previous[sig] = signal.signal(sig, _request)
    return previous


def restore(previous: dict) -> None:
    """Put back the handlers `install` replaced and forget the request."""
    global _requested
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _requested = False


def requested() -> bool:
    return _requested
