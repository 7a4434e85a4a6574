"""Device mesh, state and batch shardings, sharded init and the ahead-of-time compiled train step.

The mesh has two axes: `data` (pure data parallelism: every device of the axis holds the whole
state) and `fsdp` (the state is split across the axis, ZeRO-3 style; the batch is split over both
axes). With `fsdp = 1` everything is replicated and the step is plain data parallelism.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)
DEFAULT_MIN_SHARD_SIZE = 2**14  # Smaller arrays (biases, norms, scalars) stay replicated.


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
  """(data, fsdp) for `n_devices`, `-1` for either meaning "the rest" (fsdp=-1 with data=-1: all devices for
  fsdp); ValueError when they do not fit."""
  if fsdp == -1:
    if data == -1:
      data = 1
    if data < 1 or n_devices % data:
      raise ValueError(f"data={data} must divide the {n_devices} devices (and be >= 1) when fsdp=-1.")
    fsdp = n_devices // data
  if fsdp < 1 or n_devices % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {n_devices} devices (and be >= 1, or -1 for the rest).")
  if data == -1:
    data = n_devices // fsdp
  if data * fsdp != n_devices:
    raise ValueError(f"data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n_devices} are "
                     "available; set data=-1 to use the rest, or change fsdp.")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices (or `devices`); `-1` for data means "the rest"."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, len(devices))
  return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


_barriers: dict[str, int] = {}


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Every process waits here for the others: a barrier of jax.distributed's coordination service.

  Not a collective: the CPU backend's collectives (gloo) give up when one process reaches its first
  collective over a set of devices 30 s after another (its compile missed the persistent compilation
  cache, it was writing the exported model), which a barrier with a long timeout tolerates. No-op in
  one process.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the client; no public handle)

  _barriers[name] = _barriers.get(name, 0) + 1  # a barrier id is used once
  distributed.global_state.client.wait_at_barrier(f"{name}#{_barriers[name]}", timeout_s * 1000)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axis_size(mesh: Mesh) -> int:
  """Number of devices the batch is split over (data x fsdp)."""
  return mesh.shape[DATA] * mesh.shape[FSDP]


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
  """Shards the largest dimension divisible by `fsdp_size` over `fsdp`; small arrays replicate."""
  if fsdp_size <= 1 or not shape or math.prod(shape) < min_shard_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])  # First of the largest on ties.
  spec = [None] * len(shape)
  spec[axis] = FSDP
  return P(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
  """NamedShardings for every leaf of an abstract (or concrete) tree, by `fsdp_spec`."""
  fsdp_size = mesh.shape[FSDP]

  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_shard_size))

  return jax.tree.map(one, abstract_tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (AOT lowering and orbax restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args,
                 min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` under jit with sharded outputs; returns (tree, shardings).

  Shapes come from `jax.eval_shape`, so a large model is never materialised on one device.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, min_shard_size)
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def put(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`, also where the shardings span other processes' devices (which
  device_put refuses): every process passes the same whole values and keeps its own part of each."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  host = lambda x: x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x)  # noqa: E731
  return jax.jit(lambda t: t, out_shardings=shardings)(jax.tree.map(host, tree))


def to_host(tree: Any) -> Any:
  """Numpy copies of a tree's arrays, as `jax.device_get`, also of arrays split over other processes' devices
  (fsdp across hosts), which device_get refuses: those are gathered, a collective that every process must call
  (device_get alone where each process holds whole copies)."""
  leaves = jax.tree.leaves(tree)
  if all(not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return multihost_utils.process_allgather(tree, tiled=True)


def shard_tree(tree: Any, mesh: Mesh, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
  """Places a host or device tree (e.g. frozen networks) on the mesh by the fsdp rule."""
  return put(tree, tree_shardings(tree, mesh, min_shard_size))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
  n = batch_axis_size(mesh)
  if global_batch_size % n:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the {n} devices on the batch "
                     f"axes (data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); use a multiple of {n}.")


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles the global batch from this host's numpy piece (leading axis = local examples)."""
  leaves = jax.tree.leaves(local_batch)
  if not leaves:
    raise ValueError("Empty batch.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"Every batch leaf needs the same leading batch axis; got leading sizes "
                     f"{sorted(map(str, sizes))}.")
  local = sizes.pop()
  check_global_batch(local * jax.process_count(), mesh)

  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)

  return jax.tree.map(one, local_batch)


def abstract_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Global ShapeDtypeStructs (with the batch sharding) for a host batch, for AOT compilation."""

  def one(x):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=batch_sharding(mesh, x.ndim))

  check_global_batch(jax.tree.leaves(local_batch)[0].shape[0] * jax.process_count(), mesh)
  return jax.tree.map(one, local_batch)


def compile_train_step(
    train_step: Callable[..., Any],
    mesh: Mesh,
    state_shardings: Any,
    abstract_state: Any,
    batch: Any,
    rng: jax.Array,
    frozen: Any = None,
    *,
    donate: bool = True,
) -> tuple[Any, float]:
  """Compiles `train_step(state, batch, rng, frozen)` ahead of time; returns (compiled, seconds).

  `abstract_state` is the shape tree of the state (`jax.eval_shape`); `batch` a host batch or
  its abstract form (the global shape is derived from it); `frozen` concrete device arrays (their
  shardings are kept). The state is donated: don't reuse the state you pass in.
  """
  rep = replicated(mesh)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(frozen)):
    raise ValueError("frozen must hold device arrays; place it on the mesh first with "
                     "sharding.shard_tree(frozen, mesh).")
  if not all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(batch)):
    batch = abstract_batch(batch, mesh)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  jitted = jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_sh, rep, frozen_sh),
      out_shardings=(state_shardings, rep),
      donate_argnums=(0,) if donate else (),
  )
  abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)
  abstract_frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), frozen)
  t0 = time.perf_counter()
  compiled = jitted.lower(with_shardings(abstract_state, state_shardings), batch, abstract_rng,
                          abstract_frozen).compile()
  return compiled, time.perf_counter() - t0
