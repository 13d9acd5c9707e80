"""What each `config.mode` does: train, eval, patch, sample."""
from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from blt_jax.errors import UserError


def run(config: ml_collections.ConfigDict, workdir: str):
  handlers = {"train": train, "eval": evaluate}
  if config.mode not in handlers:
    raise UserError(f"unknown mode {config.mode!r} (known: {', '.join(handlers)})")
  handlers[config.mode](config, Path(workdir))


def _check_workdir(workdir: Path):
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"workdir {workdir} exists and is not a directory")


def train(config, workdir: Path):
  from blt_jax import train as train_lib
  _check_workdir(workdir)
  result = train_lib.train(config, workdir)
  print(f"{workdir}: held-out bpb {result['bpb']:.4f}  loss {result['loss']:.4f}  "
        f"accuracy {result['accuracy']:.3f}  on {result['bytes']} bytes")


def evaluate(config, workdir: Path):
  from blt_jax import api, checkpoint, train as train_lib
  from blt_jax.evaluate import Evaluator
  from flax import nnx
  _check_workdir(workdir)
  step = None if config.eval.step < 0 else config.eval.step
  saved, step = checkpoint.read_config(workdir, step)
  train_lib.check_same_model(saved, config, workdir)
  lm = api.load(workdir, step)
  splits = train_lib.Splits(config)
  batches, total = splits.eval_batches(config, config.eval.max_bytes, lm.patcher)
  graphdef, state = nnx.split(lm.model)
  result = Evaluator(graphdef)(state, batches, total=total)
  result.update(step=step, corpus=config.eval.corpus or f"{config.data.corpus} (held-out)")
  (workdir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
  print(f"{workdir} step {step}: bpb {result['bpb']:.4f}  loss {result['loss']:.4f}  "
        f"accuracy {result['accuracy']:.3f}  perplexity {result['perplexity']:.3f}  "
        f"on {result['bytes']} bytes of {result['corpus']}")
