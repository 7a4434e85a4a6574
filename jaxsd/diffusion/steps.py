"""One model call's update for each sampler: (schedule, i, x, out, state, noise) -> (x, state), in jnp.

`Schedule` is the pytree of float32 arrays that `samplers.make_schedule` builds and every update indexes by
the call's index i; `out` is the network's float32 output, `state` the sampler's earlier outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Schedule:
  """Everything one sampling run indexes, as float32 arrays; the loop runs len(timesteps) calls."""

  timesteps: jax.Array  # [L] the t given to model_fn at each call
  init_noise_sigma: jax.Array  # [] scale of pure-noise initial latents (text-to-image)
  levels: jax.Array  # [L + 1, 2] (a, b): before call i the latents are a * x0 + b * noise; row L is (1, 0)
  sampler: str = struct.field(pytree_node=False)
  prediction_type: str = struct.field(pytree_node=False)
  clip_sample_range: float | None = struct.field(pytree_node=False)  # None: no clipping of x0
  sigmas: jax.Array | None = None  # [L + 1] noise levels (Euler family, DPM++, UniPC, EDM); the last is 0 (or
  # EDM's sigma_min)
  alphas: jax.Array | None = None  # [L] alpha_bar at each call's timestep (DDIM, PNDM, DDPM, LCM)
  alphas_prev: jax.Array | None = None  # [L] alpha_bar the step moves to
  coeffs: jax.Array | None = None  # [L, k] per-call weights (LMS, DPM++ 2M (SDE), UniPC, TCD; DDIM with eta > 0)
  # [L, 3] (c_in, c_skip, c_out) per call: EDM's preconditioning, LCM's boundary condition (c_in = 1 there).
  scalings: jax.Array | None = None
  prk_calls: int = struct.field(pytree_node=False, default=0)  # PNDM: Runge-Kutta warm-up calls before PLMS


def _x0_eps(s: Schedule, out, x, alpha, sigma):
  """Predicted x0 and eps from the model output, for x = alpha * x0 + sigma * eps, alpha^2 + sigma^2 = 1.

  The one place that reads `prediction_type`: eps, x0 ("sample") or v = alpha * eps - sigma * x0
  (Salimans & Ho 2022).
  """
  if s.prediction_type == "epsilon":
    return (x - sigma * out) / alpha, out
  if s.prediction_type == "v_prediction":
    return alpha * x - sigma * out, alpha * out + sigma * x
  return out, (x - alpha * out) / sigma


def _denoised(s: Schedule, out, x, sigma):
  """Predicted x0 at noise level sigma of the Euler family's x = x0 + sigma * eps (x / sqrt(sigma^2 + 1)
  is the variance-preserving x that the model saw)."""
  alpha = 1 / jnp.sqrt(sigma**2 + 1)
  return _x0_eps(s, out, x * alpha, alpha, sigma * alpha)[0]


def _clip(s: Schedule, x0):
  r = s.clip_sample_range
  return x0 if r is None else jnp.clip(x0, -r, r)


def ddim_step(s, i, x, out, state, noise):
  """Implements DDIM, Song et al. (2021) eq. 12: deterministic (eta = 0), or, where the schedule has `coeffs`
  (eta > 0), with fresh noise of std eta sigma_t (their eq. 16) and the direction term shrunk to match, as
  diffusers' DDIMScheduler.step (the unclipped eps: use_clipped_model_output=False, what its pipelines pass)."""
  a, a_prev = s.alphas[i], s.alphas_prev[i]
  x0, eps = _x0_eps(s, out, x, jnp.sqrt(a), jnp.sqrt(1 - a))
  if s.coeffs is None:
    return jnp.sqrt(a_prev) * _clip(s, x0) + jnp.sqrt(1 - a_prev) * eps, state
  c = s.coeffs[i]  # (sqrt(1 - a_prev - std^2), std)
  return jnp.sqrt(a_prev) * _clip(s, x0) + c[0] * eps + c[1] * noise, state


