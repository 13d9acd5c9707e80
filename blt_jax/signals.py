"""SIGTERM (what clusters send before they stop a job) and SIGINT (Ctrl-C) during training:
noted, so the loop ends after its current step with a checkpoint instead of losing the
work since the last one."""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from blt_jax.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def raise_stopped(signum, frame):
  """Outside the train loop: stop at once (nothing unsaved to keep)."""
  del frame
  raise Stopped(signum)


class StopRequests:
  """While open (`with`), SIGTERM and SIGINT set `received` instead of stopping the
  process; a second SIGINT stops at once. Outside the main thread, signals are left alone."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _note(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise_stopped(signum, frame)  # Ctrl-C twice: the user does not want to wait
    self.received = signum

  def agreed(self) -> bool:
    """Whether to stop after the current step: a signal arrived, on any process of the run
    (all processes stop at the same step)."""
    if jax.process_count() > 1:
      got = np.ravel(multihost_utils.process_allgather(np.int32(self.received or 0)))
      if self.received is None and got.any():
        self.received = int(got[got > 0][0])
    return self.received is not None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._note)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
