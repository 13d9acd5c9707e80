"""The released BLT: BltForCausalLM folders read, run, fine-tuned and written back, against
references that transformers computed (scripts/make_blt_reference.py; no torch here)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import blt_jax
from blt_jax import entropy
from blt_jax.errors import UserError
from blt_jax.models import blt_hf, hash_embed, hf_files, vocab
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
NAMES = ("blt_tiny_entropy", "blt_tiny_static", "blt_tiny_bf16")
SEQ_LEN = 320  # bytes per window: each fixture text fits one


@pytest.fixture(scope="module")
def lms():
  return {name: blt_jax.from_pretrained(FIXTURES / name, seq_len=SEQ_LEN) for name in NAMES}


def text_of(folder: Path, i: int) -> tuple[np.ndarray, bytes]:
  ids = np.load(folder / f"input_ids_{i}.npy")[0]
  return ids, bytes((ids[1:] - vocab.BLT_OFFSET).tolist())


def raw_logits(lm, text: bytes, n: int) -> np.ndarray:
  """[n, 260]: the model's logits of BOS + text (+ one filler target), patched by `lm`."""
  text = text + b"\0"
  batch = lm.patcher(text, lm.windows(text))
  return np.asarray(lm.model.logits({k: jnp.asarray(v) for k, v in batch.items()}))[0, :n]


def byte_starts(token_lengths: np.ndarray, n: int) -> np.ndarray:
  """Whether each target byte 0..n-1 starts a patch, from transformers' token patches
  (token 0 is BOS; byte i is token i + 1; a trailing empty patch starts byte n - 1)."""
  starts = np.cumsum(np.concatenate([[0], token_lengths[:-1]]))[1:] - 1
  out = np.zeros(n, bool)
  out[starts[starts < n]] = True
  return out


@pytest.mark.parametrize("name", NAMES)
def test_logits_patches_and_entropies_match_transformers(lms, name):
  folder, lm = FIXTURES / name, lms[name]
  tol = 2e-2 if name.endswith("bf16") else 1e-4
  for i in (0, 1):
    ids, text = text_of(folder, i)
    n = len(ids)
    ref_Nx260 = np.load(folder / f"logits_{i}.npy")[0]
    assert np.abs(raw_logits(lm, text, n) - ref_Nx260).max() <= tol
    # The public API: row t is the log-softmax over the 256 byte logits for byte t.
    ref_logp = np.asarray(jax.nn.log_softmax(ref_Nx260[:, vocab.BLT_OFFSET:], axis=-1))
    assert np.abs(lm.next_byte_logprobs(text + b"\0") - ref_logp).max() <= tol
    # Patches: identical to those transformers' forward used.
    window = lm.patcher(text + b"\0", lm.windows(text + b"\0"))
    lengths = window["patch_lengths"][0]
    ours = np.zeros(SEQ_LEN, bool)
    ours[np.cumsum(lengths)[lengths > 0] - lengths[lengths > 0]] = True
    token_lengths = np.load(folder / f"patch_lengths_{i}.npy")[0]
    np.testing.assert_array_equal(ours[:n], byte_starts(token_lengths, n))
    if (folder / f"entropies_{i}.npy").exists():
      ref_h = np.load(folder / f"entropies_{i}.npy")[0]  # position t: entropy for byte t
      h = entropy.document_entropies(lm.patcher.lm, text)
      assert np.abs(h - ref_h[:len(text)]).max() <= 1e-4


@pytest.mark.parametrize("name", ("blt_tiny_entropy", "blt_tiny_static"))
def test_hash_ids_match_transformers(lms, name):
  folder, model = FIXTURES / name, lms[name].model
  for i in (0, 1):
    ids, text = text_of(folder, i)
    ours = np.concatenate([[256], np.frombuffer(text, np.uint8)])[None]  # BOS + bytes
    got = np.stack([np.asarray(b)[0] for b in model.hash_embed.bucket_ids(jnp.asarray(ours))])
    np.testing.assert_array_equal(got, np.load(folder / f"hash_ids_{i}.npy"))


def test_blt_hash_equals_wrapping_int64_arithmetic():
  """The 64-bit hash on 32-bit halves against numpy's int64 (which wraps the same way)."""
  tokens = np.random.default_rng(0).integers(0, 260, size=(2, 40))
  for prime in hash_embed.BLT_PRIMES[:4]:
    for n, buckets in ((3, 1009), (6, 500002), (8, (1 << 20) - 1)):
      padded = np.concatenate([np.zeros((2, n - 1), np.int64), tokens], axis=1)
      powers = np.array([pow(prime, j, 1 << 64) for j in range(n)], np.uint64).view(np.int64)
      with np.errstate(over="ignore"):
        h = sum(padded[:, j:j + 40] * powers[j] for j in range(n))
      got = np.asarray(hash_embed.blt_hash(jnp.asarray(tokens), n, prime, buckets))
      np.testing.assert_array_equal(got, h % buckets)
      assert (h < 0).any()  # the signed wrap-around is exercised


