"""Patcher throughput (bytes/s): each rule's starts, the full path (global starts with
max_patch_len, then lengths), a plain Python loop and a vectorised NumPy reference.

  python benchmarks/patching.py [--rows 32768] [--seq-len 512] [--max-patch-len 16]

Times are the best of --repeats after a warm-up call, with block_until_ready.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import time

import jax
import numpy as np

import blt_jax
from blt_jax import data as data_lib, entropy, patching


def best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def numpy_full_path(h_NxT, threshold, m, P):
  """Vectorised NumPy: flatnonzero + diff on the flat batch; a patch of length L is cut
  into ceil(L / m) pieces by arithmetic; bincount folds the surplus into slot P-1."""
  N, T = h_NxT.shape
  starts = h_NxT > threshold
  starts[:, 0] = True
  natural = np.flatnonzero(starts)  # every row begins with a start: no patch spans rows
  pieces = -(-np.diff(natural, append=N * T) // m)
  piece = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
  pos = np.repeat(natural, pieces) + piece * m
  row = pos // T
  slot = np.minimum(np.arange(len(pos)) - np.searchsorted(pos, row * T), P - 1)
  lengths = np.bincount(row * P + slot, weights=np.diff(pos, append=N * T), minlength=N * P)
  return lengths.astype(np.int32).reshape(N, P)


def numpy_starts_diff(h_NxT, threshold):
  """The NumPy floor: starts, flatnonzero and diff only (no cut, no per-row slots)."""
  starts = h_NxT > threshold
  starts[:, 0] = True
  return np.diff(np.flatnonzero(starts), append=starts.size)


def python_full_path(h_NxT, threshold, m, P):
  """A plain loop over bytes, one sequence at a time."""
  out = []
  for row in h_NxT.tolist():
    lengths, last = [], 0
    for t in range(1, len(row) + 1):
      if t == len(row) or row[t] > threshold or t - last == m:
        lengths.append(t - last)
        last = t
    if len(lengths) > P:
      lengths[P - 1:] = [sum(lengths[P - 1:])]
    out.append(lengths + [0] * (P - len(lengths)))
  return np.array(out, np.int32)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=32768)
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--max-patch-len", type=int, default=16)
  ap.add_argument("--max-patches", type=int, default=0, help="default: seq_len // 2")
  ap.add_argument("--target-patch-size", type=float, default=4.5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--entropy-workdir", default="",
                  help="a trained entropy model whose corpus scoring is timed; default: the "
                       "newest runs/entropy_patcher-* (skipped if there is none)")
  args = ap.parse_args()
  N, T, m = args.rows, args.seq_len, args.max_patch_len
  P = args.max_patches or T // 2
  n_bytes = N * T
  rng = np.random.default_rng(0)
  h_np = rng.gamma(1.0, 1.0, (N, T)).astype(np.float32)
  text = np.frombuffer(b"the quick brown fox, jumps over 12 lazy dogs.\n", np.uint8)
  data_np = rng.choice(text, (N, T))
  h, data = jax.device_put(h_np), jax.device_put(data_np)
  theta = patching.calibrate_threshold(h_np[:1024], target_patch_size=args.target_patch_size,
                                       max_patch_len=m)
  print(f"{n_bytes / 2**20:.0f}M bytes ({N} x {T}) on {jax.devices()[0].device_kind}; "
        f"global threshold {theta:.3f} (mean patch size {args.target_patch_size}), "
        f"max_patch_len {m}, max_patches {P}")
  rates = {}

  def report(name, seconds, note=""):
    rates[name] = n_bytes / seconds
    print(f"  {name:34s} {rates[name] / 1e6:9.1f} M bytes/s  {note}")

  for mode in patching.MODES:
    kw = dict(mode=mode, threshold=theta, patch_size=4, data=data)
    report(f"starts {mode}", best_time(lambda: patching.patch_starts(h, **kw), args.repeats))
  report(f"starts global, max_patch_len {m}", best_time(
      lambda: patching.patch_starts(h, mode="global", threshold=theta, max_patch_len=m),
      args.repeats))
  starts = patching.patch_starts(h, mode="global", threshold=theta, max_patch_len=m)
  report("lengths", best_time(lambda: patching.patch_lengths(starts, P), args.repeats))

  def full():
    s = patching.patch_starts(h, mode="global", threshold=theta, max_patch_len=m)
    return patching.patch_lengths(s, P)
  report("full path (JAX, jitted)", best_time(full, args.repeats))

  ref = numpy_full_path(h_np, theta, m, P)
  report("full path (NumPy, vectorised)",
         best_time(lambda: numpy_full_path(h_np, theta, m, P), args.repeats))
  report("NumPy starts+flatnonzero+diff only",
         best_time(lambda: numpy_starts_diff(h_np, theta), args.repeats), "(no cut, no slots)")
  rows = max(1, N // 256)
  t0 = time.perf_counter()
  loop = python_full_path(h_np[:rows], theta, m, P)
  report("full path (Python loop)", (time.perf_counter() - t0) * N / rows,
         f"({rows} rows, scaled)")
  jitted = np.asarray(full())
  assert (jitted == ref).all() and (jitted[:rows] == loop).all(), "implementations disagree"
  jax_rate = rates["full path (JAX, jitted)"]
  print(f"  ratio full path JAX / NumPy {jax_rate / rates['full path (NumPy, vectorised)']:.2f}, "
        f"JAX / Python loop {jax_rate / rates['full path (Python loop)']:.0f}")
  trained = sorted(Path("runs").glob("entropy_patcher-*/checkpoints"),
                   key=lambda p: p.stat().st_mtime)
  workdir = args.entropy_workdir or (str(trained[-1].parent) if trained else "")
  if workdir and Path(workdir, "checkpoints").is_dir():
    rates["entropy scoring"] = scoring_rate(workdir)
  return rates


def scoring_rate(workdir: str, n_bytes: int = 1_000_000) -> float:
  """Entropy-cache scoring bytes/s: a trained entropy model over ~1M stdlib bytes."""
  lm = blt_jax.load(workdir)
  corpus = data_lib.prepare("stdlib")
  n_docs = int(np.searchsorted(corpus.offsets, n_bytes))
  offsets = corpus.offsets[:n_docs + 1]
  sample = np.asarray(corpus.data[:offsets[-1]])
  entropy.score(lm, sample[:offsets[1]], offsets[:2], progress=False)  # compile
  t0 = time.perf_counter()
  entropy.score(lm, sample, offsets, progress=False)
  rate = len(sample) / (time.perf_counter() - t0)
  m = lm.config.model
  print(f"  entropy-cache scoring ({m.dim} wide x {m.n_layers} layers, window {lm.seq_len}): "
        f"{rate / 1e3:.1f} k bytes/s on {len(sample) / 1e6:.2f}M stdlib bytes")
  return rate


if __name__ == "__main__":
  main()