# Adams-Bashforth weights of PLMS by call index: 0, 1 (the repeated first step), 2, 3, >= 4.
_PLMS_WEIGHTS = np.array([[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
                          [55 / 24, -59 / 24, 37 / 24, -9 / 24]], np.float32)


def _pndm_update(s, i, x, e):
  """The transfer x_t -> x_t' of Liu et al. (2022) eq. 11 with the combined output e (diffusers' _get_prev_sample)."""
  a_t, a_prev = s.alphas[i], s.alphas_prev[i]
  e = _x0_eps(s, e, x, jnp.sqrt(a_t), jnp.sqrt(1 - a_t))[1]  # (PNDM refuses prediction_type="sample")
  denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
  return jnp.sqrt(a_prev / a_t) * x - (a_prev - a_t) * e / denom


def pndm_step(s, i, x, out, state, noise):
  """Implements PLMS, Liu et al. (2022) eq. 12, as diffusers' PNDM (with its Runge-Kutta warm-up if
  the schedule has one)."""
  if s.prk_calls:
    return _prk_plms_step(s, i, x, out, state)
  ets, x_first, acc = state  # previous outputs, newest first; the latents the first call started from
  w = jnp.asarray(_PLMS_WEIGHTS)[jnp.minimum(i, 4)]
  e = w[0] * out + w[1] * ets[0] + w[2] * ets[1] + w[3] * ets[2]
  x = jnp.where(i == 1, x_first, x)  # the repeated call redoes the first step with averaged outputs
  x_next = _pndm_update(s, i, x, e)
  ets = jnp.where(i == 1, ets, jnp.concatenate([out[None], ets[:2]]))
  return x_next, (ets, jnp.where(i == 0, x, x_first), acc)


def _prk_plms_step(s, i, x, out, state):
  """PNDM with skip_prk_steps=False, as diffusers' step_prk then step_plms.

  The four calls of a Runge-Kutta step all move its first call's latents, with e1, e2, e3, then
  (e1 + 2 e2 + 2 e3 + e4) / 6; each step's e1 is kept for PLMS, which then runs at fourth order.
  """
  ets, x_start, acc = state  # each RK step's first output, newest first; that step's latents; the RK sum
  prk, r = i < s.prk_calls, i % 4
  x_start = jnp.where(prk & (r == 0), x, x_start)
  e_prk = jnp.where(r == 3, acc + out / 6, out)
  acc = jnp.where(r == 0, out / 6, jnp.where(r == 3, jnp.zeros_like(acc), acc + out / 3))
  w = _PLMS_WEIGHTS[4]
  e_plms = w[0] * out + w[1] * ets[0] + w[2] * ets[1] + w[3] * ets[2]
  x_next = _pndm_update(s, i, jnp.where(prk, x_start, x), jnp.where(prk, e_prk, e_plms))
  ets = jnp.where(~prk | (r == 0), jnp.concatenate([out[None], ets[:2]]), ets)
  return x_next, (ets, x_start, acc)


def ddpm_step(s, i, x, out, state, noise):
  """Implements ancestral sampling, Ho et al. (2020) Algorithm 2, via the posterior mean of eq. 7."""
  a_t, a_prev = s.alphas[i], s.alphas_prev[i]
  b_t, b_prev = 1 - a_t, 1 - a_prev
  cur_alpha = a_t / a_prev
  cur_beta = 1 - cur_alpha
  x0, _ = _x0_eps(s, out, x, jnp.sqrt(a_t), jnp.sqrt(1 - a_t))
  mean = (jnp.sqrt(a_prev) * cur_beta / b_t) * _clip(s, x0) + (jnp.sqrt(cur_alpha) * b_prev / b_t) * x
  std = jnp.sqrt(jnp.maximum(b_prev / b_t * cur_beta, 1e-20))
  return jnp.where(s.timesteps[i] > 0, mean + std * noise, mean), state


def euler_step(s, i, x, out, state, noise):
  """Implements Algorithm 2 (Euler steps) from Karras et al. (2022), without churn."""
  sigma = s.sigmas[i]
  d = (x - _denoised(s, out, x, sigma)) / sigma
  return x + d * (s.sigmas[i + 1] - sigma), state


def euler_ancestral_step(s, i, x, out, state, noise):
  """Implements ancestral sampling with Euler steps, k-diffusion's sample_euler_ancestral (eta = 1)."""
  sigma, sigma_to = s.sigmas[i], s.sigmas[i + 1]
  sigma_up = jnp.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
  sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
  d = (x - _denoised(s, out, x, sigma)) / sigma
  return x + d * (sigma_down - sigma) + noise * sigma_up, state


def heun_step(s, i, x, out, state, noise):
  """Implements Algorithm 1 (Heun steps) from Karras et al. (2022): even calls predict, odd correct."""
  d_prev, dt_prev, x_prev = state
  sigma = s.sigmas[i]  # the predictor's sigma, or the corrector's sigma_next
  d = (x - _clip(s, _denoised(s, out, x, sigma))) / sigma
  dt = s.sigmas[i + 1] - sigma
  first = i % 2 == 0
  x_next = jnp.where(first, x + d * dt, x_prev + (d_prev + d) / 2 * dt_prev)
  return x_next, jax.tree.map(lambda a, b: jnp.where(first, a, b), (d, dt, x), state)


def lms_step(s, i, x, out, state, noise):
  """Implements linear multistep sampling (order 4) in sigma, k-diffusion's sample_lms."""
  sigma = s.sigmas[i]
  ds = jnp.concatenate([((x - _denoised(s, out, x, sigma)) / sigma)[None], state[:3]])
  c = s.coeffs[i]
  return x + (c[0] * ds[0] + c[1] * ds[1] + c[2] * ds[2] + c[3] * ds[3]), ds


def dpmpp_2m_step(s, i, x, out, state, noise):
  """Implements DPM-Solver++(2M), Lu et al. (2022b) Algorithm 2; first order at the first and last step."""
  sigma = s.sigmas[i]
  alpha = 1 / jnp.sqrt(sigma**2 + 1)  # x here is variance-preserving: alpha * x0 + sigma * alpha * eps
  x0, _ = _x0_eps(s, out, x, alpha, sigma * alpha)
  c = s.coeffs[i]
  return c[0] * x + c[1] * x0 + c[2] * state, x0


def dpmpp_2m_sde_step(s, i, x, out, state, noise):
  """Implements SDE-DPM-Solver++(2M) (midpoint), Lu et al. (2022b), as diffusers' sde-dpmsolver++: DPM++(2M)'s
  step with the drift doubled and fresh noise."""
  x_next, x0 = dpmpp_2m_step(s, i, x, out, state, noise)
  return x_next + s.coeffs[i, 3] * noise, x0


def unipc_step(s, i, x, out, state, noise):
  """Implements UniPC (Zhao et al. 2023), UniC-2 corrector then UniP-2 predictor, B(h) = e^h - 1, as diffusers."""
  x_prev, x0_1, x0_2 = state  # the previous call's corrected latents, and the last two x0 predictions
  sigma = s.sigmas[i]
  alpha = 1 / jnp.sqrt(sigma**2 + 1)
  x0, _ = _x0_eps(s, out, x, alpha, sigma * alpha)  # from the latents the model saw, not the corrected ones
  c = s.coeffs[i]
  xc = c[0] * x + c[1] * x_prev + c[2] * x0_1 + c[3] * x0 + c[4] * x0_2
  return c[5] * xc + c[6] * x0 + c[7] * x0_1, (xc, x0, x0_1)


def _edm_denoised(s, i, x, out):
  """D(x; sigma) = c_skip x + c_out F, Karras et al. (2022) eq. 7 (diffusers negates c_out for v-prediction)."""
  return s.scalings[i, 1] * x + s.scalings[i, 2] * out


def edm_euler_step(s, i, x, out, state, noise):
  """Implements Algorithm 2 (Euler steps) from Karras et al. (2022), without churn, with EDM preconditioning."""
  sigma = s.sigmas[i]
  d = (x - _edm_denoised(s, i, x, out)) / sigma
  return x + d * (s.sigmas[i + 1] - sigma), state


def edm_dpmpp_2m_step(s, i, x, out, state, noise):
  """Implements DPM-Solver++(2M), Lu et al. (2022b) Algorithm 2, on EDM's x = x0 + sigma eps."""
  x0 = _edm_denoised(s, i, x, out)
  c = s.coeffs[i]
  return c[0] * x + c[1] * x0 + c[2] * state, x0


def lcm_step(s, i, x, out, state, noise):
  """Implements multistep latent consistency sampling, Luo et al. (2023) Algorithm 1: the consistency estimate
  c_skip x + c_out x0, then fresh noise to the next timestep (none after the last call)."""
  a, a_prev = s.alphas[i], s.alphas_prev[i]
  x0, _ = _x0_eps(s, out, x, jnp.sqrt(a), jnp.sqrt(1 - a))
  denoised = s.scalings[i, 2] * _clip(s, x0) + s.scalings[i, 1] * x
  return jnp.sqrt(a_prev) * denoised + jnp.sqrt(1 - a_prev) * noise, state


def tcd_step(s, i, x, out, state, noise):
  """Implements Trajectory Consistency Distillation's strategic stochastic sampling, Zheng et al. (2024) Algorithm 4:
  the x0 and eps predictions carried to the earlier timestep s = floor((1 - gamma) t_prev), then fresh noise back up
  to t_prev (none when gamma = 0, nor after the last call)."""
  a, a_s = s.alphas[i], s.alphas_prev[i]
  x0, eps = _x0_eps(s, out, x, jnp.sqrt(a), jnp.sqrt(1 - a))
  noised = jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps
  c = s.coeffs[i]
  return c[0] * noised + c[1] * noise, state


def kdpm2_step(s, i, x, out, state, noise):
  """Implements DPM-Solver-2, Lu et al. (2022) Algorithm 1 in sigma, k-diffusion's sample_dpm_2 (and, with noise,
  sample_dpm_2_ancestral): even calls step to the midpoint sigma, odd calls redo the step from its start with the
  midpoint's derivative."""
  sigma = s.sigmas[i]  # the sigma the model saw: the step's, or its midpoint's
  d = (x - _denoised(s, out, x, sigma)) / sigma
  first = i % 2 == 0
  c = s.coeffs[i]  # (the sigma step, the ancestral noise's scale: 0 but in kdpm2_a's odd calls)
  x_next = jnp.where(first, x, state) + d * c[0]
  if noise is not None:
    x_next = x_next + noise * c[1]
  return x_next, jnp.where(first, x, state)


def dpmpp_2s_step(s, i, x, out, state, noise):
  """Implements singlestep DPM-Solver++(2S), Lu et al. (2022b) Algorithm 1, as diffusers (the intermediate point is
  the previous grid sigma): a first-order call moves x, a second-order one redoes that move with both x0 predictions."""
  start, x0_prev = state  # the latents the last first-order call started from, and the previous x0 prediction
  sigma = s.sigmas[i]
  alpha = 1 / jnp.sqrt(sigma**2 + 1)
  x0, _ = _x0_eps(s, out, x, alpha, sigma * alpha)
  c = s.coeffs[i]
  base = jnp.where(c[3] > 0, start, x)
  return c[0] * base + c[1] * x0 + c[2] * x0_prev, (base, x0)


def deis_step(s, i, x, out, state, noise):
  """Implements multistep DEIS (Zhang & Chen 2023), the "logrho" polynomial extrapolation of eps in rho = sigma,
  order 2, as diffusers' DEISMultistepScheduler."""
  sigma = s.sigmas[i]
  alpha = 1 / jnp.sqrt(sigma**2 + 1)
  x0, _ = _x0_eps(s, out, x, alpha, sigma * alpha)
  eps = (x - alpha * x0) / (sigma * alpha)  # (diffusers converts every output to x0, then back to eps)
  c = s.coeffs[i]
  return c[0] * x + c[1] * eps + c[2] * state, eps


def dpmpp_sde_step(s, i, x, out, state, noise):
  """Implements DPM-Solver++ SDE, k-diffusion's sample_dpmpp_sde (r = 1/2, eta = 1), as diffusers'
  DPMSolverSDEScheduler: even calls take an ancestral DPM-Solver++(1) step to the midpoint sigma, odd calls redo the
  whole step from its start with the midpoint's x0 prediction; both add noise, the odd call's over the whole step
  (which holds the even call's half: see set_timesteps_more.dpm_sde_schedule). The last call is an Euler step to 0.
  `noise` is the loop's standard normal draw, not diffusers' torchsde Brownian tree: distributed alike, not the same
  numbers (see `samplers`)."""
  start, z_prev = state  # the latents the step started from, and the even call's noise
  x0 = _denoised(s, out, x, s.sigmas[i])  # at the sigma the model saw: the step's, or its midpoint's
  c = s.coeffs[i]
  base = jnp.where(i % 2 == 0, x, start)
  z = c[3] * z_prev + c[4] * noise
  return c[0] * base + c[1] * x0 + c[2] * z, (base, z)
