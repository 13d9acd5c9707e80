"""Writing a run's files and caches: whole or not at all (a temporary sibling renamed into
place), checksummed where a damaged file must be noticed, and a full disk or an unwritable
path said in one line that names it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from blt_jax.errors import UserError


def cannot_write(path: str | Path, error: OSError) -> UserError:
  return UserError(f"cannot write {path}: {error.strerror or error}")


def write_text(path: str | Path, text: str):
  """Replaces `path` with `text` atomically: readers see the old file or the new, whole."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise cannot_write(path, e) from None


def write_json(path: str | Path, record):
  write_text(path, json.dumps(record, indent=1) + "\n")


def read_json(path: str | Path):
  """The record in a JSON file, or None when there is no such file."""
  path = Path(path)
  return json.loads(path.read_text()) if path.is_file() else None


def checksum(path: str | Path) -> str:
  """blake2b of a file's bytes, read in 8 MiB blocks."""
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    while block := f.read(1 << 23):
      h.update(block)
  return h.hexdigest()


def seal(path: Path) -> dict:
  """What `intact` checks later: the file's size and checksum."""
  return {"size": path.stat().st_size, "blake2b": checksum(path)}


def intact(path: Path, sealed: dict | None) -> bool:
  """Whether `path` still has the size and checksum it was sealed with."""
  try:
    return (sealed is not None and path.stat().st_size == sealed["size"]
            and checksum(path) == sealed["blake2b"])
  except OSError:
    return False


class AppendLog:
  """A file that lines are appended to and flushed one by one (metrics.jsonl)."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    try:
      self._file = open(self.path, "a")
    except OSError as e:
      raise cannot_write(self.path, e) from None

  def write(self, line: str):
    try:
      self._file.write(line)
      self._file.flush()
    except OSError as e:
      raise cannot_write(self.path, e) from None

  def close(self):
    try:
      self._file.close()
    except OSError:
      pass  # a failed flush was already reported by `write`
