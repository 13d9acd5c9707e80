"""The device mesh of a run: data parallelism and FSDP over JAX's own SPMD engine.

Mesh axes ('data', 'fsdp'). A batch is split over both axes (FSDP is data parallelism
whose replicas also split the parameters); every parameter and optimizer-state array is
split along its largest dimension that 'fsdp' divides, and replicated over 'data'. XLA
inserts the all-gathers and reduce-scatters. Several hosts: `initialize` starts
`jax.distributed` first; each process then reads its own share of every batch.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from blt_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH = PartitionSpec(AXES)   # the leading (batch) axis over every device


def initialize(mesh_cfg) -> None:
  """Starts jax.distributed when `mesh.distributed` is set (once per process)."""
  if not mesh_cfg.get("distributed", False) or jax.distributed.is_initialized():
    return
  kw = {}
  if mesh_cfg.get("coordinator"):
    kw["coordinator_address"] = mesh_cfg.coordinator
  if mesh_cfg.get("num_processes", 0) > 0:
    kw["num_processes"] = mesh_cfg.num_processes
  if mesh_cfg.get("process_id", -1) >= 0:
    kw["process_id"] = mesh_cfg.process_id
  try:
    jax.distributed.initialize(**kw)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"jax.distributed.initialize failed: {e} (set mesh.coordinator, "
                    "mesh.num_processes and mesh.process_id, or run under SLURM / Open MPI)")


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
  """(data, fsdp) with -1 resolved to the rest of the devices; a UserError if impossible."""
  if (data, fsdp) == (-1, -1) or 0 in (data, fsdp) or min(data, fsdp) < -1:
    raise UserError(f"mesh.data={data}, mesh.fsdp={fsdp}: each must be positive, or -1 "
                    "(the rest of the devices) for one of them")
  known = max(data, 1) * max(fsdp, 1)
  if n_devices % known:
    raise UserError(f"mesh.data={data} x mesh.fsdp={fsdp} does not divide the "
                    f"{n_devices} devices")
  rest = n_devices // known
  data, fsdp = (rest if data == -1 else data), (rest if fsdp == -1 else fsdp)
  if data * fsdp != n_devices:
    raise UserError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but "
                    f"there are {n_devices} (use -1 for the rest)")
  return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(int(mesh_cfg.data), int(mesh_cfg.fsdp), len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  """Split the largest dimension that `fsdp` divides; replicate small or odd arrays."""
  if fsdp == 1 or not shape:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(state, mesh):
  """NamedShardings for every array of a (model, optimizer) state, FSDP-style."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), state)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def check_batch(batch_size: int, mesh, what: str = "train.batch_size", per: int = 1):
  """A batch must split evenly over the devices (and `per` micro-batches on each)."""
  n = mesh.size * per
  if batch_size % n:
    raise UserError(f"{what}={batch_size} is not divisible by {n} (mesh {mesh.shape['data']} "
                    f"data x {mesh.shape['fsdp']} fsdp" + (f" x {per} micro-batches)" if per > 1
                                                          else ")"))


def train_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh of a training run, after checking that its batch splits over it."""
  mesh = make_mesh(config.mesh, devices)
  if config.train.grad_accum < 1:
    raise UserError(f"train.grad_accum must be >= 1, got {config.train.grad_accum}")
  check_batch(config.train.batch_size, mesh, per=config.train.grad_accum)
  return mesh


def process_shard() -> tuple[int, int]:
  """(index, count) of this process: its share of every training batch."""
  return jax.process_index(), jax.process_count()


def global_batch(local: dict, mesh) -> dict:
  """Process-local numpy rows -> global arrays split over the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def full_batch(batch: dict, mesh) -> dict:
  """A batch every process holds whole -> global arrays, split over devices when it divides
  (else replicated)."""
  def put(v):
    v = np.asarray(v)
    sharding = batch_sharding(mesh) if v.shape[0] % mesh.size == 0 else replicated(mesh)
    return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])
  return {k: put(v) for k, v in batch.items()}
