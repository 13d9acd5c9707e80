"""Writes tiny BLT fixtures (Hugging Face `BltForCausalLM` checkpoints) with PyTorch + transformers.

  pip install torch transformers   # for this script only; not project dependencies
  python scripts/make_blt_reference.py [--out tests/fixtures]
  python scripts/make_blt_reference.py --check DIR [--tol 1e-4]

Each folder is a checkpoint (config.json + safetensors) of a tiny random BLT with order-one
weights, plus, for the two texts TEXTS[i] (token ids [1] + [byte + 4], BOS 1):
  input_ids_{i}.npy      int64 [1, N]
  logits_{i}.npy         float32 [1, N, 260], transformers' forward (float32, eager attention)
  patch_lengths_{i}.npy  int64 [1, P], the patches that forward used
  entropies_{i}.npy      float32 [1, N], the patcher's next-byte entropies (entropy folders)
  hash_ids_{i}.npy       int64 [F, N], `byte_group_hash_function` of every (function f, group
                         size n) in the order f-major, n-minor, with function f's prime, before the
                         per-table offset (table k = f * len(sizes) + j holds rows k * vocab ...)

  blt_tiny_entropy  patch_in_forward, entropy patching in the forward with the threshold chosen
                    here (patches of 1, 2, 3 and >= 4 bytes; text 1 ends in a zero-length patch),
                    untied head, one model.safetensors, local window 16 (encoder and decoder
                    share the encoder's sliding-window mask), patcher window 24, rope theta 5e5
                    (encoder, decoder), 1e4 (global), 2e4 (patcher), one hash function, sizes 3..8
  blt_tiny_static   no patcher, static patches of 4 passed as explicit patch_lengths (transformers'
                    own forward without patch_lengths gives every byte its own patch), tied head,
                    sharded (model-0000k-of-0000n.safetensors + model.safetensors.index.json),
                    token_embedding_projection (2 * 32 != 48), two hash functions, sizes 3, 5, 8
  blt_tiny_bf16     blt_tiny_entropy saved in bfloat16; its references come from its bf16-rounded
                    weights computed in float32 (entropies differ a little; same threshold)

Patches as transformers' `BltPatcher.patch_lengths_from_entropies` makes them: token 0 (BOS) and
token 1 always start a patch; token t >= 2 starts one iff the entropy at position t - 1 exceeds the
threshold. The entropy at the last position N - 1 decides about token N, past the input: when it
exceeds the threshold the lengths end with a zero-length patch (start N, end N - 1). That patch
changes the logits of the last position: the decoder maps token t to the global output of patch
id(t + 1) - 1, so with it the last token reads its own patch. The static lengths here follow the
same convention with blt-jax's static rule (byte i = token i + 1 starts a patch iff i % 4 == 0):
[1, 4, 4, ..., rest] and a trailing 0 iff (N - 1) % 4 == 0 (text 0 has one, text 1 not). The
threshold is picked midway between two neighbouring entropies of text 0 near its median, as far as
possible from every entropy of both texts in float32 and bf16 (the margin is printed, ~7e-4).

Hashes: the rolling sum of token ids (not bytes) times prime**k, k = 0 for the oldest byte of the
window (zero-padded on the left), wraps modulo 2**64 as signed int64; then the floor modulo
(non-negative) by the vocab.

Tied weights: with tie_word_embeddings=True transformers 5 stores lm_head.weight and leaves
model.local_encoder.embed_tokens.weight out of the safetensors (BltForCausalLM's
_tied_weights_keys points the embedding at the head), and ties them again on load (TIED_NOTE,
checked by make()).

`--check DIR` loads DIR with `BltForCausalLM.from_pretrained` (float32, eager), runs every
input_ids_{i}.npy (with patch_lengths_{i}.npy unless the config patches by entropy in the forward),
prints max |d| against logits_{i}.npy and exits 1 when one exceeds --tol.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers.models.blt import modeling_blt

TEXTS = (
    b"The byte latent transformer reads raw bytes and groups them into patches. A small "
    b"model guesses the next byte; where it's unsure, a new patch begins, so hard parts of "
    b"a text get more compute than easy ones. Long words are cheap!",
    "def caf\u00e9_total(items):\n    # Sum the prices \u2014 \u00fcber simple, 50\u20ac max.\n"
    "    total = 0\n    for name, price in items:\n        if price > 50:\n"
    "            raise ValueError(f\"{name}: {price} \u20ac\")\n        total += price\n"
    "    return total  # \u65e5\u672c \u2713 done \u00e9t\u00e9".encode("utf-8"),
)
BOS, OFFSET, VOCAB = 1, 4, 260
# compute_hash_embeddings' primes (a list local to that function): function f uses PRIMES[f].
PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767,
          3628273133, 2860486313, 5463458053, 3367900313)
TIED_NOTE = "a tied checkpoint stores lm_head.weight, not model.local_encoder.embed_tokens.weight"


def rope(theta: float) -> dict:
  return {"rope_type": "default", "rope_theta": theta}


def entropy_config(threshold: float) -> transformers.BltConfig:
  return transformers.BltConfig(
      vocab_size=VOCAB, patch_in_forward=True, patching_mode="entropy", patch_size=4,
      patching_threshold=threshold, max_patch_length=None, local_attention_window_len=16,
      cross_attn_k=2, encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
      encoder_hash_byte_group_vocab=1009, encoder_hash_byte_group_nb_functions=1,
      tie_word_embeddings=False, attn_implementation="eager",
      encoder_config=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                          num_hidden_layers=1, intermediate_size=96, cross_attn_all_layers=False,
                          cross_attn_k=2, hidden_size_global=64, rms_norm_eps=1e-5,
                          rope_parameters=rope(5e5)),
      decoder_config=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                          num_hidden_layers=2, intermediate_size=80, cross_attn_all_layers=True,
                          cross_attn_k=2, hidden_size_global=64, rms_norm_eps=1e-5,
                          rope_parameters=rope(5e5)),
      global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                         intermediate_size=160, rms_norm_eps=1e-5, rope_parameters=rope(1e4)),
      patcher_config=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                          num_hidden_layers=2, intermediate_size=64, sliding_window=24,
                          rms_norm_eps=1e-5, rope_parameters=rope(2e4)))


def static_config() -> transformers.BltConfig:
  return transformers.BltConfig(
      vocab_size=VOCAB, patch_in_forward=False, patching_mode="static", patch_size=4,
      max_patch_length=None, local_attention_window_len=16, cross_attn_k=2,
      encoder_hash_byte_group_size=[3, 5, 8], encoder_hash_byte_group_vocab=1009,
      encoder_hash_byte_group_nb_functions=2, tie_word_embeddings=True,
      attn_implementation="eager",
      encoder_config=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                          num_hidden_layers=2, intermediate_size=64, cross_attn_all_layers=False,
                          cross_attn_k=2, hidden_size_global=48, rms_norm_eps=1e-5,
                          rope_parameters=rope(5e5)),
      decoder_config=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                          num_hidden_layers=2, intermediate_size=88, cross_attn_all_layers=False,
                          cross_attn_k=2, hidden_size_global=48, rms_norm_eps=1e-5,
                          rope_parameters=rope(5e5)),
      global_config=dict(hidden_size=48, num_attention_heads=2, num_hidden_layers=2,
                         intermediate_size=112, rms_norm_eps=1e-5, rope_parameters=rope(1e4)))


def order_one(model, seed: int):
  """Overwrites every parameter so that logits and entropies are order one."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # a tied lm_head is the embedding, listed once
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "encoder_hash_tok_embedding" in name:
        p.normal_(0.0, 0.5)
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model


