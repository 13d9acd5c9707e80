"""The public Python API: `blt_jax.load(workdir).next_byte_logprobs(data)`, and the
released BLT: `blt_jax.from_pretrained(folder)`, `LanguageModel.save_pretrained(folder)`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt_jax import bpe as bpe_lib, checkpoint, data as data_lib, decode, models
from blt_jax.constants import BYTES
from blt_jax.errors import UserError
from blt_jax.models import blt_hf, vocab
from blt_jax.patcher import DocumentPatcher
from blt_jax.resolved import PatchRule, Resolved
from blt_jax.token_generation import TokenGenerator


def restore_model(workdir: str | Path, model_fields: dict,
                  step: int | None = None) -> tuple[models.ByteModel, int]:
  """The model `model_fields` describe with its parameters from `workdir`, and the step
  restored (the latest readable one when `step` is None). The optimizer state is not read,
  and nothing but the checkpoint is (no pretrained weights)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(model_fields)))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    params, step = ckpt.restore_params(step, checkpoint.abstract(nnx.to_pure_dict(state)))
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state), step


class LanguageModel:
  """A trained model of any kind, restored from a run's workdir."""

  def __init__(self, model: models.ByteModel, config: ml_collections.ConfigDict, step: int,
               resolved: Resolved, patcher: DocumentPatcher | None = None,
               workdir: Path | None = None, bpe: bpe_lib.BPE | None = None):
    self.model, self.config, self.step, self.resolved = model, config, step, resolved
    self.workdir = workdir  # the run it was restored from
    self.seq_len = config.data.seq_len
    self.patcher = patcher  # adds patch lengths to a document's windows, for BLT
    self.bpe = bpe  # a token model's vocabulary
    self._decoder = None
    graphdef, self.state = nnx.split(model)

    def logprobs(state, batch):
      return vocab.byte_logprobs(nnx.merge(graphdef, state).logits(batch))
    self._logprobs = jax.jit(logprobs)

    def entropies(state, inputs):
      return vocab.entropy(nnx.merge(graphdef, state).logits({"inputs": inputs}))
    self._entropies = jax.jit(entropies)

  def entropies(self, inputs_BxT) -> jax.Array:
    """Next-byte entropies (nats) [B, T] of a byte LM for BOS-led input windows (over its
    whole vocabulary: the released BLT patcher's 260 tokens)."""
    return self._entropies(self.state, jnp.asarray(inputs_BxT))

  def windows(self, data: bytes) -> dict[str, np.ndarray]:
    """Splits bytes into the same BOS-led windows of seq_len that training and eval use."""
    x = np.frombuffer(bytes(data), np.uint8)
    starts = np.arange(0, max(len(x), 1), self.seq_len)
    return data_lib.windows(x, starts, np.minimum(len(x) - starts, self.seq_len),
                            self.seq_len)

  def predicts_bytes(self, what: str):
    """A BPE-token model predicts tokens: `what` (a byte-level use) is a one-line error."""
    if self.bpe is not None:
      raise UserError(f"{self.workdir or 'this model'} is a BPE-token model: it has no "
                      f"{what} (it is scored by mode=eval, bpb over the bytes its tokens "
                      f"cover, and generates with generate)")

  def next_byte_logprobs(self, data: bytes, batch_size: int = 16) -> np.ndarray:
    """float32 [n, 256]: row t is log p(x[t] | BOS, x[<t]) (within its window of seq_len)."""
    self.predicts_bytes("next-byte probabilities")
    n = len(data)
    if n == 0:
      return np.zeros((0, BYTES), np.float32)
    windows = self.windows(data)
    if self.patcher is not None:
      windows = self.patcher(bytes(data), windows)
    out = []
    for lo in range(0, len(windows["inputs"]), batch_size):
      batch = {k: v[lo:lo + batch_size] for k, v in windows.items()}
      pad = batch_size - len(batch["inputs"])  # fixed batch shape: one compile
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      out.append(np.asarray(self._logprobs(self.state, {k: jnp.asarray(v) for k, v in
                                                        batch.items()}))[:batch_size - pad])
    return np.concatenate(out).reshape(-1, BYTES)[:n]


  # ------------------------------------------------------------------ generation

  def context_logprobs(self, text: bytes) -> np.ndarray:
    """float32 [256]: log p(next byte | text), uncached: the window that the context rule
    (`decode.context_start`) picks for the next byte is run whole, and for BLT patched by
    the entropy model over that window. The reference cached generation is tested against."""
    start = decode.context_start(len(text), self.seq_len)
    return self.next_byte_logprobs(bytes(text[start:]) + b"\0", batch_size=1)[-1]

  @property
  def decoder(self) -> decode.Decoder:
    """The cached decoder of this model (built on first use): over a token model's token
    ids, in windows of its training token slots."""
    if self._decoder is None and self.bpe is not None:
      self._decoder = decode.Decoder(self.model, self.resolved.model["max_tokens"],
                                     bos=self.bpe.vocab_size, logprobs=vocab.logprobs)
    if self._decoder is None:
      rule = self.resolved.patching
      entropy_lm = self.patcher.lm if self.patcher is not None else None
      self._decoder = decode.Decoder(
          self.model, self.seq_len, rule,
          entropy_lm.model if entropy_lm is not None else None,
          entropy_lm.seq_len if entropy_lm is not None else None)
    return self._decoder

  def generate(self, prompts: list[bytes], *, max_bytes: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: bytes | None = None,
               on_bytes=None) -> list[bytes]:
    """The continuation of each prompt: `max_bytes` bytes (fewer when a row's output ends
    with `stop`, which is kept), greedy at temperature 0, else drawn from the top-k /
    top-p filtered distribution at that temperature, row i with seed + i. Batched, with
    caches, on the device; a row's output does not depend on its batch mates.
    `on_bytes(row, new_bytes)` sees the bytes as they come."""
    options = decode.Options(max_bytes, temperature, top_k, top_p, seed, stop)
    if self.bpe is not None:  # tokens, spelt out as bytes
      return TokenGenerator(self.decoder, self.bpe).generate(prompts, options, on_bytes)
    return [out for out, _ in self.decoder.generate(prompts, options, on_bytes=on_bytes)]

  def generate_with_logprobs(self, prompts: list[bytes], *, cached: bool = True,
                             on_bytes=None, **options) -> list[tuple[bytes, np.ndarray]]:
    """`generate`, with the log-probabilities [n, 256] of each generated byte's step;
    `cached=False` runs the uncached reference (`context_logprobs` for every byte)."""
    self.predicts_bytes("per-byte log-probabilities")
    options = decode.Options(**options)
    if cached:
      return self.decoder.generate(prompts, options, record=True, on_bytes=on_bytes)
    return decode.uncached_generate(self.context_logprobs, prompts, options,
                                    on_bytes=on_bytes)

  # ------------------------------------------------------------------ released format

  def save_pretrained(self, folder: str | Path, dtype: str = "float32",
                      shard_bytes: int = blt_hf.hf_files.SHARD_BYTES):
    """Writes this model as a transformers `BltForCausalLM` folder (config.json and
    safetensors, the entropy model as its patcher): a BLT of the released architecture
    (loaded, fine-tuned or trained with configs/blt_paper.py) patched by `global` entropy
    or `static` patching. One line naming what does not fit otherwise."""
    rule = self.resolved.patching
    if self.resolved.model.get("kind") != "blt" or rule is None:
      raise UserError(f"only a BLT saves as {blt_hf.ARCHITECTURE}, not a "
                      f"{self.resolved.model.get('kind')} model")
    if rule.mode not in blt_hf.PATCHING_MODES.values():
      raise UserError(f"cannot save {rule.mode!r} patching as {blt_hf.ARCHITECTURE} "
                      f"(it patches by entropy, 'global', or 'static')")
    entropy_lm = self.patcher.lm if rule.uses_entropy else None
    released = blt_hf.Released(
        blt=self.model.cfg, patcher=entropy_lm.model.cfg if entropy_lm else None,
        mode=rule.mode, threshold=rule.threshold, patch_size=rule.patch_size,
        max_patch_len=rule.max_patch_len, tied=False, seq_len=self.seq_len,
        patcher_seq_len=entropy_lm.seq_len if entropy_lm else 0)
    if "pretrained" in self.config:  # the folder's own position limits
      released = dataclasses.replace(
          released, seq_len=self.config.pretrained.max_positions,
          patcher_seq_len=self.config.pretrained.patcher_max_positions)
    blt_hf.save(folder, released, self.model, entropy_lm.model if entropy_lm else None,
                dtype=dtype, shard_bytes=shard_bytes)


