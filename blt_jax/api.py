"""The public Python API: `blt_jax.load(workdir).next_byte_logprobs(data)`."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt_jax import checkpoint
from blt_jax.data import BOS
from blt_jax.evaluate import apply


def restore_model(config: ml_collections.ConfigDict, workdir, step: int | None = None):
  """Builds the model `config` describes and loads its parameters from `workdir`:
  (model, the step restored; the latest readable one when `step` is None)."""
  from blt_jax import train  # train imports this module's neighbours; keep import light
  model = train.build_model(config)
  optimizer = nnx.Optimizer(model, train.make_optimizer(config.train), wrt=nnx.Param)
  _, state = nnx.split((model, optimizer))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    restored, _, step = ckpt.restore(step, checkpoint.abstract(nnx.to_pure_dict(state)))
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, restored)
  nnx.update((model, optimizer), state)
  return model, step


class LanguageModel:
  """A trained model of any kind, restored from a run's workdir."""

  def __init__(self, model, config: ml_collections.ConfigDict, step: int, patcher=None):
    self.model, self.config, self.step = model, config, step
    self.seq_len = config.data.seq_len
    self.patcher = patcher  # adds patch lengths to a document's windows, for BLT
    graphdef, self._state = nnx.split(model)

    def logprobs(state, batch):
      return jax.nn.log_softmax(apply(nnx.merge(graphdef, state), batch), axis=-1)
    self._logprobs = jax.jit(logprobs)

    def entropies(state, inputs):
      logp = logprobs(state, {"inputs": inputs})
      return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    self._entropies = jax.jit(entropies)

  def entropies(self, inputs_BxT) -> jax.Array:
    """Next-byte entropies (nats) [B, T] of a byte LM for BOS-led input windows."""
    return self._entropies(self._state, jnp.asarray(inputs_BxT))

  def windows(self, data: bytes) -> dict[str, np.ndarray]:
    """Splits bytes into the same BOS-led windows of seq_len that training and eval use."""
    x = np.frombuffer(bytes(data), np.uint8)
    n_win = max(1, -(-len(x) // self.seq_len))
    targets = np.zeros((n_win, self.seq_len), np.int32)
    targets.reshape(-1)[:len(x)] = x
    inputs = np.concatenate([np.full((n_win, 1), BOS, np.int32), targets[:, :-1]], axis=1)
    mask = (np.arange(n_win * self.seq_len) < len(x)).reshape(n_win, -1).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "mask": mask}

  def next_byte_logprobs(self, data: bytes, batch_size: int = 16) -> np.ndarray:
    """float32 [n, 256]: row t is log p(x[t] | BOS, x[<t]) (within its window of seq_len)."""
    n = len(data)
    if n == 0:
      return np.zeros((0, 256), np.float32)
    windows = self.windows(data)
    if self.patcher is not None:
      windows = self.patcher.for_document(bytes(data), windows)
    out = []
    for lo in range(0, len(windows["inputs"]), batch_size):
      batch = {k: v[lo:lo + batch_size] for k, v in windows.items()}
      pad = batch_size - len(batch["inputs"])  # fixed batch shape: one compile
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      out.append(np.asarray(self._logprobs(self._state, {k: jnp.asarray(v) for k, v in
                                                         batch.items()}))[:batch_size - pad])
    return np.concatenate(out).reshape(-1, 256)[:n]


def load(workdir: str | Path, step: int | None = None) -> LanguageModel:
  """Restores a run's config and parameters (latest step by default)."""
  saved, _ = checkpoint.read_config(workdir, step)
  config = ml_collections.ConfigDict(saved)
  model, step = restore_model(config, workdir, step)
  from blt_jax import pipeline  # the patcher needs this module's LanguageModel
  return LanguageModel(model, config, step, pipeline.load_patcher(config))