def tiny_model(config, seed: int):
  torch.manual_seed(seed)
  model = order_one(transformers.BltForCausalLM(config), seed).eval()
  subs = [model.config] + [getattr(model.config, k) for k in
                           ("encoder_config", "decoder_config", "global_config", "patcher_config")]
  assert all(c._attn_implementation == "eager" for c in subs)
  return model


def token_ids(text: bytes) -> torch.Tensor:
  return torch.tensor([[BOS] + [b + OFFSET for b in text]], dtype=torch.int64)


def run_patcher(model, ids):
  """(entropies float32 [1, N], patch lengths int64 [1, P]) of transformers' patcher."""
  cfg = model.config
  with torch.no_grad():
    entropies, lengths, _ = model.model.patcher(
        ids, patch_size=cfg.patch_size, threshold=cfg.patching_threshold,
        max_patch_length=cfg.max_patch_length)
  return entropies.float(), lengths.long()


def static_lengths(n_tokens: int, patch_size: int) -> torch.Tensor:
  """blt-jax's static patches in transformers' convention (BOS alone, trailing empty patch)."""
  starts = [0] + [i + 1 for i in range(n_tokens - 1) if i % patch_size == 0]
  if (n_tokens - 1) % patch_size == 0:
    starts.append(n_tokens)  # the byte after the input would start a patch
  ends = starts[1:] + [n_tokens]
  return torch.tensor([[e - s for s, e in zip(starts, ends)]], dtype=torch.int64)


