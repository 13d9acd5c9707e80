"""The BLT job around the train loop: find or train the entropy model, score the corpus
once (cached), calibrate the threshold on training data only, and patch every batch."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blt_jax import api, checkpoint, data, entropy, patching, splits as splits_lib
from blt_jax.errors import UserError

ENTROPY_MODES = ("global", "monotonic")
CALIBRATION_BYTES = 1 << 21  # training bytes the threshold is calibrated on


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py:size=tiny' -> the ConfigDict its get_config builds."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise UserError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except ValueError as e:
    raise UserError(f"{spec}: {e}")


def default_workdir(config_spec: str, size: str) -> str:
  name = Path(config_spec.split(":")[0]).stem
  return f"runs/{name}" if size == "small" else f"runs/{name}_{size}"


def default_entropy_workdir(spec: str, size: str, split: splits_lib.Split) -> str:
  """runs/<entropy config>[_<size>]-<split key>: one entropy model per split, so a model
  trained on another split is never picked up."""
  return f"{default_workdir(spec, size)}-{split.key}"


def check_entropy_workdir(workdir: str | Path, split: splits_lib.Split):
  """A trained entropy model must hold out exactly the run's documents: one that trained on
  them would place boundaries by how well it knows the bytes being scored."""
  recorded = splits_lib.Split.load(workdir)
  if recorded is None:
    raise UserError(f"patching.entropy_workdir {workdir} has no {splits_lib.SPLIT_FILE}: it was "
                    "trained before runs recorded their split; retrain it")
  diff = split.difference(recorded)
  if diff is not None:
    raise UserError(f"patching.entropy_workdir {workdir} was trained on another split: {diff}")


def entropy_model(config: ml_collections.ConfigDict, split: splits_lib.Split,
                  progress: bool = True) -> api.LanguageModel:
  """The run's entropy model: reused from its workdir when trained, else trained now, on
  the run's `split` (same corpus, same held-out documents).

  `patching.entropy_workdir` may name any trained next-byte model run (a byte LM, a
  fine-tuned Qwen3, ...) of the same split: its own saved config is used, and it is
  finished if it stopped early. Otherwise `patching.entropy_config` is trained there (or in
  its default workdir, keyed on the split). Resolves `patching.entropy_workdir` to an
  absolute path in `config`.
  """
  from blt_jax import train as train_lib
  p = config.patching
  spec = p.entropy_config or f"configs/entropy_patcher.py:size={config.size}"
  workdir = p.entropy_workdir
  if (workdir and Path(workdir).is_dir()
      and checkpoint.Checkpointer(workdir).latest_step() is not None):
    check_entropy_workdir(workdir, split)
    ecfg = ml_collections.ConfigDict(checkpoint.read_config(workdir)[0])
    ecfg.train.stop_at = 0
    if ecfg.patching.mode != "none":
      raise UserError(f"patching.entropy_workdir {workdir} holds a patched model "
                      f"({ecfg.model.kind}); an entropy model is a plain next-byte model")
  else:
    ecfg = load_config_file(spec)
    for key in ("corpus", "cache_dir", "eval_fraction"):  # the run's split
      ecfg.data[key] = config.data[key]
  if not workdir:
    workdir = default_entropy_workdir(spec, ecfg.size, split)
  workdir = Path(workdir).absolute()
  done = checkpoint.Checkpointer(workdir).latest_step() if workdir.exists() else None
  if done is None or done < ecfg.train.steps:
    print(f"training the entropy model in {workdir} ({spec})")
    train_lib.train(ecfg, workdir, progress=progress)
  check_entropy_workdir(workdir, split)
  p.entropy_workdir = str(workdir)
  return api.load(workdir)


@functools.partial(jax.jit, static_argnames=("mode", "patch_size", "max_patch_len",
                                              "max_patches"))
def _lengths(h_BxT, bytes_BxT, valid_BxT, *, mode, threshold, patch_size, max_patch_len,
             max_patches):
  starts_BxT = patching.patch_starts(h_BxT, mode=mode, threshold=threshold,
                                     patch_size=patch_size, data=bytes_BxT,
                                     max_patch_len=max_patch_len or None)
  starts_BxT = starts_BxT & valid_BxT  # padding joins the last real patch
  return patching.patch_lengths(starts_BxT, max_patches), jnp.sum(starts_BxT, axis=-1)


class Patcher:
  """Adds `patch_lengths` [B, P] to batches, from entropies aligned with corpus bytes."""

  def __init__(self, p: ml_collections.ConfigDict, max_patches: int,
               entropies: np.ndarray | None = None, lm: api.LanguageModel | None = None):
    self.mode, self.max_patches = p.mode, max_patches
    self.threshold = float(p.threshold)
    self.patch_size, self.max_patch_len = int(p.patch_size), int(p.max_patch_len)
    self.entropies, self.lm = entropies, lm

  def lengths(self, h_BxT, targets_BxT, mask_BxT):
    """(patch lengths int32 [B, P], patch starts per window int32 [B]) as numpy."""
    lengths, n_starts = _lengths(
        jnp.asarray(h_BxT, jnp.float32), jnp.asarray(targets_BxT, jnp.uint8),
        jnp.asarray(mask_BxT > 0), mode=self.mode, threshold=self.threshold,
        patch_size=self.patch_size, max_patch_len=self.max_patch_len,
        max_patches=self.max_patches)
    return np.asarray(lengths), np.asarray(n_starts)

  def window_entropies(self, batch):
    T = batch["targets"].shape[1]
    if self.mode not in ENTROPY_MODES:
      return np.zeros(batch["targets"].shape, np.float32)
    idx_BxT = batch["start"][:, None] + np.arange(T)
    h_BxT = self.entropies[np.minimum(idx_BxT, len(self.entropies) - 1)]
    return np.where(batch["mask"] > 0, h_BxT, 0.0).astype(np.float32)

  def __call__(self, batch: dict) -> dict:
    lengths, _ = self.lengths(self.window_entropies(batch), batch["targets"], batch["mask"])
    return {**batch, "patch_lengths": lengths}

  def for_document(self, raw: bytes, windows: dict) -> dict:
    """Patches the windows of one byte string, scoring its entropies as the cache would."""
    h = np.zeros(windows["targets"].size, np.float32)
    if self.mode in ENTROPY_MODES:
      h[:len(raw)] = entropy.document_entropies(self.lm, raw)
    lengths, _ = self.lengths(h.reshape(windows["targets"].shape), windows["targets"],
                              windows["mask"])
    return {**windows, "patch_lengths": lengths}


def calibration_windows(config, splits) -> np.ndarray:
  """int64 [N, T] corpus offsets of a fixed random sample of full training windows."""
  T = config.data.seq_len
  table = data.window_table(splits.corpus, splits.train_ids, T)
  table = table[table[:, 1] == T]
  table = table[np.random.default_rng(config.train.seed).permutation(len(table))]
  return table[:max(1, CALIBRATION_BYTES // T), :1] + np.arange(T)


def calibrate(config, splits, h_all: np.ndarray) -> float:
  """The threshold giving the target mean patch size on full training windows."""
  h_NxT = np.asarray(h_all[calibration_windows(config, splits)], np.float32)
  try:
    return patching.calibrate_threshold(
        h_NxT, target_patch_size=config.patching.target_patch_size,
        mode=config.patching.mode, max_patch_len=config.patching.max_patch_len or None)
  except ValueError as e:
    raise UserError(f"threshold calibration: {e}")


def training_patch_size(config, splits, h_all: np.ndarray | None) -> float:
  """Mean patch size of the run's patching rule on the calibration windows."""
  p = config.patching
  idx_NxT = calibration_windows(config, splits)
  starts = patching.patch_starts(
      None if h_all is None else np.asarray(h_all[idx_NxT], np.float32), mode=p.mode,
      threshold=p.threshold if h_all is not None else None, patch_size=p.patch_size,
      data=np.asarray(splits.corpus.data[idx_NxT]), max_patch_len=p.max_patch_len or None)
  return patching.mean_patch_size(starts)