def from_pretrained(folder: str | Path, seq_len: int | None = None) -> LanguageModel:
  """A transformers `BltForCausalLM` folder (the released BLT-1B / 7B, or one `save_pretrained`
  wrote), read without torch: the BLT configured as released, its patcher as the entropy
  model, patched as transformers' forward patches (entropy over the patcher's 260 tokens
  against the folder's threshold, or static). `seq_len`: bytes per window (default the
  folder's max_position_embeddings); a window never folds patches."""
  released, blt, patcher = blt_hf.load(folder, seq_len)
  T = seq_len or released.seq_len
  rule = PatchRule(mode=released.mode, max_patches=T, threshold=released.threshold,
                   patch_size=released.patch_size, max_patch_len=released.max_patch_len,
                   entropy_workdir=str(Path(folder).absolute()) if patcher else None)
  config = lambda fields: ml_collections.ConfigDict({
      "data": {"seq_len": T}, "model": fields,
      "pretrained": {"path": str(folder), "max_positions": released.seq_len,
                     "patcher_max_positions": released.patcher_seq_len}})
  fields = {"kind": "blt", **dataclasses.asdict(released.blt)}
  entropy_lm = None
  if patcher is not None:
    p_fields = {"kind": "byte_lm", **dataclasses.asdict(released.patcher)}
    entropy_lm = LanguageModel(patcher, config(p_fields), 0, Resolved(p_fields))
  return LanguageModel(blt, config(fields), 0, Resolved(fields, rule),
                       DocumentPatcher(rule, entropy_lm))


