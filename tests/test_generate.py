"""Generation: the cached, batched decoder against the uncached reference (the whole window
recomputed for every byte), for every model kind and patching rule; rows independent of
their batch mates; the context rule past the window; sampling; stop; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import blt_jax
from blt_jax import config_files, decode, entropy, jobs, models, patching, sampling
from blt_jax.api import LanguageModel
from blt_jax.constants import BOS
from blt_jax.errors import UserError
from blt_jax.patcher import DocumentPatcher
from blt_jax.resolved import PatchRule, Resolved
from conftest import launch

T = 256  # the window of the random models: 200+ bytes fit in it
BLT = dict(kind="blt", enc_dim=32, enc_layers=1, enc_heads=2, enc_window=24, global_dim=64,
           global_layers=2, global_heads=2, dec_dim=32, dec_layers=1, dec_heads=2,
           dec_window=24, cross_attn_k=2, cross_heads=2, hash_buckets=512, max_patches=96)
PROMPT = b"def main(argv):\n  "


def random_lm(fields: dict, rule: PatchRule | None = None, entropy_lm=None, seed: int = 0,
              seq_len: int = T) -> LanguageModel:
  config = ml_collections.ConfigDict({"data": {"seq_len": seq_len}})
  patcher = None
  if rule is not None:  # the model's slots are the rule's, as a run records them
    fields = dict(fields, max_patches=rule.max_patches)
    patcher = DocumentPatcher(rule, entropy_lm)
  return LanguageModel(models.build(fields, seed), config, 0, Resolved(fields, rule), patcher)


@pytest.fixture(scope="module")
def entropy_lm():
  return random_lm(dict(kind="byte_lm", dim=32, n_layers=2, n_heads=2), seed=7)


@pytest.fixture(scope="module")
def threshold(entropy_lm):
  """A global threshold giving patches of about 3 bytes on the prompt's kind of text."""
  h = entropy.document_entropies(entropy_lm, PROMPT * 12)
  return patching.calibrate_threshold(h[None], target_patch_size=3.0, rtol=float("inf"))


def rule_of(name: str, threshold: float) -> PatchRule:
  return {"global": PatchRule("global", 96, threshold, entropy_workdir="-"),
          "monotonic": PatchRule("monotonic", 96, 0.05, max_patch_len=6, entropy_workdir="-"),
          "static": PatchRule("static", 96, patch_size=4),
          "space": PatchRule("space", 40)}[name]  # few slots: surplus patches fold


CASES = {"byte_lm": (dict(kind="byte_lm", dim=32, n_layers=2, n_heads=2, window=40), None),
         "qwen3": (dict(kind="qwen3"), None),
         "blt global": (BLT, "global"),
         "blt monotonic, max_patch_len": (BLT, "monotonic"),
         "blt static": (dict(BLT, pooling="mean", dec_dim=48), "static"),
         "blt space, folding, no hash": (dict(BLT, hash_ngrams=()), "space")}


@pytest.mark.parametrize("case", CASES)
def test_cached_greedy_equals_the_uncached_reference(case, entropy_lm, threshold):
  fields, rule_name = CASES[case]
  rule = rule_of(rule_name, threshold) if rule_name else None
  lm = random_lm(fields, rule, entropy_lm if rule is not None and rule.uses_entropy else None)
  assert len(PROMPT) + 220 < T  # all within the window
  for options in (dict(max_bytes=220), dict(max_bytes=100, temperature=1.0, seed=5)):
    (got, got_logp), = lm.generate_with_logprobs([PROMPT], **options)
    (ref, ref_logp), = lm.generate_with_logprobs([PROMPT], cached=False, **options)
    assert got == ref
    np.testing.assert_allclose(got_logp, ref_logp, atol=1e-4, rtol=0)
  assert len(set(got)) > 20  # drawn at temperature 1: a varied text
  if rule is not None and rule.mode != "static":  # patches of several lengths here
    lengths = lm.patcher(PROMPT + got, lm.windows(PROMPT + got))["patch_lengths"][0]
    assert len(set(lengths[lengths > 0][:-1])) >= 3  # the last holds padding (or folds)


