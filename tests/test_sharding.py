"""Scale: one device vs data-parallel vs FSDP (8 simulated CPU devices, own process),
sharded checkpoints on another mesh, two jax.distributed processes, gradient
accumulation, remat, bf16 compute with fp32 parameters, per-process data shards, mesh
errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt_jax import data, models
from tests.conftest import ROOT, launch

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def eight(tmp_path_factory, private_cache):
  """tests/sharding_check.py's results, run once with 8 simulated CPU devices."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-m", "tests.sharding_check",
                           str(tmp_path_factory.mktemp("mesh"))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, private_cache):
  """tests/sharding_check.py as two jax.distributed processes with one CPU device each."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  env.pop("XLA_FLAGS", None)
  root = tmp_path_factory.mktemp("hosts")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding_check", str(root),
                             f"--process={i}", f"--port={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  failed = [f"process {i} exited {p.returncode}: {err[-2000:]}"
            for i, (p, (_, err)) in enumerate(zip(procs, outs)) if p.returncode]
  assert not failed, "\n".join(failed)  # both: one's crash shows as the other's timeout
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_data_parallel_with_accumulation_matches_one_device(eight):
  assert eight["devices"] == 8
  one, dp = eight["one"], eight["data8_accum2"]
  assert len(one["losses"]) == len(dp["losses"]) == 4
  np.testing.assert_allclose(dp["losses"], one["losses"], **TOL)
  np.testing.assert_allclose(dp["eval_loss"], one["eval_loss"], **TOL)


def test_packed_global_slots_across_devices_match_one_device(eight):
  one, packed = eight["one"], eight["data8_packed"]
  assert packed["packed"] == [1.0] * 4 and one["packed"] == [None] * 4
  np.testing.assert_allclose(packed["losses"], one["losses"], **TOL)
  np.testing.assert_allclose(packed["eval_loss"], one["eval_loss"], **TOL)


def test_data_parallel_blt_moves_only_gradients(eight):
  """Pooling, both cross-attentions and slot packing run per window, and packing groups
  keep to one device: a data-parallel forward needs no collectives at all."""
  c = eight["communication"]
  assert c["fits"]
  assert c["forward_packed"] == 0 and c["forward_unpacked"] == 0
  assert 0 < c["gradient_packed"] <= c["parameters"]


def test_fsdp_step_gathers_parameters_instead_of_moving_activations(eight):
  """FSDP over 8 devices: one all-gather of the parameters and one gradient reduction in
  each of the step's two branches (packed, unpacked), about 3x the parameter count; left
  to itself XLA moved activations instead, 13.5x."""
  c = eight["communication"]
  assert c["fsdp_step"] <= 3.2 * c["parameters"]


def test_fsdp_resumed_on_another_mesh_matches_one_device(eight):
  one, fsdp = eight["one"], eight["fsdp_resumed"]
  assert len(fsdp["losses"]) == 4  # 2 steps on 2 x 4, then 2 on 4 x 2 from the checkpoint
  np.testing.assert_allclose(fsdp["losses"], one["losses"], **TOL)
  np.testing.assert_allclose(fsdp["eval_loss"], one["eval_loss"], **TOL)


def test_sharded_checkpoint_restores_on_a_different_mesh(eight):
  r = eight["restore"]
  assert r["max_abs_diff"] == 0.0  # fsdp=8 restore equals a one-device restore
  axis = r["spec"].index("fsdp")  # the largest array is split 8 ways along one axis
  assert r["shard_shape"][axis] * 8 == r["shape"][axis]


def test_two_processes_match_one_device_and_resume(eight, two_processes):
  one = eight["one"]
  for r in two_processes:  # every process sees the same global metrics
    assert (r["processes"], r["devices"]) == (2, 2)
    np.testing.assert_allclose(r["losses"], one["losses"], **TOL)
    np.testing.assert_allclose(r["eval_loss"], one["eval_loss"], **TOL)
    assert r["resumed_losses"][:4] == r["losses"] and len(r["resumed_losses"]) == 6


def test_bad_mesh_and_batch_are_one_line_errors(eight):
  e = eight["errors"]
  assert e["mesh"] == "mesh.data=3 x mesh.fsdp=1 does not divide the 8 devices"
  assert "there are 8" in e["mesh_total"]
  assert e["batch"].startswith("train.batch_size=12 is not divisible by 8")


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.data=3", "error: mesh.data=3 x mesh.fsdp=1 does not divide the 1 devices"),
    ("--config.train.grad_accum=3", "error: train.batch_size=8 is not divisible by 3 "
                                    "(mesh 1 data x 1 fsdp x 3 micro-batches)")])
def test_launcher_rejects_a_bad_mesh_in_one_line(tmp_path, override, message):
  result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={tmp_path}",
                  override)
  assert result.returncode == 2 and result.stderr.strip() == message, result.stderr[-2000:]


def _blt(**fields):
  base = dict(enc_dim=32, enc_layers=1, enc_heads=2, enc_window=16, global_dim=32,
              global_layers=1, global_heads=2, dec_dim=32, dec_layers=1, dec_heads=2,
              dec_window=16, cross_attn_k=2, cross_heads=2, hash_ngrams=(3, 4),
              hash_buckets=64, max_patches=8)
  return models.build({"kind": "blt", **base, **fields})


def _batch(B=2, T=32):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (B, T), dtype=np.int32)
  return (jnp.asarray(np.concatenate([np.full((B, 1), 256), x[:, :-1]], 1)), jnp.asarray(x),
          jnp.full((B, 8), 4, jnp.int32))


@nnx.jit
def _loss_and_grads(model, inputs, targets, lengths):
  def loss(model):
    logp = jax.nn.log_softmax(model.logits({"inputs": inputs, "patch_lengths": lengths}))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
  return nnx.value_and_grad(loss)(model)


def test_remat_gives_the_same_loss_and_gradients():
  args = _batch()
  lm = lambda **kw: models.build(dict(kind="byte_lm", dim=32, n_layers=2, n_heads=2, **kw))
  loss, grads = _loss_and_grads(lm(), *args)
  loss_r, grads_r = _loss_and_grads(lm(remat=True), *args)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)
  blt = _blt(remat=True)  # BLT's three transformers are the same layers.Transformer
  assert blt.encoder.remat and blt.global_tf.remat and blt.decoder.remat
  qwen3 = lambda **kw: models.build(dict(kind="qwen3", hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=8, **kw))
  loss, grads = _loss_and_grads(qwen3(), *args)
  model_r = qwen3(remat=True)
  graph, state = nnx.split(model_r)
  assert "remat" in str(jax.make_jaxpr(lambda s: nnx.merge(graph, s)(args[0]).sum())(state))
  loss_r, grads_r = _loss_and_grads(model_r, *args)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_parameters():
  inputs, targets, lengths = _batch()
  for model in (_blt(dtype="bfloat16"),
                models.build(dict(kind="byte_lm", dim=32, n_layers=1, n_heads=2, dtype="bfloat16"))):
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    forward = jax.jit(lambda x: model.logits({"inputs": x, "patch_lengths": lengths}))
    logits = forward(inputs)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert "bf16" in forward.lower(inputs).as_text()  # the matmuls run in bfloat16


def test_process_shards_together_hold_the_single_process_batch(tmp_path):
  (tmp_path / "a.txt").write_text("def f(x):\n  return x + 1\n" * 100)
  corpus = data.prepare(str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "cache"))
  ids = np.arange(len(corpus.names))
  kw = dict(seq_len=16, seed=3)
  whole = iter(data.train_dataset(corpus, ids, batch_size=8, **kw))
  shards = [iter(data.train_dataset(corpus, ids, batch_size=4, shard=i, n_shards=2, **kw))
            for i in range(2)]
  for _ in range(3):
    full = next(whole)["start"]
    parts = np.concatenate([next(s)["start"] for s in shards])
    assert sorted(full.tolist()) == sorted(parts.tolist())
