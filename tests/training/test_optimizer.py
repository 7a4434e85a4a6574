"""Optimizer: schedules, gradient accumulation equals a big-batch step, clipping, config errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsd.training import make_optimizer, make_schedule
from jaxsd.training.optimizer import clip_by_global_norm, with_group_lr
from jaxsd.training.train_state import TrainState, make_train_step

from tests.training import toy_train as toy


def test_warmup_cosine_values():
  sched = make_schedule(dict(lr=1e-3, warmup_steps=10, schedule="cosine", total_steps=110))
  np.testing.assert_allclose(float(sched(0)), 0.0)
  np.testing.assert_allclose(float(sched(5)), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  # Halfway through the decay: 0.5 * (1 + cos(pi / 2)) = 0.5.
  np.testing.assert_allclose(float(sched(60)), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(float(sched(35)), 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)), rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(sched(500)), 0.0, atol=1e-12)


def test_warmup_constant_values():
  sched = make_schedule(dict(lr=2e-4, warmup_steps=4, schedule="constant"))
  got = [float(sched(s)) for s in range(7)]
  np.testing.assert_allclose(got, [0, 0.5e-4, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4], rtol=1e-6)
  no_warmup = make_schedule(dict(lr=2e-4, warmup_steps=0, schedule="constant"))
  np.testing.assert_allclose(float(no_warmup(0)), 2e-4)


def test_config_errors():
  with pytest.raises(ValueError, match="Unknown optimizer config keys.*learning_rate"):
    make_optimizer(dict(learning_rate=1e-3))
  with pytest.raises(ValueError, match="schedule"):
    make_optimizer(dict(schedule="linear"))
  with pytest.raises(ValueError, match="total_steps"):
    make_optimizer(dict(schedule="cosine", warmup_steps=10, total_steps=10))
  with pytest.raises(ValueError, match="grad_accum_steps"):
    make_optimizer(dict(grad_accum_steps=0))
  with pytest.raises(ValueError, match="mu_dtype='float16'"):
    make_optimizer(dict(mu_dtype="float16"))
  for key, value in (("lr", float("inf")), ("lr", float("nan")), ("eps", float("inf")), ("weight_decay", float("inf")),
                     ("grad_clip_norm", float("nan"))):
    with pytest.raises(ValueError, match=f"optimizer.{key}={value} must be"):
      make_optimizer({key: value})


def _run(cfg, batches, ema_decay=None):
  tx, sched = make_optimizer(cfg)
  state = TrainState.create(toy.init_params(jax.random.key(0)), tx, ema_decay)
  step = jax.jit(make_train_step(toy.loss_fn, tx, ema_decay=ema_decay, lr_schedule=sched))
  rng = jax.random.key(1)
  lrs = []
  for b in batches:
    state, m = step(state, b, rng)
    lrs.append(float(m["lr"]))
  return state, lrs


def _noise_free_loss(params, batch, rng, frozen=None):
  del rng, frozen
  return jnp.mean((toy.apply(params, batch["x"]) - batch["y"])**2), {}


def test_grad_accumulation_equals_big_batch(monkeypatch):
  monkeypatch.setattr(toy, "loss_fn", _noise_free_loss)  # Same loss for every micro-batch rng.
  k, micro = 4, 4
  cfg = dict(lr=1e-2, warmup_steps=2, schedule="cosine", total_steps=40, grad_clip_norm=0.5)
  big = [toy.make_batch(i, k * micro) for i in range(3)]
  small = [jax.tree.map(lambda x, j=j: x[j * micro:(j + 1) * micro], b) for b in big for j in range(k)]
  # Config step counts are train steps: the accumulated run has k times as many.
  ref, _ = _run(cfg, big, ema_decay=0.9)
  acc_cfg = dict(cfg, grad_accum_steps=k, warmup_steps=2 * k, total_steps=40 * k)
  acc, lrs = _run(acc_cfg, small, ema_decay=0.9)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(acc.params)))
  print(f"grad accumulation vs big batch: max |dparams| = {diff:.3g}")
  assert diff < 1e-5
  ema_diff = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref.ema_params), jax.tree.leaves(acc.ema_params)))
  assert ema_diff < 1e-5, ema_diff
  # The params moved, and the micro-steps inside a window did not move them.
  init = toy.init_params(jax.random.key(0))
  assert not np.allclose(init["dense_0"]["kernel"], acc.params["dense_0"]["kernel"])
  # The logged lr is constant within an accumulation window and follows the big-batch schedule.
  assert lrs[0:4] == [lrs[0]] * 4 and lrs[4:8] == [lrs[4]] * 4
  sched = make_schedule(cfg)
  np.testing.assert_allclose(lrs[::k], [float(sched(n)) for n in range(3)], rtol=1e-6)


def test_global_norm_clipping():
  clip = 0.5
  tx, _ = make_optimizer(dict(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip_norm=clip))
  ref_tx = optax.adamw(1e-2, weight_decay=0.0)
  no_clip_tx, _ = make_optimizer(dict(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.0))
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
  s, s_ref, s_nc = tx.init(params), ref_tx.init(params), no_clip_tx.init(params)
  p, p_ref, p_nc = params, params, params
  rng = np.random.default_rng(0)
  for scale in (10.0, 0.1, 3.0):  # Norms above and below the threshold.
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32), params)
    norm = float(optax.tree.norm(g))
    g_clipped = jax.tree.map(lambda x: x * min(1.0, clip / norm), g)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    u, s_ref = ref_tx.update(g_clipped, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    u, s_nc = no_clip_tx.update(g, s_nc, p_nc)
    p_nc = optax.apply_updates(p_nc, u)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(p["w"], p_nc["w"], rtol=1e-4)  # Clipping changed the result.


def test_clipping_is_optaxs_and_takes_a_given_norm():
  """optimizer.clip_by_global_norm against optax.clip_by_global_norm: the same state (checkpoints interchange)
  and the same updates to fp32 rounding above and below the threshold; with `global_norm=` it scales by that
  norm instead of computing one."""
  ours, ref = clip_by_global_norm(0.5), optax.clip_by_global_norm(0.5)
  rng = np.random.default_rng(0)
  g = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  s = ours.init(g)
  assert jax.tree.structure(s) == jax.tree.structure(ref.init(g))
  for scale in (10.0, 0.01):
    gs = jax.tree.map(lambda x: x * scale, g)
    got, want = ours.update(gs, s)[0], ref.update(gs, s)[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-7, atol=0)
  norm = float(optax.tree.norm(g))
  given = ours.update(g, s, None, global_norm=jnp.float32(2 * norm))[0]
  np.testing.assert_allclose(given["w"], g["w"] * 0.5 / (2 * norm), rtol=1e-6)
  below = ours.update(g, s, None, global_norm=jnp.float32(0.25))[0]
  np.testing.assert_array_equal(below["w"], g["w"])


def _norm_recorder():
  """A transformation whose state records the `global_norm` it was given (-1: none); updates are zero."""

  def update(updates, state, params=None, *, global_norm=None, **extra):
    del params, extra, state
    seen = jnp.float32(-1.0) if global_norm is None else jnp.asarray(global_norm, jnp.float32)
    return jax.tree.map(jnp.zeros_like, updates), seen

  return optax.GradientTransformationExtraArgs(lambda p: jnp.float32(0.0), update)


def test_train_step_gives_the_gradient_norm_to_the_optimizer_unless_accumulating():
  params = toy.init_params(jax.random.key(0))
  batch, rng = toy.make_batch(0, 8), jax.random.key(1)
  grads = jax.grad(lambda p: toy.loss_fn(p, batch, jax.random.fold_in(rng, 0))[0])(params)
  multi = optax.MultiSteps(_norm_recorder(), every_k_schedule=1)  # forwards extra arguments to the inner one
  for tx, want in ((optax.chain(_norm_recorder()), float(optax.tree.norm(grads))),
                   (optax.GradientTransformationExtraArgs(multi.init, multi.update), -1.0)):
    state = TrainState.create(params, tx)
    state, m = jax.jit(make_train_step(toy.loss_fn, tx))(state, batch, rng)
    seen = jax.tree.leaves(state.opt_state)
    seen = seen[0] if len(seen) == 1 else state.opt_state.inner_opt_state
    np.testing.assert_allclose(float(seen), want, rtol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-6)


def test_ema_waits_for_the_accumulation_window_inside_a_group_lr():
  """optax.MultiSteps found inside with_group_lr's chain: the EMA moves only when the window's update does."""
  cfg = dict(lr=1e-2, warmup_steps=0, grad_accum_steps=2)
  params = {"unet": toy.init_params(jax.random.key(0)), "text_encoder": {"e": jnp.ones((5,))}}
  tx = with_group_lr(make_optimizer(cfg)[0], "text_encoder", 0.5)

  def loss(p, batch, rng, frozen=None):
    l, aux = toy.loss_fn(p["unet"], batch, rng)
    return l + jnp.sum(p["text_encoder"]["e"]**2), aux

  step = jax.jit(make_train_step(loss, tx, ema_decay=0.5))
  state = TrainState.create(params, tx, ema_decay=0.5)
  state, _ = step(state, toy.make_batch(0, 8), jax.random.key(1))  # first micro-step: nothing moves
  np.testing.assert_array_equal(state.ema_params["text_encoder"]["e"], params["text_encoder"]["e"])
  state, _ = step(state, toy.make_batch(1, 8), jax.random.key(1))  # the window's update
  assert not np.allclose(state.params["text_encoder"]["e"], 1.0)
  # The first update's decay, min(0.5, (1 + 0) / (10 + 0)) = 0.1: ema = 0.1 * 1 + 0.9 * params.
  np.testing.assert_allclose(state.ema_params["text_encoder"]["e"], 0.1 + 0.9 * state.params["text_encoder"]["e"],
                             rtol=1e-6)


def test_a_group_trains_at_its_own_learning_rate():
  """with_group_lr (the U-Net stage's `text_encoder_lr`): the group's AdamW updates, weight decay included, are
  the plain optimizer's times the ratio; the other group's are the plain optimizer's, and the clipping sees
  both groups' gradients together."""
  cfg = dict(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip_norm=0.5)
  plain = make_optimizer(cfg)[0]
  grouped = with_group_lr(plain, "text_encoder", 0.1)
  rng = np.random.default_rng(0)
  params = {
      "unet": {
          "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
      },
      "text_encoder": {
          "e": jnp.asarray(rng.normal(size=(5,)), jnp.float32)
      }
  }
  s_plain, s_grouped = plain.init(params), grouped.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u_plain, s_plain = plain.update(grads, s_plain, params)
    u_grouped, s_grouped = grouped.update(grads, s_grouped, params)
    np.testing.assert_allclose(u_grouped["unet"]["w"], u_plain["unet"]["w"], rtol=1e-6)
    np.testing.assert_allclose(u_grouped["text_encoder"]["e"], 0.1 * u_plain["text_encoder"]["e"], rtol=1e-6)
    params = optax.apply_updates(params, u_plain)


def test_bf16_first_moment():
  """optimizer.mu_dtype='bfloat16' keeps AdamW's first moment in bf16 (the second in fp32) and
  moves the parameters as the fp32 optimizer does, within bf16's rounding of mu."""
  params = {"w": jnp.ones((16, 32)), "b": jnp.zeros((32,))}
  run = {}
  for mu in ("float32", "bfloat16"):
    tx, _ = make_optimizer(dict(lr=1e-2, warmup_steps=0, mu_dtype=mu))
    s, p = tx.init(params), params
    rng = np.random.default_rng(0)
    for _ in range(5):
      g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    adam = s[-1][0]
    run[mu] = (p, adam.mu["w"].dtype, adam.nu["w"].dtype)
  assert run["float32"][1:] == (jnp.float32, jnp.float32)
  assert run["bfloat16"][1:] == (jnp.bfloat16, jnp.float32)
  moved = np.abs(run["float32"][0]["w"] - 1.0).mean()
  diff = np.abs(run["bfloat16"][0]["w"] - run["float32"][0]["w"]).max()
  assert moved > 1e-2 and diff < 0.01 * moved  # measured: moved 0.023, diff 2.0e-4
