"""Mode `patch`: how a text is patched, as marked text and a PNG of its entropies and
boundaries. In a trained run's workdir it uses that run's rule (threshold, entropy model)."""
from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from blt_jax import api, calibration, checkpoint, entropy, patching, plots
from blt_jax.errors import UserError
from blt_jax.jobs import entropy_model
from blt_jax.resolved import Resolved
from blt_jax.splits import Split, Splits


def text_of(config: ml_collections.ConfigDict) -> bytes:
  p = config.patching
  if p.file:
    if not Path(p.file).is_file():
      raise UserError(f"patching.file {p.file!r} not found")
    raw = Path(p.file).read_bytes()[:2000]
  else:
    raw = (p.text or config.sample.prompt).encode("utf-8")
  if not raw:
    raise UserError("mode=patch needs patching.text or patching.file")
  return raw


def entropies_and_threshold(config: ml_collections.ConfigDict, workdir: Path, raw: bytes):
  """(h of `raw`, threshold): the trained run's own rule when it has the same mode, else
  the config's entropy model and threshold (calibrated on training data when None)."""
  p = config.patching
  recorded = Resolved.of_run(workdir) if checkpoint.latest_step(workdir) is not None else None
  if recorded is not None and recorded.patching and recorded.patching.mode == p.mode:
    rule = recorded.patching
    return entropy.document_entropies(api.load(rule.entropy_workdir), raw), rule.threshold
  splits = Splits(config, Split.load(workdir))  # a run's own split, when it has one
  lm = entropy_model.entropy_model(config, splits.split)
  threshold = p.threshold
  if threshold is None:
    threshold = calibration.calibrate(
        splits, entropy.corpus_entropies(lm, splits.corpus, config.data.cache_dir),
        seq_len=config.data.seq_len, seed=config.train.seed, mode=p.mode,
        target_patch_size=p.target_patch_size, max_patch_len=p.max_patch_len or None)
  return entropy.document_entropies(lm, raw), threshold


def rule_of(config: ml_collections.ConfigDict, workdir: Path, raw: bytes):
  """(mode, h of `raw` or None, threshold, patch_size, max_patch_len): a pretrained folder's
  own patching, else the config's (see `entropies_and_threshold`)."""
  p = config.patching
  if config.model.kind == api.PRETRAINED:
    lm = api.for_config(config, workdir)
    rule = lm.resolved.patching
    h = entropy.document_entropies(lm.patcher.lm, raw) if rule.uses_entropy else None
    return rule.mode, h, rule.threshold, rule.patch_size, rule.max_patch_len
  if p.mode == "none":
    raise UserError("mode=patch needs a patching config (patching.mode is 'none')")
  h = threshold = None
  if p.mode in patching.THRESHOLD_MODES:
    h, threshold = entropies_and_threshold(config, workdir, raw)
  return p.mode, h, threshold, p.patch_size, p.max_patch_len or None


def run(config: ml_collections.ConfigDict, workdir: Path):
  raw = text_of(config)
  mode, h, threshold, patch_size, max_patch_len = rule_of(config, workdir, raw)
  starts = np.asarray(patching.patch_starts(
      h, mode=mode, threshold=threshold, patch_size=patch_size,
      data=np.frombuffer(raw, np.uint8), max_patch_len=max_patch_len))
  workdir.mkdir(parents=True, exist_ok=True)
  png = workdir / "patches.png"
  n_patches = int(starts.sum())
  plots.entropy_figure(raw, h, starts, png, threshold=threshold,
                       title=f"{mode} patching: {n_patches} patches, "
                             f"mean size {len(raw) / n_patches:.2f} bytes")
  print(plots.marked_text(raw, starts))
  lengths = np.diff(np.append(np.flatnonzero(starts), len(raw)))
  counts = np.bincount(lengths)
  print(f"\n{n_patches} patches over {len(raw)} bytes, mean patch size "
        f"{len(raw) / n_patches:.2f}" + (f", threshold {threshold:.4f} nats"
                                         if h is not None else ""))
  print("patch lengths: " + "  ".join(f"{k}:{c}" for k, c in enumerate(counts) if c))
  print(f"figure: {png}")
