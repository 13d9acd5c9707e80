"""What every model kind provides: the interface the train loop, eval and the API use.

A model maps input ids [B, T] (BOS first) and, when it `needs_patches`, patch lengths
[B, P] over the T target bytes, to next-byte logits [B, T, 256] (float32).
"""
from __future__ import annotations

import jax
from flax import nnx


class ByteModel(nnx.Module):
  """Base of every model kind. Subclasses set `cfg` (their frozen shape dataclass) and
  implement `__call__` and `flops_per_byte`; the rest has defaults."""

  needs_patches: bool = False  # reads batch["patch_lengths"]

  def logits(self, batch: dict, *, packed: bool = False, shards: int = 1):
    """Next-byte logits [B, T, 256] of a batch (it holds `inputs`, and `patch_lengths`
    when the model `needs_patches`). `packed`: see `packs`."""
    del packed, shards  # only a model that packs reads them
    return self(batch["inputs"])

  def init_cache(self, batch_size: int, length: int):
    """The decoding state (a pytree of arrays) of `batch_size` rows of up to `length`
    input positions, for `decode_step`."""
    raise NotImplementedError(f"{type(self).__name__} does not decode")

  def decode_step(self, cache, ids_B, pos_B, starts_B=None):
    """One input position per row: id ids_B[b] at position pos_B[b] (BOS at 0; positions
    advance by one from 0, and a row goes back to 0 to start a new window). Returns the
    next-byte logits [B, 256] float32, equal to `logits` at that position of the window,
    and the cache. `starts_B` (models that `needs_patches`): whether the target byte this
    position predicts starts a patch (as the patching rule decides from bytes before it)."""
    raise NotImplementedError(f"{type(self).__name__} does not decode")

  def prefill(self, ids_BxT, n_B, starts_BxT=None):
    """What `decode_step` at positions 0 .. n_B[b] - 1 of each row gives, computed over
    the whole windows at once: (logits [B, T, 256] of every position, the cache to go on
    from at position n_B). Positions from n_B on may hold anything (`starts_BxT` there
    included); their cache entries are written again before they are read."""
    raise NotImplementedError(f"{type(self).__name__} does not decode")

  def flops_per_byte(self, seq_len: int, mean_patch_size: float | None = None) -> float:
    """Analytic training (forward + backward) matmul FLOPs per byte (see `flops`)."""
    raise NotImplementedError

  def param_counts(self) -> dict:
    """Parameters: `total`, and `without_hash` (without hash n-gram embedding tables)."""
    total = int(sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param))))
    return dict(total=total, without_hash=total)

  def packs(self, batch_size: int, n_slots: int, shards: int = 1) -> bool:
    """Whether batches of this shape can run `packed` (fewer rows of the same logits)."""
    del batch_size, n_slots, shards
    return False

  def packing_fits(self, patch_lengths_BxP, seq_len: int, shards: int = 1):
    """A bool array: whether this batch fits the packed rows. Only for shapes that `packs`."""
    raise NotImplementedError(f"{type(self).__name__} does not pack")

  def load_pretrained(self) -> None:
    """Reads pretrained weights into a freshly built model (at the start of training only);
    a model trained from scratch has none."""