def test_changing_one_byte_moves_only_later_rows(lms):
  lm = lms["blt_tiny_entropy"]
  _, text = text_of(FIXTURES / "blt_tiny_entropy", 0)
  base = lm.next_byte_logprobs(text)
  for k in (0, 37, 150, len(text) - 1):
    changed = bytearray(text)
    changed[k] ^= 0x20
    other = lm.next_byte_logprobs(bytes(changed))
    np.testing.assert_allclose(other[:k + 1], base[:k + 1], atol=1e-5)  # its own row too
    if k < len(text) - 1:
      assert np.abs(other[k + 1:] - base[k + 1:]).max() > 1e-3


@pytest.mark.parametrize("name, options", [
    ("blt_tiny_entropy", dict(max_bytes=32, temperature=1.0, seed=3)),
    ("blt_tiny_static", dict(max_bytes=32))])
def test_generation_equals_the_uncached_reference(lms, name, options):
  lm = lms[name]
  prompts = [b"def forward(self, x):\n    ", b"The"]
  cached = lm.generate_with_logprobs(prompts, **options)
  reference = lm.generate_with_logprobs(prompts, cached=False, **options)
  for (out, logp), (ref_out, ref_logp) in zip(cached, reference):
    assert out == ref_out and len(out) == options["max_bytes"]
    assert np.abs(logp - ref_logp).max() <= 1e-4


@pytest.mark.parametrize("name", ("blt_tiny_entropy", "blt_tiny_static"))
def test_save_pretrained_writes_the_folder_back(lms, tmp_path, name):
  folder = FIXTURES / name
  lm = lms[name]
  lm.save_pretrained(tmp_path / "out", shard_bytes=400_000)
  original = hf_files.read_checkpoint(folder)
  written = hf_files.read_checkpoint(tmp_path / "out")
  if blt_hf.read_config(folder).tied:  # written untied: the embedding is the head
    original[blt_hf.TIED[0]] = original[blt_hf.TIED[1]]
  assert set(written) == set(original)
  for key, array in original.items():
    np.testing.assert_array_equal(np.asarray(written[key]), np.asarray(array), err_msg=key)
  assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
  before, after = blt_hf.read_config(folder), blt_hf.read_config(tmp_path / "out")
  assert dataclasses.replace(after, tied=before.tied) == before
  again = blt_jax.from_pretrained(tmp_path / "out", seq_len=SEQ_LEN)
  _, text = text_of(folder, 1)
  np.testing.assert_array_equal(again.next_byte_logprobs(text), lm.next_byte_logprobs(text))


def test_save_pretrained_in_bfloat16(lms, tmp_path):
  lm = lms["blt_tiny_entropy"]
  lm.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
  written = hf_files.read_checkpoint(tmp_path / "bf16")
  reference = hf_files.read_checkpoint(FIXTURES / "blt_tiny_bf16")  # transformers' own cast
  for key, array in reference.items():
    assert written[key].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(written[key], np.float32),
                                  np.asarray(array, np.float32), err_msg=key)


def copy_fixture(tmp_path, name="blt_tiny_entropy") -> Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def edit_config(folder: Path, edit):
  hf = json.loads((folder / "config.json").read_text())
  edit(hf)
  (folder / "config.json").write_text(json.dumps(hf))


def edit_tensors(folder: Path, edit):
  file = folder / "model.safetensors"
  tensors = dict(safetensors.numpy.load_file(file))
  edit(tensors)
  safetensors.numpy.save_file(tensors, file)


@pytest.mark.parametrize("edit, message", [
    (lambda hf: hf["encoder_config"].update(cross_attn_all_layers=True),
     "encoder_config.cross_attn_all_layers"),
    (lambda hf: hf["global_config"].update(num_key_value_heads=1),
     "global_config.num_key_value_heads"),
    (lambda hf: hf.update(patching_mode="space"), "patching_mode"),
    (lambda hf: hf["decoder_config"].update(hidden_act="gelu"), "decoder_config.hidden_act"),
    (lambda hf: hf.update(model_type="llama"), "not a BltForCausalLM folder"),
])
def test_unsupported_configuration_is_named(tmp_path, edit, message):
  folder = copy_fixture(tmp_path)
  edit_config(folder, edit)
  with pytest.raises(UserError, match=message):
    blt_jax.from_pretrained(folder)


def test_missing_and_mismatched_tensors_are_named(tmp_path):
  folder = copy_fixture(tmp_path)
  name = "model.local_decoder.cross_attn_layers.1.k_norm.weight"
  edit_tensors(folder, lambda t: t.pop(name))
  with pytest.raises(UserError, match=f"lacks tensor {name}"):
    blt_jax.from_pretrained(folder)
  folder = copy_fixture(tmp_path / "b")
  name = "model.global_transformer.layers.1.mlp.down_proj.weight"
  edit_tensors(folder, lambda t: t.update({name: t[name][:, :-1].copy()}))
  with pytest.raises(UserError, match=f"tensor {name} has shape"):
    blt_jax.from_pretrained(folder)
