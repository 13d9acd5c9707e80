"""What each `config.mode` does: train, eval, patch, sample, sweep. The config is frozen
here: a run never writes it (what it resolves goes to `<workdir>/resolved.json`)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import ml_collections

from blt_jax import api, sharding
from blt_jax.errors import UserError
from blt_jax.jobs import evaluate, patch, sample, sweep, train
from blt_jax.workdir_lock import WorkdirLock

MODES = {"train": train.run, "eval": evaluate.run, "patch": patch.run, "sample": sample.run,
         "sweep": sweep.run}
WRITES_WORKDIR = ("train", "patch", "sweep")
PRETRAINED_MODES = ("eval", "patch", "sample")
HOLDS_WORKDIR = ("train", "eval", "sweep")  # one such run per workdir at a time


def run(config: ml_collections.ConfigDict, workdir: str | Path):
  """Runs `config.mode` in `workdir`."""
  config = ml_collections.FrozenConfigDict(config)
  if config.mode not in MODES:
    raise UserError(f"unknown mode {config.mode!r} (known: {', '.join(MODES)})")
  pretrained = "model" in config and config.model.kind == api.PRETRAINED  # (sweeps have none)
  if pretrained and config.mode not in PRETRAINED_MODES:
    raise UserError(f"a pretrained folder runs mode {', '.join(PRETRAINED_MODES)}, not "
                    f"{config.mode!r} (to fine-tune: configs/blt_paper.py, model.init_from)")
  sharding.initialize(config.mesh)  # multi-host: before anything touches a device
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"workdir {workdir} exists and is not a directory")
  if config.mode in WRITES_WORKDIR:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / ".write-test").touch()
      (workdir / ".write-test").unlink()
    except OSError as e:
      raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}")
  holds = (config.mode in HOLDS_WORKDIR and workdir.is_dir()
           and jax.process_index() == 0)  # multi-host: process 0 holds it for the run
  with WorkdirLock(workdir) if holds else contextlib.nullcontext():
    MODES[config.mode](config, workdir)
