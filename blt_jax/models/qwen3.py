"""Qwen3 in flax.nnx, a loader for Hugging Face checkpoints (read with the safetensors
library), and `ByteQwen3`: a Qwen3 adapted to the byte vocabulary.

  model = qwen3.from_pretrained("path/to/Qwen3-0.6B", dtype="bfloat16")
  logits_BxTxV = model(token_ids_BxT)

  cfg = ByteQwen3Config.resolve(ByteQwen3Config(path="path/to/Qwen3-0.6B"))  # shape only
  model = ByteQwen3(cfg, rngs=nnx.Rngs(0))  # reads no files
  model.load_pretrained()                    # byte rows of the pretrained weights
  logits_BxTx256 = model(inputs_BxT)

Grouped-query attention with per-head q/k RMSNorm before RoPE, SwiGLU MLP, pre-norm
blocks, tied or untied LM head. Shapes in names: B batch, T length, D hidden, H query
heads, G key/value heads, R = H // G, K head dim, F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt_jax.constants import BYTES, INPUT_VOCAB
from blt_jax.errors import UserError
from blt_jax.models import flops, layers
from blt_jax.models.hf_files import (check_present, checkpoint_names, listing,
                                     read_checkpoint, read_hf_config, variable)
from blt_jax.models.interface import ByteModel


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  vocab_size: int = 151936
  hidden_size: int = 1024
  intermediate_size: int = 3072
  num_hidden_layers: int = 28
  num_attention_heads: int = 16
  num_key_value_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # parameter dtype
  remat: bool = False           # recompute each layer's activations in the backward pass

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> Qwen3Config:
    """From the dict of a Hugging Face `config.json` (either rope style)."""
    check_architecture(hf)
    if hf.get("use_sliding_window"):
      raise UserError("Qwen3 config has use_sliding_window=true, which is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise UserError(f"Qwen3 config has hidden_act {hf['hidden_act']!r}; only 'silu' is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise UserError(f"Qwen3 config has rope_type {rope_type!r}; only 'default' is supported")
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
      raise UserError("Qwen3 config.json has neither rope_theta nor rope_parameters.rope_theta")
    hf = dict(hf)
    if hf.get("head_dim") is None and "hidden_size" in hf and "num_attention_heads" in hf:
      hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "rope_theta",
                                                         "remat"}
    optional = ("attention_bias", "tie_word_embeddings")
    missing = sorted(n for n in names if n not in hf and n not in optional)
    if missing:
      raise UserError(f"Qwen3 config.json lacks field(s) {missing}")
    fields = {n: hf[n] for n in names if n in hf and n not in overrides}
    return cls(rope_theta=float(theta), **fields, **overrides)


def check_architecture(hf: dict):
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type != "qwen3" or (archs and "Qwen3ForCausalLM" not in archs):
    raise UserError(f"not a Qwen3 checkpoint: model_type={model_type!r}, "
                    f"architectures={archs!r} (expected 'qwen3', ['Qwen3ForCausalLM'])")


def _linear(din: int, dout: int, cfg: Qwen3Config, *, rngs: nnx.Rngs, bias: bool = False):
  return nnx.Linear(din, dout, use_bias=bias, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype),
                    kernel_init=nnx.initializers.normal(0.02),
                    dot_general=layers.linear_dot_general, rngs=rngs)


class Qwen3Attention(nnx.Module):
  """Causal grouped-query self-attention with q/k RMSNorm and RoPE."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    if cfg.num_attention_heads % cfg.num_key_value_heads:
      raise ValueError(f"{cfg.num_attention_heads} heads are not a multiple of "
                       f"{cfg.num_key_value_heads} key/value heads")
    self.cfg = cfg
    D, H, G, K = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                  cfg.head_dim)
    bias = cfg.attention_bias
    self.q_proj = _linear(D, H * K, cfg, rngs=rngs, bias=bias)
    self.k_proj = _linear(D, G * K, cfg, rngs=rngs, bias=bias)
    self.v_proj = _linear(D, G * K, cfg, rngs=rngs, bias=bias)
    self.o_proj = _linear(H * K, D, cfg, rngs=rngs, bias=bias)
    self.q_norm = layers.RMSNorm(K, eps=cfg.rms_norm_eps, rngs=rngs)
    self.k_norm = layers.RMSNorm(K, eps=cfg.rms_norm_eps, rngs=rngs)

  def __call__(self, x_BxTxD, mask_TxS, positions_BxT):
    return self.prefill(x_BxTxD, mask_TxS, positions_BxT)[0]

  def prefill(self, x_BxTxD, mask_TxS, positions_BxT):
    """`__call__`, and its keys and values as a decoding cache (each [B * G, T, K])."""
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_BxTxHxK = self.q_norm(self.q_proj(x_BxTxD).reshape(B, T, H, K))
    k_BxTxGxK = self.k_norm(self.k_proj(x_BxTxD).reshape(B, T, G, K))
    v_BxTxGxK = self.v_proj(x_BxTxD).reshape(B, T, G, K)
    q_BxTxHxK = layers.rope(q_BxTxHxK, positions_BxT, cfg.rope_theta)
    k_BxTxGxK = layers.rope(k_BxTxGxK, positions_BxT, cfg.rope_theta)
    # Query head h = g * R + r reads key/value head g.
    q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
    s_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK,
                             preferred_element_type=jnp.float32) * K ** -0.5
    s_BxGxRxTxS = jnp.where(mask_TxS, s_BxGxRxTxS, -1e30)
    p_BxGxRxTxS = jax.nn.softmax(s_BxGxRxTxS, axis=-1).astype(v_BxTxGxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", p_BxGxRxTxS, v_BxTxGxK)
    rows = lambda a: layers.rows_of(a.transpose(0, 2, 1, 3))
    return (self.o_proj(out_BxTxGxRxK.reshape(B, T, H * K)),
            (rows(k_BxTxGxK), rows(v_BxTxGxK)))

  def init_cache(self, batch_size: int, length: int) -> tuple:
    """An empty key/value cache (k, v), each [B * G, S, K] (cache rows, see `layers`)."""
    cfg = self.cfg
    shape = (batch_size * cfg.num_key_value_heads, length, cfg.head_dim)
    return jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype))

  def step(self, x_Bx1xD, cache: tuple, pos_B):
    """`__call__` at one new position per row (row b at pos_B[b]) over itself and the
    cached keys and values of its earlier positions; returns [B, 1, D] and the cache with
    this position written (first, then read: XLA updates it in place)."""
    cfg = self.cfg
    B = x_Bx1xD.shape[0]
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    positions_Bx1 = pos_B[:, None]
    q_Bx1xHxK = layers.rope(self.q_norm(self.q_proj(x_Bx1xD).reshape(B, 1, H, K)),
                            positions_Bx1, cfg.rope_theta)
    k_Bx1xGxK = layers.rope(self.k_norm(self.k_proj(x_Bx1xD).reshape(B, 1, G, K)),
                            positions_Bx1, cfg.rope_theta)
    v_BxGxK = self.v_proj(x_Bx1xD).reshape(B, G, K)
    cache = tuple(layers.write_position(c, pos_B, e)
                  for c, e in zip(cache, (k_Bx1xGxK[:, 0], v_BxGxK)))
    # Query head h = g * R + r reads key/value head g: the R heads of a group query its row.
    q_NxRxK = q_Bx1xHxK.reshape(B * G, H // G, K) * jnp.asarray(K ** -0.5, q_Bx1xHxK.dtype)
    seen_NxS = layers.per_head(jnp.arange(cache[0].shape[1]) <= pos_B[:, None], G)
    out_NxRxK = layers.masked_attention(q_NxRxK, cache[0], cache[1], seen_NxS[:, None])
    return self.o_proj(out_NxRxK.reshape(B, 1, H * K)), cache


class Qwen3MLP(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(D, F, cfg, rngs=rngs)
    self.up_proj = _linear(D, F, cfg, rngs=rngs)
    self.down_proj = _linear(F, D, cfg, rngs=rngs)

  def __call__(self, x_BxTxD):
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class Qwen3Layer(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
    self.self_attn = Qwen3Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                   rngs=rngs)
    self.mlp = Qwen3MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, mask_TxS, positions_BxT):
    return self.prefill(x_BxTxD, mask_TxS, positions_BxT)[0]

  def prefill(self, x_BxTxD, mask_TxS, positions_BxT):
    a_BxTxD, cache = self.self_attn.prefill(self.input_layernorm(x_BxTxD), mask_TxS,
                                            positions_BxT)
    x_BxTxD = x_BxTxD + a_BxTxD
    return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD)), cache

  def step(self, x_Bx1xD, cache, pos_B):
    a_Bx1xD, cache = self.self_attn.step(self.input_layernorm(x_Bx1xD), cache, pos_B)
    x_Bx1xD = x_Bx1xD + a_Bx1xD
    return x_Bx1xD + self.mlp(self.post_attention_layernorm(x_Bx1xD)), cache


