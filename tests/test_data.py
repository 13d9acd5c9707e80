"""Corpus preparation, the held-out split, pipeline determinism and exact resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from blt_jax import data, splits
from blt_jax.errors import UserError


def make_corpus(root, n_docs=40, size=300):
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n_docs):
    words = rng.choice(["alpha", "beta", "gamma", "delta", "\n", "x = 1"], size=size)
    (root / f"doc{i:03d}.txt").write_text(" ".join(words))
  return root


def test_prepare_directory_roundtrip_and_cache(tmp_path):
  root = make_corpus(tmp_path / "c")
  corpus = data.prepare(str(root))
  assert len(corpus.names) == 40 and corpus.data.dtype == np.uint8
  assert corpus.doc(corpus.names.index("doc007.txt")) == (root / "doc007.txt").read_bytes()
  assert data.prepare(str(root)).path == corpus.path  # reused, same fingerprint
  (root / "doc000.txt").write_text("changed")
  assert data.prepare(str(root)).fingerprint != corpus.fingerprint


def test_jsonl_glob_and_long_documents(tmp_path):
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} é"})
                                              for i in range(5)) + "\n")
  corpus = data.prepare(str(tmp_path / "a.jsonl"))
  assert corpus.doc(2) == "line 2 é".encode()
  make_corpus(tmp_path / "g", n_docs=3)
  assert len(data.prepare(str(tmp_path / "g" / "*.txt")).names) == 3
  one = data.prepare(str(tmp_path / "g" / "doc000.txt"))  # a file is one document, whole
  assert one.names == ["doc000.txt"] and one.doc(0) == (tmp_path / "g" / "doc000.txt").read_bytes()


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["one doc", "two docs"]}), tmp_path / "t.parquet")
  corpus = data.prepare(str(tmp_path / "t.parquet"))
  assert [corpus.doc(i) for i in range(2)] == [b"one doc", b"two docs"]


def test_stdlib_corpus_has_no_tests_and_split_is_disjoint():
  corpus = data.prepare("stdlib")
  assert not any(part in ("test", "tests", "site-packages") for n in corpus.names
                 for part in n.split("/")[:-1])
  held = splits.Split.of(corpus, 0.05).held_out
  assert 5 < len(held) < len(corpus.names) / 10 and len(set(held)) == len(held)
  # stable: a name's side never depends on the rest of the corpus
  assert all(splits.is_held_out(n, 0.05) for n in held)
  assert sum(splits.is_held_out(n, 0.05) for n in corpus.names) == len(held)


def test_windows_start_with_bos_and_mask_padding(tmp_path):
  corpus = data.prepare(str(make_corpus(tmp_path / "c", n_docs=2, size=10)))
  table = data.window_table(corpus, np.arange(2), 16)
  row = data.WindowReader(corpus.data, 16)(table[-1])
  length = int(table[-1, 1])
  assert row["inputs"][0] == data.BOS and (row["inputs"][1:] == row["targets"][:-1]).all()
  assert row["mask"].sum() == length and (row["targets"][length:] == 0).all()
  assert table[:, 1].sum() == len(corpus.data)  # every byte is a target exactly once


def test_pipeline_is_deterministic_and_resumes_exactly(tmp_path):
  corpus = data.prepare(str(make_corpus(tmp_path / "c")))
  ids = np.arange(len(corpus.names))
  kw = dict(seq_len=32, batch_size=4)
  run = lambda seed: iter(data.train_dataset(corpus, ids, seed=seed, **kw))
  a, b, c = run(0), run(0), run(1)
  first = [next(a)["inputs"] for _ in range(5)]
  assert all((x == next(b)["inputs"]).all() for x in first)
  assert any((x != next(c)["inputs"]).any() for x in first)
  state = a.get_state()
  expected = [next(a)["inputs"] for _ in range(30)]  # crosses an epoch boundary
  resumed = run(0)
  resumed.set_state(state)
  assert all((x == next(resumed)["inputs"]).all() for x in expected)


def test_eval_batches_cover_each_window_once(tmp_path):
  corpus = data.prepare(str(make_corpus(tmp_path / "c", n_docs=5)))
  ids = np.arange(5)
  batches = list(data.eval_batches(corpus, ids, seq_len=64, batch_size=7))
  assert sum(b["mask"].sum() for b in batches) == len(corpus.data)
  subset = list(data.eval_batches(corpus, ids, seq_len=64, batch_size=7, max_bytes=500))
  assert 500 <= sum(b["mask"].sum() for b in subset) < 500 + 64


def test_bad_corpora(tmp_path):
  with pytest.raises(UserError, match="not found"):
    data.prepare(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no readable text documents"):
    data.prepare(str(tmp_path / "empty"))
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "x.bin").write_bytes(bytes(range(256)) * 4)
  with pytest.raises(UserError, match=r"no readable text documents \(1 binary skipped\)"):
    data.prepare(str(tmp_path / "bin"))
