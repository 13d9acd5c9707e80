"""Orbax checkpoints of a run: parameters + optimizer state, the data iterator, and the
run's config; which checkpoint restores into which model. The only module that touches
orbax."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from blt_jax import files
from blt_jax.errors import UserError

# orbax logs every save at INFO; keep the console for the progress bar.
logging.getLogger("absl").setLevel(logging.WARNING)


def _quiet_closed_loop_noise():
  """A failed tensorstore read reports 'Event loop is closed' from its callbacks through
  sys.unraisablehook; once we say in one line that the checkpoint is damaged, that is
  noise. Other unraisable errors are reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "blt_jax_quiet", False):
    return

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and
            "Event loop is closed" in str(unraisable.exc_value)):
      previous(unraisable)
  hook.blt_jax_quiet = True
  sys.unraisablehook = hook


def _os_error(error: BaseException) -> OSError | None:
  """The OSError (a full disk, an unwritable path) behind an error, if any."""
  while error is not None:
    if isinstance(error, OSError):
      return error
    error = error.__cause__ or error.__context__
  return None


class Checkpointer:
  """Saves every `every_steps` (and on demand), keeps the last `keep` steps. The `writer`
  of a run (the one holding its workdir) first removes the temporary folders a save that
  failed or was killed left behind."""

  def __init__(self, workdir: str | Path, *, keep: int = 3, every_steps: int = 0,
               writer: bool = False):
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=writer)
    self.manager = self._writing(lambda: ocp.CheckpointManager(self.directory,
                                                               options=options))

  def _writing(self, action):
    """Runs `action`; a full disk or an unwritable path becomes one line naming it."""
    try:
      return action()
    except Exception as e:
      error = _os_error(e)
      if error is None:
        raise
      raise files.cannot_write(error.filename or self.directory, error) from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def is_due(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def save(self, step: int, state, *, config: dict, data_iter=None):
    """Saves a pure-dict state at `step`; asynchronous: call `wait()` before reading."""
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._writing(lambda: self.manager.save(step, args=ocp.args.Composite(**items),
                                                   force=True))

  def restore_params(self, step: int | None, abstract_params) -> tuple[dict, int]:
    """(the model's parameters, step) at `step` (None: the latest readable), without the
    optimizer state: the first part of the saved (model, optimizer) state."""
    first = step if step is not None else self.latest_step()
    self._check_layout(first, {0: abstract_params}, partial=True)

    def read(s):
      item = {0: abstract_params}
      args = ocp.args.PyTreeRestore(item, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(item))
      restored = self.manager.restore(s, args=ocp.args.Composite(state=args))
      return restored["state"][0], s
    return self._first_readable(step, read)

  def restore(self, step: int | None, abstract_state, *, data_iter=None):
    """Restores (state, config, step) at `step`, and the data iterator in place.

    With `step=None`, the latest readable step: a damaged or partial checkpoint is moved
    aside (to `damaged-<step>`) with a warning, and the previous one is tried.
    """
    first = step if step is not None else self.latest_step()
    self._check_layout(first, abstract_state)
    if data_iter is not None:
      self._check_process_count(first)

    def read(s):
      items = {"state": ocp.args.StandardRestore(abstract_state),
               "config": ocp.args.JsonRestore()}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      restored = self.manager.restore(s, args=ocp.args.Composite(**items))
      return restored["state"], restored["config"], s
    return self._first_readable(step, read)

  def _check_layout(self, step: int | None, abstract_state, partial: bool = False):
    """A checkpoint of another parameter layout (written by another version of the code) is
    refused in one line, before the mismatch could pass for damage and be moved aside."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns about a missing optional metadata file
    try:
      saved = _leaf_paths(ocp.StandardCheckpointer().metadata(
          self.directory / str(step) / "state").item_metadata)
    except Exception:  # unreadable: the damage handling of `_first_readable` decides
      return
    finally:
      absl_logger.setLevel(level)
    wanted = _leaf_paths(abstract_state)
    if partial:  # the rest of the checkpoint (the optimizer state) is not read
      saved = {path for path in saved if path.split("/")[0] == "0"}
    if saved and saved != wanted:
      example = sorted(wanted - saved)[:1] or sorted(saved - wanted)[:1]
      where = "not in the checkpoint" if wanted - saved else "in the checkpoint only"
      raise UserError(f"checkpoint at step {step} in {self.directory.parent} has another "
                      f"parameter layout than this code builds ({example[0]} is {where}); it "
                      "was written by another version of blt-jax: restore it with that "
                      "version, or retrain")

  def _check_process_count(self, step: int | None):
    """The data position is saved per process (grain writes process_<i>-of-<n>.json): a run
    resumes only with the process count that saved it. Said in one line, before the
    mismatch could pass for a damaged checkpoint and be moved aside."""
    files = list((self.directory / str(step) / "data").glob("process_*-of-*.json"))
    counts = {int(count) for count in (f.stem.rsplit("-of-", 1)[-1] for f in files)
              if count.isdigit()}
    if counts and jax.process_count() not in counts:
      raise UserError(f"checkpoint at step {step} in {self.directory.parent} was saved by "
                      f"{max(counts)} process(es); resume it with that many (this run has "
                      f"{jax.process_count()})")

  def read_config(self, step: int | None = None) -> tuple[dict, int]:
    """The config saved with a checkpoint (latest readable by default), and its step."""
    def read(s):
      restored = self.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return restored["config"], s
    return self._first_readable(step, read)

  def _first_readable(self, step: int | None, read):
    _quiet_closed_loop_noise()
    if step is not None:
      if step not in self.all_steps():
        raise UserError(f"no checkpoint at step {step} in {self.directory.parent} "
                        f"(have {self.all_steps() or 'none'})")
      try:
        return read(step)
      except Exception as e:  # damaged: orbax, tensorstore and json errors alike
        raise UserError(f"checkpoint at step {step} in {self.directory.parent} is damaged: "
                        f"{_first_line(e)}")
    damaged = []
    for s in sorted(self.all_steps(), reverse=True):
      try:
        return read(s)
      except Exception as e:
        damaged.append(s)
        aside = self.directory / f"damaged-{s}"
        (self.directory / str(s)).rename(aside)
        self.manager.reload()
        print(f"warning: checkpoint at step {s} is damaged ({_first_line(e)}); moved aside "
              f"to {aside.name}, trying the previous one", file=sys.stderr)
    if damaged:
      raise UserError(f"no readable checkpoint in {self.directory.parent} (damaged: steps "
                      f"{', '.join(map(str, damaged))})")
    raise UserError(f"no checkpoint in {self.directory.parent} (train first, or check "
                    "--workdir)")

  def wait(self):
    self._writing(self.manager.wait_until_finished)

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def read_config(workdir: str | Path, step: int | None = None) -> tuple[dict, int]:
  """The config saved with a checkpoint (latest readable by default), and its step."""
  if not Path(workdir).is_dir():
    raise UserError(f"no checkpoint in {workdir} (train first, or check --workdir)")
  ckpt = Checkpointer(workdir)
  try:
    return ckpt.read_config(step)
  finally:
    ckpt.close()


def _leaf_paths(tree) -> set[str]:
  """'0/trunk/blocks/0/attn/qkv/kernel'-style paths of a tree's leaves."""
  return {"/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]


def abstract(tree):
  """Shape/dtype skeleton of a pytree, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def latest_step(workdir: str | Path) -> int | None:
  """The latest checkpoint step of a run; None when it has none (or no workdir)."""
  if not (Path(workdir) / "checkpoints").is_dir():
    return None
  ckpt = Checkpointer(workdir)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


# How a model computes, not what it stores: these may change when a run resumes.
RUNTIME_FIELDS = ("dtype", "remat", "global_capacity", "zero_global")


def check_same_model(saved: dict, model: dict, workdir, defaults: dict | None = None):
  """A checkpoint restores only into the model shape it was saved from: `saved` is the
  config saved with it, `model` the model fields asked for now. A field the run left to
  derive (saved as None: its record holds what it used) is not compared; one its config
  predates is compared with `defaults` (the shape dataclass's), when given."""
  model = json.loads(json.dumps(model))  # tuples become lists, as in the file
  had = {**json.loads(json.dumps(defaults or {})), **saved.get("model", {})}
  for key, value in model.items():
    if key in RUNTIME_FIELDS or (key in saved.get("model", {}) and had[key] is None):
      continue
    if had.get(key) != value:
      raise UserError(f"checkpoint in {workdir} has model.{key}={had.get(key)!r} but the "
                      f"config says {value!r}")