def hash_ids(model, ids) -> np.ndarray:
  """int64 [F, N] raw bucket ids; asserts they rebuild transformers' encoder embeddings."""
  cfg, enc = model.config, model.model.local_encoder
  table = model.model.encoder_hash_tok_embedding
  rows, emb = [], enc.embed_tokens(ids)
  for f in range(cfg.encoder_hash_byte_group_nb_functions):
    for n in cfg.encoder_hash_byte_group_size:
      vocab = cfg.encoder_hash_byte_group_vocab
      h = modeling_blt.byte_group_hash_function(ids, n, PRIMES[f], vocab)
      emb = emb + table(h + len(rows) * vocab)
      rows.append(h[0])
  want = modeling_blt.compute_hash_embeddings(
      ids, enc, table, cfg.encoder_hash_byte_group_nb_functions, cfg.encoder_hash_byte_group_size,
      cfg.encoder_hash_byte_group_vocab)
  assert torch.equal(emb, want), "hash ids do not rebuild compute_hash_embeddings"
  return torch.stack(rows).numpy()


def logits_of(model, ids, patch_lengths=None) -> torch.Tensor:
  kw = {} if patch_lengths is None else {"patch_lengths": patch_lengths}
  with torch.no_grad():  # use_cache=False: BltModel's cache creation fails on a BltConfig
    return model(ids, use_cache=False, **kw).logits.float()


def histogram(lengths: torch.Tensor) -> dict:
  values, counts = np.unique(lengths.numpy(), return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def has_all_lengths(lengths: torch.Tensor) -> bool:
  body = lengths[0, 1:].tolist()  # not the BOS patch
  return {1, 2, 3} <= set(body) and max(body) >= 4


def pick_threshold(models, ids_list) -> float:
  """The threshold, between two neighbouring entropies of text 0 from its 45th to 65th
  percentile, farthest from every entropy of `models` (the float32 model and its bf16 rounding)
  on all texts, whose patches have lengths 1, 2, 3 and >= 4 in every text."""
  ents = [run_patcher(m, ids)[0][0, 1:] for m in models for ids in ids_list]
  every = torch.cat(ents).numpy()
  pool = np.sort(ents[0].numpy())
  lo, hi = int(0.45 * len(pool)), int(0.65 * len(pool))
  mids = (pool[lo:hi] + pool[lo + 1:hi + 1]) / 2
  for threshold in sorted(mids, key=lambda t: -np.abs(every - t).min()):
    for m in models:
      m.config.patching_threshold = float(threshold)
    if all(has_all_lengths(run_patcher(m, ids)[1]) for m in models for ids in ids_list):
      return float(threshold)
  raise RuntimeError("no threshold gives patches of 1, 2, 3 and >= 4 bytes")


def entropy_margin(entropies: torch.Tensor, threshold: float) -> float:
  return float((entropies[0, 1:] - threshold).abs().min())


def write_refs(model, folder: Path, ids_list, static: bool):
  for i, ids in enumerate(ids_list):
    np.save(folder / f"input_ids_{i}.npy", ids.numpy())
    np.save(folder / f"hash_ids_{i}.npy", hash_ids(model, ids))
    if static:
      lengths = static_lengths(ids.shape[1], model.config.patch_size)
      logits = logits_of(model, ids, lengths)
    else:
      entropies, lengths = run_patcher(model, ids)
      logits = logits_of(model, ids)
      same = logits_of(model, ids, lengths)
      assert torch.equal(logits, same), "the forward used other patches than the patcher's"
      np.save(folder / f"entropies_{i}.npy", entropies.numpy())
      print(f"  text {i}: entropy margin to threshold "
            f"{entropy_margin(entropies, model.config.patching_threshold):.2e}")
    assert int(lengths.sum()) == ids.shape[1]
    np.save(folder / f"patch_lengths_{i}.npy", lengths.numpy())
    np.save(folder / f"logits_{i}.npy", logits.numpy())
    print(f"  text {i}: N={ids.shape[1]} P={lengths.shape[1]} trailing0={int(lengths[0, -1]) == 0}"
          f" lengths histogram {histogram(lengths)}")


def save(model, folder: Path, **kw):
  model.save_pretrained(folder, safe_serialization=True, **kw)
  (folder / "generation_config.json").unlink(missing_ok=True)


def stored_keys(folder: Path) -> set:
  keys = set()
  for f in folder.glob("*.safetensors"):
    with safe_open(f, "pt") as st:
      keys |= set(st.keys())
  return keys


def round_bf16(model):
  """bf16-rounded parameters, float32 compute (rotary buffers intact)."""
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.bfloat16().float())
  return model


