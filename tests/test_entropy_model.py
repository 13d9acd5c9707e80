"""The entropy model end to end: training lowers loss, causality, checkpoint round trip."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import blt_jax
from blt_jax import data, models
from tests.conftest import launch

TEXT = (b"def entropy(p):\n    return -sum(q * math.log(q) for q in p if q > 0)\n\n"
        b"class Patcher:\n    '''Cuts bytes where the model is surprised.'''\n" * 3)


def test_training_lowers_loss(tiny_run):
  rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
  assert all(r["bytes_per_s"] > 0 and abs(r["bpb"] * np.log(2) - r["loss"]) < 1e-6
             for r in rows)
  result = json.loads((tiny_run / "eval.json").read_text())
  assert set(result) >= {"bpb", "loss", "accuracy", "perplexity", "bytes"}
  assert result["bpb"] < 6.0 and result["bytes"] > 10000  # better than uniform (8 bits)


def test_next_byte_logprobs_is_prefix_invariant(tiny_run):
  lm = blt_jax.load(tiny_run)
  assert lm.seq_len == 64 and len(TEXT) > 2 * lm.seq_len  # spans several windows
  full = lm.next_byte_logprobs(TEXT)
  assert full.shape == (len(TEXT), 256) and full.dtype == np.float32
  np.testing.assert_allclose(np.exp(full).sum(-1), 1.0, rtol=1e-4)
  for k in (1, 2, 7, 63, 64, 65, 100, 128, len(TEXT) - 1):
    np.testing.assert_allclose(lm.next_byte_logprobs(TEXT[:k]), full[:k], atol=1e-5)


def test_no_gradient_from_later_bytes():
  model = models.build({"kind": "byte_lm", "dim": 32, "n_layers": 2, "n_heads": 2})
  x = jnp.asarray(np.frombuffer(TEXT[:31], np.uint8).astype(np.int32))[None]
  inputs = jnp.concatenate([jnp.array([[data.BOS]]), x], axis=1)
  emb = model.embed(inputs)

  def logit_at(e, t):
    model_fn = lambda e: model.head(model.trunk(e))
    return model_fn(e)[0, t].sum()

  for t in (0, 5, 20):
    grad = jax.grad(logit_at)(emb, t)[0]
    assert float(jnp.abs(grad[t + 1:]).max()) == 0.0
    assert float(jnp.abs(grad[:t + 1]).max()) > 0.0


def test_sliding_window_attention_sees_only_the_window():
  mask = np.asarray(models.layers.causal_mask(8, window=3))
  for t in range(8):
    assert list(np.flatnonzero(mask[t])) == list(range(max(0, t - 2), t + 1))


def test_restore_gives_identical_logprobs_and_eval(tiny_run, tmp_path):
  lm = blt_jax.load(tiny_run)
  again = blt_jax.load(tiny_run)
  np.testing.assert_array_equal(lm.next_byte_logprobs(TEXT), again.next_byte_logprobs(TEXT))
  earlier = blt_jax.load(tiny_run, step=30)
  assert earlier.step == 30 and not np.allclose(earlier.next_byte_logprobs(TEXT[:50]),
                                                lm.next_byte_logprobs(TEXT[:50]))
  trained = json.loads((tiny_run / "eval.json").read_text())
  result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={tiny_run}",
                  "--config.mode=eval", "--config.train.steps=60")
  assert result.returncode == 0, result.stderr[-2000:]
  restored = json.loads((tiny_run / "eval.json").read_text())
  assert restored["bytes"] == trained["bytes"]
  assert abs(restored["bpb"] - trained["bpb"]) < 1e-5


def test_eval_errors(tiny_run, tmp_path):
  result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={tmp_path}",
                  "--config.mode=eval")
  assert result.returncode == 2 and "no checkpoint" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={tiny_run}",
                  "--config.mode=eval", "--config.model.dim=48")
  assert result.returncode == 2 and "model.dim" in result.stderr


def test_eval_on_another_corpus(tiny_run, tmp_path):
  (tmp_path / "other.txt").write_text("print('hello world')\n" * 20)
  result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={tiny_run}",
                  "--config.mode=eval", f"--config.eval.corpus={tmp_path / 'other.txt'}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((tiny_run / "eval.json").read_text())["bytes"] == 21 * 20


def test_rerun_resumes_to_the_same_parameters(tmp_path):
  """Stopping at a checkpoint and running again ends where an unbroken run ends."""
  common = ["--config=configs/entropy_model.py:size=tiny", "--config.train.steps=20",
            "--config.ckpt.every_steps=10", "--config.eval.max_bytes=512"]
  assert launch(*common, f"--workdir={tmp_path / 'a'}").returncode == 0
  first = launch(*common, "--config.train.stop_at=10", f"--workdir={tmp_path / 'b'}")
  assert first.returncode == 0
  second = launch(*common, f"--workdir={tmp_path / 'b'}")
  assert second.returncode == 0, second.stderr[-2000:]
  a, b = blt_jax.load(tmp_path / "a"), blt_jax.load(tmp_path / "b")
  assert a.step == b.step == 20
  for x, y in zip(jax.tree.leaves(jax.tree.map(np.asarray, a.state)),
                  jax.tree.leaves(jax.tree.map(np.asarray, b.state))):
    np.testing.assert_array_equal(x, y)
