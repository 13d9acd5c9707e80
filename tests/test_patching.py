"""Patching: hand-worked cases, a plain Python reference, the BLT paper's example, calibration."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import patching

EXAMPLE = json.loads((Path(__file__).parent / "fixtures" / "entropy_example.json").read_text())


def reference_starts(h, data, mode, threshold=None, patch_size=None, max_patch_len=None):
  """One sequence, a plain loop over bytes: the rules as DESIGN.md states them."""
  T = len(data) if h is None else len(h)

  def space_like(b):
    return not (chr(b).isascii() and chr(b).isalnum()) and not 0x80 <= b <= 0xBF

  starts = []
  for t in range(T):
    if mode == "global":
      s = t == 0 or h[t] > threshold
    elif mode == "monotonic":
      s = t == 0 or h[t] - h[t - 1] > threshold
    elif mode == "static":
      s = t % patch_size == 0
    else:
      s = t == 0 or (space_like(data[t - 1]) and (t == 1 or not space_like(data[t - 2])))
    starts.append(bool(s))
  if max_patch_len:
    last = 0
    for t in range(T):
      if starts[t]:
        last = t
      elif (t - last) % max_patch_len == 0:
        starts[t] = True
  return np.array(starts)


def reference_lengths(starts, P):
  """Lengths in order; beyond P patches the rest folds into the last slot."""
  pos = [0] + [t for t in range(1, len(starts)) if starts[t]] + [len(starts)]
  lengths = [b - a for a, b in zip(pos[:-1], pos[1:])]
  if len(lengths) > P:
    lengths = lengths[:P - 1] + [sum(lengths[P - 1:])]
  return lengths + [0] * (P - len(lengths))


def starts_of(x):
  return np.flatnonzero(np.asarray(x)).tolist()


def test_the_papers_example_gives_its_22_patches():
  h = np.array(EXAMPLE["entropy"], np.float32)
  starts = patching.patch_starts(h, mode="global", threshold=EXAMPLE["threshold_nats"])
  assert starts_of(starts) == EXAMPLE["global_patch_starts"]
  lengths = np.asarray(patching.patch_lengths(starts, max_patches=32))
  assert lengths[:22].tolist() == EXAMPLE["global_patch_lengths"] and not lengths[22:].any()
  assert lengths.sum() == len(h) == len(EXAMPLE["text"].encode())
  np.testing.assert_array_equal(np.bincount(patching.patch_ids(starts, 32), minlength=32),
                                lengths)


def test_hand_worked_rules():
  h = np.array([[9.0, 0.1, 2.0, 0.5, 3.0, 3.5]])
  assert starts_of(patching.patch_starts(h, mode="global", threshold=1.0)[0]) == [0, 2, 4, 5]
  assert starts_of(patching.patch_starts(h, mode="monotonic", threshold=1.0)[0]) == [0, 2, 4]
  data = np.frombuffer(b"ab  cd,e f", np.uint8)
  # after the first of a run of space-like bytes: "ab| |cd,|e |f" -> starts 0, 3, 7, 9
  assert starts_of(patching.patch_starts(mode="space", data=data)) == [0, 3, 7, 9]
  assert starts_of(patching.patch_starts(mode="space", data=np.full(3, 32, np.uint8))) == [0, 1]
  assert starts_of(patching.patch_starts(mode="static", patch_size=3, data=data)) == [0, 3, 6, 9]
  assert starts_of(patching.patch_starts(h, mode="static", patch_size=4)[0]) == [0, 4]
  # in "é" (c3 a9) the lead byte is space-like, the continuation byte is not
  word = np.frombuffer("é xé".encode(), np.uint8)
  assert starts_of(patching.patch_starts(mode="space", data=word)) == [0, 1, 3, 5]


def test_max_patch_len_cuts_every_m_bytes_from_each_start():
  h = np.zeros((1, 20), np.float32)
  h[0, 9] = 5.0  # one natural start at 9: cuts at 4, 8 then 13, 17
  got = patching.patch_starts(h, mode="global", threshold=1.0, max_patch_len=4)
  assert starts_of(got[0]) == [0, 4, 8, 9, 13, 17]
  assert patching.patch_lengths(got, max_patches=8).tolist() == [[4, 4, 1, 4, 4, 3, 0, 0]]
  every = patching.patch_starts(h, mode="global", threshold=1.0, max_patch_len=1)
  assert np.asarray(every).all()


def test_surplus_patches_fold_into_the_last_slot():
  starts = np.ones((2, 10), bool)
  assert patching.patch_lengths(starts, max_patches=4).tolist() == [[1, 1, 1, 7]] * 2
  assert patching.patch_lengths(starts, max_patches=1).tolist() == [[10]] * 2
  assert patching.patch_ids(starts, 4).tolist()[0] == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]
  # byte 0 always starts a patch, whatever the array says there
  assert patching.patch_lengths(np.array([False, False, True]), max_patches=3).tolist() == \
      [2, 1, 0]


@pytest.mark.parametrize("mode", patching.MODES)
@pytest.mark.parametrize("max_patch_len", [None, 1, 5])
@pytest.mark.parametrize("shape", [(70,), (3, 4, 40)])
def test_rules_match_the_reference(mode, max_patch_len, shape):
  rng = np.random.default_rng(zlib.crc32(f"{mode}{max_patch_len}{shape}".encode()))
  h = rng.gamma(1.5, 1.0, shape).astype(np.float32)
  data = rng.choice(np.frombuffer(b"abc XY9 \n,.\xc3\xa9", np.uint8), size=shape)
  kw = dict(mode=mode, threshold=1.2, patch_size=3, max_patch_len=max_patch_len)
  got = np.asarray(patching.patch_starts(h, data=data, **kw))
  assert got.shape == shape and got.dtype == bool
  lengths = np.asarray(patching.patch_lengths(got, max_patches=12))
  assert lengths.shape == shape[:-1] + (12,) and (lengths.sum(-1) == shape[-1]).all()
  for idx in np.ndindex(shape[:-1]):
    want = reference_starts(h[idx], data[idx], **kw)
    np.testing.assert_array_equal(got[idx], want)
    assert lengths[idx].tolist() == reference_lengths(want, 12)


@pytest.mark.parametrize("impl", ["loop", "parallel"])
def test_both_implementations_match_the_reference(impl):
  """The CPU loops and the accelerator form, each run here on CPU."""
  cut = {"loop": patching._cut_loop, "parallel": patching._cut_parallel}[impl]
  lengths_fn = {"loop": patching._lengths_loop, "parallel": patching._lengths_parallel}[impl]
  rng = np.random.default_rng(3)
  for T, p, m, P in [(1, 0.5, 3, 1), (33, 0.3, 4, 5), (200, 0.05, 7, 40), (64, 0.9, 64, 70)]:
    natural = rng.random((6, T)) < p
    natural[:, 0] = True
    got = np.asarray(jax.jit(cut, static_argnums=1)(jnp.asarray(natural), m))
    lengths = np.asarray(jax.jit(lengths_fn, static_argnums=1)(jnp.asarray(got), P))
    for row in range(6):
      want = reference_starts(natural[row].astype(float), None, "global", threshold=0.5,
                              max_patch_len=m)
      np.testing.assert_array_equal(got[row], want)
      assert lengths[row].tolist() == reference_lengths(want, P)


def test_lengths_and_ids_agree_when_patches_overflow():
  starts = np.random.default_rng(5).random((8, 300)) < 0.4
  for P in (1, 7, 100, 300):
    lengths = np.asarray(patching.patch_lengths(starts, max_patches=P))
    ids = np.asarray(patching.patch_ids(starts, max_patches=P))
    assert (lengths.sum(-1) == 300).all() and lengths.dtype == np.int32
    for row in range(8):
      np.testing.assert_array_equal(np.bincount(ids[row], minlength=P), lengths[row])
      assert lengths[row].tolist() == reference_lengths(starts[row], P)


def test_works_inside_jit_with_a_traced_threshold():
  h = np.random.default_rng(1).gamma(1.5, 1.0, (4, 50)).astype(np.float32)

  @jax.jit
  def lengths(h, threshold):
    s = patching.patch_starts(h, mode="global", threshold=threshold, max_patch_len=6)
    return patching.patch_lengths(s, 20)

  for theta in (0.5, 2.0):
    want = [reference_lengths(reference_starts(row, None, "global", theta, max_patch_len=6), 20)
            for row in h]
    assert np.asarray(lengths(h, theta)).tolist() == want


def test_mean_patch_size():
  assert patching.mean_patch_size(np.array([[True, False, False, True], [False] * 4])) == 8 / 3


@pytest.mark.parametrize("mode", patching.THRESHOLD_MODES)
@pytest.mark.parametrize("max_patch_len", [None, 16])
def test_calibration_hits_targets_within_one_percent(mode, max_patch_len):
  h = np.random.default_rng(7).gamma(0.8, 1.2, (32, 512)).astype(np.float32)
  for target in (3, 5, 7, 10, 12):
    theta = patching.calibrate_threshold(h, target_patch_size=target, mode=mode,
                                         max_patch_len=max_patch_len)
    assert isinstance(theta, float)
    starts = patching.patch_starts(h, mode=mode, threshold=theta, max_patch_len=max_patch_len)
    assert abs(patching.mean_patch_size(starts) - target) <= 0.01 * target, target


def test_calibration_on_the_papers_example_recovers_its_patches():
  h = np.array(EXAMPLE["entropy"], np.float32)
  target = len(h) / len(EXAMPLE["global_patch_starts"])
  theta = patching.calibrate_threshold(h, target_patch_size=target)
  assert starts_of(patching.patch_starts(h, mode="global", threshold=theta)) == \
      EXAMPLE["global_patch_starts"]


def test_calibration_says_when_the_target_cannot_be_hit():
  tied = np.ones((4, 64), np.float32)  # every threshold gives size 1 or size 64
  with pytest.raises(ValueError, match="closest is"):
    patching.calibrate_threshold(tied, target_patch_size=3.0)
  theta = patching.calibrate_threshold(tied, target_patch_size=3.0, rtol=float("inf"))
  assert patching.mean_patch_size(patching.patch_starts(tied, mode="global",
                                                        threshold=theta)) == 1.0
  h = np.random.default_rng(0).gamma(1.0, 1.0, (4, 64)).astype(np.float32)
  with pytest.raises(ValueError, match="closest is"):  # at most 64 / ceil(64 / 8) = 8
    patching.calibrate_threshold(h, target_patch_size=10.0, max_patch_len=8)
  with pytest.raises(ValueError, match="closest is"):
    patching.calibrate_threshold(h, target_patch_size=0.5)
  with pytest.raises(ValueError, match="threshold"):
    patching.calibrate_threshold(h, target_patch_size=3.0, mode="static")


def test_bad_arguments_fail_with_one_clear_line():
  h = np.zeros((1, 4))
  cases = [(dict(mode="entropy", threshold=1.0), "unknown patching mode"),
           (dict(mode="global"), "needs entropies and a threshold"),
           (dict(mode="space"), "needs the bytes"),
           (dict(mode="static"), "patch_size >= 1"),
           (dict(mode="global", threshold=1.0, max_patch_len=0), "max_patch_len")]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message):
      patching.patch_starts(h, **kw)
  with pytest.raises(ValueError, match="max_patches"):
    patching.patch_lengths(np.ones((1, 4), bool), max_patches=0)
