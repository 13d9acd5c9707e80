"""Figures: per-byte entropy with the threshold and patch boundaries; patch-length
histograms; sweep curves and bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _label(byte: int) -> str:
  ch = chr(byte)
  return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(ch, ch if 32 < byte < 127 else f"{byte:02x}")


def entropy_figure(raw: bytes, h: np.ndarray | None, starts: np.ndarray, path: str | Path, *,
                   threshold: float | None = None, title: str = ""):
  """The BLT paper's figure: entropy per byte, the threshold, and where patches start;
  with a histogram of patch lengths beside it."""
  n = len(raw)
  lengths = np.diff(np.append(np.flatnonzero(starts), n))
  fig, (ax, hist) = plt.subplots(1, 2, figsize=(max(8.0, min(40.0, n * 0.16)) + 3, 3.6),
                                 gridspec_kw={"width_ratios": [max(4, min(36, n * 0.14)), 3]})
  x = np.arange(n)
  if h is not None:
    ax.plot(x, h, "-o", ms=2.5, lw=1, color="tab:blue", label="entropy (nats)")
  if threshold is not None:
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:.3f}")
  for s in np.flatnonzero(starts):
    ax.axvline(s - 0.5, color="0.6", lw=0.8)
  if n <= 300:
    ax.set_xticks(x)
    ax.set_xticklabels([_label(b) for b in raw], fontsize=7, family="monospace")
  ax.set_xlim(-1, n)
  ax.set_ylabel("entropy (nats)" if h is not None else "")
  ax.set_title(title or f"{len(lengths)} patches, mean size {n / max(len(lengths), 1):.2f}")
  if h is not None or threshold is not None:
    ax.legend(loc="upper right", fontsize=7)
  hist.hist(lengths, bins=np.arange(0.5, lengths.max() + 1.5), color="tab:green")
  hist.set_xlabel("patch length (bytes)")
  hist.set_ylabel("patches")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def marked_text(raw: bytes, starts: np.ndarray, mark: str = "|") -> str:
  """The text with `mark` before every patch but the first."""
  out = []
  for i, b in enumerate(raw):
    if starts[i] and i:
      out.append(mark.encode())
    out.append(bytes([b]))
  return b"".join(out).decode("utf-8", errors="replace")


def boundaries_figure(raw: bytes, panels: list, path: str | Path):
  """One row per patching rule over the same text: (label, entropies or None, starts,
  threshold or None) -> the entropy curve, its threshold, and the patch starts."""
  n = len(raw)
  fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                           figsize=(max(8.0, min(40.0, n * 0.16)), 1.0 + 1.6 * len(panels)))
  x = np.arange(n)
  for ax, (label, h, starts, threshold) in zip(axes[:, 0], panels):
    if h is not None:
      ax.plot(x, h, "-o", ms=2, lw=1, color="tab:blue")
    if threshold is not None:
      ax.axhline(threshold, color="tab:red", ls="--", lw=1)
    for s in np.flatnonzero(starts):
      ax.axvline(s - 0.5, color="0.55", lw=0.8)
    n_patches = int(np.sum(starts))
    ax.set_title(f"{label}: {n_patches} patches, mean {n / max(n_patches, 1):.2f} bytes"
                 + (f", threshold {threshold:.2f} nats" if threshold is not None else ""),
                 fontsize=8, loc="left")
    ax.set_ylabel("nats" if h is not None else "", fontsize=7)
  ax = axes[-1, 0]
  if n <= 300:
    ax.set_xticks(x)
    ax.set_xticklabels([_label(b) for b in raw], fontsize=7, family="monospace")
  ax.set_xlim(-1, n)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def sweep_curve(table: list[dict], *, x: str, xlabel: str, path: str | Path, title: str,
                x_scale: float = 1.0, connect: bool = True):
  """Held-out bpb (± std over seeds) against a column, one colour (and line, when
  `connect`) per series, each point labelled with its variant."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  series = {}
  for row in table:
    if x in row and "bpb" in row:
      series.setdefault(row["series"], []).append(row)
  for name, rows in series.items():
    rows = sorted(rows, key=lambda r: r[x])
    xs, ys = [r[x] * x_scale for r in rows], [r["bpb"] for r in rows]
    ax.errorbar(xs, ys, yerr=[r.get("bpb_std", 0.0) for r in rows], marker="o", capsize=3,
                lw=1.2, label=name, ls="-" if connect else "none")
    for r in rows:
      ax.annotate(r["variant"], (r[x] * x_scale, r["bpb"]), textcoords="offset points",
                  xytext=(4, 4), fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("held-out bits per byte")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, title="patching")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def sweep_bars(table: list[dict], *, path: str | Path, title: str):
  """Held-out bpb (± std over seeds) of every variant as a bar, coloured by series, with
  its training MFLOP per byte written on it: a matched-compute comparison at a glance."""
  rows = [r for r in table if "bpb" in r]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 1.5), 4.2))
  colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r["series"] for r in rows))}
  x = np.arange(len(rows))
  ax.bar(x, [r["bpb"] for r in rows], yerr=[r.get("bpb_std", 0.0) for r in rows], capsize=3,
         color=[colours[r["series"]] for r in rows])
  for i, r in enumerate(rows):
    if "train_flops_per_byte" in r:
      ax.annotate(f"{r['train_flops_per_byte'] * 1e-6:.3g}", (i, r["bpb"]), ha="center",
                  textcoords="offset points", xytext=(0, 8), fontsize=7)
  low = min(r["bpb"] - r.get("bpb_std", 0.0) for r in rows)
  high = max(r["bpb"] + r.get("bpb_std", 0.0) for r in rows)
  ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.25 * (high - low + 1e-3))
  ax.set_xticks(x)
  ax.set_xticklabels([r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out bits per byte")
  ax.set_title(title + " (numbers: train MFLOP/byte)", fontsize=10)
  ax.legend(handles=[matplotlib.patches.Patch(color=c, label=s) for s, c in colours.items()],
            fontsize=8, title="series")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