PRETRAINED = "blt_pretrained"  # model.kind of configs/blt_pretrained.py: a folder, not a run


def for_config(config: ml_collections.ConfigDict, workdir: str | Path) -> LanguageModel:
  """The model a job runs: the folder of a `blt_pretrained` config, else the run in
  `workdir` (at `eval.step`)."""
  if config.model.kind == PRETRAINED:
    if not config.model.path:
      raise UserError("configs/blt_pretrained.py needs --config.model.path=<BltForCausalLM folder>")
    return from_pretrained(config.model.path, seq_len=config.data.seq_len or None)
  return load(workdir, config.eval.step)


def load(workdir: str | Path, step: int | None = None,
         runtime: dict | None = None) -> LanguageModel:
  """Restores a run's model (parameters only; latest step by default), its config and
  record, and for BLT its patcher with the run's entropy model. `runtime`: model fields
  of how it computes (`checkpoint.RUNTIME_FIELDS`, e.g. {'zero_global': True}) to change."""
  saved, _ = checkpoint.read_config(workdir, step)
  resolved = Resolved.of_run(workdir)
  if runtime:
    resolved = dataclasses.replace(resolved, model={**resolved.model, **runtime})
  model, step = restore_model(workdir, resolved.model, step)
  rule, patcher = resolved.patching, None
  if rule is not None:
    patcher = DocumentPatcher(rule, load(rule.entropy_workdir) if rule.uses_entropy else None)
  tokens = (bpe_lib.BPE.load(Path(workdir) / bpe_lib.TOKENIZER_FILE)
            if resolved.model.get("kind") == "token_lm" else None)
  return LanguageModel(model, ml_collections.ConfigDict(saved), step, resolved, patcher,
                       Path(workdir).absolute(), tokens)
