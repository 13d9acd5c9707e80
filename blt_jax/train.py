"""One optax train loop for every model kind: jitted step with donated state, tqdm,
metrics.jsonl, periodic held-out evaluation, orbax checkpoints, resume."""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from blt_jax import checkpoint, data, files, loss, models, sharding, signals, splits as splits_lib
from blt_jax.errors import Stopped, UserError
from blt_jax.evaluate import Evaluator
from blt_jax.resolved import PatchRule, Resolved

DEVICE_KEYS = ("inputs", "targets", "mask", "patch_lengths", "target_bytes")


class Diverged(UserError):
  """Training produced a non-finite metric."""


def build_model(model_fields: dict, seed: int) -> models.ByteModel:
  try:
    return models.build(model_fields, seed=seed)
  except (ValueError, TypeError) as e:
    raise UserError(f"bad model config: {e}")


def _muon_dims(params):
  """Muon for 2-D hidden matrices; embeddings and the output head stay with Adam."""
  def dims(path, leaf):
    names = {str(getattr(p, "key", p)) for p in path}
    if leaf.ndim != 2 or names & {"embed", "embedding", "head", "lm_head", "hash_embeds"}:
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, max(1, t.warmup_steps), max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * t.min_lr_ratio)
  if t.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  elif t.optimizer == "muon":
    opt = optax.contrib.muon(schedule, adam_b1=t.b1, adam_b2=t.b2,
                             weight_decay=t.weight_decay, adam_weight_decay=t.weight_decay,
                             muon_weight_dimension_numbers=_muon_dims)
  else:
    raise UserError(f"unknown train.optimizer {t.optimizer!r} (adamw | muon)")
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip else opt


def _grads(model_def, rest, params, batch, *, packed: bool, shards: int):
  """(gradients of the summed loss, (nll, correct, count)) of one micro-batch."""
  def summed(params):
    return loss.summed_loss(nnx.merge(model_def, params, rest), batch, packed=packed,
                            shards=shards)
  (nll, (correct, count)), grads = jax.value_and_grad(summed, has_aux=True)(params)
  return grads, (nll, correct, count)


def _micro_grads(model, model_def, rest, params, batch, *, packs: bool, shards: int):
  """Gradients and sums of one micro-batch, plus whether it ran packed: by the packed
  forward when the model packs and the batch fits (a branch around the whole gradient, so
  no residuals cross it)."""
  unpacked = functools.partial(_grads, model_def, rest, params, packed=False, shards=shards)
  if not packs:
    grads, sums = unpacked(batch)
    return grads, (*sums, jnp.zeros(()))
  fits = model.packing_fits(batch["patch_lengths"], batch["targets"].shape[1], shards)
  packed = functools.partial(_grads, model_def, rest, params, packed=True, shards=shards)
  grads, sums = jax.lax.cond(fits, packed, unpacked, batch)
  return grads, (*sums, fits.astype(jnp.float32))


def make_train_step(graphdef, *, grad_accum: int = 1, shardings=None, mesh=None):
  """(state, batch) -> (new state, device metrics); the input state is donated.

  The batch splits into `grad_accum` micro-batches (strided rows, so each stays spread
  over the batch-sharded devices) whose gradients of the summed loss are accumulated in
  float32 and divided by the total count of real bytes: the same update as one batch.
  With `shardings`, the new state keeps the layout of the old (FSDP); metrics are
  replicated over `mesh`. The gradient computation reads every parameter whole, gathered
  once per step (FSDP's all-gather); left to choose, XLA would rather move activations
  between the devices, several times more data.
  """
  def step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is not None:
      params = jax.lax.with_sharding_constraint(params, sharding.replicated(mesh))
    # Every micro-batch is split over all devices; packing groups keep to one device's rows.
    shards = mesh.size if mesh is not None else 1
    lengths_BxP = batch.get("patch_lengths")
    packs = lengths_BxP is not None and model.packs(lengths_BxP.shape[0] // grad_accum,
                                                    lengths_BxP.shape[1], shards)
    micro = functools.partial(_micro_grads, model, model_def, rest, params, packs=packs,
                              shards=shards)
    if grad_accum == 1:
      grads, (nll, correct, count, n_packed) = micro(batch)
    else:
      batches = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum,
                                                 *x.shape[1:]).swapaxes(0, 1), batch)
      zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()),) * 4)
      (grads, (nll, correct, count, n_packed)), _ = jax.lax.scan(
          lambda carry, mb: (jax.tree.map(jnp.add, carry, micro(mb)), None), zeros, batches)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    opt.update(model, grads)
    new_state = nnx.state((model, opt))
    metrics = {"loss": nll / denom, "accuracy": correct / denom,
               "grad_norm": optax.global_norm(grads), "bytes": count}
    if packs:
      metrics["packed"] = n_packed / grad_accum  # share of micro-batches run packed
    if shardings is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, shardings)
      metrics = jax.lax.with_sharding_constraint(metrics, sharding.replicated(mesh))
    return new_state, metrics
  return jax.jit(step, donate_argnums=0)


