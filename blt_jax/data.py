"""Corpora -> a flat uint8 array + source-document offsets (cached), and grain pipelines
of fixed-length windows that start with BOS. The held-out split is in `splits`.

A document is a source document, whole: a file of a file/directory/glob corpus, a record
of a `.jsonl`, a row of a `.parquet` file or a dataset. Nothing cuts it into pieces.

A window covers up to T target bytes of one document, starting at a multiple of T:
  inputs  = [BOS, x[o], ..., x[o+T-2]]   targets = [x[o], ..., x[o+T-1]]   mask = real targets
The final window of a document is zero-padded and its padding is masked out.
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import grain
import numpy as np

from blt_jax import files
from blt_jax.constants import BOS
from blt_jax.errors import UserError

FORMAT_VERSION = 2  # 2: documents are never cut into pieces
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """All documents of a corpus, back to back: document d is data[offsets[d]:offsets[d+1]]."""
  name: str
  fingerprint: str
  data: np.ndarray       # uint8 [N]
  offsets: np.ndarray    # int64 [D + 1]
  names: list[str]
  path: Path             # the cache directory holding it

  def doc(self, d: int) -> bytes:
    return self.data[self.offsets[d]:self.offsets[d + 1]].tobytes()


def cache_root(cache_dir: str = "") -> Path:
  return Path(cache_dir or os.environ.get("BLT_JAX_CACHE", "~/.cache/blt_jax")).expanduser()


# ---------------------------------------------------------------- sources


def _stdlib_files() -> tuple[Path, list[Path]]:
  root = Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py")
           if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])]
  return root, sorted(files)


def _source_files(corpus: str) -> tuple[Path, list[Path]]:
  """The files a file-based corpus names, and the root their names are relative to."""
  if corpus == "stdlib":
    return _stdlib_files()
  path = Path(corpus).expanduser()
  if path.is_file():
    return path.parent, [path]
  if path.is_dir():
    return path, sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
  if any(ch in corpus for ch in "*?["):
    files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
      raise UserError(f"corpus glob {corpus!r} matches no files")
    return Path(os.path.commonpath([str(f.parent) for f in files])), files
  raise UserError(f"corpus {corpus!r} not found (expected stdlib, hf:NAME, or an existing "
                  "file, directory or glob)")


def _file_documents(root: Path, path: Path, skipped: Counter) -> Iterator[tuple[str, bytes]]:
  rel = str(path.relative_to(root)) if path != root else path.name
  if path.suffix == ".jsonl":
    with open(path, "rb") as f:
      for i, line in enumerate(f):
        if line.strip():
          try:
            text = json.loads(line)["text"]
          except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{i + 1}: expected a JSON object with a 'text' field")
          yield f"{rel}:{i + 1}", text.encode("utf-8")
  elif path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise UserError("reading .parquet corpora needs pyarrow: pip install pyarrow")
    table = pq.read_table(path, columns=["text"])
    for i, text in enumerate(table.column("text").to_pylist()):
      if text:
        yield f"{rel}:{i}", text.encode("utf-8")
  else:
    try:
      raw = path.read_bytes()
    except OSError:
      skipped["unreadable"] += 1
      return
    if b"\0" in raw[:8192]:
      skipped["binary"] += 1  # not text (any other bytes are fine: bytes are bytes)
      return
    yield rel, raw


def _hf_documents(name: str) -> Iterator[tuple[str, bytes]]:
  try:
    import datasets
  except ImportError:
    raise UserError("hf: corpora need the optional extra: pip install -e '.[hf]'")
  try:
    ds = datasets.load_dataset(name, split="train")
  except Exception as e:  # the hub, the network or the name: report it in one line
    raise UserError(f"could not load Hugging Face dataset {name!r}: {str(e).splitlines()[0]}")
  for i, row in enumerate(ds):
    yield f"{name}:{i}", row["text"].encode("utf-8")


def _fingerprint(corpus: str) -> str:
  h = hashlib.blake2b(digest_size=10)
  h.update(json.dumps([FORMAT_VERSION, corpus]).encode())
  if not corpus.startswith("hf:"):
    root, paths = _source_files(corpus)
    for f in paths:
      st = f.stat()
      h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0"
               f"{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def _documents(corpus: str, skipped: Counter) -> Iterator[tuple[str, bytes]]:
  if corpus.startswith("hf:"):
    yield from _hf_documents(corpus[3:])
    return
  root, paths = _source_files(corpus)
  for f in paths:
    yield from _file_documents(root, f, skipped)


# ---------------------------------------------------------------- preparation


ARRAYS = ("data", "offsets")


def _write_atomically(directory: Path, arrays: dict[str, np.ndarray], meta: dict):
  """Writes into a temporary sibling, sealed (sizes and checksums in meta.json), then
  renames it into place: never a half cache."""
  try:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
  except OSError as e:
    raise files.cannot_write(directory.parent, e) from None
  try:
    for key, value in arrays.items():
      np.save(tmp / f"{key}.npy", value)
    meta = {**meta, "sealed": {key: files.seal(tmp / f"{key}.npy") for key in arrays}}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
      os.rename(tmp, directory)
    except OSError:  # another process won the race; theirs is as good as ours
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise files.cannot_write(e.filename or directory, e) from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _build(corpus: str, directory: Path, fp: str):
  names, docs, skipped = [], [], Counter()
  for name, raw in _documents(corpus, skipped):
    if raw:
      names.append(name)
      docs.append(np.frombuffer(raw, np.uint8))
    else:
      skipped["empty"] += 1
  counts = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
  if not docs:
    raise UserError(f"corpus {corpus!r} has no readable text documents"
                    + (f" ({counts} skipped)" if counts else ""))
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
  _write_atomically(directory, {"data": np.concatenate(docs), "offsets": offsets},
                    {"corpus": corpus, "names": names, "fingerprint": fp})
  if counts:
    print(f"corpus {corpus!r}: skipped {counts} document(s)")


def _open(directory: Path, corpus: str, fp: str) -> Corpus:
  """The prepared corpus in `directory`; ValueError when it is damaged or partial."""
  meta = json.loads((directory / "meta.json").read_text())
  sealed = meta.get("sealed")
  if sealed is not None and not all(files.intact(directory / f"{k}.npy", sealed.get(k))
                                    for k in ARRAYS):
    raise ValueError("a file does not match its size or checksum")
  data = np.load(directory / "data.npy", mmap_mode="r")
  offsets = np.load(directory / "offsets.npy")
  if offsets[-1] != len(data) or len(offsets) != len(meta["names"]) + 1:
    raise ValueError("its offsets do not fit its data")
  if sealed is None:  # written before caches were sealed: seal it now
    meta["sealed"] = {k: files.seal(directory / f"{k}.npy") for k in ARRAYS}
    files.write_text(directory / "meta.json", json.dumps(meta))
  return Corpus(name=corpus, fingerprint=fp, data=data, offsets=offsets, names=meta["names"],
                path=directory)


def prepare(corpus: str, *, cache_dir: str = "") -> Corpus:
  """Reads a corpus once into uint8 + offsets under a fingerprint, and reuses it after.
  Empty, binary and unreadable documents are left out (and counted). A damaged cache is
  moved aside and built again."""
  fp = _fingerprint(corpus)
  directory = cache_root(cache_dir) / "corpora" / fp
  if (directory / "meta.json").exists():
    try:
      return _open(directory, corpus, fp)
    except (OSError, ValueError, KeyError) as e:
      aside = directory.with_name(f"{directory.name}.damaged-{time.time_ns()}")
      directory.rename(aside)
      print(f"warning: the prepared corpus {directory} is damaged ({e}); moved aside to "
            f"{aside.name}, preparing it again", file=sys.stderr)
  elif directory.exists():  # a folder without meta.json: not ours to trust
    shutil.rmtree(directory, ignore_errors=True)
  _build(corpus, directory, fp)
  return _open(directory, corpus, fp)


# ---------------------------------------------------------------- windows


def window_table(corpus: Corpus, doc_ids: np.ndarray, seq_len: int) -> np.ndarray:
  """int64 [N, 2] of (start offset into corpus.data, number of real target bytes)."""
  rows = []
  for d in doc_ids:
    lo, hi = int(corpus.offsets[d]), int(corpus.offsets[d + 1])
    starts = np.arange(lo, hi, seq_len, dtype=np.int64)
    rows.append(np.stack([starts, np.minimum(seq_len, hi - starts)], axis=1))
  return np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)


def windows(data: np.ndarray, starts_N: np.ndarray, lengths_N: np.ndarray,
            seq_len: int) -> dict[str, np.ndarray]:
  """The BOS-led windows [N, T] of `lengths_N` bytes of `data` from `starts_N`, zero-padded:
  inputs = [BOS, x[s], .., x[s+T-2]], targets = x[s] .. x[s+T-1], mask = real targets.
  The one window builder of training, eval, entropy scoring and the API."""
  pos_T = np.arange(seq_len)
  mask_NxT = pos_T < np.asarray(lengths_N)[:, None]
  idx_NxT = np.minimum(np.asarray(starts_N, np.int64)[:, None] + pos_T, max(len(data) - 1, 0))
  targets_NxT = np.where(mask_NxT, np.asarray(data)[idx_NxT] if len(data) else 0, 0)
  targets_NxT = targets_NxT.astype(np.int32)
  inputs_NxT = np.concatenate([np.full((len(targets_NxT), 1), BOS, np.int32),
                               targets_NxT[:, :-1]], axis=1)
  return {"inputs": inputs_NxT, "targets": targets_NxT, "mask": mask_NxT.astype(np.float32)}


class WindowReader:
  """(start, length) -> one window's inputs, targets and mask, as numpy."""

  def __init__(self, data: np.ndarray, seq_len: int):
    self.data, self.seq_len = data, seq_len

  def __call__(self, row: np.ndarray) -> dict[str, np.ndarray]:
    start, length = int(row[0]), int(row[1])
    window = windows(self.data, np.array([start]), np.array([length]), self.seq_len)
    return {**{k: v[0] for k, v in window.items()},
            "start": np.int64(start), "length": np.int32(length)}


