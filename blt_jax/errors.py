"""How a run ends early: launch.py prints each as one line and exits with its status."""
from __future__ import annotations

import signal


class UserError(Exception):
  """Bad input from the user (config, paths, corpora, checkpoints); never a bug. Exit 2."""


class Stopped(Exception):
  """A SIGTERM or SIGINT (Ctrl-C) ended the run: exit 128 + the signal's number."""

  def __init__(self, signum: int, step: int | None = None):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    done = (f"at step {step}, after saving a checkpoint; run the same command again to "
            "resume" if step is not None else "")
    super().__init__(f"stopped by {name} {done}".strip())

  @property
  def status(self) -> int:
    return 128 + self.signum
