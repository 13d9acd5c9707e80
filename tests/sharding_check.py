"""Multi-device checks, run by tests/test_sharding.py in a process of its own with
XLA_FLAGS=--xla_force_host_platform_device_count=8: a tiny static-patched BLT trained on
one device, data-parallel (with gradient accumulation, and with packed global slots) and
FSDP (saved on one mesh, resumed on another); a sharded checkpoint restored onto a third
mesh; what the collectives of a data-parallel BLT move. Prints one JSON line.
With --process=I, one of two processes (one CPU device each, gloo collectives) of a
jax.distributed run on localhost:PORT, training the same model for 4 steps, then 2 more
after a resume.

  python -m tests.sharding_check WORKDIR
  python -m tests.sharding_check WORKDIR --process=I --port=PORT
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from blt_jax import checkpoint, models, patching, sharding, train
from blt_jax.errors import UserError
from blt_jax.jobs import train as train_job
from blt_jax.loss import token_stats
from blt_jax.splits import Splits
from tests.conftest import tiny_config

STEPS = 4


def config(**overrides):
  corpus = os.path.join(os.path.dirname(os.__file__), "json", "*.py")
  base = {"data.corpus": corpus, "data.eval_fraction": 0.3, "train.steps": STEPS,
          "train.batch_size": 16, "train.log_every": 1, "eval.max_bytes": 2048,
          "eval.batch_size": 8, "ckpt.every_steps": 0}
  return tiny_config("static4", **{**base, **overrides})


def run(workdir: Path, devices=None, **overrides) -> dict:
  """Trains; (per-step losses of every invocation in the workdir, final eval loss)."""
  c = config(**overrides)
  splits = Splits(c)
  rule, transform, eval_transform = train_job.patchers(c, splits, workdir, progress=False)
  result = train.train(c, workdir, splits=splits, rule=rule, transform=transform,
                       eval_transform=eval_transform, progress=False, devices=devices,
                       until=c.train.stop_at)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {"losses": [r["loss"] for r in rows], "eval_loss": result["loss"],
          "packed": [r.get("packed") for r in rows]}


def restore_on(workdir: Path, mesh_cfg: dict, devices=None):
  """The latest checkpoint of `workdir`, restored FSDP-sharded onto another mesh."""
  c = config()
  model = models.build(c.model.to_dict())
  _, state = nnx.split((model, nnx.Optimizer(model, train.make_optimizer(c.train),
                                             wrt=nnx.Param)))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    restored, _, _ = ckpt.restore(None, checkpoint.abstract(nnx.to_pure_dict(state)))
  finally:
    ckpt.close()
  return restored


COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|all-to-all|collective-permute|"
                        r"reduce-scatter)(?:-start)?\(")


def collective_elements(hlo: str) -> int:
  """Array elements that the collectives of a compiled program produce."""
  total = 0
  for m in COLLECTIVE.finditer(hlo):
    for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
      total += int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def communication() -> dict:
  """What collectives move in a BLT on 8 devices (2 windows each, global slots packed in
  groups of 2). Data parallel: the forward, packed and not, should move nothing (every
  window is computed on its own device) and the packed gradient only the parameters'
  gradients. FSDP over 8: the whole train step (packed and unpacked branches) should move
  one gather of the parameters and one gradient reduction per branch."""
  c = config(**{"model.global_capacity": 0.75})
  model = models.build(c.model.to_dict())
  graphdef, params = nnx.split(model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  mesh_of = lambda data, fsdp: sharding.make_mesh(ml_collections.ConfigDict(
      {"data": data, "fsdp": fsdp}))
  mesh = mesh_of(8, 1)
  B, T = 16, c.data.seq_len
  rng = np.random.default_rng(0)
  targets = rng.integers(0, 256, (B, T), dtype=np.int32)
  starts = np.arange(T)[None].repeat(B, 0) % 4 == 0
  batch_np = {"inputs": np.concatenate([np.full((B, 1), 256, np.int32), targets[:, :-1]], 1),
              "targets": targets, "mask": np.ones((B, T), np.float32),
              "patch_lengths": np.asarray(patching.patch_lengths(starts, c.model.max_patches))}
  batch = sharding.full_batch(batch_np, mesh)
  replicated = jax.device_put(params, sharding.replicated(mesh))
  logits = lambda p, b, packed: nnx.merge(graphdef, p)(b["inputs"], b["patch_lengths"],
                                                       packed=packed, shards=mesh.size)
  nll = lambda p, b: token_stats(logits(p, b, True), b)[0]
  moved = lambda f, *args: collective_elements(f.lower(*args).compile().as_text())

  fsdp = mesh_of(1, 8)
  step_graph, state = nnx.split((model, nnx.Optimizer(model, train.make_optimizer(c.train),
                                                      wrt=nnx.Param)))
  shardings = sharding.state_shardings(state, fsdp)
  step = train.make_train_step(step_graph, shardings=shardings, mesh=fsdp)
  return {"forward_packed": moved(jax.jit(lambda p, b: logits(p, b, True)), replicated, batch),
          "forward_unpacked": moved(jax.jit(lambda p, b: logits(p, b, False)), replicated,
                                    batch),
          "gradient_packed": moved(jax.jit(jax.grad(nll)), replicated, batch),
          "fsdp_step": moved(step, jax.device_put(state, shardings),
                             sharding.full_batch(batch_np, fsdp)),
          "parameters": n_params,
          "fits": bool(model.packing_fits(batch["patch_lengths"], T, mesh.size))}


def main(root: Path):
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  out = {"devices": jax.device_count()}
  out["one"] = run(root / "one", devices=jax.devices()[:1], **{"mesh.data": 1})
  out["data8_accum2"] = run(root / "data8", **{"mesh.data": 8, "train.grad_accum": 2})
  # Packed global slots: 2 windows per device, packed in groups of 2.
  out["data8_packed"] = run(root / "packed", **{"mesh.data": 8, "model.global_capacity": 0.9})
  out["communication"] = communication()
  # FSDP 2 x 4 for two steps (checkpoint), then resumed on a 4 x 2 mesh.
  fsdp = {"ckpt.every_steps": 2, "mesh.data": 2, "mesh.fsdp": 4}
  run(root / "fsdp", **fsdp, **{"train.stop_at": 2})
  out["fsdp_resumed"] = run(root / "fsdp", **{**fsdp, "mesh.data": 4, "mesh.fsdp": 2})

  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                       jax.tree_util.tree_leaves_with_path(tree)}
  on8 = flat(restore_on(root / "fsdp", {"data": 1, "fsdp": 8}))
  on1 = flat(restore_on(root / "fsdp", {"data": 1, "fsdp": 1}, jax.devices()[:1]))
  name = max(on8, key=lambda k: on8[k].size)
  out["restore"] = {
      "max_abs_diff": max(float(np.max(np.abs(np.asarray(on8[k]) - np.asarray(on1[k]))))
                      for k in on8),
      "largest": name, "spec": [str(a) for a in on8[name].sharding.spec],
      "shard_shape": on8[name].addressable_shards[0].data.shape,
      "shape": on8[name].shape}

  errors = {}
  for label, fn in [
      ("mesh", lambda: sharding.make_mesh(ml_collections.ConfigDict({"data": 3, "fsdp": 1}))),
      ("mesh_total", lambda: sharding.make_mesh(ml_collections.ConfigDict({"data": 2,
                                                                           "fsdp": 2}))),
      ("batch", lambda: sharding.check_batch(12, sharding.make_mesh(
          ml_collections.ConfigDict({"data": -1, "fsdp": 1}))))]:
    try:
      fn()
      errors[label] = None
    except UserError as e:
      errors[label] = str(e)
  out["errors"] = errors
  print(json.dumps(out, default=str))


def two_processes(root: Path, process: int, port: int):
  flags.FLAGS.mark_as_parsed()
  mesh = {"mesh.distributed": True, "mesh.coordinator": f"localhost:{port}",
          "mesh.num_processes": 2, "mesh.process_id": process, "ckpt.every_steps": 2}
  sharding.initialize(config(**mesh).mesh)
  first = run(root, **mesh)
  resumed = run(root, **{**mesh, "train.steps": STEPS + 2})
  print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                    "losses": first["losses"], "eval_loss": first["eval_loss"],
                    "resumed_losses": resumed["losses"]}))


if __name__ == "__main__":
  if len(sys.argv) > 2:
    args = dict(a.lstrip("-").split("=") for a in sys.argv[2:])
    two_processes(Path(sys.argv[1]), int(args["process"]), int(args["port"]))
  else:
    main(Path(sys.argv[1]))
