"""The released BLT's checkpoint format: transformers' `BltForCausalLM` folders (config.json
and safetensors, the entropy patcher inside), read into the one `BLT` module configured as
released and its patcher into a `ByteLM`, and written back. No torch.

What maps to what. Each HF tensor [out, in] is a kernel [in, out] of ours; blt-jax fuses
q|k|v, gate|up and the cross-attention k|v into one kernel each. The released RoPE rotates
interleaved pairs (2i, 2i+1) of a head where blt-jax rotates halves (i, i + K/2): the q
and k rows of each head are permuted on the way in (evens, then odds) and back on the way
out, which leaves every attention score as it was.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt_jax.errors import UserError
from blt_jax.models import hf_files, layers
from blt_jax.models.blt import BLT, BLTConfig
from blt_jax.models.byte_lm import ByteLM, ByteLMConfig

ARCHITECTURE = "BltForCausalLM"
DEFAULT_THETA = {"encoder_config": 500000.0, "decoder_config": 500000.0,
                 "global_config": 500000.0, "patcher_config": 10000.0}
PATCHING_MODES = {"entropy": "global", "static": "static"}
RELEASED_THRESHOLD = 1.335442066192627  # transformers' default patching_threshold


@dataclasses.dataclass(frozen=True)
class Released:
  """What a folder holds: the BLT's fields, its patcher's (None without one) and the
  patching transformers' forward applies."""
  blt: BLTConfig
  patcher: ByteLMConfig | None
  mode: str                  # blt-jax patching mode: 'global' (entropy) or 'static'
  threshold: float | None
  patch_size: int
  max_patch_len: int | None
  tied: bool                 # the head shares the encoder's byte embedding
  seq_len: int               # max_position_embeddings: bytes per window
  patcher_seq_len: int


def _unsupported(what: str, value, path):
  raise UserError(f"{path}: unsupported BltForCausalLM option {what}={value!r}")


def _theta(sub: dict, name: str, path) -> float:
  rope = sub.get("rope_parameters") or sub.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    _unsupported(f"{name}.rope_parameters.rope_type", kind, path)
  return float(sub.get("rope_theta", rope.get("rope_theta", DEFAULT_THETA[name])))


def _stack(hf: dict, name: str, path) -> dict:
  """The checked fields of one sub-config (encoder, decoder, global or patcher)."""
  sub = hf.get(name)
  if not isinstance(sub, dict):
    raise UserError(f"{path}/config.json lacks {name}: not a {ARCHITECTURE} folder")
  try:
    dim, heads = int(sub["hidden_size"]), int(sub["num_attention_heads"])
    layers = int(sub["num_hidden_layers"])
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path}/config.json: {name} lacks a valid {e}") from None
  kv = sub.get("num_key_value_heads") or heads
  if kv != heads:
    _unsupported(f"{name}.num_key_value_heads", kv, path)
  if sub.get("hidden_act", "silu") != "silu":
    _unsupported(f"{name}.hidden_act", sub["hidden_act"], path)
  if name != "global_config" and sub.get("vocab_size", 260) != 260:
    _unsupported(f"{name}.vocab_size", sub["vocab_size"], path)
  mlp = int(sub.get("intermediate_size") or 0) or int(8 * dim / 3)
  return dict(dim=dim, heads=heads, layers=layers, mlp=mlp, theta=_theta(sub, name, path),
              eps=float(sub.get("rms_norm_eps", 1e-5)),
              max_pos=int(sub.get("max_position_embeddings") or 0))