def make(out: Path):
  ids_list = [token_ids(t) for t in TEXTS]

  print("blt_tiny_entropy")
  model = tiny_model(entropy_config(threshold=1.0), seed=0)
  assert model.model.config is model.config
  threshold = pick_threshold([model, round_bf16(copy.deepcopy(model))], ids_list)
  print(f"  patching_threshold {threshold!r}")
  folder = out / "blt_tiny_entropy"
  save(model, folder)
  write_refs(model, folder, ids_list, static=False)

  print("blt_tiny_bf16")
  folder = out / "blt_tiny_bf16"
  save(copy.deepcopy(model).to(torch.bfloat16), folder)
  write_refs(round_bf16(model), folder, ids_list, static=False)

  print("blt_tiny_static")
  model = tiny_model(static_config(), seed=1)
  assert model.lm_head.weight is model.model.local_encoder.embed_tokens.weight
  folder = out / "blt_tiny_static"
  save(model, folder, max_shard_size="300KB")
  assert (folder / "model.safetensors.index.json").exists()
  assert len(list(folder.glob("model-*.safetensors"))) >= 2
  keys = stored_keys(folder)
  assert "lm_head.weight" in keys, TIED_NOTE
  assert "model.local_encoder.embed_tokens.weight" not in keys, TIED_NOTE
  write_refs(model, folder, ids_list, static=True)

  for name in ("blt_tiny_entropy", "blt_tiny_bf16", "blt_tiny_static"):
    for f in sorted((out / name).iterdir()):
      print(f"{f.stat().st_size:>9} {f}")


def check(folder: Path, tol: float) -> int:
  model = transformers.BltForCausalLM.from_pretrained(
      folder, attn_implementation="eager", dtype=torch.float32).eval()
  # Entropy patching in the forward needs the patcher; without it use the saved lengths too.
  own_patches = model.config.patching_mode == "entropy" and model.config.patch_in_forward
  paths = sorted(folder.glob("input_ids_*.npy"))
  ok = bool(paths)
  for path in paths:
    i = path.stem.split("_")[-1]
    ids = torch.from_numpy(np.load(path))
    lengths_file = folder / f"patch_lengths_{i}.npy"
    lengths = None
    if not own_patches and lengths_file.exists():
      lengths = torch.from_numpy(np.load(lengths_file))
    got = logits_of(model, ids, lengths).numpy()
    d = float(np.abs(got - np.load(folder / f"logits_{i}.npy")).max())
    ok = ok and d <= tol  # False for NaN too
    print(f"text {i}: max |d| {d:.3e}" + ("" if lengths is None else " (explicit patch_lengths)"))
  if not paths:
    print(f"no input_ids_*.npy in {folder}")
  return 0 if ok else 1


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures"))
  parser.add_argument("--check", metavar="DIR", help="compare DIR's logits with transformers'")
  parser.add_argument("--tol", type=float, default=1e-4)
  args = parser.parse_args()
  if args.check:
    sys.exit(check(Path(args.check), args.tol))
  make(Path(args.out))


if __name__ == "__main__":
  main()