def model_inputs(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k in DEVICE_KEYS}


def to_device(batch: dict, mesh=None) -> dict:
  """The model's inputs of a numpy batch that every process holds whole."""
  batch = model_inputs(batch)
  return sharding.full_batch(batch, mesh) if mesh is not None else {
      k: jnp.asarray(v) for k, v in batch.items()}


def start_record(config: ml_collections.ConfigDict, workdir: Path,
                 rule: PatchRule | None, derived: dict | None = None) -> Resolved:
  """The run's record: written now when it starts (the config's model fields, and the
  `derived` ones the job resolved), read back when it resumes (then the job must have
  patched with the recorded rule)."""
  recorded = Resolved.of_resumed(workdir)
  if recorded is None:
    resolved = Resolved.of_start({**config.model.to_dict(), **(derived or {})}, rule)
    if jax.process_index() == 0:
      resolved.save(workdir)
    return resolved
  if recorded.patching != rule:
    raise UserError(f"{workdir} was trained with patching {recorded.patching}; it resumes "
                    f"only with that, not {rule}")
  return recorded


def initial_state(config: ml_collections.ConfigDict, resolved: Resolved, pretrained: bool):
  """(model graph, (model, optimizer) graph, state) of a fresh model: from its pretrained
  weights when `pretrained` (a run that starts, not one that resumes)."""
  runtime = {k: v for k, v in config.model.to_dict().items() if k in checkpoint.RUNTIME_FIELDS}
  model = build_model({**resolved.model, **runtime}, config.train.seed)
  if pretrained:
    models.load_pretrained(resolved.model, model)
  optimizer = nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)
  return (nnx.split(model)[0], *nnx.split((model, optimizer)))


def resume(config: ml_collections.ConfigDict, workdir: Path, ckpt: checkpoint.Checkpointer,
           state, train_iter) -> int:
  """Restores the latest checkpoint into `state` (keeping its layout) and the data
  iterator's position, in place; returns its step."""
  saved, _ = ckpt.read_config()
  checkpoint.check_same_model(saved, config.model.to_dict(), workdir,
                              models.default_fields(config.model.kind))
  restored, _, start = ckpt.restore(None, checkpoint.abstract(nnx.to_pure_dict(state)),
                                    data_iter=train_iter)
  nnx.replace_by_pure_dict(state, restored)
  return start


def check_finite(pending: list, step: int, last_good: int | None):
  """Stops at the first non-finite metric of the steps up to `step`, naming its step."""
  for offset, h in enumerate(jax.device_get(pending)):
    for key in ("loss", "grad_norm"):
      if not math.isfinite(float(h[key])):
        raise Diverged(f"training diverged at step {step - len(pending) + 1 + offset}: "
                       f"{key} is {float(h[key])} (last good checkpoint: step "
                       f"{last_good}; lower train.lr or check the data)")


