"""Held-out numbers that can be trusted: the split is by source document and shared with
the entropy model, eval scores what the public API scores, padding and a byte's own value
never reach its prediction, and bf16 stays close to fp32."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import blt_jax
from blt_jax import api, data, entropy, models, splits
from blt_jax.evaluate import Evaluator
from blt_jax.jobs import entropy_model
from blt_jax.patcher import BatchPatcher
from tests.conftest import launch, tiny_config
from tests.test_blt_model import P, T, random_inputs, tiny_model

TEXT = (b"class Walker:\n    def __init__(self, top):\n        self.top = top  # caf\xc3\xa9\n"
        b"    def walk(self):\n        for name in sorted(os.listdir(self.top)):\n"
        b"            yield os.path.join(self.top, name)\n" * 3)


def doc_of(corpus: data.Corpus, table: np.ndarray) -> np.ndarray:
  """The document id of every window (start offset) of a window table."""
  return np.searchsorted(corpus.offsets, table[:, 0], side="right") - 1


def strip_piece(name: str) -> str:
  return re.sub(r"#\d+$", "", name)


def sides(corpus, train_ids, heldout_ids, seq_len=64):
  """(source documents with training windows, source documents with held-out windows)."""
  train = doc_of(corpus, data.window_table(corpus, train_ids, seq_len))
  held = doc_of(corpus, data.window_table(corpus, heldout_ids, seq_len))
  return ({strip_piece(corpus.names[d]) for d in train},
          {strip_piece(corpus.names[d]) for d in held})


# ----------------------------------------------------------------------------- the split

def test_no_source_document_has_bytes_on_both_sides(tmp_path):
  root = tmp_path / "c"
  root.mkdir()
  src = b"".join(p.read_bytes() for p in sorted(Path(json.__file__).parent.glob("*.py")))
  for i in range(60):  # long files: each spans many windows
    (root / f"f{i:02d}.py").write_bytes(src[:20000 + 997 * i])
  (root / "records.jsonl").write_text("".join(json.dumps({"text": f"record {i} " * (40 + i)})
                                              + "\n" for i in range(50)))
  config = tiny_config("entropy_model", **{"data.corpus": str(root),
                                           "data.eval_fraction": 0.2})
  s = splits.Splits(config)
  trained, held = sides(s.corpus, s.train_ids, s.heldout_ids)
  assert held and trained and not trained & held
  # every byte of a held-out document is held out: documents are whole
  held_bytes = sum(len(s.corpus.doc(d)) for d in s.heldout_ids)
  held_files = [n for n in held if not n.startswith("records.jsonl:")]
  assert held_files, "some long files are held out"
  assert held_bytes == sum(len((root / n).read_bytes()) for n in held_files) + sum(
      len(s.corpus.doc(s.corpus.names.index(n))) for n in held if n not in held_files)
  assert list(s.split.held_out) == sorted(held)
  # the record of the split is the same on a second read, and keyed by what is held out
  s.split.save(tmp_path)
  assert splits.Split.load(tmp_path) == s.split
  other = splits.Splits(tiny_config("entropy_model", **{"data.corpus": str(root),
                                                        "data.eval_fraction": 0.3})).split
  assert other.key != s.split.key and "documents this run holds out" in other.difference(
      s.split)


def test_stdlib_split_keeps_long_files_whole():
  corpus = data.prepare("stdlib")
  s = splits.Split.of(corpus, 0.05)
  held = set(s.held_out)
  is_held = np.array([n in held for n in corpus.names])
  trained, held_names = sides(corpus, np.flatnonzero(~is_held), np.flatnonzero(is_held))
  assert not trained & held_names and not any("#" in n for n in corpus.names)
  sizes = np.diff(corpus.offsets)
  assert sizes.max() > 65536  # files once cut into pieces are whole documents now
  assert sum(sizes[is_held]) > 100_000


def test_entropy_model_shares_the_blt_run_split(blt_run, small_corpus):
  run, ent = (splits.Split.load(blt_run / name) for name in ("patch3", "entropy"))
  assert run is not None and run == ent and run.corpus == str(small_corpus)
  corpus = data.prepare(str(small_corpus))
  ent_train = set(corpus.names) - set(ent.held_out)
  assert ent_train <= set(corpus.names) - set(run.held_out)  # inside the run's training set
  summary = json.loads((blt_run / "patch3" / "summary.json").read_text())
  assert summary["entropy_workdir"] == str(blt_run / "entropy")


def test_entropy_model_of_another_split_stops_the_run(blt_run, small_corpus, tmp_path):
  before = sorted(p.name for p in (blt_run / "entropy" / "checkpoints").iterdir())
  result = launch("--config=configs/patch3.py:size=tiny", f"--workdir={tmp_path / 'x'}",
                  "--config.data.eval_fraction=0.1", f"--config.data.corpus={small_corpus}",
                  f"--config.patching.entropy_workdir={blt_run / 'entropy'}")
  assert result.returncode == 2, result.stderr[-2000:]
  line = result.stderr.strip()
  assert len(line.splitlines()) == 1 and "trained on another split" in line, line
  assert "it trained on" in line and "documents this run holds out" in line
  x = tmp_path / "x"
  assert not (x / "metrics.jsonl").exists() and not list(x.glob("checkpoints/*"))  # untrained
  assert sorted(p.name for p in (blt_run / "entropy" / "checkpoints").iterdir()) == before


def test_sweep_entropy_model_of_another_corpus_stops_before_training(blt_run, small_corpus,
                                                                      tmp_path):
  result = launch("--config=configs/sweeps/patch_size.py:size=tiny",
                  f"--workdir={tmp_path / 'sw'}", "--config.sweep.only=patch3",
                  "--config.sweep.corpus=stdlib",
                  f"--config.sweep.entropy_models={blt_run / 'entropy'}")
  assert result.returncode == 2 and f"its corpus is '{small_corpus}'" in result.stderr, \
      result.stderr
  assert not (tmp_path / "sw" / "patch3").exists()


def test_default_entropy_workdir_is_keyed_on_the_split():
  config = tiny_config("patch3")
  spec = config.patching.entropy_config
  a = splits.Splits(config).split
  b = splits.Splits(tiny_config("patch3", **{"data.eval_fraction": 0.1})).split
  assert len(b.held_out) > len(a.held_out)
  dirs = {entropy_model.default_workdir(spec, "tiny", s) for s in (a, b)}
  assert dirs == {f"runs/entropy_patcher_tiny-{a.key}", f"runs/entropy_patcher_tiny-{b.key}"}
  assert a.key != b.key and a.key == splits.Split.of(data.prepare("stdlib"), 0.05).key


# ----------------------------------------------------------------------------- alignment

def test_a_byte_never_informs_its_own_prediction(blt_run):
  """Change byte k: rows 0..k of the public API stay, through the real entropy patcher."""
  lm = blt_jax.load(blt_run / "patch3")
  W = lm.patcher.lm.seq_len
  assert len(TEXT) > 4 * W and len(TEXT) > 4 * lm.seq_len
  base = lm.next_byte_logprobs(TEXT)
  for k in (3, 40, W - 1, W, W + 17, 2 * W + 5, 3 * W + 30, len(TEXT) - 2):
    for new in (b"\n", b"Q"):
      if TEXT[k:k + 1] == new:
        continue
      changed = TEXT[:k] + new + TEXT[k + 1:]
      out = lm.next_byte_logprobs(changed)
      np.testing.assert_allclose(out[:k + 1], base[:k + 1], atol=2e-5,
                                 err_msg=f"byte {k} reached rows <= {k}")
      end = (k // lm.seq_len + 1) * lm.seq_len  # the API's windows restart the context
      if k + 1 < min(end, len(TEXT)):  # the change does reach the rest of its window
        assert np.abs(out[k + 1:end] - base[k + 1:end]).max() > 1e-3


def test_training_windows_get_the_patches_the_api_gives(blt_run):
  lm = blt_jax.load(blt_run / "patch3")
  config = lm.config
  s = splits.Splits(config, splits.Split.load(blt_run / "patch3"))
  transform = BatchPatcher(lm.patcher.rule, entropy.corpus_entropies(lm.patcher.lm, s.corpus))
  sizes = np.diff(s.corpus.offsets)
  long_docs = [int(d) for d in s.heldout_ids[np.argsort(-sizes[s.heldout_ids])][:2]]
  long_docs.append(int(s.train_ids[np.argmax(sizes[s.train_ids])]))
  read = data.WindowReader(s.corpus.data, lm.seq_len)
  for d in long_docs:
    table = data.window_table(s.corpus, np.array([d]), lm.seq_len)
    assert len(table) > 10
    batch = {k: np.stack([read(r)[k] for r in table]) for k in read(table[0])}
    trained = transform(batch)["patch_lengths"]
    raw = s.corpus.doc(d)
    given = lm.patcher(raw, lm.windows(raw))["patch_lengths"]
    np.testing.assert_array_equal(trained, given, err_msg=s.corpus.names[d])


def test_eval_bpb_is_what_the_api_scores(blt_run, small_corpus, tmp_path):
  """`mode=eval` on held-out documents equals -mean log2 p through next_byte_logprobs."""
  run = tmp_path / "patch3"
  shutil.copytree(blt_run / "patch3", run)
  held = splits.Split.load(run).held_out
  corpus = data.prepare(str(small_corpus))  # the run's corpus
  docs = tmp_path / "docs"
  docs.mkdir()
  picked = [n for n in held if 300 < len(corpus.doc(corpus.names.index(n))) < 6000][:4]
  assert len(picked) == 4
  for i, name in enumerate(picked):
    (docs / f"{i}.py").write_bytes(corpus.doc(corpus.names.index(name)))
  result = launch("--config=configs/patch3.py:size=tiny", f"--workdir={run}",
                  "--config.mode=eval", f"--config.eval.corpus={docs}",
                  "--config.eval.max_bytes=0")
  assert result.returncode == 0, result.stderr[-2000:]
  scored = json.loads((run / "eval.json").read_text())
  lm = blt_jax.load(run)
  nll = n = 0
  for name in picked:
    raw = corpus.doc(corpus.names.index(name))
    lp = lm.next_byte_logprobs(raw)
    nll -= lp[np.arange(len(raw)), np.frombuffer(raw, np.uint8)].sum()
    n += len(raw)
  assert scored["bytes"] == n
  assert scored["bpb"] == pytest.approx(nll / (n * math.log(2)), abs=1e-3)


def test_all_zero_logits_score_exactly_8_bits_per_byte(small_corpus):
  model = models.build(dict(kind="byte_lm", dim=16, n_layers=1, n_heads=2))
  model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
  assert model.head.bias is None
  corpus = data.prepare(str(small_corpus))
  ids = np.arange(5)
  graphdef, state = nnx.split(model)
  batches = data.eval_batches(corpus, ids, seq_len=64, batch_size=8)  # padded windows
  result = Evaluator(graphdef)(state, ({k: jnp.asarray(v) for k, v in b.items()
                                        if k in ("inputs", "targets", "mask")}
                                       for b in batches), progress=False)
  assert result["bytes"] == corpus.offsets[5] - corpus.offsets[0]
  assert result["bpb"] == pytest.approx(8.0, abs=1e-6)
  assert result["perplexity"] == pytest.approx(256.0, rel=1e-5)


# ----------------------------------------------------------------------------- padding, bf16

def test_padding_never_reaches_real_positions():
  model = tiny_model(seed=3)
  fwd = nnx.jit(lambda m, a, b: m(a, b))
  inputs = random_inputs(7, batch=1)
  L = 19  # real targets 0..L-1; inputs 0..L-1 are BOS and the real bytes before them
  lengths_a = np.zeros((1, P), np.int32)
  lengths_a[0, :5] = [4, 3, 5, 2, T - 14]   # padding joins the last real patch (5 real bytes)
  lengths_b = np.zeros((1, P), np.int32)
  lengths_b[0, :9] = [4, 3, 5, 2, 5, 1, 3, 4, 5]  # padding cut into patches of its own
  assert lengths_a.sum() == lengths_b.sum() == T
  other = inputs.copy()
  other[0, L:] = np.random.default_rng(8).integers(0, 256, T - L)
  a = np.asarray(fwd(model, jnp.asarray(inputs), jnp.asarray(lengths_a)))
  b = np.asarray(fwd(model, jnp.asarray(other), jnp.asarray(lengths_b)))
  np.testing.assert_allclose(b[0, :L], a[0, :L], atol=1e-5)
  assert np.abs(b[0, L:] - a[0, L:]).max() > 1e-3  # the padded tail itself did change


def assert_bf16_close_to_fp32(workdir):
  fp32 = blt_jax.load(workdir)
  model, step = api.restore_model(workdir, {**fp32.resolved.model, "dtype": "bfloat16"})
  bf16 = api.LanguageModel(model, fp32.config, step, fp32.resolved, fp32.patcher)
  a, b = fp32.next_byte_logprobs(TEXT[:200]), bf16.next_byte_logprobs(TEXT[:200])
  likely = a > math.log(0.01)  # bytes the model gives at least 1%
  assert np.abs(a - b)[likely].max() < 0.05  # measured 0.013 on both tiny runs
  assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
  assert np.abs(a - b).max() > 0  # bf16 did run


def test_bf16_compute_stays_close_to_fp32_byte_lm(tiny_run):
  assert_bf16_close_to_fp32(tiny_run)


def test_bf16_compute_stays_close_to_fp32_blt(blt_run):
  assert_bf16_close_to_fp32(blt_run / "patch3")
