"""Qwen3 in flax: parity with transformers (fixtures from scripts/make_qwen3_reference.py),
bf16 and sharded checkpoints, loader errors, causality; the byte model: its shape resolved
from a checkpoint, built from that shape alone, pretrained weights loaded. No torch, no
network."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import blt_jax
from blt_jax import models
from blt_jax.constants import BOS, BYTES
from blt_jax.errors import UserError
from blt_jax.jobs import train as train_job
from blt_jax.models import hf_files, qwen3
from blt_jax.resolved import Resolved
from tests.conftest import tiny_config

FIXTURES = Path(__file__).parent / "fixtures"


def reference(name):
  folder = FIXTURES / name
  return folder, np.load(folder / "input_ids.npy"), np.load(folder / "logits.npy")


def copy_fixture(name, tmp_path) -> Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_tiny_untied", "qwen3_tiny_bf16"])
def test_logits_match_transformers(name):
  folder, ids, ref = reference(name)
  model = qwen3.from_pretrained(folder)
  assert model.cfg.tie_word_embeddings == (name != "qwen3_tiny_untied")
  logits = np.asarray(model(ids))
  assert logits.shape == ref.shape == (2, 16, 300)
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_bf16_file_read_as_bf16_and_bf16_compute():
  folder, ids, ref = reference("qwen3_tiny_bf16")
  tensors = hf_files.read_safetensors(folder / "model.safetensors")
  assert tensors["model.norm.weight"].dtype.name == "bfloat16"
  model = qwen3.from_pretrained(folder, dtype="bfloat16")
  assert model.embed_tokens.embedding[...].dtype.name == "bfloat16"
  logits = np.asarray(model(ids))
  assert logits.dtype == np.float32
  assert np.abs(logits - ref).max() < 0.25  # bf16 compute; logits std ~0.6
  assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_sharded_checkpoint_and_old_rope_style(tmp_path):
  folder, ids, ref = reference("qwen3_tiny_untied")
  dst = tmp_path / "sharded"
  dst.mkdir()
  tensors = hf_files.read_safetensors(folder / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for file, part in shards.items():
    save_file({n: np.ascontiguousarray(tensors[n]) for n in part}, str(dst / file))
    weight_map.update({n: file for n in part})
  (dst / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
  hf = json.loads((folder / "config.json").read_text())
  hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]  # transformers < 5 style
  (dst / "config.json").write_text(json.dumps(hf))
  assert hf_files.checkpoint_names(dst) == set(names) == set(hf_files.read_checkpoint(dst))
  model = qwen3.from_pretrained(dst)
  assert model.cfg.rope_theta == 1e4
  np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)


def test_causal():
  folder, ids, _ = reference("qwen3_tiny")
  model = qwen3.from_pretrained(folder)
  changed = ids.copy()
  changed[:, 9:] = (changed[:, 9:] + 7) % 300
  a, b = np.asarray(model(ids)), np.asarray(model(changed))
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5, rtol=0)
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-2


def test_random_init_shapes():
  cfg = qwen3.Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=8, tie_word_embeddings=False)
  model = qwen3.Qwen3(cfg, rngs=qwen3.nnx.Rngs(0))
  assert model(np.zeros((3, 5), np.int32)).shape == (3, 5, 50)


def _error(folder) -> str:
  with pytest.raises(UserError) as info:
    qwen3.from_pretrained(folder)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_error_missing_directory_and_files(tmp_path):
  assert "missing Qwen3 checkpoint directory" in _error(tmp_path / "nope")
  dst = copy_fixture("qwen3_tiny", tmp_path)
  (dst / "model.safetensors").unlink()
  assert "no model.safetensors or model.safetensors.index.json" in _error(dst)
  (dst / "config.json").unlink()
  assert "missing config.json" in _error(dst)


def test_error_not_safetensors(tmp_path):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  (dst / "model.safetensors").write_bytes(b"this is not a safetensors file")
  assert "model.safetensors is not a safetensors file" in _error(dst)


def test_error_shard_lacks_listed_tensor(tmp_path):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  names = hf_files.checkpoint_names(dst)
  (dst / "model.safetensors").rename(dst / "shard.safetensors")
  weight_map = {name: "shard.safetensors" for name in [*names, "model.extra.weight"]}
  (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  for read in (hf_files.checkpoint_names, hf_files.read_checkpoint):
    with pytest.raises(UserError, match="shard.safetensors lacks tensor model.extra.weight$"):
      read(dst)


def test_error_missing_shard(tmp_path):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  (dst / "model.safetensors").unlink()
  (dst / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
  assert "missing safetensors file" in _error(dst)


@pytest.mark.parametrize("field,value", [("model_type", "llama"),
                                         ("architectures", ["Qwen2ForCausalLM"])])
def test_error_unknown_architecture(tmp_path, field, value):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  hf = json.loads((dst / "config.json").read_text())
  hf[field] = value
  (dst / "config.json").write_text(json.dumps(hf))
  assert "not a Qwen3 checkpoint" in _error(dst)


def test_error_shape_mismatch(tmp_path):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  hf = json.loads((dst / "config.json").read_text())
  hf["intermediate_size"] = 96
  (dst / "config.json").write_text(json.dumps(hf))
  message = _error(dst)
  assert "tensor model.layers.0.mlp." in message
  assert "(128, 64)" in message or "(64, 128)" in message
  assert "96" in message


def test_error_missing_tensor(tmp_path):
  dst = copy_fixture("qwen3_tiny_untied", tmp_path)
  tensors = hf_files.read_safetensors(dst / "model.safetensors")
  del tensors["lm_head.weight"]
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(dst / "model.safetensors"))
  assert "lacks tensor lm_head.weight" in _error(dst)


# ----------------------------------------------------------------- byte adaptation

NAMES = ["qwen3_tiny", "qwen3_tiny_untied", "qwen3_tiny_bf16"]


def with_tokenizer(name, tmp_path):
  """A fixture copy plus a tokenizer.json whose byte tokens sit at scattered ids: they cover
  every token of the reference input, and BOS is its first token."""
  dst = copy_fixture(name, tmp_path)
  input_ids = np.load(dst / "input_ids.npy")
  rng = np.random.default_rng(1)
  used = rng.permutation(np.unique(input_ids[:, 1:]))
  rest = rng.permutation(np.setdiff1d(np.arange(300), [*used, input_ids[0, 0]]))
  token_ids = rng.permutation(np.concatenate([used, rest])[:BYTES])
  token_ids = np.append(token_ids, input_ids[0, 0])
  table = qwen3.byte_to_unicode()
  tok = {"model": {"type": "BPE", "vocab": {table[b]: int(token_ids[b]) for b in range(BYTES)}},
         "added_tokens": [{"id": int(token_ids[BOS]), "content": "<|endoftext|>",
                           "special": True}]}
  (dst / "tokenizer.json").write_text(json.dumps(tok))
  return dst, token_ids


def byte_inputs(token_ids, input_ids):
  """The reference input as byte-model inputs (ids into `token_ids`)."""
  position = {int(t): i for i, t in enumerate(token_ids)}
  position[int(input_ids[0, 0])] = BOS
  return np.vectorize(position.__getitem__)(input_ids)


@pytest.mark.parametrize("name", NAMES)
def test_resolve_reads_shape_from_checkpoint(tmp_path, monkeypatch, name):
  dst, _ = with_tokenizer(name, tmp_path)
  hf = json.loads((dst / "config.json").read_text())
  for module, read in ((hf_files, "read_safetensors"), (hf_files, "read_checkpoint"),
                       (qwen3, "read_checkpoint")):  # tensor names only, no weights
    monkeypatch.setattr(module, read, lambda *a, **k: pytest.fail("read weights"))
  cfg = qwen3.ByteQwen3Config(path=str(dst), dtype="bfloat16", remat=True)
  resolved = qwen3.ByteQwen3Config.resolve(cfg)
  expected = {k: hf[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "head_dim",
                                 "rms_norm_eps", "tie_word_embeddings")}
  expected["rope_theta"] = hf["rope_parameters"]["rope_theta"]
  assert {k: getattr(resolved, k) for k in expected} == expected
  assert (resolved.path, resolved.dtype, resolved.remat) == (str(dst), "bfloat16", True)
  assert resolved != cfg  # the defaults differ from every fixture's shape


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_tiny_untied"])
def test_resolve_ties_head_iff_checkpoint_has_none(tmp_path, name):
  dst, _ = with_tokenizer(name, tmp_path)
  hf = json.loads((dst / "config.json").read_text())
  del hf["tie_word_embeddings"]
  (dst / "config.json").write_text(json.dumps(hf))
  resolved = qwen3.ByteQwen3Config.resolve(qwen3.ByteQwen3Config(path=str(dst)))
  assert resolved.tie_word_embeddings == (name != "qwen3_tiny_untied")


def test_resolve_without_path_is_unchanged():
  cfg = qwen3.ByteQwen3Config(hidden_size=32, head_dim=8)
  assert qwen3.ByteQwen3Config.resolve(cfg) is cfg


@pytest.mark.parametrize("name", NAMES)
def test_byte_model_built_from_shape_then_pretrained(tmp_path, name):
  dst, token_ids = with_tokenizer(name, tmp_path)
  np.testing.assert_array_equal(qwen3.byte_token_ids(dst), token_ids)
  fields = models.resolve({"kind": "qwen3", "path": str(dst)})
  away = dst.rename(tmp_path / "away")  # building reads no files
  model = models.build(fields)
  assert isinstance(model, models.ByteModel) and not model.needs_patches
  input_ids, ref = np.load(away / "input_ids.npy"), np.load(away / "logits.npy")
  inputs = byte_inputs(token_ids, input_ids)
  assert inputs[0, 0] == BOS
  expected = ref[..., token_ids[:BYTES]]
  assert np.abs(np.asarray(model(inputs)) - expected).max() > 0.1  # random init
  away.rename(dst)
  model.load_pretrained()
  assert model.lm.embed_tokens.embedding[...].dtype == np.float32
  logits = np.asarray(model(inputs))
  assert logits.shape == (2, 16, BYTES)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_load_pretrained_without_path_is_noop():
  model = models.build({"kind": "qwen3", "hidden_size": 32, "head_dim": 8})
  before = [np.array(x) for x in jax.tree.leaves(qwen3.nnx.state(model))]
  model.load_pretrained()
  for x, y in zip(before, jax.tree.leaves(qwen3.nnx.state(model)), strict=True):
    np.testing.assert_array_equal(x, y)


def test_load_pretrained_needs_resolved_shape(tmp_path):
  dst, _ = with_tokenizer("qwen3_tiny", tmp_path)
  model = qwen3.ByteQwen3(qwen3.ByteQwen3Config(path=str(dst)), rngs=qwen3.nnx.Rngs(0))
  with pytest.raises(UserError, match="intermediate_size=192 but the checkpoint .* has 128"):
    model.load_pretrained()


def test_byte_model_errors(tmp_path):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  cfg = qwen3.ByteQwen3Config(path=str(dst))
  with pytest.raises(UserError, match="missing tokenizer.json"):
    qwen3.ByteQwen3Config.resolve(cfg)
  (dst / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 1}}}))
  with pytest.raises(UserError, match="no single-byte token for byte 0"):
    qwen3.ByteQwen3Config.resolve(cfg)
  table = qwen3.byte_to_unicode()
  tok = {"model": {"vocab": {table[b]: 45 + b for b in range(BYTES)}},
         "added_tokens": [{"id": 3, "content": "<|endoftext|>"}]}
  (dst / "tokenizer.json").write_text(json.dumps(tok))
  model = models.build(models.resolve({"kind": "qwen3", "path": str(dst)}))
  with pytest.raises(UserError, match="token id 300 but tensor model.embed_tokens.weight has "
                                      "300 rows"):
    model.load_pretrained()


def test_flops_per_byte_counts_matmul_params():
  cfg = qwen3.ByteQwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=24)
  model = qwen3.ByteQwen3(cfg, rngs=qwen3.nnx.Rngs(0))
  kernels = sum(v.size for path, v in qwen3.nnx.to_flat_state(
      qwen3.nnx.state(model.lm.layers, qwen3.nnx.Param)) if path[-1] == "kernel")
  T = 64  # a query sees (T + 1) / 2 keys on average
  attention = 3 * cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.head_dim * (T + 1) / 2
  expected = 6 * (kernels + cfg.hidden_size * BYTES) + attention
  assert model.flops_per_byte(T) == pytest.approx(expected, rel=1e-12)
  assert model.flops_per_byte(T, mean_patch_size=4.0) == model.flops_per_byte(T)


def test_entropy_qwen3_config_trains_one_step():
  config = tiny_config("entropy_qwen3")
  assert config.model.kind == "qwen3" and config.model.path == ""
  model = models.build(models.resolve(config.model.to_dict()))
  opt = qwen3.nnx.Optimizer(model, optax.adam(1e-2), wrt=qwen3.nnx.Param)
  inputs = np.concatenate([np.full((2, 1), BOS), np.arange(30).reshape(2, 15) % BYTES], 1)
  targets = np.concatenate([inputs[:, 1:], np.zeros((2, 1), int)], 1)

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()

  losses = []
  for _ in range(3):
    loss, grads = qwen3.nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_a_run_starts_from_the_pretrained_weights_and_loads_without_them(small_corpus,
                                                                         tmp_path):
  """A fresh run reads the Hugging Face weights once, at its start: with a zero learning
  rate its checkpoint holds them unchanged. `blt_jax.load` then needs only the run."""
  folder, token_ids = with_tokenizer("qwen3_tiny", tmp_path)
  _, input_ids, ref_logits = reference("qwen3_tiny")
  workdir = tmp_path / "run"
  config = tiny_config("entropy_qwen3", **{
      "model.path": str(folder), "train.steps": 1, "train.lr": 0.0, "train.grad_clip": 0.0,
      "data.corpus": str(small_corpus), "eval.max_bytes": 512, "ckpt.every_steps": 1})
  train_job.run(config, workdir, progress=False)
  record = Resolved.of_run(workdir)
  hf = json.loads((folder / "config.json").read_text())
  assert record.model["hidden_size"] == hf["hidden_size"] != config.model.hidden_size
  shutil.move(folder, tmp_path / "moved")  # the Hugging Face folder is gone
  lm = blt_jax.load(workdir)
  logits = np.asarray(lm.model(byte_inputs(token_ids, input_ids)))
  byte_ref = ref_logits[..., token_ids[:BYTES]]
  np.testing.assert_allclose(logits, byte_ref, atol=1e-4)
