"""The train step (non-finite skips, EMA, bf16 compute) and the loop (resume, kill, SIGTERM)."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd import flops as flops_lib
from jaxsd import training
from jaxsd.training import metrics as metrics_lib
from jaxsd.training import sharding as sh
from jaxsd.training import train_state
from jaxsd.training.train_state import TrainState, ema_decay_rate, make_train_step
from tests.training import toy_train as toy


def _tx():
  return training.make_optimizer(dict(lr=1e-2, warmup_steps=0))


def _equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _nan_batch(i):
  b = toy.make_batch(i, 8)
  b["x"][:] = np.nan
  return b


def _inf_grad_loss(params, batch, rng, frozen=None):
  """Finite loss, infinite gradient (d sqrt(u) / du at u = 0)."""
  loss, aux = toy.loss_fn(params, batch, rng, frozen)
  w = params["dense_0"]["kernel"][0, 0]
  return loss + jnp.sqrt(jnp.abs(w - jax.lax.stop_gradient(w))), aux


@pytest.mark.parametrize("guard", ["cond", "select"])
def test_nonfinite_step_is_a_counted_noop(guard, monkeypatch):
  # The CPU keeps a non-finite step's state with a conditional, accelerators with a select: both here.
  if guard == "select":
    monkeypatch.setattr(train_state, "_COND_BACKENDS", ())
  tx, _ = _tx()
  state = TrainState.create(toy.init_params(jax.random.key(0)), tx, 0.999)
  good = jax.jit(make_train_step(toy.loss_fn, tx, ema_decay=0.999))
  inf_grad = jax.jit(make_train_step(_inf_grad_loss, tx, ema_decay=0.999))
  rng = jax.random.key(0)
  state, m = good(state, toy.make_batch(0, 8), rng)
  before = state
  bad_steps = [(good, _nan_batch(1)), (inf_grad, toy.make_batch(1, 8)), (good, _nan_batch(2))]
  for i, (step, batch) in enumerate(bad_steps):
    state, m = step(state, batch, rng)
    assert float(m["nonfinite"]) == 1.0
    assert int(state.consecutive_nonfinite) == i + 1
  assert _equal((state.params, state.opt_state, state.ema_params), (before.params, before.opt_state, before.ema_params))
  assert int(state.step) == 4 and int(state.nonfinite_count) == 3
  state, m = good(state, toy.make_batch(2, 8), rng)
  assert float(m["nonfinite"]) == 0.0 and int(state.consecutive_nonfinite) == 0
  assert int(state.nonfinite_count) == 3
  assert not _equal(state.params, before.params)


@pytest.mark.parametrize("accum", [1, 2])
def test_cond_and_select_guards_agree(accum, monkeypatch):
  """The two ways of keeping a non-finite step's state give the same states over good and bad steps, with EMA
  and with gradient accumulation: the counters exactly, the floats to rounding (the two programs are fused
  differently, and XLA may contract a multiply-add in one and not the other)."""
  tx, _ = training.make_optimizer(dict(lr=1e-2, warmup_steps=0, grad_accum_steps=accum))
  batches = [toy.make_batch(0, 8), _nan_batch(1), toy.make_batch(2, 8), toy.make_batch(3, 8), toy.make_batch(4, 8)]
  states = []
  for backends in (("cpu",), ()):
    monkeypatch.setattr(train_state, "_COND_BACKENDS", backends)
    step = jax.jit(make_train_step(toy.loss_fn, tx, ema_decay=0.9))
    state = TrainState.create(toy.init_params(jax.random.key(0)), tx, 0.9)
    for b in batches:
      state, _ = step(state, b, jax.random.key(0))
    states.append(state)
  assert int(states[0].nonfinite_count) == 1
  assert not _equal(states[0].params, toy.init_params(jax.random.key(0)))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(states[0]), jax.tree.leaves(states[1])):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.integer):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))


def test_ema_rule():
  np.testing.assert_allclose(ema_decay_rate(0, 0.9999), 0.1)
  np.testing.assert_allclose(ema_decay_rate(1, 0.9999), 2 / 11)
  np.testing.assert_allclose(ema_decay_rate(10**6, 0.9999), 0.9999)
  np.testing.assert_allclose(ema_decay_rate(0, 0.99, warmup=False), 0.99)
  tx, _ = _tx()
  p0 = toy.init_params(jax.random.key(0))
  state = TrainState.create(p0, tx, 0.9999)
  step = jax.jit(make_train_step(toy.loss_fn, tx, ema_decay=0.9999))
  state, _ = step(state, toy.make_batch(0, 8), jax.random.key(0))
  p1 = state.params
  state, _ = step(state, toy.make_batch(1, 8), jax.random.key(0))
  want = jax.tree.map(lambda a, b, c: 2 / 11 * (0.1 * a + 0.9 * b) + 9 / 11 * c, p0, p1, state.params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  no_ema = TrainState.create(p0, tx, None)
  assert no_ema.ema_params is None


def test_bf16_compute_fp32_master():

  def bf16_loss(params, batch, rng, frozen=None):
    del rng, frozen
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    pred = toy.apply(p, batch["x"].astype(jnp.bfloat16)).astype(jnp.float32)
    return jnp.mean((pred - batch["y"])**2), {}

  tx, _ = _tx()
  state = TrainState.create(toy.init_params(jax.random.key(0)), tx, 0.99)
  p0 = state.params
  state, m = jax.jit(make_train_step(bf16_loss, tx, ema_decay=0.99))(state, toy.make_batch(0, 8), jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.ema_params)))
  assert np.isfinite(float(m["loss"])) and not _equal(state.params, p0)


class PoisonedIterator(toy.FakeIterator):
  """Batches whose index is in `bad` contain NaN inputs."""

  def __init__(self, bad, **kw):
    super().__init__(**kw)
    self.bad = set(bad)

  def __next__(self):
    i = self.index
    b = super().__next__()
    if i in self.bad:
      b["x"][:] = np.nan
    return b


def test_loop_logs_checkpoints_and_resumes(tmp_path):
  calls = []
  cb = training.PeriodicCallback(
      every=2, fn=lambda s, st, w: calls.append(
          (s, int(st.step), w.write_images(s, {"grid": np.zeros((4, 4, 3), np.uint8)}))))
  res = toy.run_loop(tmp_path, PoisonedIterator(bad=[3, 4], batch_size=16), 6, callbacks=[cb])
  assert (res.step, res.source, res.preempted) == (6, "scratch", False)
  assert int(res.state.nonfinite_count) == 2  # Two NaN batches skipped, training went on.
  assert [c[:2] for c in calls] == [(2, 2), (4, 4), (6, 6)]
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 2, 4, 6]
  assert rows[0]["compile_seconds"] > 0
  assert {"loss", "grad_norm", "lr", "mae", "images_per_sec", "nonfinite_count"} <= set(rows[1])
  assert rows[2]["nonfinite_count"] == 1 and rows[2]["loss"] is None  # NaN written as null.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  params6 = res.state.params

  data = toy.FakeIterator(batch_size=16)
  res = toy.run_loop(tmp_path, data, 8)
  assert (res.step, res.source) == (8, "checkpoint")
  assert data.index == 8  # Iterator position restored to 6, then two more batches.
  assert not _equal(res.state.params, params6)


def test_too_many_nonfinite_steps_raise(tmp_path):
  data = PoisonedIterator(bad=range(2, 100), batch_size=16)
  with pytest.raises(RuntimeError, match=r"4 non-finite steps in a row at step 6"):
    toy.run_loop(tmp_path, data, 50, max_consecutive_nonfinite=4, checkpoint_every=1)
  c = training.Checkpointer(str(tmp_path))
  # Saves went on while the skipped steps left the params finite; the raise comes before step 6's.
  assert c.latest_step() == 5
  c.close()


def test_benchmark():
  mesh = sh.make_mesh(data=8)
  tx, _ = _tx()
  create = lambda r: TrainState.create(toy.init_params(r), tx, None)  # noqa: E731
  state, shardings = sh.init_sharded(create, mesh, jax.random.key(0))
  batch = toy.make_batch(0, 16)
  rng = jax.device_put(jax.random.key(0), sh.replicated(mesh))
  compiled, secs = sh.compile_train_step(make_train_step(toy.loss_fn, tx), mesh, shardings,
                                         jax.eval_shape(lambda: state), batch, rng)
  state, out = flops_lib.benchmark(compiled, state, sh.make_global_batch(batch, mesh), rng, steps=3, warmup=1,
                                   compile_seconds=secs)
  print("benchmark:", out)
  assert out["devices"] == 8 and out["images_per_sec"] > 0 and out["tflops_per_device"] > 0
  assert "mfu" not in out  # CPU: no known peak.
  assert int(state.step) == 4
  assert flops_lib.peak_flops_per_device("TPU v5 lite") == 197e12
  assert flops_lib.peak_flops_per_device("TPU v5p") == 459e12
  assert flops_lib.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert flops_lib.peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
  assert flops_lib.peak_flops_per_device("cpu") is None


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
  steps, sleep = 16, 0.2
  cache = tmp_path / "jax_cache"
  ref = toy.start_subprocess(tmp_path / "ref", tmp_path / "ref.npz", steps, 0.0, cache)
  run = toy.start_subprocess(tmp_path / "run", tmp_path / "run.npz", steps, sleep, cache)
  at = toy.wait_for_checkpoint(run, tmp_path / "run", min_step=4)
  run.send_signal(signal.SIGKILL)
  run.wait()
  assert run.returncode == -signal.SIGKILL and at < steps
  assert not os.path.exists(tmp_path / "run.npz")
  toy.finish(ref)
  out = toy.finish(toy.start_subprocess(tmp_path / "run", tmp_path / "run.npz", steps, sleep, cache))
  assert "source=checkpoint" in out, out
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert int(b["step"]) == steps and int(b["data_index"]) == int(a["data_index"]) == steps
  keys = [k for k in a.files if k.startswith(("params/", "ema/"))]
  assert len(keys) == 8 and sorted(keys) == sorted(k for k in b.files if "/" in k)
  for k in keys:
    assert np.array_equal(a[k], b[k]), (k, np.max(np.abs(a[k] - b[k])))
