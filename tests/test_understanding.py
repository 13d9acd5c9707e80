"""The understanding rows: BLT with its global path zeroed (trained so, or at eval only),
and the two entropy-model sizes the understanding sweep compares."""
from __future__ import annotations

import dataclasses
import importlib
import json

import jax
import numpy as np
import pytest
from flax import nnx

from blt_jax import checkpoint, models
from blt_jax.errors import UserError
from blt_jax.jobs import evaluate
from blt_jax.models import blt, flops
from blt_jax.models.byte_lm import ByteLMConfig
from tests.conftest import tiny_config
from tests.test_blt_model import P, T, causal_starts, lengths_from_starts, random_inputs, tiny_model


def logits_with_global_perturbed(model, inputs, lengths):
  """(logits, logits after adding noise to every global-transformer parameter)."""
  before = np.asarray(model(inputs, lengths))
  graphdef, state = nnx.split(model)
  noisy = jax.tree.map(lambda x: x + 0.5, nnx.state(model.global_tf))
  model2 = nnx.merge(graphdef, state)
  nnx.update(model2.global_tf, noisy)
  return before, np.asarray(model2(inputs, lengths))


def test_zero_global_flops_are_the_local_stacks_alone():
  """Trained with the global path zeroed, BLT is its encoder and decoder blocks: with equal
  widths and windows, a byte transformer of their layers (same head)."""
  cfg = blt.BLTConfig(enc_dim=64, enc_layers=1, dec_dim=64, dec_layers=2, enc_window=32,
                      dec_window=32, global_dim=96, hash_ngrams=(), zero_global=True)
  byte_lm = ByteLMConfig(dim=64, n_layers=3, window=32)
  want = flops.byte_lm_flops_per_byte(byte_lm, 128)
  assert flops.blt_flops_per_byte(cfg, 128, 3.0) == pytest.approx(want)
  assert flops.blt_flops_per_byte(cfg, 128, 8.0) == pytest.approx(want)
  full = dataclasses.replace(cfg, zero_global=False)
  assert flops.blt_flops_per_byte(full, 128, 3.0) > 1.5 * want


@pytest.mark.parametrize("zero", [False, True])
def test_zero_global_cuts_the_global_path_and_nothing_else(zero):
  inputs = random_inputs(0)
  lengths = lengths_from_starts(causal_starts(inputs), P)
  before, after = logits_with_global_perturbed(tiny_model(zero_global=zero), inputs, lengths)
  if zero:
    np.testing.assert_array_equal(before, after)  # the global transformer does not reach it
    full = np.asarray(tiny_model()(inputs, lengths))  # same weights, global path on
    assert np.abs(full - before).max() > 1e-3
  else:
    assert np.abs(after - before).max() > 1e-3
  assert before.shape == (2, T, 256)


def test_eval_with_zero_global_keeps_the_runs_own_eval(blt_run):
  run = blt_run / "patch3"
  own = (run / "eval.json").read_text()
  config = tiny_config("patch3", **{"mode": "eval", "model.zero_global": True,
                                    "patching.entropy_workdir": str(blt_run / "entropy")})
  evaluate.run(config, run)
  ablated = json.loads((run / "eval_zero_global-True.json").read_text())
  assert (run / "eval.json").read_text() == own
  assert ablated["model_changes"] == {"zero_global": True}
  assert ablated["bytes"] == json.loads(own)["bytes"]
  assert ablated["bpb"] > json.loads(own)["bpb"] + 0.01  # the global path was doing work


def test_the_entropy_models_compared_have_their_stated_sizes():
  """configs/sweeps/understanding.py compares the default patcher (0.13M parameters at
  size=small) with configs/entropy_model.py's (0.86M)."""
  for name, millions in (("entropy_patcher", 0.13), ("entropy_model", 0.86)):
    fields = importlib.import_module(f"configs.{name}").get_config("size=small").model.to_dict()
    model = nnx.eval_shape(lambda: models.build(fields))
    assert model.param_counts()["total"] / 1e6 == pytest.approx(millions, abs=0.005)


def test_a_run_older_than_a_field_has_its_default():
  """A run saved before `zero_global` existed ran without it: asking for it at eval is a
  change; a field the run derived (saved None) is taken from its record, not compared."""
  saved = {"model": {"kind": "blt", "dim": 8, "max_patches": None}}
  config = tiny_config("patch3", **{"model.zero_global": True})
  assert evaluate.runtime_changes(config, saved) == {"zero_global": True}
  assert evaluate.runtime_changes(tiny_config("patch3"), saved) == {}
  fields = {"kind": "blt", "max_patches": 86, "pooling": "max"}
  checkpoint.check_same_model({"model": {"kind": "blt", "max_patches": None}}, fields, "w",
                              models.default_fields("blt"))
  with pytest.raises(UserError, match="model.pooling='max' but the config says 'mean'"):
    checkpoint.check_same_model({"model": {"kind": "blt", "max_patches": 86}},
                                {**fields, "pooling": "mean"}, "w", models.default_fields("blt"))
