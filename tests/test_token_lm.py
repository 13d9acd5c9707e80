"""The BPE-token baseline: its bpb is its token NLL over the held-out bytes its tokens
cover (checked against a count made outside the train loop), its vocabulary never sees a
held-out document, and the matched-compute sweeps meet their FLOPs tolerances."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

import blt_jax
from blt_jax import bpe, models, splits as splits_lib
from blt_jax.errors import UserError
from blt_jax.jobs import sample, sweep, train as train_job
from blt_jax.loss import summarize, token_stats
from configs import flops_match
from configs.sweeps import budget, tokens_vs_patches
from tests.conftest import tiny_config

T = 64


@pytest.fixture(scope="module")
def token_run(small_corpus, tmp_path_factory):
  """A tiny BPE-token run on the small corpus, every held-out byte scored."""
  workdir = tmp_path_factory.mktemp("token_run") / "run"
  config = tiny_config("token_lm", **{"data.corpus": str(small_corpus), "data.seq_len": T,
                                      "model.vocab_size": 512, "train.steps": 30,
                                      "eval.max_bytes": 0, "ckpt.every_steps": 30})
  train_job.run(config, workdir, progress=False)
  return workdir, config


def independent_bpb(workdir, corpus_root) -> tuple[float, int]:
  """Total token NLL in bits over the held-out bytes, counted here: the held-out files
  read from disk, cut into T-byte windows, tokenized by `tokenizers` itself, the windows'
  tokens run through the restored model (each row BOS-led, zeros after its tokens: a
  causal model's rows before them do not see them), numpy log-softmax."""
  held_out = json.loads((workdir / "split.json").read_text())["held_out"]
  tokenizer = Tokenizer.from_file(str(workdir / "tokenizer.json"))
  V = tokenizer.get_vocab_size()
  rows, n_bytes = [], 0
  for name in held_out:
    raw = (corpus_root / name).read_bytes()
    n_bytes += len(raw)
    rows += [tokenizer.encode(raw[lo:lo + T].decode("latin-1"), add_special_tokens=False).ids
             for lo in range(0, len(raw), T)]
  inputs = np.zeros((len(rows), T), np.int32)
  for i, ids in enumerate(rows):
    inputs[i, :len(ids)] = [V] + ids[:-1]
  logits = np.asarray(blt_jax.load(workdir).model(jax.numpy.asarray(inputs)), np.float64)
  nll_bits = 0.0
  for i, ids in enumerate(rows):
    x = logits[i, :len(ids)] - logits[i, :len(ids)].max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll_bits -= logp[np.arange(len(ids)), ids].sum() / np.log(2)
  return nll_bits / n_bytes, n_bytes


def test_bpb_equals_an_independent_count(token_run, small_corpus):
  workdir, _ = token_run
  result = json.loads((workdir / "eval.json").read_text())
  bpb, n_bytes = independent_bpb(workdir, small_corpus)
  assert result["bytes"] == n_bytes  # every held-out byte, each once, as the byte models
  assert result["bpb"] == pytest.approx(bpb, rel=1e-5)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["kind"] == "token_lm" and 1.5 < summary["mean_patch_size"] < 6
  flops = summary["train_flops_per_byte"]
  assert summary["infer_flops_per_byte"] == pytest.approx(flops / 3)


def test_eval_mode_scores_the_same_bytes(token_run, capsys):
  workdir, config = token_run
  before = json.loads((workdir / "eval.json").read_text())
  blt_jax.jobs.evaluate.run(config, workdir)
  after = json.loads((workdir / "eval.json").read_text())
  assert after["bytes"] == before["bytes"] and after["bpb"] == pytest.approx(before["bpb"])


def test_a_token_model_has_no_next_byte_probabilities(token_run):
  lm = blt_jax.load(token_run[0])
  for use in (lambda: lm.next_byte_logprobs(b"def f():"),
              lambda: lm.generate_with_logprobs([b"def "], max_bytes=4)):
    with pytest.raises(UserError, match="BPE-token model"):
      use()


def greedy_reference(workdir, prompt: bytes, max_bytes: int) -> bytes:
  """Greedy token generation without caches, counted here: the prompt tokenized by
  `tokenizers`, each next token the argmax of a whole forward pass over BOS and the
  window of the last tokens (windows of the run's token slots S, sliding by 3S/4 when
  full), spelt by the tokenizer's own decode, cut at max_bytes."""
  lm = blt_jax.load(workdir)
  tokenizer = Tokenizer.from_file(str(workdir / "tokenizer.json"))
  V, S = tokenizer.get_vocab_size(), lm.resolved.model["max_tokens"]
  ids = tokenizer.encode(prompt.decode("latin-1"), add_special_tokens=False).ids
  n_prompt, out = len(ids), b""
  while len(out) < max_bytes:
    q = len(ids)
    start = 0 if q < S else ((q - S) // (3 * S // 4) + 1) * (3 * S // 4)
    inputs = np.asarray([[V] + ids[start:]], np.int32)
    ids.append(int(np.argmax(np.asarray(lm.model(jax.numpy.asarray(inputs)))[0, -1])))
    out = tokenizer.decode(ids[n_prompt:]).encode("latin-1")
  return out[:max_bytes]


PROMPTS = [b"def ", b"", b"import os\nclass A:\n    def __init__(self, x):\n"
           b"        self.x = [x for x in range(10)]  # a prompt longer than the slots\n" * 3]


def test_greedy_token_generation_equals_the_uncached_reference(token_run):
  workdir, _ = token_run
  lm = blt_jax.load(workdir)
  assert len(lm.bpe.encode_batch([PROMPTS[2]])[0][0]) > lm.resolved.model["max_tokens"]
  streamed = {i: b"" for i in range(len(PROMPTS))}
  def on_bytes(i, new):
    streamed[i] += new
  out = lm.generate(PROMPTS, max_bytes=150, on_bytes=on_bytes)
  for i, prompt in enumerate(PROMPTS):
    assert out[i] == greedy_reference(workdir, prompt, 150), i
    assert streamed[i] == out[i]


def test_token_generation_rows_are_independent_and_stop(token_run):
  lm = blt_jax.load(token_run[0])
  opts = dict(max_bytes=40, temperature=1.0, top_k=50, seed=3)
  together = lm.generate(PROMPTS, **opts)
  for i, prompt in enumerate(PROMPTS):
    assert lm.generate([prompt], **{**opts, "seed": 3 + i}) == [together[i]]
  assert len(set(together)) == len(PROMPTS) and all(len(t) == 40 for t in together)
  text = together[0]
  stop = text[5:7]  # a stop the row draws: the output ends just after its first match
  assert lm.generate([PROMPTS[0]], stop=stop, **opts) == [text[:text.index(stop) + 2]]


def test_sample_mode_continues_with_a_token_model(token_run, capsysbinary):
  workdir, _ = token_run
  config = tiny_config("token_lm", **{"mode": "sample", "sample.prompt": "def ",
                                      "sample.max_bytes": 24, "sample.temperature": 0.0})
  sample.run(config, workdir)
  assert capsysbinary.readouterr().out == b"def " + greedy_reference(workdir, b"def ", 24) + b"\n"


def test_the_vocabulary_never_saw_a_held_out_document(small_corpus, tmp_path):
  """A word repeated all over one held-out file would be merged into a token if the
  vocabulary had seen it; the same kind of word in a training file is."""
  root = tmp_path / "corpus"
  root.mkdir()
  for f in sorted(small_corpus.glob("*.py")):
    (root / f.name).write_bytes(f.read_bytes())
  names = sorted(f.name for f in root.iterdir())
  held = [n for n in names if splits_lib.is_held_out(n, 0.05)]
  trained = [n for n in names if n not in held]
  (root / held[0]).write_bytes(b" qzxvwk" * 2000)
  (root / trained[0]).write_bytes(b" jfyplg" * 2000)
  config = tiny_config("token_lm", **{"data.corpus": str(root), "data.seq_len": T,
                                      "model.vocab_size": 512})
  splits = splits_lib.Splits(config)
  assert held[0] in splits.split.held_out
  (tmp_path / "w").mkdir()
  train_transform, _, derived = train_job.token_windows(config, splits, tmp_path / "w")
  vocab = train_transform.bpe.tokenizer.get_vocab()
  assert " jfyplg" in vocab  # the canary of a training file is learnt ...
  assert not any(t in "qzxvwk" * 2 and len(t) > 1 for t in vocab)  # ... a held-out one never
  # the same vocabulary as `tokenizers` learns from the training files alone
  alone = bpe.BPE.train((splits.corpus.doc(int(d)) for d in splits.train_ids), 512)
  assert alone.tokenizer.get_vocab() == vocab
  assert derived["max_tokens"] < T  # slots for the training bytes per token, with slack


def test_token_windows_shift_and_cover_every_byte():
  bpe_ = bpe.BPE.train([b"def f(x):\n    return x + 1\n" * 50], 264)
  assert bpe_.vocab_size == 264
  raw = b"def f(y):\n    return y\n\xff\x00 caf\xc3\xa9"
  batch = {"targets": np.zeros((2, 48), np.int32), "mask": np.zeros((2, 48), np.float32)}
  batch["targets"][0, :len(raw)], batch["mask"][0, :len(raw)] = list(raw), 1
  out = bpe.TokenWindows(bpe_, 48)(batch)
  (ids, lengths), = bpe_.encode_batch([raw])
  n = len(ids)
  assert out["targets"][0, :n].tolist() == ids.tolist() and out["mask"][0].sum() == n
  assert out["inputs"][0, 0] == 264 and out["inputs"][0, 1:n].tolist() == ids[:-1].tolist()
  assert out["target_bytes"][0].sum() == len(raw) and out["target_bytes"][1].sum() == 0
  assert bpe_.decode(ids) == raw
  cut = bpe.TokenWindows(bpe_, 5)(batch)  # training slots: the tail past them is dropped
  assert cut["target_bytes"][0].tolist() == lengths[:5].tolist()


def test_token_stats_count_token_nll_over_bytes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  batch = {"targets": np.array([[1, 6, 0, 2], [3, 3, 0, 0]]),
           "mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32),
           "target_bytes": np.array([[2, 1, 4, 3], [5, 1, 0, 0]])}
  nll, correct, count = (float(v) for v in token_stats(jax.numpy.asarray(logits), batch))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = sum(-logp[b, t, batch["targets"][b, t]] for b in range(2) for t in range(4)
             if batch["mask"][b, t])
  right = sum(batch["target_bytes"][b, t] for b in range(2) for t in range(4)
              if batch["mask"][b, t] and logits[b, t].argmax() == batch["targets"][b, t])
  assert nll == pytest.approx(want, rel=1e-6) and count == 16 and correct == right
  assert summarize(nll, correct, count)["bpb"] == pytest.approx(want / 16 / np.log(2))


def test_stdlib_bytes_per_token_hold(private_cache):
  """The sweeps size the BPE rows for the bytes per token their vocabularies reach on the
  stdlib held-out windows: measured again here."""
  config = tiny_config("token_lm", **{"data.seq_len": 256})
  splits = splits_lib.Splits(config)
  batches, _ = splits.eval_batches(config, 0)
  texts = [t for b in batches for t in bpe.window_texts(b)]
  for vocab, expected in flops_match.STDLIB_BYTES_PER_TOKEN.items():
    tokenizer = bpe.for_training(splits.corpus, splits.train_ids, splits.split.key, vocab)
    assert bpe.bytes_per_token(tokenizer, texts) == pytest.approx(expected, rel=0.02)


def row_flops(config) -> float:
  """Analytic training FLOPs per byte of a sweep row at its expected patch / token size."""
  fields, T = config.model.to_dict(), config.data.seq_len
  if fields["kind"] == "blt":
    size = config.patching.target_patch_size or config.patching.patch_size
    return flops_match.blt_flops(fields, T, size)
  if fields["kind"] == "token_lm":
    bpt = flops_match.STDLIB_BYTES_PER_TOKEN[fields["vocab_size"]]
    return models.build({**fields, "max_tokens": T}).flops_per_byte(T, bpt)
  return models.build(fields).flops_per_byte(T)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_matched_sweeps_meet_their_tolerance(size):
  target = budget.target_flops(size)
  for module, tolerance, names in (
      (tokens_vs_patches, 0.10, ["bpe1k", "bpe4k", "byte", "patch3", "patch5", "patch8",
                                 "static4"]),
      (budget, 0.05, ["patch3", "patch5", "patch8", "patch12"])):
    config = module.get_config(f"size={size}")
    runs = sweep.expand(config.sweep)
    assert [r["name"] for r in runs] == names
    steps = set()
    for run in runs:
      row = sweep.variant_config(config.sweep, run)
      assert abs(row_flops(row) / target - 1) <= tolerance, (module.__name__, run["name"])
      steps.add(row.train.steps)
    assert len(steps) == 1  # every row trains on the same bytes
  globals_ = [sweep.variant_config(config.sweep, r).model.global_dim for r in runs]
  assert globals_ == sorted(globals_) and globals_[0] < globals_[-1]  # the global grows


def test_xla_flops_of_a_token_step_agree_with_analytic():
  """A token model's step runs its S token slots, not one per byte: with every slot a
  token (T / S bytes each), XLA's count matches the analytic one up to the masked half of
  attention and the optimizer."""
  config = tiny_config("token_lm", **{"data.seq_len": 128, "model.vocab_size": 512,
                                      "model.max_tokens": 32})
  fields = config.model.to_dict()
  analytic = models.build(fields).flops_per_byte(128, 128 / 32)
  ratio = sweep.xla_train_flops_per_byte(config, fields) / analytic
  assert 1.0 < ratio < 1.35, ratio