def test_prefill_then_decode_steps_equal_the_window_forward():
  """Every kind: `prefill` of a window's first n positions (whatever the window holds
  after them), then one `decode_step` per position, gives the logits of the window's
  forward at every position. Row 0 prefills nothing (all steps, from BOS); in row 1 the
  last prefilled byte starts a patch, in row 2 it does not (BLT with random patch
  starts, folding included)."""
  rng = np.random.default_rng(0)
  rows, T_ = 3, 40
  inputs = np.concatenate([np.full((rows, 1), BOS), rng.integers(0, 256, (rows, T_ - 1))], 1)
  starts = rng.random((rows, T_)) < 0.35
  starts[1, 16], starts[2, 26] = True, False
  n = np.array([0, 17, 27])
  later_BxT = np.arange(T_) >= n[:, None]
  for fields in [dict(kind="byte_lm", dim=32, n_layers=2, n_heads=2, window=8),
                 dict(kind="qwen3"), dict(BLT, enc_window=8, dec_window=8, max_patches=9),
                 dict(BLT, pooling="mean", dec_dim=48, hash_ngrams=(), max_patches=20)]:
    model = models.build(fields)
    batch = {"inputs": jnp.asarray(inputs)}
    if model.needs_patches:
      batch["patch_lengths"] = patching.patch_lengths(jnp.asarray(starts), fields["max_patches"])
    want = np.asarray(model.logits(batch))
    graphdef, state = nnx.split(model)

    @jax.jit
    def steps(state):
      m = nnx.merge(graphdef, state)
      ids = jnp.where(later_BxT, 7, jnp.asarray(inputs))  # garbage after n
      logits_BxTx256, cache = m.prefill(ids, jnp.asarray(n), jnp.asarray(starts | later_BxT))

      def step(cache, x):
        ids_B, t, starts_B = x
        logits_Bx256, stepped = m.decode_step(cache, ids_B, jnp.full((rows,), t),
                                              starts_B if m.needs_patches else None)
        moves_B = jnp.asarray(n) <= t  # rows still in their prefilled part keep the cache
        keep = lambda new, old: jnp.where(
            jnp.repeat(moves_B, new.shape[0] // rows).reshape((-1,) + (1,) * (new.ndim - 1)),
            new, old)
        return jax.tree.map(keep, stepped, cache), logits_Bx256
      xs = (jnp.asarray(inputs.T), jnp.arange(T_), jnp.asarray(starts.T))
      return logits_BxTx256, jax.lax.scan(step, cache, xs)[1].transpose(1, 0, 2)
    prefilled, stepped = map(np.asarray, steps(state))
    got = np.where(later_BxT[..., None], stepped, prefilled)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=str(fields))


def test_trained_blt_past_its_window_follows_the_context_rule(blt_run):
  """The tiny trained BLT (window 64): 150 new bytes slide the window three times; the
  cached decoder and the reference agree, and so does every row of a batch with prompts of
  other lengths (their windows slide at other steps)."""
  lm = blt_jax.load(blt_run / "patch3")
  assert lm.seq_len == 64
  long = b"class Parser(object):\n    def __init__(self, text):\n        self.text = text\n"
  prompts = [b"import os\n", b"", long]  # the last is longer than the window
  (ref, ref_logp), = lm.generate_with_logprobs(prompts[:1], max_bytes=150, cached=False)
  batch = lm.generate_with_logprobs(prompts, max_bytes=150)
  assert batch[0][0] == ref
  np.testing.assert_allclose(batch[0][1], ref_logp, atol=1e-4, rtol=0)
  for prompt, (text, _) in zip(prompts, batch):
    assert lm.generate([prompt], max_bytes=150) == [text]
  drawn = dict(max_bytes=90, temperature=1.0, seed=3)
  (ref, ref_logp), = lm.generate_with_logprobs([long], cached=False, **drawn)
  (got, got_logp), = lm.generate_with_logprobs([long], **drawn)
  assert got == ref
  np.testing.assert_allclose(got_logp, ref_logp, atol=1e-4, rtol=0)