def metrics_row(pending: list, step: int, seconds: float) -> dict:
  """One metrics.jsonl row: the means of the steps since the last row, and bytes/s."""
  host = jax.device_get(pending)
  mean = lambda key: float(np.mean([h[key] for h in host]))
  row = {"step": step, "loss": mean("loss"), "accuracy": mean("accuracy"),
         "grad_norm": mean("grad_norm"),
         "bytes_per_s": float(sum(h["bytes"] for h in host)) / seconds}
  row["bpb"] = row["loss"] / math.log(2)
  if "packed" in host[0]:
    row["packed"] = mean("packed")
  return row


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          splits: splits_lib.Splits, rule: PatchRule | None = None, transform=None,
          eval_transform=None, derived: dict | None = None, progress: bool = True,
          devices=None, until: int | None = None) -> dict:
  """Trains (or resumes) a run to `train.steps` (or stops after step `until`), then
  evaluates on held-out data.

  `rule` is the patching of a patched model, and `transform` maps each numpy batch
  before it reaches the model (adds patch lengths by that rule); `eval_transform` does the
  same for eval corpora (default: same); `derived` holds model fields the job resolved
  (a token model's slots). The model is built from the run's record
  (`resolved.json`, written when it starts), and a fresh run starts from the model's
  pretrained weights, if any. The mesh (`config.mesh`) spans `devices` (default: all).
  Returns the final eval metrics, also written to `<workdir>/eval.json`.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  mesh = sharding.train_mesh(config, devices)
  splits_lib.claim(workdir, splits.split)  # never resume on another split
  resolved = start_record(config, workdir, rule, derived)
  eval_transform = eval_transform or transform
  shard, n_shards = sharding.process_shard()
  train_iter = iter(data.train_dataset(splits.corpus, splits.train_ids,
                                       seq_len=config.data.seq_len,
                                       batch_size=t.batch_size // n_shards, seed=t.seed,
                                       transform=transform, shard=shard, n_shards=n_shards))
  ckpt = checkpoint.Checkpointer(workdir, keep=config.ckpt.keep,
                                 every_steps=config.ckpt.every_steps, writer=True)
  resuming = ckpt.latest_step() is not None
  model_graphdef, graphdef, state = initial_state(config, resolved, pretrained=not resuming)
  shardings = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  start = resume(config, workdir, ckpt, state, train_iter) if resuming else 0
  config_dict = config.to_dict()

  step_fn = make_train_step(graphdef, grad_accum=t.grad_accum, shardings=shardings,
                            mesh=mesh)
  evaluator = Evaluator(model_graphdef, mesh)

  def held_out(max_bytes, desc):
    batches, total = splits.eval_batches(config, max_bytes, eval_transform)
    return evaluator(state[0], (to_device(b, mesh) for b in batches), total=total, desc=desc,
                     progress=progress and lead)

  lead = jax.process_index() == 0  # one process writes metrics and shows progress
  metrics = files.AppendLog(workdir / "metrics.jsonl") if lead else None
  pending, t_log = [], time.perf_counter()

  last = t.steps if until is None else min(t.steps, until)
  bar = tqdm(total=t.steps, initial=start, desc=workdir.name, disable=not (progress and lead),
             dynamic_ncols=True, unit="step")
  stop = signals.StopRequests()
  try:
    with stop:
      for step in range(start + 1, last + 1):
        batch = next(train_iter)
        state, m = step_fn(state, sharding.global_batch(model_inputs(batch), mesh))
        pending.append(m)
        bar.update(1)
        stopping = stop.agreed()
        due = step == last or ckpt.is_due(step) or stopping
        if step % t.log_every == 0 or due:
          check_finite(pending, step, ckpt.latest_step())  # never log or save a diverged state
        if step % t.log_every == 0 or step == last or stopping:
          row = metrics_row(pending, step, time.perf_counter() - t_log)
          if config.eval.every_steps and step % config.eval.every_steps == 0:
            row.update({f"eval_{k}": v for k, v in
                        held_out(config.eval.train_max_bytes, "held-out").items()})
          if lead:
            metrics.write(json.dumps(row) + "\n")
          bar.set_postfix(loss=f"{row['loss']:.3f}", bpb=f"{row['bpb']:.3f}",
                          bytes_s=f"{row['bytes_per_s']:.0f}")
          pending, t_log = [], time.perf_counter()
        if due:
          ckpt.save(step, nnx.to_pure_dict(state), config=config_dict, data_iter=train_iter)
        if stopping:
          ckpt.wait()
          raise Stopped(stop.received, step)
  finally:
    bar.close()
    if lead:
      metrics.close()
    ckpt.close()
  result = held_out(config.eval.max_bytes, "final eval")
  result["step"] = last
  if lead:
    files.write_json(workdir / "eval.json", result)
  return result

