"""Ctrl-C during training: the first finishes the step and saves; later ones wait for that save.

While `StopOnInterrupt` is entered (the training loop and its closing checkpoint), SIGINT
raises nothing: the first one sets ``requested`` (the loop stops after the current step
and checkpoints), and a second one, e.g. pressed while that checkpoint is written, is
answered by one log line instead of a `KeyboardInterrupt` that would cut the save short.
Outside it Ctrl-C is Python's `KeyboardInterrupt`, which the commands turn into one line
and exit status 130. A thread other than the main one cannot take signals: there it does
nothing.
"""

from __future__ import annotations

import logging
import signal

__all__ = ["StopOnInterrupt"]

log = logging.getLogger(__name__)


class StopOnInterrupt:
    def __init__(self):
        self.requested = False
        self.saving = False  # set by the loop while it writes the closing checkpoint
        self._previous = None
        self._answered = False

    def _handle(self, signum, frame):
        if self.requested and not self._answered:
            self._answered = True
            log.warning(
                "Ctrl-C again: %s",
                "the checkpoint is being written; the run exits when it is saved"
                if self.saving
                else "the run stops after this step and saves a checkpoint first",
            )
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
