"""What each `config.mode` does: train, eval, patch, sample, sweep."""
from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from blt_jax.errors import UserError


def run(config: ml_collections.ConfigDict, workdir: str):
  handlers = {"train": train, "eval": evaluate, "patch": patch, "sample": sample,
              "sweep": sweep}
  if config.mode not in handlers:
    raise UserError(f"unknown mode {config.mode!r} (known: {', '.join(handlers)})")
  from blt_jax import sharding
  sharding.initialize(config.mesh)  # multi-host: before anything touches a device
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"workdir {workdir} exists and is not a directory")
  if config.mode in ("train", "patch", "sweep"):
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / ".write-test").touch()
      (workdir / ".write-test").unlink()
    except OSError as e:
      raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}")
  handlers[config.mode](config, workdir)


def model_summary(config, model, mean_patch_size: float | None = None) -> dict:
  """Parameters (with and without hash tables) and analytic training FLOPs per byte."""
  from blt_jax.models import blt, flops
  counts = blt.param_counts(model)
  shape = model.lm.cfg if hasattr(model, "lm") else model.cfg  # Qwen3 wraps its LM
  return {"params": counts["total"], "params_without_hash": counts["without_hash"],
          "train_flops_per_byte": flops.flops_per_byte(shape, config.data.seq_len,
                                                       mean_patch_size)}


def train(config, workdir: Path):
  from blt_jax import pipeline, sharding, splits as splits_lib, train as train_lib
  t0 = time.time()
  sharding.train_mesh(config)  # a bad mesh or batch fails before any data is read
  splits = splits_lib.Splits(config)
  splits_lib.check_workdir(workdir, splits.split)  # fails before anything trains
  transform, eval_transform = pipeline.prepare(config, splits, workdir)
  summary = {}
  if eval_transform is not None:
    batches, _ = splits.eval_batches(config, config.eval.max_bytes)
    summary.update(pipeline.patch_stats(eval_transform, batches))
  result = train_lib.train(config, workdir, splits=splits, transform=transform,
                           eval_transform=eval_transform)
  summary.update(result)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  summary["train_bytes_per_s"] = float(np.median([r["bytes_per_s"] for r in rows[1:] or rows]))
  summary["wall_s"] = time.time() - t0
  if config.patching.mode in pipeline.ENTROPY_MODES:
    summary["threshold"] = config.patching.threshold
    summary["entropy_workdir"] = config.patching.entropy_workdir
  model = train_lib.build_model(config)
  summary.update(model_summary(config, model, summary.get("mean_patch_size")))
  pipeline.save_summary(workdir, summary)
  print(format_summary(workdir, summary))


def format_summary(workdir, s: dict) -> str:
  parts = [f"{workdir}: held-out bpb {s['bpb']:.4f}", f"accuracy {s['accuracy']:.3f}",
           f"on {s['bytes']} bytes"]
  if "mean_patch_size" in s:
    parts.append(f"mean patch size {s['mean_patch_size']:.2f}")
  parts += [f"params {s['params'] / 1e6:.2f}M ({s['params_without_hash'] / 1e6:.2f}M "
            "without hash tables)", f"{s['train_flops_per_byte'] / 1e6:.1f} MFLOP/byte (train)",
            f"{s['train_bytes_per_s']:.0f} bytes/s", f"wall {s['wall_s']:.0f}s"]
  return " | ".join(parts)