def read_config(path: str | Path) -> Released:
  """The `Released` description of the folder `path` (reads config.json only)."""
  hf = hf_files.read_hf_config(path, what=ARCHITECTURE)
  archs = hf.get("architectures") or [ARCHITECTURE]
  if hf.get("model_type") != "blt" or ARCHITECTURE not in archs:
    raise UserError(f"{path} is not a {ARCHITECTURE} folder: model_type="
                    f"{hf.get('model_type')!r}, architectures={archs!r}")
  if hf.get("vocab_size", 260) != 260:
    _unsupported("vocab_size", hf["vocab_size"], path)
  enc, dec = _stack(hf, "encoder_config", path), _stack(hf, "decoder_config", path)
  glob = _stack(hf, "global_config", path)
  if hf["encoder_config"].get("cross_attn_all_layers"):
    _unsupported("encoder_config.cross_attn_all_layers", True, path)
  for field, a, b in (("hidden_size", enc["dim"], dec["dim"]),
                      ("num_attention_heads", enc["heads"], dec["heads"]),
                      ("rope theta", enc["theta"], dec["theta"])):
    if a != b:
      _unsupported(f"decoder_config.{field} (the encoder's is {a})", b, path)
  if len({enc["eps"], dec["eps"], glob["eps"]}) > 1:
    _unsupported("rms_norm_eps (different per stack)", [enc["eps"], dec["eps"], glob["eps"]],
                 path)
  mode = hf.get("patching_mode", "entropy")
  if mode not in PATCHING_MODES:
    _unsupported("patching_mode", mode, path)
  has_patcher = bool(hf.get("patch_in_forward", True))
  if mode == "entropy" and not has_patcher:
    _unsupported("patch_in_forward (entropy patching without a patcher)", False, path)
  window = int(hf.get("local_attention_window_len") or 0)
  groups = tuple(int(n) for n in (hf.get("encoder_hash_byte_group_size") or (3, 4, 5, 6, 7, 8)))
  try:
    blt = BLTConfig(
        enc_dim=enc["dim"], enc_layers=enc["layers"], enc_heads=enc["heads"],
        enc_window=window, global_dim=glob["dim"], global_layers=glob["layers"],
        global_heads=glob["heads"], dec_dim=dec["dim"], dec_layers=dec["layers"],
        dec_heads=dec["heads"], dec_window=window, cross_attn_k=int(hf.get("cross_attn_k", 2)),
        cross_heads=enc["heads"], pooling="max", hash_ngrams=groups,
        hash_buckets=int(hf.get("encoder_hash_byte_group_vocab", 500002)),
        hash_functions=int(hf.get("encoder_hash_byte_group_nb_functions", 1)),
        rope_theta=enc["theta"], global_rope_theta=glob["theta"], enc_mlp_dim=enc["mlp"],
        global_mlp_dim=glob["mlp"], dec_mlp_dim=dec["mlp"], norm_eps=enc["eps"],
        vocab="blt", hash_style="blt", cross_style="blt",
        dec_cross_all_layers=bool(hf["decoder_config"].get("cross_attn_all_layers", True)),
        inner_norms=False)
  except ValueError as e:
    raise UserError(f"{path}: unsupported BltForCausalLM configuration: {e}") from None
  patcher = None
  patcher_seq_len = 0
  if has_patcher:
    p = _stack(hf, "patcher_config", path)
    patcher = ByteLMConfig(dim=p["dim"], n_layers=p["layers"], n_heads=p["heads"],
                           window=int(hf["patcher_config"].get("sliding_window") or 0),
                           rope_theta=p["theta"], mlp_dim=p["mlp"], norm_eps=p["eps"],
                           vocab="blt")
    patcher_seq_len = p["max_pos"] or 8192
  max_len = hf.get("max_patch_length")
  return Released(blt=blt, patcher=patcher, mode=PATCHING_MODES[mode],
                  threshold=float(hf.get("patching_threshold") or RELEASED_THRESHOLD),
                  patch_size=int(hf.get("patch_size") or 4),
                  max_patch_len=int(max_len) if max_len else None,
                  tied=bool(hf.get("tie_word_embeddings", False)),
                  seq_len=int(hf.get("max_position_embeddings") or 4096),
                  patcher_seq_len=patcher_seq_len)


# ----------------------------------------------------------------------------- tensor map

