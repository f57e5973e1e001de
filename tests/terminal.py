"""What a child process gets from a shell at a terminal, for the tests that press Ctrl-C."""

from __future__ import annotations

import signal


def terminal_sigint() -> None:
    """``preexec_fn``: in the child, before exec, SIGINT as a shell at a terminal hands it over (default,
    unblocked). A test worker's own state must not leak in: an xdist worker ignores SIGINT, and a child
    inherits an ignored signal through exec, so without this it is deaf to Ctrl-C (a test hung in CI so)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