def test_rows_do_not_depend_on_batch_mates_when_sampling(entropy_lm, threshold):
  lm = random_lm(BLT, rule_of("global", threshold), entropy_lm)
  prompts = [b"x = 1\n", PROMPT, b"", b"for i in range(3):\n"]
  options = dict(max_bytes=40, temperature=0.9, top_k=40, top_p=0.95)
  batch = lm.generate(prompts, seed=11, **options)
  assert batch == lm.generate(prompts, seed=11, **options)  # reproducible
  assert batch != lm.generate(prompts, seed=12, **options)
  for i, prompt in enumerate(prompts):  # row i draws with seed + i
    assert lm.generate([prompt], seed=11 + i, **options) == [batch[i]]
  (ref, _), = lm.generate_with_logprobs(prompts[1:2], seed=12, cached=False, **options)
  assert ref == batch[1]  # the reference draws the same bytes with the same keys


def test_stop_ends_a_row_at_the_stop_bytes(entropy_lm):
  lm = random_lm(dict(kind="byte_lm", dim=32, n_layers=2, n_heads=2), seed=3)
  free = lm.generate([PROMPT], max_bytes=80)[0]
  stop = free[30:32]
  cut = free.index(stop) + len(stop)
  assert lm.generate([PROMPT, b"abc"], max_bytes=80, stop=stop)[0] == free[:cut]
  straddling = PROMPT[-1:] + free[:1]  # prompt's last byte + the first output byte: the
  # stop is looked for in the output only, so this does not end the row at byte 1
  want = free[:free.index(straddling) + 2] if straddling in free else free
  assert lm.generate([PROMPT], max_bytes=80, stop=straddling)[0] == want


def test_context_rule_is_the_entropy_cache_windows():
  """The window that predicts byte q starts where the entropy cache's chunk that keeps
  byte q starts (an independent table)."""
  for W in (8, 64, 100):
    table = entropy.chunk_table(np.array([0, 10 * W]), W)
    for ctx, _, keep_from, keep_to in table:
      for q in range(keep_from, keep_to):
        assert decode.context_start(q, W) == ctx
        assert 0 <= q - ctx <= W - 1


def test_next_start_decides_as_patch_starts_over_the_window():
  rng = np.random.default_rng(0)
  h = rng.random((6, 50)).astype(np.float32) * 3
  data = rng.choice(np.frombuffer(b"ab1 .\n\xc3\xa9", np.uint8), (6, 50))
  ids = np.concatenate([np.full((6, 1), 256), data[:, :-1]], axis=1)  # input at position t
  for mode, kw in [("global", dict(threshold=1.5)), ("monotonic", dict(threshold=0.3)),
                   ("static", dict(patch_size=3)), ("space", {})]:
    for max_len in (None, 4):
      want = np.asarray(patching.patch_starts(h, mode=mode, data=data, max_patch_len=max_len,
                                              **kw))
      since, prev_h, prev_id, got = np.zeros(6, np.int32), np.zeros(6, np.float32), ids[:, 0], []
      for t in range(50):
        starts, since = patching.next_start(
            np.full(6, t), mode=mode, max_patch_len=max_len, h_B=h[:, t], prev_h_B=prev_h,
            prev_byte_B=ids[:, t], prev2_byte_B=prev_id, since_B=since, **kw)
        prev_h, prev_id = h[:, t], ids[:, t]
        got.append(np.asarray(starts))
      np.testing.assert_array_equal(np.stack(got, 1), want, err_msg=f"{mode} {max_len}")


