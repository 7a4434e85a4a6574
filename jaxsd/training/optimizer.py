"""AdamW with warmup + cosine/constant learning rate, global-norm clipping, gradient accumulation.

Every step count in the config (`warmup_steps`, `total_steps`) counts *train steps*, i.e. calls
of `train_step`, which is what the logs and the checkpoints are numbered by. With
`grad_accum_steps = k > 1` each train step sees one micro-batch, the optimizer updates the
parameters every k-th step with the mean gradient, and the learning rate follows the schedule
evaluated at the train step of that update.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[int], float]

_SCHEDULES = ("cosine", "constant")
_MU_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
  """The optimizer section of a training config, with the defaults used when a key is absent."""
  return ml_collections.ConfigDict(
      dict(
          lr=1e-4,
          warmup_steps=500,
          schedule="constant",  # "cosine" decays to end_lr_ratio * lr at total_steps.
          total_steps=10_000,
          end_lr_ratio=0.0,
          weight_decay=1e-2,  # diffusers train_text_to_image default (AdamW on every parameter).
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          grad_clip_norm=1.0,  # <= 0 disables clipping.
          grad_accum_steps=1,
          # AdamW's first moment in bfloat16 (optax's mu_dtype): a quarter less optimizer state and
          # memory traffic per update; the second moment stays in the parameters' dtype.
          mu_dtype="float32",
      ))


def _resolve(cfg) -> ml_collections.ConfigDict:
  """Defaults overlaid with `cfg`; unknown keys and bad values are errors."""
  out = default_config()
  given = dict(cfg) if cfg is not None else {}
  unknown = sorted(set(given) - set(out))
  if unknown:
    raise ValueError(f"Unknown optimizer config keys {unknown}; known keys: {sorted(out)}.")
  out.update(given)
  if out.schedule not in _SCHEDULES:
    raise ValueError(f"optimizer.schedule={out.schedule!r}; use one of {_SCHEDULES}.")
  if not (math.isfinite(out.lr) and out.lr > 0):
    raise ValueError(f"optimizer.lr={out.lr} must be a finite number > 0.")
  if out.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps={out.warmup_steps} must be >= 0.")
  for key in ("b1", "b2"):
    if not 0 <= out[key] < 1:
      raise ValueError(f"optimizer.{key}={out[key]} must be in [0, 1) (AdamW's moment decays; 0.9 and 0.999 usually).")
  if not (math.isfinite(out.eps) and out.eps > 0):
    raise ValueError(f"optimizer.eps={out.eps} must be > 0 (1e-8 usually): AdamW divides by sqrt(v) + eps.")
  if not (math.isfinite(out.weight_decay) and out.weight_decay >= 0):
    raise ValueError(f"optimizer.weight_decay={out.weight_decay} must be >= 0 (0 turns it off).")
  if not 0 <= out.end_lr_ratio <= 1:
    raise ValueError(f"optimizer.end_lr_ratio={out.end_lr_ratio} must be in [0, 1] (the cosine decay's floor as a "
                     "share of lr).")
  if not math.isfinite(out.grad_clip_norm):
    raise ValueError(f"optimizer.grad_clip_norm={out.grad_clip_norm} must be a finite number (the largest global "
                     "gradient norm; <= 0 turns clipping off).")
  if out.total_steps < 0:
    raise ValueError(f"optimizer.total_steps={out.total_steps} must be >= 0.")
  if out.grad_accum_steps < 1:
    raise ValueError(f"optimizer.grad_accum_steps={out.grad_accum_steps} must be >= 1.")
  if out.mu_dtype not in _MU_DTYPES:
    raise ValueError(f"optimizer.mu_dtype={out.mu_dtype!r}; use one of {tuple(_MU_DTYPES)}.")
  if out.schedule == "cosine" and out.total_steps <= out.warmup_steps:
    raise ValueError(f"optimizer.total_steps={out.total_steps} must exceed warmup_steps={out.warmup_steps} "
                     "for the cosine schedule.")
  return out


def make_schedule(cfg) -> Schedule:
  """Learning rate per train step: linear warmup from 0, then cosine decay or constant."""
  c = _resolve(cfg)
  lr, warmup = float(c.lr), int(c.warmup_steps)
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=int(c.total_steps), end_value=lr * float(c.end_lr_ratio))
  if warmup == 0:
    return optax.constant_schedule(lr)
  return optax.warmup_constant_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm`: updates scaled by min(1, max_norm / global norm), written for XLA.

  Its state is optax's (`EmptyState`), so checkpoints of either load with the other. Two differences, both
  for speed: the clipping is one scalar multiply per leaf (optax selects per element between `t` and
  `t / norm * max_norm`, a clipped copy of every gradient that XLA:CPU wrote out for AdamW's two moment
  updates to read); and `update(..., global_norm=n)` takes the updates' global norm when the caller has it
  (`make_train_step` computes it for its finiteness check, and inside the step's conditional XLA would
  compute it again). AdamW with this clipping on the small benchmark U-Net's 72.5M parameters: 111 ms per
  update, 97 ms given the norm, 170 ms with optax's (docs/benchmarks.md). Results agree with optax's to
  fp32 rounding (1 ulp).
  """

  def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer from a config section (see `default_config` for the keys).

  Returns:
    (tx, lr_schedule): `tx` is clip -> AdamW, wrapped in `optax.MultiSteps` when
    `grad_accum_steps > 1`; `lr_schedule(step)` is the learning rate applied by the update at
    train step `step` (for logging).
  """
  c = _resolve(cfg)
  k = int(c.grad_accum_steps)
  base = make_schedule(c)
  if k == 1:
    inner_schedule, lr_schedule = base, base
  else:
    # The inner count advances once per k train steps; update number n happens at train step n*k.
    def inner_schedule(count):
      return base(count * k)

    def lr_schedule(step):
      return base((jnp.asarray(step) // k) * k)

  chain = []
  if c.grad_clip_norm and c.grad_clip_norm > 0:
    chain.append(clip_by_global_norm(float(c.grad_clip_norm)))
  chain.append(
      optax.adamw(learning_rate=inner_schedule, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                  weight_decay=float(c.weight_decay), mu_dtype=_MU_DTYPES[c.mu_dtype]))
  tx = optax.chain(*chain)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx, lr_schedule


def with_group_lr(tx: optax.GradientTransformation, group: str, ratio: float) -> optax.GradientTransformation:
  """`tx` with the updates of the params' top-level entry `group` scaled by `ratio`: that group trains at `ratio`
  times the schedule's learning rate, AdamW's step and its decoupled weight decay both (kohya's and diffusers'
  `text_encoder_lr`). The gradient clipping before it still sees every group's gradient together."""

  def mask(params):
    return {k: jax.tree.map(lambda _: k == group, v) for k, v in params.items()}

  return optax.chain(tx, optax.masked(optax.scale(float(ratio)), mask))
