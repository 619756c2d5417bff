"""Capped exponential back-off, shared by the camera reader (reopen) and the MQTT supervisor (reconnect).

The first wait is ``min_s``; each :meth:`Backoff.wait` doubles the next one up to ``max_s``;
:meth:`Backoff.reset` goes back to ``min_s`` after a success.
"""

from __future__ import annotations

import threading


class Backoff:
    """The delay before the next retry: ``min_s``, doubled after each wait, capped at ``max_s``."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.delay = min_s

    def reset(self) -> None:
        """Back to ``min_s`` (the last attempt succeeded)."""
        self.delay = self.min_s

    def wait(self, stop: threading.Event) -> bool:
        """Wait the current delay (or until ``stop`` is set), then double it up to the cap.

        Returns:
            True when ``stop`` was set (the caller should give up), as :meth:`threading.Event.wait`.
        """
        if stop.wait(self.delay):
            return True
        self.delay = min(self.delay * 2, self.max_s)
        return False
