"""The released BLT through the launcher: a BltForCausalLM folder in modes eval, patch and
sample (configs/blt_pretrained.py), and fine-tuning from one (configs/blt_paper.py)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import blt_jax
from blt_jax import config_files, entropy, jobs, models, patching, plots, train as train_loop
from blt_jax.errors import UserError
from blt_jax.models import blt_hf, hf_files
from blt_jax.resolved import PatchRule, Resolved
from tests.conftest import ROOT, launch, tiny_config

FIXTURES = ROOT / "tests" / "fixtures"
SEQ_LEN = 320


def test_pretrained_modes_run_and_bad_folders_exit_2(tmp_path, capfdbinary):
  folder = FIXTURES / "blt_tiny_entropy"
  corpus = ROOT / "configs" / "blt_pretrained.py"  # several windows of SEQ_LEN
  config = lambda **fields: config_files.load("configs.blt_pretrained", {
      "model.path": str(folder), "data.seq_len": SEQ_LEN, "eval.corpus": str(corpus), **fields})
  jobs.run(config(), tmp_path)  # mode=eval
  scored = json.loads((tmp_path / "eval.json").read_text())
  assert scored["bytes"] == corpus.stat().st_size
  lm = blt_jax.from_pretrained(folder, seq_len=SEQ_LEN)
  data = corpus.read_bytes()
  logp = lm.next_byte_logprobs(data)
  nll = -float(logp[np.arange(len(data)), np.frombuffer(data, np.uint8)].sum())
  assert abs(scored["loss"] - nll / len(data)) < 1e-4  # windows of SEQ_LEN, BOS each
  capfdbinary.readouterr()
  jobs.run(config(**{"mode": "sample", "sample.prompt": "def ", "sample.max_bytes": 12,
                     "sample.temperature": 0.0}), tmp_path)
  assert capfdbinary.readouterr().out == b"def " + lm.generate([b"def "], max_bytes=12)[0] + b"\n"
  text = b"def f(x): return x"
  jobs.run(config(**{"mode": "patch", "patching.text": text.decode()}), tmp_path)
  h = entropy.document_entropies(lm.patcher.lm, text)  # the folder's patcher and threshold
  starts = patching.patch_starts(h, mode="global", threshold=lm.patcher.rule.threshold)
  printed = capfdbinary.readouterr().out
  assert printed.startswith(plots.marked_text(text, np.asarray(starts)).encode() + b"\n")
  assert (tmp_path / "patches.png").exists()
  result = launch("--config=configs/blt_pretrained.py", f"--workdir={tmp_path}",
                  f"--config.model.path={FIXTURES / 'qwen3_tiny'}")
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "is not a BltForCausalLM folder" in result.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"model.path": "/nowhere"}, "missing BltForCausalLM checkpoint directory /nowhere"),
    ({"model.path": ""}, "needs --config.model.path"),
    ({"mode": "train"}, "to fine-tune: configs/blt_paper.py"),
])
def test_pretrained_config_errors(tmp_path, overrides, message):
  config = config_files.load("configs.blt_pretrained",
                             {"model.path": str(FIXTURES / "blt_tiny_entropy"), **overrides})
  with pytest.raises(UserError, match=message):
    jobs.run(config, tmp_path)


def test_fine_tuning_starts_from_the_folder(tmp_path):
  folder = FIXTURES / "blt_tiny_entropy"
  config = tiny_config("blt_paper", **{"model.init_from": str(folder)})
  released = blt_hf.read_config(folder)
  rule = PatchRule(mode="global", max_patches=config.model.max_patches, threshold=4.0,
                   entropy_workdir=str(tmp_path))
  resolved = Resolved.of_start(config.model.to_dict(), rule)
  for field in dataclasses.fields(released.blt):
    if field.name not in blt_hf.RUNTIME:
      assert resolved.model[field.name] == getattr(released.blt, field.name), field.name
  model = train_loop.build_model(resolved.model, seed=0)
  models.load_pretrained(resolved.model, model)  # as a starting run does
  original = hf_files.read_checkpoint(folder)
  for key, array in blt_hf.tensors_of(model, blt_hf.blt_entries(model.cfg)).items():
    np.testing.assert_array_equal(array, np.asarray(original[key]), err_msg=key)


def test_fine_tune_run_trains_and_saves_as_a_folder(tmp_path):
  folder = FIXTURES / "blt_tiny_entropy"
  jobs.run(config_files.load("configs.blt_paper:size=tiny", {
      "model.init_from": str(folder), "train.steps": 6, "ckpt.every_steps": 6,
      "eval.max_bytes": 2048, "patching.mode": "static", "patching.patch_size": 4}),
      tmp_path / "run")  # static: no entropy model to train
  lm = blt_jax.load(tmp_path / "run")
  assert lm.model.cfg.init_from == str(folder) and lm.model.cfg.enc_window == 16
  lm.save_pretrained(tmp_path / "out")
  name = "model.global_transformer.layers.0.mlp.down_proj.weight"
  moved = np.abs(hf_files.read_checkpoint(tmp_path / "out")[name]
                 - hf_files.read_checkpoint(folder)[name])
  assert 0 < moved.max() < 0.1  # trained from the folder's weights, a little
  again = blt_jax.from_pretrained(tmp_path / "out", seq_len=lm.seq_len)
  text = b"def f(x):\n    return x + 1\n"  # few enough patches that no window folds
  window = lm.patcher(text, lm.windows(text))
  assert (window["patch_lengths"] > 0).sum() < lm.model.cfg.max_patches
  np.testing.assert_allclose(again.next_byte_logprobs(text), lm.next_byte_logprobs(text),
                             atol=1e-5)