@pytest.mark.parametrize("V", [256, 1000])  # bytes, and a BPE vocabulary
def test_filtered_logits_keep_the_top_k_and_the_nucleus(V):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, V)).astype(np.float32) * 3
  kept = lambda x: np.isfinite(np.asarray(x))
  k5 = kept(sampling.filtered_logits(logits, 1.0, 5, 1.0))
  assert (k5.sum(1) == 5).all()
  assert all(set(np.flatnonzero(k5[i])) == set(np.argsort(-logits[i])[:5]) for i in range(4))
  for i, row in enumerate(kept(sampling.filtered_logits(logits, 1.0, 0, 0.6))):
    p = np.exp(logits[i] - logits[i].max())
    p /= p.sum()
    order = np.argsort(-p)
    n = np.searchsorted(np.cumsum(p[order]), 0.6) + 1  # the smallest set with mass >= 0.6
    assert set(np.flatnonzero(row)) == set(order[:n])
  assert kept(sampling.filtered_logits(logits, 1.0, 0, 1.0)).all()


@pytest.mark.parametrize("bad, needle", [
    (dict(max_bytes=0), "max_bytes must be an integer >= 1"),
    (dict(top_k=1.5), "top_k must be an integer >= 0"), (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"), (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(prompts="text"), "prompts must be a list of bytes")])
def test_bad_generation_options_are_one_line_errors(bad, needle):
  lm = random_lm(dict(kind="byte_lm", dim=16, n_layers=1, n_heads=2))
  args = dict(prompts=[b"x"], max_bytes=4) | bad
  with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("]", r"\]")):
    lm.generate(args.pop("prompts"), **args)


def test_entropy_model_with_a_shorter_window_is_refused(entropy_lm, threshold):
  short = random_lm(dict(kind="byte_lm", dim=32, n_layers=2, n_heads=2), seq_len=T // 2)
  lm = random_lm(BLT, rule_of("global", threshold), short)
  with pytest.raises(UserError, match=r"entropy model's window \(128\) to be at least"):
    lm.generate([b"x"], max_bytes=4)


def test_empty_prompt_is_bos_alone():
  lm = random_lm(dict(kind="byte_lm", dim=16, n_layers=1, n_heads=2))
  out = lm.generate([b""], max_bytes=5)[0]
  want = int(np.argmax(lm.next_byte_logprobs(b"\0")[0]))  # row 0: given BOS only
  assert len(out) == 5 and out[0] == want


def test_sample_mode_streams_and_batches_a_prompts_file(blt_run, tmp_path, capfdbinary):
  prompts = tmp_path / "prompts.txt"
  prompts.write_bytes(b"def f(x):\n\nimport sys\n")
  workdir = blt_run / "patch3"
  base = ["--config=configs/patch3.py:size=tiny", f"--workdir={workdir}", "--config.mode=sample",
          "--config.sample.temperature=0.0", "--config.sample.max_bytes=20"]
  batched = launch(*base, f"--config.sample.prompts_file={prompts}",
                   "--config.sample.batch_size=2")
  assert batched.returncode == 0, batched.stderr[-2000:]
  lm = blt_jax.load(workdir)
  texts = lm.generate([b"def f(x):", b"", b"import sys"], max_bytes=20)
  want = b"".join(f"--- {i + 1} ---\n".encode() + p + t + b"\n" for i, (p, t) in
                  enumerate(zip([b"def f(x):", b"", b"import sys"], texts)))
  assert batched.stdout.encode("utf-8", "surrogateescape") == want or batched.stdout == \
      want.decode("utf-8", "replace")
  config = lambda **fields: config_files.load("configs.patch3:size=tiny", {
      "mode": "sample", "sample.temperature": 0.0, "sample.max_bytes": 20, **fields})
  capfdbinary.readouterr()
  jobs.run(config(**{"sample.prompt": "def f(x):"}), workdir)  # one prompt, streamed
  assert capfdbinary.readouterr().out == b"def f(x):" + texts[0] + b"\n"
  with pytest.raises(UserError, match="cannot read sample.prompts_file"):
    jobs.run(config(**{"sample.prompts_file": str(tmp_path / "none.txt")}), workdir)
