"""Generation: batched decoding on the device with caches, patching as it goes; and the
uncached reference it is tested against.

The context rule. A model with windows of T inputs (BOS + up to T - 1 bytes) predicts
byte q of a text from the window that starts at `context_start(q, T)`: 0 while q < T;
after that the window slides by S = 3T/4 whenever it is full, so a prediction sees
between T - S and T - 1 bytes (the rule the entropy cache scores documents by). The
cached decoder and the uncached reference both follow it.

The cached decoder. Every row holds its text in a buffer. The known bytes of each row's
first window (its prompt) are read in one parallel pass (`ByteModel.prefill`); then the
row steps through the positions of its window, one per step, all rows at once: it feeds
the input at position p (BOS, or byte s + p - 1) to every cache and gets the logits of
byte s + p. A byte the row already knows (the retained quarter after the window slides)
is read; the first unknown one is drawn and appended. For BLT the entropy model steps alongside, and
the patching rule decides from its entropy whether byte s + p starts a patch before the
BLT step that needs it. Rows are independent: each has its own window, patches, key and
end; a finished row idles until the batch is done. The steps run in a `lax.while_loop`,
`chunk` steps per call, so the host sees the bytes as they come.

The same decoder steps over BPE-token ids for the token baseline (`bos` the vocabulary
size, T its token slots, the context rule in tokens; `token_generation` spells them out).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt_jax import patching, sampling
from blt_jax.constants import BOS, BYTES
from blt_jax.errors import UserError
from blt_jax.models import vocab
from blt_jax.resolved import PatchRule

LENGTH_BUCKET = 128  # text buffers are rounded up to a multiple of this: fewer compiles


def batch_bucket(n_rows: int) -> int:
  """Rows of the compiled batch: a power of two (the rest are padding rows, done at once)."""
  return 1 << (n_rows - 1).bit_length()


def window_stride(T: int) -> int:
  """S: how far a full window slides."""
  return max(1, 3 * T // 4)


def context_start(q: int, T: int) -> int:
  """Where the window that predicts byte q of a text starts (see the module docstring)."""
  if q < T:
    return 0
  S = window_stride(T)
  return ((q - T) // S + 1) * S


@dataclasses.dataclass(frozen=True)
class Options:
  """What to generate: bytes per row, how to choose them, where to stop."""
  max_bytes: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: bytes | None = None

  def __post_init__(self):
    sampling.check_options(max_bytes=self.max_bytes, temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p)
    if self.stop is not None and not isinstance(self.stop, bytes):
      raise UserError(f"stop must be bytes or None, got {type(self.stop).__name__}")

  def traced(self) -> dict:
    return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p)}


def check_prompts(prompts) -> list[bytes]:
  if isinstance(prompts, (bytes, str)) or not all(isinstance(p, bytes) for p in prompts):
    raise UserError("prompts must be a list of bytes objects")
  if not prompts:
    raise UserError("no prompts to continue")
  return list(prompts)


class Decoder:
  """Cached generation for one model (and, for BLT, its patching rule and entropy model).

  `model`, `entropy_model`: `ByteModel`s with parameters; `seq_len`: the window T.
  `bos`, `logprobs`: the id that starts a window and the log-probabilities of the ids the
  model predicts from its logits (bytes by default; a token model's tokens)."""

  def __init__(self, model, seq_len: int, rule: PatchRule | None = None,
               entropy_model=None, entropy_seq_len: int | None = None, *, bos: int = BOS,
               logprobs: Callable = vocab.byte_logprobs):
    self.T, self.S, self.rule = seq_len, window_stride(seq_len), rule
    self.bos, self.logprobs = bos, logprobs
    if rule is not None and rule.uses_entropy and entropy_seq_len < seq_len:
      raise UserError(f"generation needs the entropy model's window ({entropy_seq_len}) to "
                      f"be at least the model's ({seq_len})")
    self.graphdef, self.params = nnx.split(model)
    self.uses_entropy = rule is not None and rule.uses_entropy
    self.e_graphdef, self.e_params = (nnx.split(entropy_model) if self.uses_entropy
                                      else (None, None))
    self._run = {}
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,))
    self.steps = 0  # decoding steps (positions per row) the last `generate` ran

  # ---------------------------------------------------------------- device side

  def _step(self, params, e_params, st, opts, stop):
    """One position for every row (see the module docstring)."""
    T, S, rule = self.T, self.S, self.rule
    text_BxL = st["text"]
    B, L = text_BxL.shape
    rows_B = jnp.arange(B)
    s_B, p_B, n_B = st["s"], st["p"], st["n"]
    q_B = s_B + p_B  # the byte this step predicts
    ids_B = jnp.where(p_B == 0, self.bos, text_BxL[rows_B, jnp.clip(q_B - 1, 0, L - 1)])
    new = {}
    starts_B = None
    if rule is not None:
      h_B = jnp.zeros((B,), jnp.float32)
      if self.uses_entropy:
        e_logits_Bx256, new["ent"] = nnx.merge(self.e_graphdef, e_params).decode_step(
            st["ent"], ids_B, p_B)
        h_B = vocab.entropy(e_logits_Bx256)
      starts_B, new["since"] = patching.next_start(
          p_B, mode=rule.mode, threshold=rule.threshold or 0.0, patch_size=rule.patch_size,
          max_patch_len=rule.max_patch_len, h_B=h_B, prev_h_B=st["prev_h"],
          prev_byte_B=ids_B, prev2_byte_B=st["prev_id"], since_B=st["since"])
      new["prev_h"], new["prev_id"] = h_B, ids_B
    if starts_B is not None:  # finished rows start no patches (no global steps for them)
      starts_B &= ~st["done"]
    logits_Bx256, new["cache"] = nnx.merge(self.graphdef, params).decode_step(
        st["cache"], ids_B, p_B, starts_B)

    # Draw the byte where it is the row's next unknown one.
    drawing_B = (q_B == n_B) & ~st["done"]
    logp_BxV = self.logprobs(logits_Bx256)
    byte_B = sampling.choose(logp_BxV, st["keys"], st["offset"] + q_B, **opts)
    at_B = jnp.clip(q_B, 0, L - 1)
    new["text"] = text_BxL.at[rows_B, at_B].set(
        jnp.where(drawing_B, byte_B, text_BxL[rows_B, at_B]))
    if "logprobs" in st:
      out_B = jnp.clip(q_B - st["first"], 0, st["logprobs"].shape[1] - 1)
      new["logprobs"] = st["logprobs"].at[rows_B, out_B].set(
          jnp.where(drawing_B[:, None], logp_BxV, st["logprobs"][rows_B, out_B]))
    n_B = n_B + drawing_B
    ended_B = n_B >= st["end"]
    if stop:
      back_BxK = n_B[:, None] - len(stop) + jnp.arange(len(stop))
      tail_BxK = new["text"][rows_B[:, None], jnp.clip(back_BxK, 0, L - 1)]
      ended_B |= (n_B - len(stop) >= st["first"]) & jnp.all(
          tail_BxK == jnp.asarray(list(stop)), axis=1)
    new["done"] = st["done"] | (drawing_B & ended_B)
    new["n"] = n_B

    # The next position; a full window slides by S.
    p_B = p_B + 1
    full_B = p_B == T
    new["s"], new["p"] = jnp.where(full_B, s_B + S, s_B), jnp.where(full_B, 0, p_B)
    return {**st, **new}

  def _prefill_fn(self, params, e_params, st):
    """Every row's known bytes before its first draw (its prompt's window), read in one
    parallel pass over the window instead of one position per step: the caches and the
    patching rule's state as the steps would leave them, and p at the first draw."""
    T, rule = self.T, self.rule
    text_BxL = st["text"]
    B, L = text_BxL.shape
    rows_B, t_T = jnp.arange(B), jnp.arange(T)
    m_B = st["n"] - st["s"]  # positions 0 .. m - 1 hold BOS and the known bytes
    at = lambda offset_T: text_BxL[rows_B[:, None], jnp.clip(st["s"][:, None] + offset_T, 0, L - 1)]
    ids_BxT = jnp.where(t_T == 0, self.bos, at(t_T - 1))
    new, starts_BxT = {}, None
    if rule is not None:
      h_BxT = jnp.zeros((B, T), jnp.float32)
      if self.uses_entropy:
        e_logits_BxTx256, new["ent"] = nnx.merge(self.e_graphdef, e_params).prefill(ids_BxT, m_B)
        h_BxT = vocab.entropy(e_logits_BxTx256)
      starts_BxT = patching.patch_starts(
          h_BxT, mode=rule.mode, threshold=rule.threshold or 0.0, patch_size=rule.patch_size,
          data=at(t_T), max_patch_len=rule.max_patch_len)
      last_B = jnp.maximum(m_B - 1, 0)
      last_start_B = jnp.max(jnp.where(starts_BxT & (t_T <= last_B[:, None]), t_T, 0), axis=1)
      new.update(since=last_B - last_start_B, prev_h=h_BxT[rows_B, last_B],
                 prev_id=ids_BxT[rows_B, last_B])
    _, new["cache"] = nnx.merge(self.graphdef, params).prefill(ids_BxT, m_B, starts_BxT)
    new["p"] = m_B
    return {**st, **new}

  def _runner(self, stop: bytes):
    if stop not in self._run:
      def run(params, e_params, st, opts, limit):
        def more(carry):
          i, st = carry
          return (i < limit) & ~jnp.all(st["done"])

        def body(carry):
          i, st = carry
          return i + 1, self._step(params, e_params, st, opts, stop)

        return jax.lax.while_loop(more, body, (jnp.int32(0), st))
      self._run[stop] = jax.jit(run, donate_argnums=(2,))
    return self._run[stop]

  # ---------------------------------------------------------------- host side

  def initial_state(self, prompts: list[np.ndarray], options: Options, record: bool) -> dict:
    """The state of a batch: the prompts' (id arrays') last windows in text buffers, empty
    caches; `options.max_bytes` ids to draw per row."""
    T = self.T
    n_rows = len(prompts)
    B = batch_bucket(n_rows)
    offsets = [context_start(len(p), T) for p in prompts]  # ids no window will see
    kept = [p[offset:] for p, offset in zip(prompts, offsets)]
    longest = max(len(k) for k in kept) + options.max_bytes
    L = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
    text = np.zeros((B, L), np.int32)
    n = np.zeros(B, np.int32)
    for i, k in enumerate(kept):
      text[i, :len(k)] = k
      n[i] = len(k)
    model = nnx.merge(self.graphdef, self.params)
    st = {"text": jnp.asarray(text), "n": jnp.asarray(n), "first": jnp.asarray(n),
          "offset": jnp.asarray(np.pad(offsets, (0, B - n_rows)), jnp.int32),
          "end": jnp.asarray(n + options.max_bytes),
          "s": jnp.zeros(B, jnp.int32), "p": jnp.zeros(B, jnp.int32),
          "done": jnp.asarray(np.arange(B) >= n_rows),  # padding rows are done
          "keys": sampling.row_keys(options.seed, B), "cache": model.init_cache(B, T)}
    if self.rule is not None:
      st.update(since=jnp.zeros(B, jnp.int32), prev_h=jnp.zeros(B, jnp.float32),
                prev_id=jnp.zeros(B, jnp.int32))
    if self.uses_entropy:
      st["ent"] = nnx.merge(self.e_graphdef, self.e_params).init_cache(B, T)
    if record:
      st["logprobs"] = jnp.zeros((B, options.max_bytes, BYTES), jnp.float32)
    return st

  def generate(self, prompts: list[bytes], options: Options, *, record: bool = False,
               chunk: int = 64, on_bytes: Callable[[int, bytes], None] | None = None):
    """Per prompt: the generated bytes and, with `record`, the log-probabilities [n, 256]
    of every generated byte's step (else None). `on_bytes(row, new_bytes)` is called as
    bytes arrive, every `chunk` steps."""
    prompts = [np.frombuffer(p, np.uint8) for p in check_prompts(prompts)]
    on_ids = None if on_bytes is None else (
        lambda i, ids: on_bytes(i, ids.astype(np.uint8).tobytes()))
    return [(ids.astype(np.uint8).tobytes(), logprobs) for ids, logprobs in
            self.generate_ids(prompts, options, record=record, chunk=chunk, on_ids=on_ids)]

  def generate_ids(self, prompts: list[np.ndarray], options: Options, *, record: bool = False,
                   chunk: int = 64, on_ids: Callable[[int, np.ndarray], None] | None = None,
                   until: Callable[[int, np.ndarray], bool] | None = None):
    """`generate` over id arrays: per prompt, the drawn ids [n] and their log-probabilities
    [n, V] (with `record`). `on_ids(row, new_ids)` sees the ids as they come; a row also
    ends, between chunks, once `until(row, its drawn ids)` says so (then it may hold up to
    `chunk` - 1 ids more than needed)."""
    st = self._prefill(self.params, self.e_params, self.initial_state(prompts, options, record))
    run = self._runner(options.stop or b"")
    opts = options.traced()
    rows = len(prompts)
    first = np.asarray(st["first"])
    shown = first
    self.steps = 0
    while True:
      steps, st = run(self.params, self.e_params, st, opts, jnp.int32(chunk))
      self.steps += int(steps)
      done, n = np.array(st["done"]), np.asarray(st["n"])
      if on_ids is not None or until is not None:
        text = np.asarray(st["text"])
        for i in range(rows):
          if on_ids is not None and n[i] > shown[i]:
            on_ids(i, text[i, shown[i]:n[i]])
          if until is not None and not done[i] and until(i, text[i, first[i]:n[i]]):
            done[i] = True
            st["done"] = st["done"].at[i].set(True)
        shown = n
      if done.all():
        break
    text = np.asarray(st["text"])
    logprobs = np.asarray(st["logprobs"]) if record else None
    return [(text[i, first[i]:n[i]],
             None if logprobs is None else logprobs[i, :n[i] - first[i]])
            for i in range(rows)]


def uncached_generate(next_logprobs: Callable[[bytes], np.ndarray], prompts: list[bytes],
                      options: Options, *, on_bytes=None):
  """The reference: each byte from `next_logprobs(text)` (log p of the next byte given
  the whole text so far, by the context rule), chosen as the decoder chooses. Same
  results as `Decoder.generate(..., record=True)`, much slower."""
  prompts = check_prompts(prompts)
  keys = sampling.row_keys(options.seed, len(prompts))
  opts = options.traced()
  choose = jax.jit(sampling.choose)
  out = []
  for i, prompt in enumerate(prompts):
    text, steps = bytearray(prompt), []
    for _ in range(options.max_bytes):
      logp_256 = np.asarray(next_logprobs(bytes(text)), np.float32)
      steps.append(logp_256)
      byte = int(choose(jnp.asarray(logp_256)[None], keys[i:i + 1],
                        jnp.asarray([len(text)], jnp.int32), **opts)[0])
      text.append(byte)
      if on_bytes is not None:
        on_bytes(i, bytes([byte]))
      if options.stop and text[len(prompt):].endswith(options.stop):
        break
    out.append((bytes(text[len(prompt):]), np.stack(steps)))
  return out
