"""The released BLT through the launcher: a BltForCausalLM folder in modes eval, patch and
sample (configs/blt_pretrained.py), and fine-tuning from one (configs/blt_paper.py)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import blt_jax
from blt_jax import config_files, jobs, models, train as train_loop
from blt_jax.errors import UserError
from blt_jax.models import blt_hf, hf_files
from blt_jax.resolved import PatchRule, Resolved
from tests.conftest import ROOT, launch, tiny_config

FIXTURES = ROOT / "tests" / "fixtures"
SEQ_LEN = 320


def test_pretrained_modes_run_and_bad_folders_exit_2(tmp_path):
  folder = FIXTURES / "blt_tiny_entropy"
  common = ["--config=configs/blt_pretrained.py", f"--config.model.path={folder}",
            f"--workdir={tmp_path}", f"--config.data.seq_len={SEQ_LEN}"]
  corpus = ROOT / "configs" / "blt_pretrained.py"  # several windows of SEQ_LEN
  result = launch(*common, f"--config.eval.corpus={corpus}")
  assert result.returncode == 0, result.stderr[-2000:]
  scored = json.loads((tmp_path / "eval.json").read_text())
  assert scored["bytes"] == corpus.stat().st_size
  lm = blt_jax.from_pretrained(folder, seq_len=SEQ_LEN)
  data = corpus.read_bytes()
  logp = lm.next_byte_logprobs(data)
  nll = -float(logp[np.arange(len(data)), np.frombuffer(data, np.uint8)].sum())
  assert abs(scored["loss"] - nll / len(data)) < 1e-4  # windows of SEQ_LEN, BOS each
  result = subprocess.run([sys.executable, str(ROOT / "launch.py"), *common, "--config.mode=sample",
                           "--config.sample.max_bytes=12", "--config.sample.temperature=0"],
                          capture_output=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == b"def " + lm.generate([b"def "], max_bytes=12)[0] + b"\n"
  result = launch(*common, "--config.mode=patch", "--config.patching.text=def f(x): return x")
  assert result.returncode == 0 and (tmp_path / "patches.png").exists(), result.stderr[-2000:]
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
  result = launch("--config=configs/blt_paper.py:size=tiny", f"--workdir={tmp_path / 'run'}",
                  f"--config.model.init_from={folder}", "--config.train.steps=6",
                  "--config.ckpt.every_steps=6", "--config.patching.mode=static",
                  "--config.patching.patch_size=4")  # static: no entropy model to train
  assert result.returncode == 0, result.stderr[-3000:]
  lm = blt_jax.load(tmp_path / "run")
  assert lm.model.cfg.init_from == str(folder) and lm.model.cfg.enc_window == 16
  lm.save_pretrained(tmp_path / "out")
  again = blt_jax.from_pretrained(tmp_path / "out", seq_len=lm.seq_len)
  text = b"def f(x):\n    return x + 1\n"  # few enough patches that no window folds
  window = lm.patcher(text, lm.windows(text))
  assert (window["patch_lengths"] > 0).sum() < lm.model.cfg.max_patches
  np.testing.assert_allclose(again.next_byte_logprobs(text), lm.next_byte_logprobs(text),
                             atol=1e-5)
