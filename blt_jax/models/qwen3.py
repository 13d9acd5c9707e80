"""Qwen3 in flax.nnx, and a loader for Hugging Face checkpoints (safetensors).

  model = qwen3.from_pretrained("path/to/Qwen3-0.6B", dtype="bfloat16")
  logits_BxTxV = model(token_ids_BxT)

Grouped-query attention with per-head q/k RMSNorm before RoPE, SwiGLU MLP, pre-norm
blocks, tied or untied LM head. Shapes in names: B batch, T length, D hidden, H query
heads, G key/value heads, R = H // G, K head dim, F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from blt_jax.errors import UserError
from blt_jax.models import layers


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
    return self.o_proj(out_BxTxGxRxK.reshape(B, T, H * K))


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
    x_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), mask_TxS, positions_BxT)
    return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


class Qwen3(nnx.Module):
  """Causal LM: token ids [B, T] -> logits [B, T, vocab_size] (float32)."""

  needs_patches = False

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

  def __call__(self, ids_BxT, patch_lengths_BxP=None):
    del patch_lengths_BxP  # a token LM has no patches
    x_BxTxD = self.hidden(ids_BxT)
    if self.lm_head is None:
      return self.embed_tokens.attend(x_BxTxD).astype(jnp.float32)
    return self.lm_head(x_BxTxD).astype(jnp.float32)


# ----------------------------------------------------------------------------- loading

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | Path, names=None) -> dict[str, np.ndarray]:
  """Tensors of one .safetensors file as numpy arrays (bf16 as ml_dtypes.bfloat16).

  Reads the header (u64 length + JSON) itself, so bf16 works without torch.
  """
  path = Path(path)
  if not path.is_file():
    raise UserError(f"missing safetensors file {path}")
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise UserError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise UserError(f"{path} is not a safetensors file (bad header)")
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__" or (names is not None and name not in names):
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise UserError(f"tensor {name} in {path} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])
  return out


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a HF directory: model.safetensors or a sharded index."""
  path = Path(path)
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    return read_safetensors(single)
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
      wanted = {k for k, v in weight_map.items() if v == shard}
      out.update(read_safetensors(path / shard, wanted))
    return out
  raise UserError(f"missing weights: no model.safetensors or model.safetensors.index.json "
                  f"in {path}")


def read_hf_config(path: str | Path) -> dict:
  path = Path(path)
  if not path.is_dir():
    raise UserError(f"missing Qwen3 checkpoint directory {path}")
  file = path / "config.json"
  if not file.is_file():
    raise UserError(f"missing config.json in {path}")
  try:
    return json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"bad JSON in {file}: {e}")


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


def _variable(module, path):
  node = module
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def load_weights(model: Qwen3, tensors: dict[str, np.ndarray], source="checkpoint"):
  """Copies HF tensors into `model` (in place), checking names and shapes."""
  cfg = model.cfg
  expected = hf_param_names(cfg)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise UserError(f"{source} lacks tensor {missing[0]}" +
                    (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
  if extra:
    raise UserError(f"{source} has unexpected tensor {extra[0]}" +
                    (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  for name, (path, transpose) in expected.items():
    var = _variable(model, path)
    want = tuple(var.get_value().shape)
    want_hf = want[::-1] if transpose else want
    array = tensors[name]
    if tuple(array.shape) != want_hf:
      raise UserError(f"tensor {name} has shape {tuple(array.shape)} but the model expects "
                      f"{want_hf} (from config.json)")
    array = array.T if transpose else array
    var.set_value(jnp.asarray(np.asarray(array), dtype=jnp.dtype(cfg.param_dtype)))
  return model


def from_pretrained(path: str | Path, dtype: str = "float32",
                    param_dtype: str | None = None) -> Qwen3:
  """A Qwen3 with the weights of a local HF directory (config.json + safetensors).

  `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: dtype).
  """
  hf = read_hf_config(path)
  check_architecture(hf)
  tensors = read_checkpoint(path)
  overrides = {}
  if "tie_word_embeddings" not in hf:  # absent: tied iff the file has no separate head
    overrides["tie_word_embeddings"] = "lm_head.weight" not in tensors
  cfg = Qwen3Config.from_hf(hf, dtype=str(jnp.dtype(dtype)),
                            param_dtype=str(jnp.dtype(param_dtype or dtype)), **overrides)
  model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
  return load_weights(model, tensors, source=str(path))


# ----------------------------------------------------------------- byte adaptation

BYTE_VOCAB_IN = 257   # bytes 0..255 + BOS (256), as every blt-jax model takes
BYTE_VOCAB_OUT = 256


def byte_to_unicode() -> dict[int, str]:
  """The byte-level BPE alphabet: each byte's one-character token string."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def byte_token_ids(path: str | Path, bos_token: str = "<|endoftext|>") -> np.ndarray:
  """[257] Qwen token ids of the 256 single-byte tokens, then of `bos_token` (for BOS)."""
  file = Path(path) / "tokenizer.json"
  if not file.is_file():
    raise UserError(f"missing tokenizer.json in {path} (needed for the byte vocabulary)")
  tok = json.loads(file.read_text())
  vocab = dict(tok.get("model", {}).get("vocab", {}))
  vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
  table = byte_to_unicode()
  missing = [b for b in range(256) if table[b] not in vocab]
  if missing:
    raise UserError(f"tokenizer.json in {path} has no single-byte token for byte {missing[0]} "
                    f"({len(missing)} bytes missing); not a byte-level BPE vocabulary")
  if bos_token not in vocab:
    raise UserError(f"tokenizer.json in {path} has no token {bos_token!r} to use as BOS")
  return np.array([vocab[table[b]] for b in range(256)] + [vocab[bos_token]], np.int64)


@dataclasses.dataclass(frozen=True)
class ByteQwen3Config:
  """A Qwen3 with a 257-entry byte input and 256-entry next-byte head.

  With `path`, shape fields come from the checkpoint's config.json and the byte rows of its
  embedding / head are kept; without it, a random Qwen3 of the shape below.
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


class ByteQwen3(nnx.Module):
  """Input ids [B, T] (BOS = 256 first) -> next-byte logits [B, T, 256]."""

  needs_patches = False

  def __init__(self, cfg: ByteQwen3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if not cfg.path:
      shape = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name != "path"}
      self.lm = Qwen3(Qwen3Config(vocab_size=BYTE_VOCAB_IN, **shape), rngs=rngs)
      return
    hf = read_hf_config(cfg.path)
    check_architecture(hf)
    tensors = dict(read_checkpoint(cfg.path))
    ids = byte_token_ids(cfg.path)
    tied = hf.get("tie_word_embeddings", "lm_head.weight" not in tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
      if name in tensors:
        tensors[name] = np.asarray(tensors[name])[ids]
    hf = {**hf, "vocab_size": BYTE_VOCAB_IN, "tie_word_embeddings": tied}
    lm_cfg = Qwen3Config.from_hf(hf, dtype=cfg.dtype, param_dtype="float32", remat=cfg.remat)
    self.lm = nnx.eval_shape(lambda: Qwen3(lm_cfg, rngs=nnx.Rngs(0)))
    load_weights(self.lm, tensors, source=cfg.path)

  def __call__(self, inputs_BxT, patch_lengths_BxP=None):
    del patch_lengths_BxP
    return self.lm(inputs_BxT)[..., :BYTE_VOCAB_OUT]