def evaluate(config, workdir: Path):
  from blt_jax import api, checkpoint, splits as splits_lib, train as train_lib
  from blt_jax.evaluate import Evaluator
  from flax import nnx
  step = None if config.eval.step < 0 else config.eval.step
  saved, _ = checkpoint.read_config(workdir, step)
  train_lib.check_same_model(saved, config, workdir)
  lm = api.load(workdir, step)
  step = lm.step
  config = ml_collections.ConfigDict({**lm.config.to_dict(), "eval": config.eval.to_dict(),
                                      "data": {**lm.config.data.to_dict(),
                                               "cache_dir": config.data.cache_dir}})
  recorded = splits_lib.Split.load(workdir)
  if recorded is None and not config.eval.corpus:
    raise UserError(f"{workdir} has no {splits_lib.SPLIT_FILE}: it was trained before runs "
                    "recorded their held-out split, so its held-out documents are unknown; "
                    "evaluate it on eval.corpus")
  splits = splits_lib.Splits(config, recorded)  # the documents the run held out
  transform = None
  if lm.patcher is not None:
    from blt_jax import entropy, pipeline
    h = (entropy.corpus_entropies(lm.patcher.lm, splits.eval_corpus, config.data.cache_dir)
         if lm.patcher.lm is not None else None)
    transform = pipeline.Patcher(config.patching, config.model.max_patches, h, lm.patcher.lm)
  batches, total = splits.eval_batches(config, config.eval.max_bytes, transform)
  graphdef, state = nnx.split(lm.model)
  result = Evaluator(graphdef)(state, (train_lib.to_device(b) for b in batches), total=total)
  result.update(step=step, corpus=config.eval.corpus or f"{config.data.corpus} (held-out)")
  (workdir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
  print(f"{workdir} step {step}: bpb {result['bpb']:.4f}  loss {result['loss']:.4f}  "
        f"accuracy {result['accuracy']:.3f}  perplexity {result['perplexity']:.3f}  "
        f"on {result['bytes']} bytes of {result['corpus']}")


def sample(config, workdir: Path):
  from blt_jax import api, sample as sample_lib
  s = config.sample
  if s.max_bytes < 1:
    raise UserError(f"sample.max_bytes must be >= 1, got {s.max_bytes}")
  if s.temperature < 0 or not 0 <= s.top_k <= 256:
    raise UserError("sample.temperature must be >= 0 and sample.top_k in 0..256, got "
                    f"{s.temperature} and {s.top_k}")
  lm = api.load(workdir, None if config.eval.step < 0 else config.eval.step)
  prompt = s.prompt.encode("utf-8")
  out = sample_lib.generate(lm, prompt, max_bytes=s.max_bytes, temperature=s.temperature,
                            top_k=s.top_k, seed=s.seed)
  print((prompt + out).decode("utf-8", errors="replace"))


def patch(config, workdir: Path):
  """Shows how a text is patched: marked text, a PNG of entropies and boundaries."""
  from blt_jax import checkpoint, entropy, patching, pipeline, plots, splits as splits_lib
  p = config.patching
  if p.file:
    if not Path(p.file).is_file():
      raise UserError(f"patching.file {p.file!r} not found")
    raw = Path(p.file).read_bytes()[:2000]
  else:
    raw = (p.text or config.sample.prompt).encode("utf-8")
  if not raw:
    raise UserError("mode=patch needs patching.text or patching.file")
  if p.mode == "none":
    raise UserError("mode=patch needs a patching config (patching.mode is 'none')")
  if workdir.is_dir() and checkpoint.Checkpointer(workdir).latest_step() is not None:
    saved, _ = checkpoint.read_config(workdir)  # the trained run's entropy model and threshold
    for key in ("threshold", "entropy_workdir"):
      p[key] = saved["patching"][key] if p.mode == saved["patching"]["mode"] else p[key]
  h = None
  if p.mode in pipeline.ENTROPY_MODES:
    splits = splits_lib.Splits(config, splits_lib.Split.load(workdir))  # a run's own split
    lm = pipeline.entropy_model(config, splits.split)
    if p.threshold < 0:
      p.threshold = pipeline.calibrate(config, splits, entropy.corpus_entropies(
          lm, splits.corpus, config.data.cache_dir))
    h = entropy.document_entropies(lm, raw)
  starts = np.asarray(patching.patch_starts(
      None if h is None else h, mode=p.mode, threshold=p.threshold if h is not None else None,
      patch_size=p.patch_size, data=np.frombuffer(raw, np.uint8),
      max_patch_len=p.max_patch_len or None))
  workdir.mkdir(parents=True, exist_ok=True)
  png = workdir / "patches.png"
  n_patches = int(starts.sum())
  plots.entropy_figure(raw, h, starts, png, threshold=p.threshold if h is not None else None,
                       title=f"{p.mode} patching: {n_patches} patches, "
                             f"mean size {len(raw) / n_patches:.2f} bytes")
  print(plots.marked_text(raw, starts))
  lengths = np.diff(np.append(np.flatnonzero(starts), len(raw)))
  counts = np.bincount(lengths)
  print(f"\n{n_patches} patches over {len(raw)} bytes, mean patch size "
        f"{len(raw) / n_patches:.2f}" + (f", threshold {p.threshold:.4f} nats"
                                         if h is not None else ""))
  print("patch lengths: " + "  ".join(f"{k}:{c}" for k, c in enumerate(counts) if c))
  print(f"figure: {png}")


def sweep(config, workdir: Path):
  """Runs a sweep config's variants in turn, then writes its tables and plots."""
  from blt_jax import experiments
  experiments.run_sweep(config, workdir)