def train_dataset(corpus: Corpus, doc_ids: np.ndarray, *, seq_len: int, batch_size: int,
                  seed: int, transform=None, shard: int = 0,
                  n_shards: int = 1) -> grain.IterDataset:
  """Shuffled (per epoch, by seed), repeated, batched windows; deterministic per seed.

  `transform`, when given, maps each batch (a dict of numpy arrays) to a new dict, e.g.
  adding patch lengths. Iterators of the result have checkpointable state. With
  `n_shards` > 1 (one per process), shard i reads windows i, i + n, ... of the shuffled
  stream in batches of `batch_size` (the per-process batch): step s of all shards together
  holds the same windows as step s of one process with n times the batch.
  """
  table = window_table(corpus, doc_ids, seq_len)
  ds = grain.MapDataset.source(table).shuffle(seed=seed).repeat()
  if n_shards > 1:
    ds = ds[shard::n_shards]
  ds = ds.map(WindowReader(corpus.data, seq_len)).batch(batch_size, drop_remainder=True)
  if transform is not None:
    ds = ds.map(transform)
  return ds.to_iter_dataset()


def eval_table(corpus: Corpus, doc_ids: np.ndarray, seq_len: int, max_bytes: int = 0):
  """The eval windows: all of them, or a fixed random subset of about `max_bytes` bytes."""
  table = window_table(corpus, doc_ids, seq_len)
  if max_bytes:
    table = table[np.random.default_rng(1234).permutation(len(table))]
    table = table[:max(1, int(np.searchsorted(np.cumsum(table[:, 1]), max_bytes)) + 1)]
  return table


def eval_batches(corpus: Corpus, doc_ids: np.ndarray, *, seq_len: int, batch_size: int,
                 max_bytes: int = 0, transform=None) -> Iterator[dict[str, np.ndarray]]:
  """Every eval window once (see `eval_table`), in fixed-size batches; the last batch is
  filled with fully masked windows, which count for nothing."""
  table = eval_table(corpus, doc_ids, seq_len, max_bytes)
  read = WindowReader(corpus.data, seq_len)
  for lo in range(0, len(table), batch_size):
    rows = list(table[lo:lo + batch_size])
    rows += [np.array([0, 0], np.int64)] * (batch_size - len(rows))
    windows = [read(r) for r in rows]
    batch = {k: np.stack([w[k] for w in windows]) for k in windows[0]}
    yield transform(batch) if transform is not None else batch
