"""Qwen3 in flax: parity with transformers (fixtures from scripts/make_qwen3_reference.py),
bf16 and sharded checkpoints, loader errors, causality. No torch, no network."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from blt_jax.errors import UserError
from blt_jax.models import qwen3

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
  tensors = qwen3.read_safetensors(folder / "model.safetensors")
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
  tensors = qwen3.read_safetensors(folder / "model.safetensors")
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
  tensors = qwen3.read_safetensors(dst / "model.safetensors")
  del tensors["lm_head.weight"]
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(dst / "model.safetensors"))
  assert "lacks tensor lm_head.weight" in _error(dst)


# ----------------------------------------------------------------- byte adaptation

def with_tokenizer(name, tmp_path):
  """A fixture copy plus a tokenizer.json whose byte tokens sit at scattered ids."""
  dst = copy_fixture(name, tmp_path)
  ids = np.random.default_rng(1).permutation(300)[:257]
  table = qwen3.byte_to_unicode()
  tok = {"model": {"type": "BPE", "vocab": {table[b]: int(ids[b]) for b in range(256)}},
         "added_tokens": [{"id": int(ids[256]), "content": "<|endoftext|>", "special": True}]}
  (dst / "tokenizer.json").write_text(json.dumps(tok))
  return dst, ids


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_tiny_untied"])
def test_byte_model_keeps_byte_rows(tmp_path, name):
  from blt_jax import models
  dst, token_ids = with_tokenizer(name, tmp_path)
  np.testing.assert_array_equal(qwen3.byte_token_ids(dst), token_ids)
  byte_model = models.build("qwen3", {"kind": "qwen3", "path": str(dst)})
  full = qwen3.from_pretrained(dst)
  inputs = np.concatenate([np.full((2, 1), 256), np.arange(20).reshape(2, 10) * 12], 1)
  logits = np.asarray(byte_model(inputs))
  assert logits.shape == (2, 11, 256)
  expected = np.asarray(full(token_ids[inputs]))[..., token_ids[:256]]
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def test_byte_model_errors(tmp_path):
  dst = copy_fixture("qwen3_tiny", tmp_path)
  with pytest.raises(UserError, match="missing tokenizer.json"):
    qwen3.ByteQwen3(qwen3.ByteQwen3Config(path=str(dst)), rngs=qwen3.nnx.Rngs(0))
  (dst / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 1}}}))
  with pytest.raises(UserError, match="no single-byte token for byte 0"):
    qwen3.byte_token_ids(dst)


def test_entropy_qwen3_config_trains_one_step():
  import optax
  from configs import entropy_qwen3
  from blt_jax import models
  config = entropy_qwen3.get_config("size=tiny")
  assert config.model.kind == "qwen3" and config.model.path == ""
  model = models.build("qwen3", config.model.to_dict())
  opt = qwen3.nnx.Optimizer(model, optax.adam(1e-2), wrt=qwen3.nnx.Param)
  inputs = np.concatenate([np.full((2, 1), 256), np.arange(30).reshape(2, 15) % 256], 1)
  targets = np.concatenate([inputs[:, 1:], np.zeros((2, 1), int)], 1)

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()

  losses = []
  for _ in range(3):
    loss, grads = qwen3.nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
