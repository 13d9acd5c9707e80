"""Per-byte next-byte entropies from an entropy model, and their on-disk cache.

h[t] (nats) is the entropy of the model's distribution for byte t of a document given
BOS and the bytes before t. Documents longer than the model's window W are scored in
windows that slide by S = 3W/4: a byte past the first window is scored with between W/4
and W bytes of context, always from the same window (so h[t] never depends on bytes at or
after t), and each byte costs W/S = 4/3 forward positions.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from blt_jax import data as data_lib, files

CACHE_VERSION = 3  # 3: keyed on the run's resolved model fields


def chunk_table(offsets: np.ndarray, window: int, stride: int | None = None) -> np.ndarray:
  """int64 [N, 4] rows (context start, context end, keep from, keep to), global offsets.

  Chunk 0 of a document keeps its whole window; chunk k >= 1 starts at k*S and keeps
  its last S bytes, so every byte is kept exactly once.
  """
  stride = stride or max(1, window * 3 // 4)
  rows = []
  for lo, hi in zip(offsets[:-1], offsets[1:]):
    lo, hi = int(lo), int(hi)
    if hi == lo:
      continue
    ctx = lo + np.arange(0, max(1, hi - lo - (window - stride)), stride, dtype=np.int64)
    keep_from = np.where(ctx == lo, lo, ctx + window - stride)
    ctx_end = np.minimum(ctx + window, hi)
    keep = keep_from < ctx_end
    rows.append(np.stack([ctx, ctx_end, keep_from, ctx_end], axis=1)[keep])
  return np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)


def score(lm, data: np.ndarray, offsets: np.ndarray, *, batch_size: int = 64,
          progress: bool = True, desc: str = "entropies") -> np.ndarray:
  """float32 [len(data)]: entropies of every byte of the documents data[offsets[d]:...]."""
  W = lm.seq_len
  table = chunk_table(offsets, W)
  out = np.zeros(len(data), np.float32)
  positions_W = np.arange(W)
  for lo in tqdm(range(0, len(table), batch_size), desc=desc, disable=not progress,
                 unit="batch", dynamic_ncols=True, leave=False):
    rows = table[lo:lo + batch_size]
    idx_BxW = rows[:, :1] + positions_W
    inputs = data_lib.windows(data, rows[:, 0], rows[:, 1] - rows[:, 0], W)["inputs"]
    pad = batch_size - len(rows)  # one compiled shape
    inputs = np.concatenate([inputs, np.zeros((pad, W), inputs.dtype)])
    h_BxW = np.asarray(lm.entropies(inputs))[:len(rows)]
    keep_BxW = (idx_BxW >= rows[:, 2:3]) & (idx_BxW < rows[:, 3:4])
    out[idx_BxW[keep_BxW]] = h_BxW[keep_BxW]
  return out


def model_fingerprint(lm) -> str:
  h = hashlib.blake2b(digest_size=10)
  h.update(f"{CACHE_VERSION}:{json.dumps(lm.resolved.model)}:{lm.seq_len}".encode())
  for leaf in jax.tree.leaves(lm.state):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def _write(path: Path, h: np.ndarray):
  """Saves `h` under `path` atomically, with its seal (size, checksum) beside it."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp.npy", dir=path.parent)
  except OSError as e:
    raise files.cannot_write(path.parent, e) from None
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, h.astype(np.float32))
    files.write_json(path.with_suffix(".json"), files.seal(Path(tmp)))
    os.replace(tmp, path)  # atomic: never a half cache under the final name
  except OSError as e:
    Path(tmp).unlink(missing_ok=True)
    raise files.cannot_write(path, e) from None
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _open(path: Path, n_bytes: int) -> np.ndarray:
  """The cached entropies at `path`; ValueError when damaged or partial."""
  seal_file = path.with_suffix(".json")
  sealed = files.read_json(seal_file)
  if sealed is not None and not files.intact(path, sealed):
    raise ValueError("it does not match its size or checksum")
  h = np.load(path, mmap_mode="r")
  if h.shape != (n_bytes,):
    raise ValueError(f"it holds {h.shape} entropies for {n_bytes} bytes")
  if sealed is None:  # written before caches were sealed: seal it now
    files.write_json(seal_file, files.seal(path))
  return h


def corpus_entropies(lm, corpus: data_lib.Corpus, cache_dir: str = "",
                     progress: bool = True) -> np.ndarray:
  """The entropies of a whole prepared corpus, scored once and cached. A damaged cache is
  moved aside and scored again.

  Stored as float32: float16 would round entropies into ties (2^-11 relative steps)
  large enough that no threshold hits a target mean patch size within 1%.
  """
  path = (data_lib.cache_root(cache_dir) / "entropies" /
          f"{corpus.fingerprint}-{model_fingerprint(lm)}.npy")
  if path.exists():
    try:
      return _open(path, len(corpus.data))
    except (OSError, ValueError) as e:
      aside = path.with_name(f"{path.stem}.damaged-{time.time_ns()}.npy")
      path.rename(aside)
      path.with_suffix(".json").unlink(missing_ok=True)
      print(f"warning: the entropy cache {path} is damaged ({e}); moved aside to "
            f"{aside.name}, scoring again", file=sys.stderr)
  h = score(lm, corpus.data, corpus.offsets, progress=progress,
            desc=f"entropies of {corpus.name}")
  _write(path, h)
  return _open(path, len(corpus.data))


def document_entropies(lm, raw: bytes) -> np.ndarray:
  """Entropies (float32) of one byte string treated as a document, as the cache scores it."""
  x = np.frombuffer(bytes(raw), np.uint8)
  offsets = np.array([0, len(x)])
  batch_size = 1 if len(chunk_table(offsets, lm.seq_len)) <= 1 else 8  # one window: no padding
  return score(lm, x, offsets, batch_size=batch_size, progress=False)
