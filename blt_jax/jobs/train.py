"""Mode `train`: a run end to end. A BLT run first gets its entropy model, scores the
corpus once (cached), calibrates the threshold on training windows and derives its patch
slots; then the train loop, a held-out eval and `<workdir>/summary.json`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from blt_jax import (bpe, calibration, checkpoint, entropy, files, models, patching, sharding,
                     train)
from blt_jax.errors import UserError
from blt_jax.jobs import entropy_model
from blt_jax.models import flops
from blt_jax.patcher import BatchPatcher, patch_stats
from blt_jax.resolved import PatchRule, Resolved
from blt_jax.splits import Splits, check_workdir


def resolve_rule(config: ml_collections.ConfigDict, splits: Splits, h_all: np.ndarray | None,
                 entropy_workdir: str | None) -> PatchRule:
  """The run's patching rule: the threshold calibrated on training windows unless given,
  and the patch slots derived from the rule's mean patch size unless given."""
  p, T, seed = config.patching, config.data.seq_len, config.train.seed
  max_len = p.max_patch_len or None
  threshold = None
  if p.mode in patching.THRESHOLD_MODES:
    threshold = p.threshold
    if threshold is None:
      threshold = calibration.calibrate(splits, h_all, seq_len=T, seed=seed, mode=p.mode,
                                        target_patch_size=p.target_patch_size,
                                        max_patch_len=max_len)
      print(f"calibrated threshold {threshold:.4f} nats for mean patch size "
            f"{p.target_patch_size} on training data")
  slots = config.model.max_patches
  if slots is None:
    m = calibration.training_patch_size(splits, h_all, seq_len=T, seed=seed, mode=p.mode,
                                        threshold=threshold, patch_size=p.patch_size,
                                        max_patch_len=max_len)
    slots = patching.max_patches(T, m)
    print(f"mean patch size {m:.2f} on training data: {slots} patch slots")
  return PatchRule(mode=p.mode, max_patches=slots, threshold=threshold,
                   patch_size=p.patch_size, max_patch_len=max_len,
                   entropy_workdir=entropy_workdir)


RULE_FIELDS = ("mode", "target_patch_size", "threshold", "patch_size", "max_patch_len")


def check_same_patching(saved: dict, config: ml_collections.ConfigDict, workdir: Path):
  """A run resumes only with the patching it started with."""
  for key in RULE_FIELDS:
    if saved["patching"].get(key) != config.patching[key]:
      raise UserError(f"{workdir} was trained with patching.{key}="
                      f"{saved['patching'].get(key)!r} but the config says "
                      f"{config.patching[key]!r}; train in a new workdir")


def patchers(config: ml_collections.ConfigDict, splits: Splits, workdir: Path,
             progress: bool = True):
  """(rule, train patcher, eval patcher) of a patched run; Nones for a plain one. A run
  that resumes keeps the rule it recorded."""
  p = config.patching
  if p.mode == "none":
    return None, None, None
  if p.mode not in patching.MODES:
    raise UserError(f"unknown patching.mode {p.mode!r} (none, {', '.join(patching.MODES)})")
  if (p.mode in patching.THRESHOLD_MODES and p.threshold is None
      and p.target_patch_size <= 0):
    raise UserError(f"patching.mode={p.mode} needs patching.threshold or "
                    "patching.target_patch_size > 0")
  recorded = Resolved.of_resumed(workdir)
  if recorded is not None:
    check_same_patching(checkpoint.read_config(workdir)[0], config, workdir)
  h_train = h_eval = lm = None
  if p.mode in patching.THRESHOLD_MODES:
    lm = entropy_model.entropy_model(config, splits.split, progress)
    h_train = entropy.corpus_entropies(lm, splits.corpus, config.data.cache_dir, progress)
    h_eval = (h_train if splits.eval_corpus is splits.corpus else
              entropy.corpus_entropies(lm, splits.eval_corpus, config.data.cache_dir, progress))
  if recorded is not None:
    rule = recorded.patching
  else:
    rule = resolve_rule(config, splits, h_train, str(lm.workdir) if lm else None)
  return rule, BatchPatcher(rule, h_train), BatchPatcher(rule, h_eval)