def prepare(config: ml_collections.ConfigDict, splits, workdir=None, progress: bool = True):
  """(train transform, eval transform) for a patched run; resolves patching fields.

  A run that resumes keeps the threshold its checkpoints were trained with.
  """
  p = config.patching
  if workdir is not None and Path(workdir).is_dir() and p.threshold < 0:
    if checkpoint.Checkpointer(workdir).latest_step() is not None:
      saved, _ = checkpoint.read_config(workdir)
      if saved["patching"]["mode"] == p.mode:
        p.threshold = saved["patching"]["threshold"]
  if p.mode == "none":
    return None, None
  if p.mode in ENTROPY_MODES and p.threshold < 0 and p.target_patch_size <= 0:
    raise UserError(f"patching.mode={p.mode} needs patching.threshold >= 0 or "
                    "patching.target_patch_size > 0")
  lm = corpus_h = eval_h = None
  if p.mode in ENTROPY_MODES:
    lm = entropy_model(config, splits.split, progress)
    corpus_h = entropy.corpus_entropies(lm, splits.corpus, config.data.cache_dir, progress)
    eval_h = (corpus_h if splits.eval_corpus is splits.corpus else
              entropy.corpus_entropies(lm, splits.eval_corpus, config.data.cache_dir, progress))
    if p.threshold < 0:
      p.threshold = calibrate(config, splits, corpus_h)
      print(f"calibrated threshold {p.threshold:.4f} nats for mean patch size "
            f"{p.target_patch_size} on training data")
  elif p.mode not in ("static", "space"):
    raise UserError(f"unknown patching.mode {p.mode!r} (none, global, monotonic, static, space)")
  if config.model.max_patches <= 0:  # derived from the rule's mean patch size on training data
    m = training_patch_size(config, splits, corpus_h)
    config.model.max_patches = patching.max_patches(config.data.seq_len, m)
    print(f"mean patch size {m:.2f} on training data: {config.model.max_patches} patch slots")
  P = config.model.max_patches
  return Patcher(p, P, corpus_h, lm), Patcher(p, P, eval_h, lm)


def patch_stats(patcher: Patcher, batches) -> dict:
  """Mean patch size over real bytes, and the share of windows whose patches overflowed."""
  n_bytes = n_patches = n_windows = n_folded = 0
  for batch in batches:
    h = patcher.window_entropies(batch)
    _, n_starts = patcher.lengths(h, batch["targets"], batch["mask"])
    real = batch["mask"].sum(1) > 0
    n_bytes += batch["mask"].sum()
    n_patches += n_starts[real].sum()
    n_windows += real.sum()
    n_folded += (n_starts[real] > patcher.max_patches).sum()
  return {"mean_patch_size": float(n_bytes / max(n_patches, 1)),
          "folded_windows": float(n_folded / max(n_windows, 1))}


def load_patcher(config: ml_collections.ConfigDict) -> Patcher | None:
  """The patcher of a trained run, for `blt_jax.load` (None for byte models)."""
  p = config.patching
  if p.mode == "none":
    return None
  lm = api.load(p.entropy_workdir) if p.mode in ENTROPY_MODES else None
  return Patcher(p, config.model.max_patches, None, lm)


def save_summary(workdir: Path, summary: dict):
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
