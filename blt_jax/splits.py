"""The held-out split of a corpus, by source document, and its record `split.json`.

A document's side is decided by a stable hash of its name (a file's path relative to the
corpus root, `file.jsonl:LINE` for a jsonl record, `file.parquet:ROW`, `NAME:ROW` for a
dataset row), so a document lies wholly on one side, on every machine and in every run.
Each run writes the split it trained with to `<workdir>/split.json`; eval reads it back,
and a BLT run's entropy model must have been trained on exactly the same split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from blt_jax import data, files
from blt_jax.errors import UserError

SPLIT_FILE = "split.json"


def is_held_out(name: str, eval_fraction: float) -> bool:
  """A stable split by source-document name: the same on every machine and every run."""
  digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0 ** 64 < eval_fraction


@dataclasses.dataclass(frozen=True)
class Split:
  """Which documents of a corpus are held out: what `split.json` records."""
  corpus: str
  fingerprint: str
  eval_fraction: float
  held_out: tuple[str, ...]  # sorted names of the held-out documents

  @classmethod
  def of(cls, corpus: data.Corpus, eval_fraction: float) -> Split:
    held = sorted(n for n in corpus.names if is_held_out(n, eval_fraction))
    return cls(corpus.name, corpus.fingerprint, float(eval_fraction), tuple(held))

  @property
  def key(self) -> str:
    """A short id of the split (corpus contents and held-out documents), for paths."""
    text = json.dumps([self.fingerprint, list(self.held_out)])
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()

  def save(self, workdir: str | Path):
    record = {**dataclasses.asdict(self), "held_out": list(self.held_out)}
    files.write_json(Path(workdir) / SPLIT_FILE, record)  # whole, whoever writes it

  @classmethod
  def load(cls, workdir: str | Path) -> Split | None:
    """The split a run recorded, or None when it has none."""
    record = files.read_json(Path(workdir) / SPLIT_FILE)
    if record is None:
      return None
    return cls(record["corpus"], record["fingerprint"], float(record["eval_fraction"]),
               tuple(record["held_out"]))

  def difference(self, other: Split) -> str | None:
    """How `other` (another run's split) differs from this one, in a phrase; None when
    they are the same."""
    if self.corpus != other.corpus:
      return f"its corpus is {other.corpus!r}, this run's is {self.corpus!r}"
    if self.fingerprint != other.fingerprint:
      return (f"its corpus fingerprint is {other.fingerprint}, this run's {self.fingerprint} "
              "(the corpus files changed)")
    mine, theirs = set(self.held_out), set(other.held_out)
    if mine == theirs:
      return None
    parts = [f"eval_fraction {other.eval_fraction}, this run's {self.eval_fraction}"]
    if mine - theirs:
      parts.append(f"it trained on {len(mine - theirs)} documents this run holds out "
                   f"(e.g. {sorted(mine - theirs)[0]!r})")
    if theirs - mine:
      parts.append(f"it holds out {len(theirs - mine)} documents this run trains on "
                   f"(e.g. {sorted(theirs - mine)[0]!r})")
    return "; ".join(parts)


def check_workdir(workdir: str | Path, split: Split):
  """A run resumes only on the split it was trained on.

  A workdir with checkpoints but no record predates split records: its held-out set is
  unknown, so it is not resumed.
  """
  workdir = Path(workdir)
  recorded = Split.load(workdir)
  if recorded is None:
    ckpts = workdir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
      raise UserError(f"{workdir} has checkpoints but no {SPLIT_FILE}: it was trained before "
                      "runs recorded their held-out split; train in a new workdir")
  elif (diff := split.difference(recorded)) is not None:
    raise UserError(f"{workdir} holds a run on another split: {diff}")


def claim(workdir: str | Path, split: Split):
  """Checks a run's workdir (`check_workdir`), then records `split` there."""
  check_workdir(workdir, split)
  Path(workdir).mkdir(parents=True, exist_ok=True)
  split.save(workdir)


class Splits:
  """The corpus of a run, its training and held-out documents, and the eval corpus.

  `recorded` (a run's `split.json`) fixes the held-out documents by name, so eval scores
  what the run held out whatever the current config's `eval_fraction` says.
  """

  def __init__(self, config, recorded: Split | None = None):
    d = config.data
    self.corpus = data.prepare(d.corpus, cache_dir=d.cache_dir)
    if recorded is None:
      self.split = Split.of(self.corpus, d.eval_fraction)
    else:
      self.split = recorded
      missing = set(recorded.held_out) - set(self.corpus.names)
      if missing:
        raise UserError(f"{len(missing)} held-out documents of the run are not in corpus "
                        f"{d.corpus!r} (e.g. {sorted(missing)[0]!r})")
      if recorded.fingerprint != self.corpus.fingerprint:
        print(f"warning: corpus {d.corpus!r} changed since the run was trained "
              f"(fingerprint {self.corpus.fingerprint}, was {recorded.fingerprint})")
    held = set(self.split.held_out)
    is_held = np.array([n in held for n in self.corpus.names], bool)
    self.train_ids, self.heldout_ids = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    n_train = int(np.sum(np.diff(self.corpus.offsets)[self.train_ids]))
    if n_train < d.seq_len:
      raise UserError(f"corpus {d.corpus!r} has {n_train} training bytes, fewer than one "
                      f"window (data.seq_len={d.seq_len})")
    if config.eval.corpus:
      self.eval_corpus = data.prepare(config.eval.corpus, cache_dir=d.cache_dir)
      self.eval_ids = np.arange(len(self.eval_corpus.names))
    else:
      if not len(self.heldout_ids):
        raise UserError(f"corpus {d.corpus!r} has no held-out documents "
                        f"({len(self.corpus.names)} in all; the split is by whole "
                        "document): raise data.eval_fraction, or evaluate on eval.corpus")
      self.eval_corpus, self.eval_ids = self.corpus, self.heldout_ids

  def eval_batches(self, config, max_bytes: int, transform=None):
    """(numpy batches, number of batches) of the eval windows."""
    kw = dict(seq_len=config.data.seq_len, max_bytes=max_bytes)
    total = -(-len(data.eval_table(self.eval_corpus, self.eval_ids, **kw))
              // config.eval.batch_size)
    batches = data.eval_batches(self.eval_corpus, self.eval_ids,
                                batch_size=config.eval.batch_size, transform=transform, **kw)
    return batches, total
