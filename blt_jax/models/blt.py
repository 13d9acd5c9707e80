"""The Byte Latent Transformer (Pagnoni et al., 2024) in flax.nnx.

Shapes: B batch, T bytes, P byte patches (= global slots), k query slots per patch,
E / G / D encoder / global / decoder widths.

Alignment. inputs = [BOS, x0, .., x_{T-2}], targets = x0 .. x_{T-1}; logits[i] predict x_i.
`patch_lengths_BxP` splits the T targets into patches; g[i] is the patch of target x_i.
Input position 0 (BOS) forms input patch 0; input position i >= 1 (holding x_{i-1})
belongs to input patch g[i-1] + 1. The decoder at position i reads only the global output
of input patch g[i], which holds BOS (g = 0) or the bytes of byte patch g[i] - 1, all before
x_i's patch: complete and causal. Input patch P (the bytes of the last byte patch) is never
read by any decoder position, so it is dropped: the global transformer runs over P slots,
input patches 0 .. P-1.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax import patching
from blt_jax.models import flops, layers, slot_packing, vocab
from blt_jax.models.hash_embed import HashEmbed
from blt_jax.models.interface import ByteModel
from blt_jax.models.patch_attention import (CrossAttention, byte_patch_ids, input_patch_ids,
                                            pool_patches)
from blt_jax.models.vocab import PAD_ID


@dataclasses.dataclass(frozen=True)
class BLTConfig:
  enc_dim: int = 256             # local encoder width
  enc_layers: int = 1
  enc_heads: int = 4
  enc_window: int = 256          # encoder causal self-attention span in bytes; 0 = full
  global_dim: int = 512          # global (latent) transformer width
  global_layers: int = 6
  global_heads: int = 8
  dec_dim: int = 256             # local decoder width
  dec_layers: int = 2
  dec_heads: int = 4
  dec_window: int = 256          # decoder causal self-attention span in bytes; 0 = full
  cross_attn_k: int = 2          # query slots per patch (encoder and decoder cross-attention)
  cross_heads: int = 4           # heads of both cross-attentions
  pooling: str = "max"           # patch pooling of encoder states: 'max' | 'mean'
  hash_ngrams: tuple[int, ...] = (3, 4, 5, 6, 7, 8)   # hash n-gram sizes; () = off
  hash_buckets: int = 4096       # rows of each hash embedding table
  max_patches: int = 256         # P: fixed number of patches per window (patcher pads/folds)
  global_capacity: float = 1.0   # global dense layers run on this share of the B*P slots,
                                 # packed, when the batch's patches fit; 1.0 = never pack
  mlp_ratio: float = 4.0
  rope_theta: float = 10000.0
  global_rope_theta: float = 0.0  # the global transformer's RoPE base; 0 = rope_theta
  enc_mlp_dim: int = 0           # SwiGLU widths of each stack; 0 = from mlp_ratio
  global_mlp_dim: int = 0
  dec_mlp_dim: int = 0
  norm_eps: float = 1e-6         # RMSNorm epsilon
  # Where the released BLT (facebookresearch/blt, transformers' BltForCausalLM) differs
  # from blt-jax's own choices (README: "The released BLT"); configs/blt_paper.py sets all.
  vocab: str = "bytes"           # 'bytes' | 'blt': the released 260 tokens (models/vocab.py)
  hash_style: str = "mix32"      # 'mix32' | 'blt' (models/hash_embed.py); 'blt' also sums
                                 # the embeddings unscaled (mix32 scales by 1/sqrt(tables))
  hash_functions: int = 1        # 'blt' hashing: hash functions per n-gram size
  cross_style: str = "blt_jax"   # 'blt_jax' | 'blt': encoder slots of width enc_dim,
                                 # RMSNorm on both sides, the query added twice
  dec_cross_all_layers: bool = False  # the decoder cross-attends before every layer
  inner_norms: bool = True       # final norms on the encoder and global outputs
  init_from: str = ""            # a BltForCausalLM folder: its shape, and weights to start from
  zero_global: bool = False      # the decoder reads zeros for the global slots (an ablation:
                                 # in training, a BLT without its global path; at eval, a
                                 # trained BLT's bytes without what the global adds)
  dtype: str = "float32"         # compute dtype; parameters stay float32
  remat: bool = False            # recompute block activations in the backward pass

  @property
  def slot_dim(self) -> int:
    """S: the width of the k encoder slots of a patch."""
    return self.enc_dim if self.cross_style == "blt" else self.global_dim // self.cross_attn_k

  def __post_init__(self):
    ngrams = self.hash_ngrams
    if isinstance(ngrams, str):   # e.g. a command-line override "3,4,5" or ""
      ngrams = [s for s in ngrams.replace(" ", "").strip("()[]").split(",") if s]
    object.__setattr__(self, "hash_ngrams", tuple(int(n) for n in ngrams))
    if self.pooling not in ("max", "mean"):
      raise ValueError(f"pooling must be 'max' or 'mean', got {self.pooling!r}")
    vocab.check(self.vocab)
    if self.cross_style not in ("blt_jax", "blt"):
      raise ValueError(f"cross_style must be 'blt_jax' or 'blt', got {self.cross_style!r}")
    if self.cross_style == "blt_jax" and self.global_dim % self.cross_attn_k:
      raise ValueError(f"global_dim {self.global_dim} is not divisible by "
                       f"cross_attn_k {self.cross_attn_k}")
    if self.dec_layers < 1:
      raise ValueError(f"dec_layers must be >= 1, got {self.dec_layers}")
    for name, width in (("the slot width", self.slot_dim), ("dec_dim", self.dec_dim)):
      if width % self.cross_heads:
        raise ValueError(f"{name} = {width} is not divisible by cross_heads {self.cross_heads}")
    if not 0.0 < self.global_capacity <= 1.0:
      raise ValueError(f"global_capacity must be in (0, 1], got {self.global_capacity}")
    if any(n < 1 for n in self.hash_ngrams):
      raise ValueError(f"hash_ngrams must be positive, got {self.hash_ngrams}")


class BLT(ByteModel):
  """Maps input ids [B, T] (BOS first) and patch lengths [B, P] to next-byte logits [B, T, 256]."""

  needs_patches = True

  def __init__(self, cfg: BLTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    E, G, D, k, S = cfg.enc_dim, cfg.global_dim, cfg.dec_dim, cfg.cross_attn_k, cfg.slot_dim
    released = cfg.cross_style == "blt"
    tf = dict(mlp_ratio=cfg.mlp_ratio, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
              dtype=dtype, remat=cfg.remat, rngs=rngs)
    cross = dict(released=released, norm_eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
    self.embed = nnx.Embed(vocab.input_rows(cfg.vocab), E, dtype=dtype,
                           param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.hash_embed = (HashEmbed(cfg.hash_ngrams, cfg.hash_buckets, E, style=cfg.hash_style,
                                 functions=cfg.hash_functions, vocab_name=cfg.vocab,
                                 dtype=dtype, rngs=rngs)
                       if cfg.hash_ngrams else None)
    self.encoder = layers.Transformer(E, cfg.enc_layers, cfg.enc_heads, window=cfg.enc_window,
                                      mlp_dim=cfg.enc_mlp_dim, final_norm=cfg.inner_norms, **tf)
    # Patch vectors: pooled encoder states -> k query slots of width S -> cross-attention.
    self.enc_slots = layers.dense(E, k * S, rngs=rngs, dtype=dtype)
    self.enc_cross = CrossAttention(S, E, cfg.cross_heads, k, slots_query=True, **cross)
    self.global_in = layers.dense(k * S, G, rngs=rngs, dtype=dtype) if k * S != G else None
    self.global_tf = layers.Transformer(
        G, cfg.global_layers, cfg.global_heads, mlp_dim=cfg.global_mlp_dim,
        final_norm=cfg.inner_norms, **{**tf, "rope_theta": cfg.global_rope_theta or cfg.rope_theta})
    # Decoder: bytes (from encoder states) cross-attend to the k slots of their patch,
    # before its first layer (or before every layer).
    self.dec_slots = layers.dense(G, k * D, rngs=rngs, dtype=dtype)
    self.enc_to_dec = layers.dense(E, D, rngs=rngs, dtype=dtype) if E != D else None
    self.dec_cross = CrossAttention(D, D, cfg.cross_heads, k, slots_query=False, **cross)
    self.dec_cross_rest = (nnx.List([
        CrossAttention(D, D, cfg.cross_heads, k, slots_query=False, **cross)
        for _ in range(cfg.dec_layers - 1)]) if cfg.dec_cross_all_layers else None)
    self.decoder = layers.Transformer(D, cfg.dec_layers, cfg.dec_heads, window=cfg.dec_window,
                                      mlp_dim=cfg.dec_mlp_dim, **tf)
    self.head = layers.dense(D, vocab.output_columns(cfg.vocab), rngs=rngs, dtype=dtype)

  def global_input(self, z_BxPxkS):
    """The global transformer's input [B, P, G] from the k slots of each patch."""
    return z_BxPxkS if self.global_in is None else self.global_in(z_BxPxkS)

  def decoder_slots(self, z_xG):
    """The decoder's k slots [..., k * D] of global outputs (zeros with `zero_global`)."""
    slots = self.dec_slots(z_xG)
    return jnp.zeros_like(slots) if self.cfg.zero_global else slots

  def cross_before(self, slots_BxPkxD, g_BxT):
    """The decoder's `before` hook: layer i's input cross-attends (when it has a
    cross-attention) to the k slots of global patch g (complete patches only)."""
    crosses = self.dec_crosses
    return lambda i, d: crosses[i](d, slots_BxPkxD, g_BxT) if i < len(crosses) else d

  @property
  def dec_crosses(self) -> list:
    """The decoder's cross-attentions, the one before layer i at i."""
    return [self.dec_cross] + list(self.dec_cross_rest or [])

  def embed_inputs(self, inputs_BxT, context_BxN=None):
    """[B, T, E]: byte embedding plus hash n-gram embeddings (their sum scaled by
    1/sqrt(#tables) for mix32 hashing). With `context` (the ids that end at each row's
    last input, PAD_ID before the window), inputs is one id per row [B, 1] and its n-grams
    are hashed from that context."""
    x_BxTxE = self.embed(vocab.tokens(inputs_BxT, self.cfg.vocab))
    if self.hash_embed is not None:
      hashed_BxTxE = (self.hash_embed(inputs_BxT) if context_BxN is None
                      else self.hash_embed(context_BxN)[:, -1:])
      x_BxTxE = x_BxTxE + hashed_BxTxE
      if self.cfg.hash_style == "mix32":
        x_BxTxE = x_BxTxE * ((1 + self.hash_embed.n_tables) ** -0.5)
    return x_BxTxE

  def __call__(self, inputs_BxT, patch_lengths_BxP, packed: bool = False, shards: int = 1):
    return self.forward_embedded(self.embed_inputs(inputs_BxT), patch_lengths_BxP, packed,
                                 shards)

  def logits(self, batch: dict, *, packed: bool = False, shards: int = 1):
    return self(batch["inputs"], batch["patch_lengths"], packed, shards)

  # --------------------------------------------------------------------------- decoding
  # One input position per row and step, as `forward_embedded` computes it over a window:
  # the encoder and decoder keep key/value caches of the window's positions, the global
  # transformer of its patches. When the target of position i starts patch j (decided by
  # the patching rule from bytes before it), input patch j (BOS, or the bytes of patch
  # j - 1, the last of them at position i) is complete: its pooled states (kept running)
  # become k slots that cross-attend to its positions (their keys and values kept per
  # position), the global transformer takes one step, and the decoder's slots become
  # those of patch j until the next.

  def init_cache(self, batch_size: int, length: int) -> dict:
    cfg, B, T = self.cfg, batch_size, length
    dtype = jnp.dtype(cfg.dtype)
    zeros = lambda *shape, dtype=dtype: jnp.zeros(shape, dtype)
    return {"enc": self.encoder.init_cache(B, T, dtype),
            "dec": self.decoder.init_cache(B, T, dtype),
            "glob": self.global_tf.init_cache(B, cfg.max_patches, dtype),
            "ids": zeros(B, T, dtype=jnp.int32),          # input ids of the window
            "kv": self.enc_cross.attn.init_cache(B, T, dtype),  # slot cross-attention
            "pool": zeros(B, cfg.enc_dim, dtype=jnp.float32),  # running max / sum ...
            "count": zeros(B, dtype=jnp.int32),           # ... over the input patch so far
            "from": zeros(B, dtype=jnp.int32),            # its first position
            "g": zeros(B, dtype=jnp.int32),               # patch of the last target
            "slots": [c.attn.init_cache(B, cfg.cross_attn_k, dtype)  # of patch g, per
                      for c in self.dec_crosses]}                   # cross-attention

  def prefill(self, ids_BxT, n_B, starts_BxT=None):
    cfg, k = self.cfg, self.cfg.cross_attn_k
    B, T = ids_BxT.shape
    P = cfg.max_patches
    t_T = jnp.arange(T)
    last_B = jnp.maximum(n_B - 1, 0)  # the last position filled
    lengths_BxP = patching.patch_lengths(starts_BxT & (t_T < n_B[:, None]), P)
    g_BxT = byte_patch_ids(lengths_BxP, T)
    ip_BxT = input_patch_ids(g_BxT)

    # The window's forward (as `forward_embedded`), keeping every stack's cache.
    h_BxTxE, enc = self.encoder.prefill(self.embed_inputs(ids_BxT))
    q_BxPkxS = self.enc_slots(pool_patches(h_BxTxE, ip_BxT, P, cfg.pooling)).reshape(B, P * k, -1)
    z_BxPxG = self.global_input(self.enc_cross(q_BxPkxS, h_BxTxE, ip_BxT).reshape(B, P, -1))
    z_BxPxG, glob = self.global_tf.prefill(z_BxPxG)
    slots_BxPxkxD = self.decoder_slots(z_BxPxG).reshape(B, P, k, -1)
    d_BxTxD = h_BxTxE if self.enc_to_dec is None else self.enc_to_dec(h_BxTxE)
    d_BxTxD, dec = self.decoder.prefill(
        d_BxTxD, before=self.cross_before(slots_BxPxkxD.reshape(B, P * k, -1), g_BxT))

    # The state after the last position: its patch g, whose slots the decoder reads, and
    # the open input patch (the positions since the last patch start; none when the last
    # target started one), pooled so far.
    rows_B = jnp.arange(B)
    g_B = g_BxT[rows_B, last_B]
    started_B = (last_B == 0) | (g_B != g_BxT[rows_B, jnp.maximum(last_B - 1, 0)])
    open_BxT = (ip_BxT == ip_BxT[rows_B, last_B][:, None]) & (t_T <= last_B[:, None])
    h32_BxTxE = h_BxTxE.astype(jnp.float32)
    pool_BxE = (jnp.max(jnp.where(open_BxT[..., None], h32_BxTxE, -jnp.inf), axis=1)
                if cfg.pooling == "max" else
                jnp.sum(jnp.where(open_BxT[..., None], h32_BxTxE, 0), axis=1))
    cache = {"enc": enc, "dec": dec, "glob": glob, "ids": ids_BxT.astype(jnp.int32),
             "kv": self.enc_cross.keys_values(h_BxTxE),
             "pool": pool_BxE,
             "count": jnp.where(started_B, 0, jnp.sum(open_BxT, axis=1)).astype(jnp.int32),
             "from": jnp.argmax(open_BxT, axis=1).astype(jnp.int32), "g": g_B,
             "slots": [c.keys_values(slots_BxPxkxD[rows_B, g_B]) for c in self.dec_crosses]}
    return self.head(d_BxTxD).astype(jnp.float32), cache

  def decode_step(self, cache, ids_B, pos_B, starts_B=None):
    P = self.cfg.max_patches
    first_B = pos_B == 0
    # This position belongs to input patch g + 1 (BOS to 0); its target starts patch
    # g + 1 when the rule says so and a slot is left (else it folds into slot P - 1).
    g_B = cache["g"]
    h_Bx1xE, enc = self.encode_position(cache, ids_B, pos_B)
    new_g_B = jnp.where(first_B, 0, jnp.where(starts_B & (g_B < P - 1), g_B + 1, g_B))
    new_patch_B = first_B | (new_g_B != g_B)
    # The global step runs only when some row starts a patch; inside the `cond` the global
    # caches are only read (returning them whole would copy them) and written after it.
    B, H = len(pos_B), self.cfg.global_heads
    no_patch = lambda *_: (cache["slots"], [
        tuple(jnp.zeros((B, H, c.shape[-1]), c.dtype) for c in kv) for kv in cache["glob"]])
    slots, entries = jax.lax.cond(jnp.any(new_patch_B),
                                  functools.partial(self.next_patch, entries=True), no_patch,
                                  cache, enc, pos_B, new_g_B, new_patch_B)
    glob = layers.write_caches(cache["glob"], new_g_B, entries, new_patch_B)
    logits_Bx256, dec = self.decode_position(h_Bx1xE, slots, cache["dec"], pos_B)
    # The next position opens input patch new_g + 1 when this target started new_g.
    enc["count"] = jnp.where(new_patch_B, 0, enc["count"])
    return logits_Bx256, {**enc, "dec": dec, "glob": glob, "g": new_g_B, "slots": slots}

  def encode_position(self, cache, ids_B, pos_B):
    """The encoder state [B, 1, E] of the new position (byte and hash n-gram embedding,
    the n-grams over the ids before it in the window), and the cache entries it updates:
    `enc`, `ids`, its slot cross-attention keys and values `kv`, and the running pool of
    its input patch (`count` positions from `from`; a count of 0 opens a new one)."""
    rows_B = jnp.arange(len(pos_B))
    ids_BxT = cache["ids"].at[rows_B, pos_B].set(ids_B.astype(jnp.int32))
    n = max(self.cfg.hash_ngrams, default=1)
    back_BxN = pos_B[:, None] - jnp.arange(n - 1, -1, -1)
    context_BxN = jnp.where(back_BxN >= 0, ids_BxT[rows_B[:, None], jnp.maximum(back_BxN, 0)],
                            PAD_ID)
    x_Bx1xE = self.embed_inputs(ids_B[:, None], context_BxN)
    h_Bx1xE, enc_cache = self.encoder.step(x_Bx1xE, cache["enc"], pos_B)
    H = self.enc_cross.attn.n_heads
    kv = tuple(layers.write_position(c, pos_B, e.reshape(len(pos_B), H, -1))
               for c, e in zip(cache["kv"], self.enc_cross.keys_values(h_Bx1xE)))
    h_BxE = h_Bx1xE[:, 0].astype(jnp.float32)
    pool_BxE = cache["pool"]
    pool_BxE = (jnp.maximum(pool_BxE, h_BxE) if self.cfg.pooling == "max"
                else pool_BxE + h_BxE)
    restart_B = (pos_B == 0) | (cache["count"] == 0)
    return h_Bx1xE, {"enc": enc_cache, "ids": ids_BxT, "kv": kv,
                     "pool": jnp.where(restart_B[:, None], h_BxE, pool_BxE),
                     "count": jnp.where(restart_B, 1, cache["count"] + 1),
                     "from": jnp.where(restart_B, pos_B, cache["from"])}

  def next_patch(self, cache, enc, pos_B, new_g_B, new_patch_B, entries: bool = False):
    """In rows where `new_patch`: the input patch that ends at pos pooled, its slots
    cross-attending to its positions, one global step at new_g, and the decoder's slot
    keys and values of patch new_g; the other rows keep theirs. Returns (the slots' keys
    and values, each [B * H, k, K], the global caches with those rows written), or with
    `entries` (inside a `lax.cond`, where returning whole caches copies them), the global
    step's keys and values for `layers.write_caches` in place of the caches."""
    B, T = enc["ids"].shape
    k = self.cfg.cross_attn_k
    pooled_BxE = enc["pool"]
    if self.cfg.pooling == "mean":
      pooled_BxE = pooled_BxE / enc["count"][:, None]
    t_T = jnp.arange(T)
    in_patch_BxT = (t_T >= enc["from"][:, None]) & (t_T <= pos_B[:, None])
    q_BxkxS = self.enc_slots(pooled_BxE[:, None].astype(self.enc_slots.kernel.dtype))
    q_BxkxS = q_BxkxS.reshape(B, k, -1).astype(enc["kv"][0].dtype)
    z_BxkxS = self.enc_cross.attend(q_BxkxS, enc["kv"], in_patch_BxT[:, None, :])
    z_Bx1xG, glob = self.global_tf.step(self.global_input(z_BxkxS.reshape(B, 1, -1)),
                                        cache["glob"], new_g_B,
                                        write_B=new_patch_B, entries=entries)
    slots_BxkxD = self.decoder_slots(z_Bx1xG).reshape(B, k, -1)
    new_N = layers.per_head(new_patch_B, self.dec_cross.attn.n_heads)
    slots = [tuple(jnp.where(new_N[:, None, None], new, old) for new, old in
                   zip(c.keys_values(slots_BxkxD), kv))
             for c, kv in zip(self.dec_crosses, cache["slots"])]
    return slots, glob

  def decode_position(self, h_Bx1xE, slots, dec_cache, pos_B):
    """Next-byte logits [B, 256] of the new position, which reads the slots of its patch
    (their keys and values), and the decoder caches with it written."""
    d_Bx1xD = h_Bx1xE if self.enc_to_dec is None else self.enc_to_dec(h_Bx1xE)
    crosses = self.dec_crosses
    before = lambda i, d: crosses[i].attend(d, slots[i]) if i < len(crosses) else d
    d_Bx1xD, dec_cache = self.decoder.step(d_Bx1xD, dec_cache, pos_B, before=before)
    return self.head(d_Bx1xD)[:, 0].astype(jnp.float32), dec_cache

  def flops_per_byte(self, seq_len: int, mean_patch_size: float | None = None) -> float:
    return flops.blt_flops_per_byte(self.cfg, seq_len, mean_patch_size)

  def param_counts(self) -> dict:
    counts = super().param_counts()
    if self.hash_embed is not None:
      n_hash = sum(p.size for p in jax.tree.leaves(nnx.state(self.hash_embed, nnx.Param)))
      counts["without_hash"] = counts["total"] - int(n_hash)
    return counts

  def packs(self, batch_size: int, n_slots: int, shards: int = 1) -> bool:
    """Whether batches of this shape can run packed (`global_capacity` saves rows)."""
    n_groups, rows = slot_packing.packed_rows(batch_size, n_slots, self.cfg.global_capacity,
                                              shards)
    return n_groups * rows < batch_size * n_slots

  def packing_fits(self, patch_lengths_BxP, seq_len: int, shards: int = 1):
    """Whether this batch's needed slots fit the packed rows (a bool array): then
    `packed=True` gives the same logits faster. Only for shapes that `packs`."""
    return self.packing_of(byte_patch_ids(patch_lengths_BxP, seq_len),
                           patch_lengths_BxP.shape[1], shards).fits

  def packing_of(self, g_BxT, n_slots: int, shards: int = 1) -> slot_packing.SlotPacking:
    """The packing of the slots the decoder reads: 0 .. max g of each window."""
    return slot_packing.plan(jnp.max(g_BxT, axis=1) + 1, n_slots, self.cfg.global_capacity,
                             shards)

  def forward_embedded(self, x_BxTxE, patch_lengths_BxP, packed: bool = False,
                       shards: int = 1):
    """Logits [B, T, 256] float32 from embedded inputs (split out for gradient tests). With
    `packed`, the global transformer runs on packed slots (`slot_packing`); the caller
    checks `packing_fits` first. The logits are the same either way. `shards`: the batch
    is split into this many equal parts (devices), and packing keeps to each."""
    cfg, k = self.cfg, self.cfg.cross_attn_k
    B, T, _ = x_BxTxE.shape
    P = patch_lengths_BxP.shape[-1]
    g_BxT = byte_patch_ids(patch_lengths_BxP, T)
    ip_BxT = input_patch_ids(g_BxT)

    # Local encoder: windowed causal self-attention over bytes.
    h_BxTxE = self.encoder(x_BxTxE)

    # Patch vectors: pool -> k slots -> each slot cross-attends to its own patch's bytes.
    pooled_BxPxE = pool_patches(h_BxTxE, ip_BxT, P, cfg.pooling)
    q_BxPkxS = self.enc_slots(pooled_BxPxE).reshape(B, P * k, -1)
    q_BxPkxS = self.enc_cross(q_BxPkxS, h_BxTxE, ip_BxT)
    z_BxPxG = self.global_input(q_BxPkxS.reshape(B, P, -1))

    # Global transformer: causal over patches; then the decoder's k slots per patch.
    if packed:
      packing = self.packing_of(g_BxT, P, shards)
      z_NxCxG = self.global_tf(packing.pack(z_BxPxG), packing=packing)
      slots_BxPxkD = packing.unpack(self.decoder_slots(z_NxCxG))
    else:
      slots_BxPxkD = self.decoder_slots(self.global_tf(z_BxPxG))

    # Local decoder: byte i reads the k slots of global patch g[i] (complete patches only).
    slots_BxPkxD = slots_BxPxkD.reshape(B, P * k, -1)
    d_BxTxD = h_BxTxE if self.enc_to_dec is None else self.enc_to_dec(h_BxTxE)
    d_BxTxD = self.decoder(d_BxTxD, before=self.cross_before(slots_BxPkxD, g_BxT))
    return self.head(d_BxTxD).astype(jnp.float32)