def token_windows(config: ml_collections.ConfigDict, splits: Splits, workdir: Path):
  """(train transform, eval transform, derived model fields) of a BPE-token run. The vocabulary is trained on the training documents only (or
  read from the cache) and kept in the workdir; training windows get token slots for
  their bytes per token on training data unless `model.max_tokens` says; eval windows get
  one slot per byte, so no held-out byte goes unscored. A resumed run keeps its own."""
  if config.patching.mode != "none":
    raise UserError(f"a BPE-token model is not patched; patching.mode={config.patching.mode!r}")
  T = config.data.seq_len
  recorded = Resolved.of_resumed(workdir)
  if recorded is not None:
    tokenizer, slots = bpe.BPE.load(workdir / bpe.TOKENIZER_FILE), recorded.model["max_tokens"]
  else:
    tokenizer = bpe.for_training(splits.corpus, splits.train_ids, splits.split.key,
                                 config.model.vocab_size, config.data.cache_dir)
    if tokenizer.vocab_size != config.model.vocab_size:
      raise UserError(f"the training documents give only {tokenizer.vocab_size} BPE tokens, "
                      f"not model.vocab_size={config.model.vocab_size}; lower it")
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(workdir / bpe.TOKENIZER_FILE)
    slots = config.model.max_tokens
    if slots is None:
      rows = splits.corpus.data[calibration.calibration_windows(splits, T, config.train.seed)]
      m = bpe.bytes_per_token(tokenizer, [r.tobytes() for r in rows])
      slots = patching.max_patches(T, m)
      print(f"{m:.2f} bytes per token on training data: {slots} token slots per window")
  return (bpe.TokenWindows(tokenizer, slots), bpe.TokenWindows(tokenizer, T),
          {"max_tokens": slots})


def model_summary(model: models.ByteModel, seq_len: int,
                  mean_patch_size: float | None = None) -> dict:
  """Parameters (with and without hash tables) and analytic training FLOPs per byte."""
  counts = model.param_counts()
  train_flops = model.flops_per_byte(seq_len, mean_patch_size)
  return {"params": counts["total"], "params_without_hash": counts["without_hash"],
          "train_flops_per_byte": train_flops,
          "infer_flops_per_byte": train_flops / flops.TRAIN_PER_FORWARD}


def format_summary(workdir, s: dict) -> str:
  parts = [f"{workdir}: held-out bpb {s['bpb']:.4f}", f"accuracy {s['accuracy']:.3f}",
           f"on {s['bytes']} bytes"]
  if "mean_patch_size" in s:
    unit = "bytes per token" if s.get("kind") == "token_lm" else "mean patch size"
    parts.append(f"{unit} {s['mean_patch_size']:.2f}")
  parts += [f"params {s['params'] / 1e6:.2f}M ({s['params_without_hash'] / 1e6:.2f}M "
            "without hash tables)", f"{s['train_flops_per_byte'] / 1e6:.1f} MFLOP/byte (train)",
            f"{s['train_bytes_per_s']:.0f} bytes/s", f"wall {s['wall_s']:.0f}s"]
  return " | ".join(parts)


def run(config: ml_collections.ConfigDict, workdir: Path, progress: bool = True):
  t0 = time.time()
  sharding.train_mesh(config)  # a bad mesh or batch fails before any data is read
  splits = Splits(config)
  check_workdir(workdir, splits.split)  # fails before anything trains
  summary, derived, rule = {"kind": config.model.kind}, {}, None
  batches, _ = splits.eval_batches(config, config.eval.max_bytes)
  if config.model.kind == "token_lm":
    transform, eval_transform, derived = token_windows(config, splits, workdir)
    summary["mean_patch_size"] = bpe.bytes_per_token(  # bytes per token, held-out
        eval_transform.bpe, [t for b in batches for t in bpe.window_texts(b)])
  else:
    rule, transform, eval_transform = patchers(config, splits, workdir, progress)
    if eval_transform is not None:
      summary.update(patch_stats(eval_transform, batches))
  summary.update(train.train(config, workdir, splits=splits, rule=rule, transform=transform,
                             eval_transform=eval_transform, derived=derived,
                             progress=progress, until=config.train.stop_at))
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  summary["train_bytes_per_s"] = float(np.median([r["bytes_per_s"] for r in rows[1:] or rows]))
  summary["wall_s"] = time.time() - t0
  if rule is not None and rule.uses_entropy:
    summary["threshold"] = rule.threshold
    summary["entropy_workdir"] = rule.entropy_workdir
  model = nnx.eval_shape(lambda: models.build(Resolved.of_run(workdir).model))
  summary.update(model_summary(model, config.data.seq_len, summary.get("mean_patch_size")))
  files.write_json(workdir / "summary.json", summary)
  print(format_summary(workdir, summary))