class Qwen3(nnx.Module):
  """Causal LM: token ids [B, T] -> logits [B, T, vocab_size] (float32)."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                                  param_dtype=jnp.dtype(cfg.param_dtype),
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([Qwen3Layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
    self.lm_head = (None if cfg.tie_word_embeddings
                    else _linear(cfg.hidden_size, cfg.vocab_size, cfg, rngs=rngs))

  def hidden(self, ids_BxT, positions_BxT=None):
    """Final-norm hidden states [B, T, D]."""
    B, T = ids_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask_TxS = layers.causal_mask(T)
    x_BxTxD = self.embed_tokens(ids_BxT)
    apply_layer = nnx.remat(Qwen3Layer.__call__) if self.cfg.remat else Qwen3Layer.__call__
    for layer in self.layers:
      x_BxTxD = apply_layer(layer, x_BxTxD, mask_TxS, positions_BxT)
    return self.norm(x_BxTxD)

  def __call__(self, ids_BxT):
    return self.head(self.hidden(ids_BxT))

  def head(self, x_BxTxD):
    """Logits [B, T, V] float32 of final-norm hidden states."""
    if self.lm_head is None:
      return self.embed_tokens.attend(x_BxTxD).astype(jnp.float32)
    return self.lm_head(x_BxTxD).astype(jnp.float32)

  def init_cache(self, batch_size: int, length: int) -> list:
    return [layer.self_attn.init_cache(batch_size, length) for layer in self.layers]

  def prefill(self, ids_BxT):
    """Logits [B, T, V] of whole windows, and the decoding caches of their positions."""
    B, T = ids_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask_TxS = layers.causal_mask(T)
    x_BxTxD, caches = self.embed_tokens(ids_BxT), []
    for layer in self.layers:
      x_BxTxD, cache = layer.prefill(x_BxTxD, mask_TxS, positions_BxT)
      caches.append(cache)
    return self.head(self.norm(x_BxTxD)), caches

  def step(self, ids_B, caches: list, pos_B):
    """Logits [B, V] of token ids_B[b] at position pos_B[b] of each row, from the key/value
    caches of the earlier positions; and the caches with it written."""
    x_Bx1xD = self.embed_tokens(ids_B[:, None])
    new_caches = []
    for layer, cache in zip(self.layers, caches):
      x_Bx1xD, cache = layer.step(x_Bx1xD, cache, pos_B)
      new_caches.append(cache)
    return self.head(self.norm(x_Bx1xD))[:, 0], new_caches


# ----------------------------------------------------------------------------- loading

def hf_param_names(cfg: Qwen3Config) -> dict[str, tuple[tuple, bool]]:
  """HF tensor name -> (attribute path in `Qwen3`, transpose from torch [out, in])."""
  out = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
         "model.norm.weight": (("norm", "scale"), False)}
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"model.layers.{i}", ("layers", i)
    out[f"{hf}.input_layernorm.weight"] = (ours + ("input_layernorm", "scale"), False)
    out[f"{hf}.post_attention_layernorm.weight"] = (
        ours + ("post_attention_layernorm", "scale"), False)
    for norm in ("q_norm", "k_norm"):
      out[f"{hf}.self_attn.{norm}.weight"] = (ours + ("self_attn", norm, "scale"), False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out[f"{hf}.self_attn.{proj}.weight"] = (ours + ("self_attn", proj, "kernel"), True)
      if cfg.attention_bias:
        out[f"{hf}.self_attn.{proj}.bias"] = (ours + ("self_attn", proj, "bias"), False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      out[f"{hf}.mlp.{proj}.weight"] = (ours + ("mlp", proj, "kernel"), True)
  return out


def load_weights(model: Qwen3, tensors: dict, source="checkpoint"):
  """Copies HF tensors (jax or numpy arrays) into `model` in place, checking names and
  shapes."""
  cfg = model.cfg
  expected = hf_param_names(cfg)
  check_present(expected, tensors, source)
  extra = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
  if extra:
    raise UserError(f"{source} has unexpected tensor {listing(extra)}")
  for name, (path, transpose) in expected.items():
    var = variable(model, path)
    want = tuple(var.get_value().shape)
    want_hf = want[::-1] if transpose else want
    array = tensors[name]
    if tuple(array.shape) != want_hf:
      raise UserError(f"tensor {name} has shape {tuple(array.shape)} but the model expects "
                      f"{want_hf} (from config.json)")
    array = array.T if transpose else array
    var.set_value(jnp.asarray(array, dtype=jnp.dtype(cfg.param_dtype)))
  return model


def pretrained_config(path: str | Path, **overrides) -> Qwen3Config:
  """The Qwen3Config of a local HF directory, from config.json and the tensor names (no
  tensor data is read); checks the files hold every tensor it needs."""
  hf = read_hf_config(path)
  check_architecture(hf)
  names = checkpoint_names(path)
  if "tie_word_embeddings" not in hf:  # absent: tied iff the file has no separate head
    overrides.setdefault("tie_word_embeddings", "lm_head.weight" not in names)
  cfg = Qwen3Config.from_hf(hf, **overrides)
  check_present(hf_param_names(cfg), names, path)
  return cfg


def from_pretrained(path: str | Path, dtype: str = "float32",
                    param_dtype: str | None = None) -> Qwen3:
  """A Qwen3 with the weights of a local HF directory (config.json + safetensors).

  `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: dtype).
  """
  cfg = pretrained_config(path, dtype=str(jnp.dtype(dtype)),
                          param_dtype=str(jnp.dtype(param_dtype or dtype)))
  model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
  return load_weights(model, read_checkpoint(path), source=str(path))


# ----------------------------------------------------------------- byte adaptation

def byte_to_unicode() -> dict[int, str]:
  """The byte-level BPE alphabet: each byte's one-character token string."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  table, extra = {}, 0
  for b in range(BYTES):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)  # GPT-2's stand-ins for unprintable bytes
      extra += 1
  return table


def byte_token_ids(path: str | Path, bos_token: str = "<|endoftext|>") -> np.ndarray:
  """[INPUT_VOCAB] Qwen token ids of the single-byte tokens, then of `bos_token` (for BOS)."""
  file = Path(path) / "tokenizer.json"
  if not file.is_file():
    raise UserError(f"missing tokenizer.json in {path} (needed for the byte vocabulary)")
  try:
    tok = json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"bad JSON in {file}: {e}") from None
  vocab = dict(tok.get("model", {}).get("vocab", {}))
  vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
  table = byte_to_unicode()
  missing = [b for b in range(BYTES) if table[b] not in vocab]
  if missing:
    raise UserError(f"tokenizer.json in {path} has no single-byte token for byte {missing[0]} "
                    f"({len(missing)} bytes missing); not a byte-level BPE vocabulary")
  if bos_token not in vocab:
    raise UserError(f"tokenizer.json in {path} has no token {bos_token!r} to use as BOS")
  return np.array([vocab[table[b]] for b in range(BYTES)] + [vocab[bos_token]], np.int64)


@dataclasses.dataclass(frozen=True)
class ByteQwen3Config:
  """A Qwen3 with an INPUT_VOCAB-entry byte input and a BYTES-entry next-byte head.

  `path`: a HF Qwen3 directory to start from ('' = random init). `resolve` sets the shape
  fields to its shape; `ByteQwen3.load_pretrained` reads its weights (byte rows of the
  embedding / head).
  """
  path: str = ""
  hidden_size: int = 64
  intermediate_size: int = 192
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  tie_word_embeddings: bool = True
  dtype: str = "float32"     # compute dtype; parameters stay float32
  remat: bool = False        # recompute each layer's activations in the backward pass

  @staticmethod
  def resolve(cfg: ByteQwen3Config) -> ByteQwen3Config:
    """`cfg` with the shape of the checkpoint at `cfg.path` (reads config.json, tensor
    names and tokenizer.json, no weights); `cfg` itself without a path."""
    if not cfg.path:
      return cfg
    shape = _checkpoint_shape(cfg.path)
    byte_token_ids(cfg.path)  # a folder without the byte vocabulary fails before training
    return dataclasses.replace(cfg, **shape)


_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ByteQwen3Config)
                      if f.name not in ("path", "dtype", "remat"))


def _checkpoint_shape(path: str) -> dict:
  """The ByteQwen3Config shape fields of the HF directory `path`."""
  lm_cfg = pretrained_config(path)
  if lm_cfg.attention_bias:
    raise UserError(f"Qwen3 config.json in {path} has attention_bias=true, which byte "
                    f"models do not support")
  return {name: getattr(lm_cfg, name) for name in _SHAPE_FIELDS}


class ByteQwen3(ByteModel):
  """Input ids [B, T] (BOS first) -> next-byte logits [B, T, BYTES]. Built from its shape
  alone (reads no files); `load_pretrained` reads the weights of `cfg.path`."""

  def __init__(self, cfg: ByteQwen3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    shape = {name: getattr(cfg, name) for name in _SHAPE_FIELDS}
    lm_cfg = Qwen3Config(vocab_size=INPUT_VOCAB, dtype=cfg.dtype, param_dtype="float32",
                         remat=cfg.remat, **shape)
    self.lm = Qwen3(lm_cfg, rngs=rngs)

  def __call__(self, inputs_BxT):
    return self.lm(inputs_BxT)[..., :BYTES]

  def init_cache(self, batch_size: int, length: int):
    return self.lm.init_cache(batch_size, length)

  def prefill(self, ids_BxT, n_B, starts_BxT=None):
    del n_B, starts_BxT  # every position's keys and values are the window's
    logits_BxTxV, cache = self.lm.prefill(ids_BxT)
    return logits_BxTxV[..., :BYTES], cache

  def decode_step(self, cache, ids_B, pos_B, starts_B=None):
    del starts_B  # no patches
    logits_BxV, cache = self.lm.step(ids_B, cache, pos_B)
    return logits_BxV[:, :BYTES], cache

  def flops_per_byte(self, seq_len: int, mean_patch_size: float | None = None) -> float:
    del mean_patch_size  # no patches
    return flops.qwen3_flops_per_byte(self.lm.cfg, seq_len)

  def load_pretrained(self) -> None:
    """Copies the weights of `cfg.path` into the model, keeping the byte rows of the
    embedding / head; a no-op without a path. The shape must be `resolve`d."""
    path = self.cfg.path
    if not path:
      return
    shape = _checkpoint_shape(path)
    for name in _SHAPE_FIELDS:
      if getattr(self.cfg, name) != shape[name]:
        raise UserError(f"model {name}={getattr(self.cfg, name)!r} but the checkpoint in "
                        f"{path} has {shape[name]!r}; build the model from "
                        f"ByteQwen3Config.resolve(cfg)")
    token_ids = byte_token_ids(path)
    tensors = read_checkpoint(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
      if name in tensors:
        rows = tensors[name].shape[0]
        if token_ids.max() >= rows:
          raise UserError(f"tokenizer.json in {path} has token id {token_ids.max()} but tensor "
                          f"{name} has {rows} rows")
        tensors[name] = tensors[name][token_ids]
    load_weights(self.lm, tensors, source=path)