def _rope_rows(w_OxI, heads: int):
  """Rows of each head reordered from interleaved RoPE pairs to halves (evens, then odds)."""
  O, I = w_OxI.shape
  w = w_OxI.reshape(heads, O // heads // 2, 2, I)
  return w.transpose(0, 2, 1, 3).reshape(O, I)


def _rope_rows_back(w_OxI, heads: int):
  O, I = w_OxI.shape
  w = w_OxI.reshape(heads, 2, O // heads // 2, I)
  return w.transpose(0, 2, 1, 3).reshape(O, I)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter of ours and the HF tensors it is made of."""
  path: tuple                 # attribute path in the module, ending in the variable
  names: tuple                # HF tensor names, concatenated in this order
  linear: bool = True         # kernel [in, out] <- concat of [out_i, in] (else copied)
  rope_heads: tuple = ()      # per name: heads whose rows to permute (0: none)


def _block_entries(hf: str, ours: tuple, heads: int) -> list:
  attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
  return [Entry(ours + ("attn_norm", "scale"), (f"{hf}.input_layernorm.weight",), False),
          Entry(ours + ("mlp_norm", "scale"), (f"{hf}.post_attention_layernorm.weight",), False),
          Entry(ours + ("attn", "qkv", "kernel"),
                tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), rope_heads=(heads, heads, 0)),
          Entry(ours + ("attn", "o", "kernel"), (f"{attn}.o_proj.weight",)),
          Entry(ours + ("mlp", "gate_up", "kernel"),
                (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight")),
          Entry(ours + ("mlp", "down", "kernel"), (f"{mlp}.down_proj.weight",))]


def _cross_entries(hf: str, ours: tuple) -> list:
  return [Entry(ours + ("norm", "scale"), (f"{hf}.q_norm.weight",), False),
          Entry(ours + ("kv_norm", "scale"), (f"{hf}.k_norm.weight",), False),
          Entry(ours + ("attn", "q", "kernel"), (f"{hf}.q_proj.weight",)),
          Entry(ours + ("attn", "kv", "kernel"), (f"{hf}.k_proj.weight", f"{hf}.v_proj.weight")),
          Entry(ours + ("attn", "o", "kernel"), (f"{hf}.o_proj.weight",))]


def blt_entries(cfg: BLTConfig) -> list:
  """The BLT's parameters (paths from the `BLT` module) and their HF tensors."""
  enc, dec, glob = "model.local_encoder", "model.local_decoder", "model.global_transformer"
  out = [Entry(("embed", "embedding"), (f"{enc}.embed_tokens.weight",), False),
         Entry(("hash_embed", "fused", "embedding"),
               ("model.encoder_hash_tok_embedding.weight",), False),
         Entry(("enc_slots", "kernel"), (f"{enc}.patch_embedding_projection.weight",)),
         Entry(("dec_slots", "kernel"), (f"{dec}.patch_embedding_projection.weight",)),
         Entry(("decoder", "norm", "scale"), (f"{dec}.norm.weight",), False),
         Entry(("head", "kernel"), ("lm_head.weight",))]
  if cfg.cross_attn_k * cfg.slot_dim != cfg.global_dim:
    out.append(Entry(("global_in", "kernel"), (f"{glob}.token_embedding_projection.weight",)))
  out += _cross_entries(f"{enc}.cross_attn_layers.0", ("enc_cross",))
  n_cross = cfg.dec_layers if cfg.dec_cross_all_layers else 1
  for i in range(n_cross):
    ours = ("dec_cross",) if i == 0 else ("dec_cross_rest", i - 1)
    out += _cross_entries(f"{dec}.cross_attn_layers.{i}", ours)
  for i in range(cfg.enc_layers):
    out += _block_entries(f"{enc}.layers.{i}", ("encoder", "blocks", i), cfg.enc_heads)
  for i in range(cfg.global_layers):
    out += _block_entries(f"{glob}.layers.{i}", ("global_tf", "blocks", i), cfg.global_heads)
  for i in range(cfg.dec_layers):
    out += _block_entries(f"{dec}.layers.{i}", ("decoder", "blocks", i), cfg.dec_heads)
  return out


def patcher_entries(cfg: ByteLMConfig) -> list:
  """The patcher's parameters (paths from its `ByteLM`) and their HF tensors."""
  out = [Entry(("embed", "embedding"), ("model.patcher.embed_tokens.weight",), False),
         Entry(("trunk", "norm", "scale"), ("model.patcher.norm.weight",), False),
         Entry(("head", "kernel"), ("model.patcher.lm_head.weight",))]
  for i in range(cfg.n_layers):
    out += _block_entries(f"model.patcher.layers.{i}", ("trunk", "blocks", i), cfg.n_heads)
  return out


def load_entries(module, entries: list, tensors: dict, source) -> None:
  """Copies HF tensors into `module` (built with `nnx.eval_shape` or real), checking
  shapes; every parameter gets float32."""
  for e in entries:
    var = hf_files.variable(module, e.path)
    parts = []
    for i, name in enumerate(e.names):
      w = np.asarray(tensors[name], np.float32)
      if e.rope_heads and e.rope_heads[i]:
        w = _rope_rows(w, e.rope_heads[i])
      parts.append(w)
    w = np.concatenate(parts, axis=0).T if e.linear else parts[0]
    want = tuple(var.get_value().shape)
    if w.shape != want:
      shapes = [tuple(np.shape(tensors[n])) for n in e.names]
      raise UserError(f"{source}: tensor {' + '.join(e.names)} has shape "
                      f"{shapes if len(shapes) > 1 else shapes[0]} but config.json implies "
                      f"{want[::-1] if e.linear and len(e.names) == 1 else want}")
    var.set_value(jnp.asarray(w))


def tensors_of(module, entries: list, dtype=np.float32) -> dict:
  """HF tensors (name -> numpy array) of `module`'s parameters."""
  out = {}
  for e in entries:
    w = np.asarray(hf_files.variable(module, e.path).get_value(), np.float32)
    if not e.linear:
      out[e.names[0]] = w.astype(dtype)
      continue
    rows = w.T
    sizes = [rows.shape[0] // len(e.names)] * len(e.names)
    for i, (name, part) in enumerate(zip(e.names, np.split(rows, np.cumsum(sizes)[:-1]))):
      if e.rope_heads and e.rope_heads[i]:
        part = _rope_rows_back(part, e.rope_heads[i])
      out[name] = np.ascontiguousarray(part).astype(dtype)
  return out


def needed_names(released: Released, patcher: bool = True) -> set:
  """The HF tensor names the folder must hold (`patcher`: the patcher's too)."""
  names = {n for e in blt_entries(released.blt) for n in e.names}
  if patcher and released.patcher is not None:
    names |= {n for e in patcher_entries(released.patcher) for n in e.names}
  return names


TIED = ("model.local_encoder.embed_tokens.weight", "lm_head.weight")


def read_tensors(path: str | Path, released: Released, patcher: bool = True) -> dict:
  """The folder's tensors, checked against what its config needs (named when missing)."""
  tensors = hf_files.read_checkpoint(path)
  if released.tied:  # transformers keeps one of the two
    for a, b in (TIED, TIED[::-1]):
      if a not in tensors and b in tensors:
        tensors[a] = tensors[b]
  hf_files.check_present(sorted(needed_names(released, patcher)), tensors, path)
  return tensors


def load(path: str | Path, seq_len: int | None = None) -> tuple[Released, BLT, ByteLM | None]:
  """The folder's description, its BLT and its patcher (None without one), weights loaded;
  `seq_len` (bytes per window, default the folder's) sets the BLT's patch slots."""
  released = read_config(path)
  released = dataclasses.replace(released, blt=dataclasses.replace(
      released.blt, max_patches=seq_len or released.seq_len))
  tensors = read_tensors(path, released)
  blt = nnx.eval_shape(lambda: BLT(released.blt, rngs=nnx.Rngs(0)))
  load_entries(blt, blt_entries(released.blt), tensors, path)
  patcher = None
  if released.patcher is not None:
    patcher = nnx.eval_shape(lambda: ByteLM(released.patcher, rngs=nnx.Rngs(0)))
    load_entries(patcher, patcher_entries(released.patcher), tensors, path)
  return released, blt, patcher


# ----------------------------------------------------------------------------- fine-tuning

RUNTIME = ("max_patches", "global_capacity", "dtype", "remat", "init_from", "zero_global")


def resolve(cfg: BLTConfig) -> BLTConfig:
  """A BLT config with `init_from` gets the shape of that folder (reads config.json and
  tensor names, no weights); without, it is returned as it is."""
  if not cfg.init_from:
    return cfg
  released = read_config(cfg.init_from)
  names = hf_files.checkpoint_names(cfg.init_from)
  if released.tied:
    names |= set(TIED) if names & set(TIED) else set()
  hf_files.check_present(sorted(needed_names(released, patcher=False)), names, cfg.init_from)
  return dataclasses.replace(released.blt, **{f: getattr(cfg, f) for f in RUNTIME})


def load_into(model: BLT) -> None:
  """Reads the weights of `model.cfg.init_from` into a BLT built from `resolve`d fields
  (at the start of a run); a no-op without `init_from`."""
  path = model.cfg.init_from
  if not path:
    return
  released = read_config(path)
  for f in dataclasses.fields(BLTConfig):
    if f.name not in RUNTIME and getattr(model.cfg, f.name) != getattr(released.blt, f.name):
      raise UserError(f"model {f.name}={getattr(model.cfg, f.name)!r} but {path} has "
                      f"{getattr(released.blt, f.name)!r}")
  load_entries(model, blt_entries(model.cfg), read_tensors(path, released, patcher=False), path)


# ----------------------------------------------------------------------------- export

def check_exportable(blt: BLTConfig, patcher: ByteLMConfig | None):
  """One line naming the first choice a BltForCausalLM cannot hold."""
  want = dict(vocab="blt", hash_style="blt", cross_style="blt", inner_norms=False,
              pooling="max", enc_window=blt.dec_window, dec_dim=blt.enc_dim,
              dec_heads=blt.enc_heads, cross_heads=blt.enc_heads)
  for name, value in want.items():
    if getattr(blt, name) != value:
      raise UserError(f"cannot save as {ARCHITECTURE}: model {name}={getattr(blt, name)!r} "
                      f"(the released architecture has {value!r}; see configs/blt_paper.py)")
  if patcher is not None and patcher.vocab != "blt":
    raise UserError(f"cannot save as {ARCHITECTURE}: the entropy model's vocab is "
                    f"{patcher.vocab!r}, not the released 'blt' (see configs/blt_paper.py)")


def _mlp(dim: int, mlp_dim: int, ratio: float) -> int:
  return mlp_dim or layers.mlp_hidden(dim, ratio)


def hf_config(r: Released) -> dict:
  """config.json of a BltForCausalLM holding `r` (untied)."""
  b, k = r.blt, r.blt.cross_attn_k
  rope = lambda theta: {"rope_type": "default", "rope_theta": float(theta)}

  def stack(dim, heads, n_layers, mlp, theta, **extra):
    return dict(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=heads,
                num_hidden_layers=n_layers, intermediate_size=mlp, rope_parameters=rope(theta),
                rms_norm_eps=b.norm_eps, hidden_act="silu", dropout=0.0, **extra)

  local = dict(vocab_size=260, cross_attn_k=k, hidden_size_global=b.global_dim,
               max_position_embeddings=r.seq_len)
  out = {
      "architectures": [ARCHITECTURE], "model_type": "blt", "vocab_size": 260,
      "max_position_embeddings": r.seq_len, "patch_in_forward": r.patcher is not None,
      "patching_mode": {v: k for k, v in PATCHING_MODES.items()}[r.mode],
      "patch_size": r.patch_size,
      "patching_threshold": RELEASED_THRESHOLD if r.threshold is None else r.threshold,
      "max_patch_length": r.max_patch_len, "patching_batch_size": 1,
      "local_attention_window_len": b.enc_window or None, "cross_attn_k": k,
      "encoder_hash_byte_group_size": list(b.hash_ngrams),
      "encoder_hash_byte_group_vocab": b.hash_buckets,
      "encoder_hash_byte_group_nb_functions": b.hash_functions,
      "tie_word_embeddings": False, "rope_parameters": rope(b.rope_theta),
      "encoder_config": stack(b.enc_dim, b.enc_heads, b.enc_layers,
                              _mlp(b.enc_dim, b.enc_mlp_dim, b.mlp_ratio), b.rope_theta,
                              cross_attn_all_layers=False,
                              sliding_window=b.enc_window or None, **local),
      "decoder_config": stack(b.dec_dim, b.dec_heads, b.dec_layers,
                              _mlp(b.dec_dim, b.dec_mlp_dim, b.mlp_ratio), b.rope_theta,
                              cross_attn_all_layers=b.dec_cross_all_layers, **local),
      "global_config": stack(b.global_dim, b.global_heads, b.global_layers,
                             _mlp(b.global_dim, b.global_mlp_dim, b.mlp_ratio),
                             b.global_rope_theta or b.rope_theta,
                             max_position_embeddings=b.max_patches),
  }
  if r.patcher is not None:
    p = r.patcher
    out["patcher_config"] = dict(
        stack(p.dim, p.n_heads, p.n_layers, _mlp(p.dim, p.mlp_dim, p.mlp_ratio), p.rope_theta,
              vocab_size=260, sliding_window=p.window or None,
              max_position_embeddings=r.patcher_seq_len), rms_norm_eps=p.norm_eps)
  return out


def save(path: str | Path, r: Released, blt: BLT, patcher: ByteLM | None,
         dtype: str = "float32", shard_bytes: int = hf_files.SHARD_BYTES):
  """Writes `blt` (and `patcher`) as the BltForCausalLM folder `path`."""
  check_exportable(r.blt, r.patcher)
  tensors = tensors_of(blt, blt_entries(r.blt))
  if patcher is not None:
    tensors.update(tensors_of(patcher, patcher_entries(r.patcher)))
  dt = jnp.dtype(dtype)
  hf_files.write_checkpoint(path, {**hf_config(r), "dtype": str(dt)},
                            {n: jnp.asarray(w, dt) for n, w in tensors.items()}, shard_bytes)
