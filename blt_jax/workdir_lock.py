"""One run per workdir: `<workdir>/run.lock` names the run that holds it (host, pid, since).

A second run on a held workdir stops at once with one line naming the holder. A lock whose
holder is gone is taken over with a warning: on this host, a holder whose process no longer
exists; on any host (a shared filesystem), one whose heartbeat (the file's modification
time, renewed every HEARTBEAT_S) is older than STALE_S. So a kill -9 or a restarted machine
never blocks a workdir for long.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from blt_jax.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 20.0
STALE_S = 90.0


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


class WorkdirLock:
  """Holds `<workdir>/run.lock` from `acquire` (or `with`) to `release`; re-entrant within
  one process."""

  _held: dict[Path, int] = {}  # lock path -> depth, in this process

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir).absolute() / LOCK_FILE
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def holder(self) -> dict | None:
    """The record of the run holding the lock (with its age in seconds), or None."""
    try:
      record = json.loads(self.path.read_text())
      record["age_s"] = time.time() - self.path.stat().st_mtime
      return record
    except (FileNotFoundError, ValueError):
      return None

  def _alive(self, holder: dict) -> bool:
    if holder["age_s"] > STALE_S:
      return False
    return holder.get("host") != socket.gethostname() or _process_exists(holder.get("pid", -1))

  def acquire(self):
    if self.path in self._held:
      self._held[self.path] += 1
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(100):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self.holder()
        if holder is None:  # being written or just released: look again
          time.sleep(0.05)
          continue
        if self._alive(holder):
          raise UserError(f"{self.path.parent} is in use by another run (pid {holder.get('pid')}"
                          f" on {holder.get('host')}, since {holder.get('since')}); wait for it "
                          "to end, or use another --workdir")
        print(f"warning: {self.path} was left by a run that is gone (pid {holder.get('pid')} "
              f"on {holder.get('host')}); taking it over", file=sys.stderr)
        self.path.unlink(missing_ok=True)
        continue
      with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")
      break
    else:
      raise UserError(f"could not take {self.path}")
    self._held[self.path] = 1
    self._heartbeat = threading.Thread(target=self._beat, daemon=True)
    self._heartbeat.start()

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        return

  def release(self):
    depth = self._held.get(self.path, 0)
    if depth > 1:
      self._held[self.path] = depth - 1
      return
    self._held.pop(self.path, None)
    self._stop.set()
    self.path.unlink(missing_ok=True)
