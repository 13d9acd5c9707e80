"""What a run resolved before training, written once to `<workdir>/resolved.json`.

The config is locked at launch and never written; what the run derives from it and from
the data is recorded here instead: the model's fields as built (a BLT's patch slots when
derived, a pretrained model's shape read from its files) and the patching rule (the
calibrated threshold, the entropy model's workdir). Eval, the API, sweeps and a resumed
run read it back; nothing recomputes it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from blt_jax import checkpoint, files, models, patching
from blt_jax.errors import UserError

RECORD_FILE = "resolved.json"


@dataclasses.dataclass(frozen=True)
class PatchRule:
  """A run's patching, complete: what turns a window's bytes (and entropies) into patch
  lengths [P]."""
  mode: str                          # one of patching.MODES
  max_patches: int                   # P: patch slots per window
  threshold: float | None = None     # nats, for patching.THRESHOLD_MODES
  patch_size: int = 4                # for `static`
  max_patch_len: int | None = None   # cut longer patches every this many bytes
  entropy_workdir: str | None = None  # the run of the entropy model, for THRESHOLD_MODES

  def __post_init__(self):
    if self.mode not in patching.MODES:
      raise UserError(f"unknown patching.mode {self.mode!r} (none, {', '.join(patching.MODES)})")
    if self.uses_entropy and (self.threshold is None or not self.entropy_workdir):
      raise ValueError(f"{self.mode} patching needs a threshold and an entropy model")

  @property
  def uses_entropy(self) -> bool:
    return self.mode in patching.THRESHOLD_MODES


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The record of one run: `model` fields as built (`kind` + shape), and its patching
  (None for a plain next-byte model)."""
  model: dict
  patching: PatchRule | None = None

  def save(self, workdir: str | Path):
    record = {"model": self.model,
              "patching": None if self.patching is None else dataclasses.asdict(self.patching)}
    files.write_json(Path(workdir) / RECORD_FILE, record)  # whole, whoever writes it

  @classmethod
  def load(cls, workdir: str | Path) -> Resolved | None:
    """The record of a run, or None when it has none."""
    record = files.read_json(Path(workdir) / RECORD_FILE)
    if record is None:
      return None
    rule = record["patching"]
    return cls(record["model"], None if rule is None else PatchRule(**rule))

  @classmethod
  def of_start(cls, model: dict, rule: PatchRule | None) -> Resolved:
    """The record of a run starting now: the config's model fields as built (with the
    rule's patch slots, for a patched model), and its patching rule."""
    fields = dict(model)
    if rule is not None:
      fields["max_patches"] = rule.max_patches
    try:
      return cls(models.resolve(fields), rule)
    except (ValueError, TypeError) as e:
      raise UserError(f"bad model config: {e}")

  @classmethod
  def of_resumed(cls, workdir: str | Path) -> Resolved | None:
    """The record of a run that has checkpoints (a resume keeps what it resolved), or None
    when it has none yet."""
    return None if checkpoint.latest_step(workdir) is None else cls.of_run(workdir)

  @classmethod
  def of_run(cls, workdir: str | Path) -> Resolved:
    """The record of a trained run; a run without one predates records (one-line error)."""
    record = cls.load(workdir)
    if record is None:
      raise UserError(f"{workdir} has no {RECORD_FILE}: it was trained before runs recorded "
                      "what they resolved (or never started); retrain it")
    return record
