"""Sharded train steps on 8 simulated devices equal a single-device step; no recompilation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsd.training import sharding as sh
from jaxsd.training import make_optimizer
from jaxsd.training.train_state import TrainState, make_train_step
from tests.training import toy_train as toy

GLOBAL_BATCH = 16


def _setup(mesh, ema_decay=0.99):
  tx, sched = make_optimizer(dict(lr=1e-2, warmup_steps=0, grad_clip_norm=1.0))
  create = lambda r: TrainState.create(toy.init_params(r), tx, ema_decay)  # noqa: E731
  state, shardings = sh.init_sharded(create, mesh, jax.random.key(0), min_shard_size=toy.MIN_SHARD_SIZE)
  step = make_train_step(toy.loss_fn, tx, ema_decay=ema_decay, lr_schedule=sched)
  return state, shardings, step


def _train(mesh, n_steps=2):
  state, shardings, step = _setup(mesh)
  abstract = jax.eval_shape(lambda: state)
  rng = jax.device_put(jax.random.key(1), sh.replicated(mesh))
  batches = [toy.make_batch(i, GLOBAL_BATCH) for i in range(n_steps)]
  compiled, seconds = sh.compile_train_step(step, mesh, shardings, abstract, batches[0], rng)
  for b in batches:
    state, metrics = compiled(state, sh.make_global_batch(b, mesh), rng, None)
  return state, metrics, seconds


@pytest.fixture(scope="module")
def single_device():
  return _train(sh.make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (2, 4)])
def test_sharded_step_equals_single_device(single_device, data, fsdp):
  ref, ref_metrics, _ = single_device
  mesh = sh.make_mesh(data=data, fsdp=fsdp)
  state, metrics, seconds = _train(mesh)
  kernel_spec = state.params["dense_0"]["kernel"].sharding.spec
  if fsdp > 1:  # The toy kernels really are split over fsdp (64 is the largest divisible dim).
    assert kernel_spec == P(None, "fsdp"), kernel_spec
    assert state.opt_state[1][0].mu["dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
  else:
    assert kernel_spec == P(), kernel_spec
  assert state.params["dense_0"]["bias"].sharding.spec == P()  # 64 elements: replicated.
  diffs = [
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves((ref.params, ref.ema_params)), jax.tree.leaves((state.params, state.ema_params)))
  ]
  print(f"mesh data={data} fsdp={fsdp}: max |params - single device| = {max(diffs):.3g}, "
        f"compile {seconds:.2f} s")
  assert max(diffs) < 1e-6
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  assert int(state.step) == int(ref.step) == 2


def test_no_recompilation():
  mesh = sh.make_mesh(data=4, fsdp=2)
  traces = []

  def counting_loss(params, batch, rng, frozen):
    traces.append(1)
    return toy.loss_fn(params, batch, rng, frozen)

  tx, _ = make_optimizer(dict(lr=1e-2, warmup_steps=0))
  create = lambda r: TrainState.create(toy.init_params(r), tx, 0.99)  # noqa: E731
  state, shardings = sh.init_sharded(create, mesh, jax.random.key(0), min_shard_size=256)
  step = jax.jit(make_train_step(counting_loss, tx, ema_decay=0.99), out_shardings=(shardings, sh.replicated(mesh)),
                 donate_argnums=(0,))
  rng = jax.random.key(1)
  for i in range(4):
    state, _ = step(state, sh.make_global_batch(toy.make_batch(i, GLOBAL_BATCH), mesh), rng)
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_batch_not_divisible_is_a_clear_error():
  mesh = sh.make_mesh(data=4, fsdp=2)
  with pytest.raises(ValueError, match=r"Global batch size 12 is not divisible by the 8 devices"):
    sh.make_global_batch(toy.make_batch(0, 12), mesh)
  with pytest.raises(ValueError, match="not divisible"):
    state, shardings, step = _setup(mesh)
    sh.compile_train_step(step, mesh, shardings, jax.eval_shape(lambda: state), toy.make_batch(0, 4), jax.random.key(0))
  with pytest.raises(ValueError, match="leading batch axis"):
    sh.make_global_batch({"x": np.zeros((8, 2)), "y": np.zeros((4, 2))}, mesh)


def test_mesh_errors():
  with pytest.raises(ValueError, match="fsdp=3"):
    sh.make_mesh(fsdp=3)
  with pytest.raises(ValueError, match="data=2 x fsdp=2"):
    sh.make_mesh(data=2, fsdp=2)
  mesh = sh.make_mesh(fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_fsdp_minus_one_takes_the_devices_data_leaves():
  """fsdp=-1 (finetune.py:sdxl's ZeRO-3 over everything): all devices, or those data leaves."""
  assert sh.mesh_shape(-1, -1, 8) == (1, 8) and sh.mesh_shape(1, -1, 8) == (1, 8)
  assert sh.mesh_shape(2, -1, 8) == (2, 4)
  with pytest.raises(ValueError, match="data=3 must divide the 8 devices"):
    sh.mesh_shape(3, -1, 8)


def test_fsdp_spec():
  assert sh.fsdp_spec((3, 3, 320, 640), 4, 16) == P(None, None, None, "fsdp")
  assert sh.fsdp_spec((640, 320), 4, 16) == P("fsdp", None)
  assert sh.fsdp_spec((1280, 6), 8, 16) == P("fsdp", None)
  assert sh.fsdp_spec((7, 9), 4, 16) == P()  # Nothing divisible.
  assert sh.fsdp_spec((320,), 4, 2**14) == P()  # Small: replicated.
  assert sh.fsdp_spec((), 4, 0) == P()
  assert sh.fsdp_spec((640, 320), 1, 0) == P()  # No fsdp axis.


def test_frozen_network_is_sharded_and_used():
  """A frozen input projection (not trained, not donated) on a data=4 x fsdp=2 mesh."""

  def loss_with_frozen(params, batch, rng, frozen):
    batch = dict(batch, x=batch["x"] @ frozen["proj"])
    return toy.loss_fn(params, batch, rng)

  proj = np.linalg.qr(np.random.default_rng(0).normal(size=(toy.D_IN, toy.D_IN)))[0]
  proj = proj.astype(np.float32)
  results = []
  for mesh in (sh.make_mesh(devices=jax.devices()[:1]), sh.make_mesh(data=4, fsdp=2)):
    tx, _ = make_optimizer(dict(lr=1e-2, warmup_steps=0))
    create = lambda r: TrainState.create(toy.init_params(r), tx)  # noqa: E731
    state, shardings = sh.init_sharded(create, mesh, jax.random.key(0), min_shard_size=64)
    frozen = sh.shard_tree({"proj": proj}, mesh, min_shard_size=64)
    rng = jax.device_put(jax.random.key(1), sh.replicated(mesh))
    compiled, _ = sh.compile_train_step(make_train_step(loss_with_frozen, tx), mesh, shardings,
                                        jax.eval_shape(lambda: state), toy.make_batch(0, 16), rng, frozen)
    state, _ = compiled(state, sh.make_global_batch(toy.make_batch(0, 16), mesh), rng, frozen)
    assert not frozen["proj"].is_deleted()  # Not donated.
    results.append(np.asarray(state.params["dense_0"]["kernel"]))
  assert frozen["proj"].sharding.spec == P("fsdp", None)
  # Adam's first update is ~lr * sign(g): roundoff in a near-zero gradient entry can move one
  # element by a fraction of lr (1e-2), so the bound is 1% of lr.
  np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_frozen_must_be_on_devices():
  mesh = sh.make_mesh(data=8)
  state, shardings, step = _setup(mesh)
  with pytest.raises(ValueError, match="shard_tree"):
    sh.compile_train_step(step, mesh, shardings, jax.eval_shape(lambda: state), toy.make_batch(0, 8), jax.random.key(0),
                          frozen={"w": np.ones(3)})
  frozen = sh.shard_tree({"w": np.ones((512, 4), np.float32)}, sh.make_mesh(fsdp=2), 256)
  assert frozen["w"].sharding.spec == P("fsdp", None)
