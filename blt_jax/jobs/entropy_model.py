"""The entropy model of a BLT run: found where `patching.entropy_workdir` points, or in the
default workdir of `patching.entropy_config` for the run's split, trained there if missing.
It must hold out exactly the run's documents."""
from __future__ import annotations

from pathlib import Path

import ml_collections

from blt_jax import api, checkpoint, config_files, train
from blt_jax.errors import UserError
from blt_jax.splits import SPLIT_FILE, Split, Splits
from blt_jax.workdir_lock import WorkdirLock


def default_workdir(spec: str, size: str, split: Split) -> str:
  """runs/<entropy config>[_<size>]-<split key>: one entropy model per split, so a model
  trained on another split is never picked up."""
  return f"{config_files.default_workdir(spec, size)}-{split.key}"


def check_split(workdir: str | Path, split: Split):
  """A trained entropy model must hold out exactly the run's documents: one that trained on
  them would place boundaries by how well it knows the bytes being scored."""
  recorded = Split.load(workdir)
  if recorded is None:
    raise UserError(f"patching.entropy_workdir {workdir} has no {SPLIT_FILE}: it was "
                    "trained before runs recorded their split; retrain it")
  diff = split.difference(recorded)
  if diff is not None:
    raise UserError(f"patching.entropy_workdir {workdir} was trained on another split: {diff}")


def spec_of(config: ml_collections.ConfigDict) -> str:
  return config.patching.entropy_config or f"configs.entropy_patcher:size={config.size}"


def workdir_of(config: ml_collections.ConfigDict, split: Split) -> Path:
  """Where the run's entropy model is (or will be trained): absolute."""
  given = config.patching.entropy_workdir
  if given:
    return Path(given).absolute()
  spec = spec_of(config)
  size = config_files.load(spec).size
  return Path(default_workdir(spec, size, split)).absolute()


def entropy_model(config: ml_collections.ConfigDict, split: Split,
                  progress: bool = True) -> api.LanguageModel:
  """The run's entropy model, trained first when missing or unfinished, on the run's
  `split` (same corpus, same held-out documents).

  `patching.entropy_workdir` may name any trained next-byte model run (a byte LM, a
  fine-tuned Qwen3, ...) of the same split: its own saved config is used, and it is
  finished if it stopped early. Otherwise `patching.entropy_config` is trained (in
  `patching.entropy_workdir` when given, else its default workdir for the split).
  """
  workdir = workdir_of(config, split)
  if checkpoint.latest_step(workdir) is not None:
    check_split(workdir, split)
    ecfg = ml_collections.FrozenConfigDict(checkpoint.read_config(workdir)[0])
    if ecfg.patching.mode != "none":
      raise UserError(f"patching.entropy_workdir {workdir} holds a patched model "
                      f"({ecfg.model.kind}); an entropy model is a plain next-byte model")
  else:
    ecfg = config_files.load(spec_of(config), {"data": {  # the run's split
        key: config.data[key] for key in ("corpus", "cache_dir", "eval_fraction")}})
  done = checkpoint.latest_step(workdir)
  if done is None or done < ecfg.train.steps:
    print(f"training the entropy model in {workdir} ({spec_of(config)})")
    with WorkdirLock(workdir):
      train.train(ecfg, workdir, splits=Splits(ecfg), progress=progress)
  check_split(workdir, split)
  return api.load(workdir)
