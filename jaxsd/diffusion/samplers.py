"""The standard Stable Diffusion samplers as pure JAX functions over a model function.

Each sampler follows the diffusers PyTorch scheduler of the same name step for step (timesteps,
sigmas, multistep bookkeeping, quirks included), so a run reproduces the diffusers pipeline.
`make_schedule` builds everything the loop indexes into a `Schedule` pytree of float32 arrays;
`sample` runs the whole loop in one `lax.scan`, one model call per iteration (Heun calls the
model twice per step and PNDM once more than its step count, or 9 more with its Runge-Kutta
warm-up, as in diffusers). What each sampler needs is one `Sampler` row (state init, step, schedule
builder, facts); `init_state`, `model_input`, `step_noise` and `step` are the loop's body one call
at a time, for loops of one's own. A scheduler config is read as the diffusers class of the sampler
reads it: keys it leaves out take that class's defaults (`SchedulerConfig.for_class`).

The samplers (SAMPLERS; SAMPLER_OF maps each diffusers class to its own):
  ddim, pndm (alias plms), ddpm                  DDIM / PNDM / DDPMScheduler
  euler, euler_a, heun, lms                      (Ancestral)Euler / Heun / LMSDiscreteScheduler
  dpmpp_2m, dpmpp_2m_sde (+ _karras aliases)     DPMSolverMultistepScheduler, dpmsolver++ / sde-dpmsolver++
  unipc                                          UniPCMultistepScheduler (bh2, order 2)
  lcm                                            LCMScheduler (latent consistency models, LCM-LoRA)
  edm_euler, edm_dpmpp_2m                        EDMEuler / EDMDPMSolverMultistepScheduler
The EDM samplers are for models with EDM preconditioning (Playground v2.5, CosXL: `SchedulerConfig.edm`) and
only they sample those: on such a config euler and dpmpp_2m(_karras) mean them, the others are refused.

    s = make_schedule(cfg, "euler", 30)
    x = sample(model_fn, prepare_latents(s, noise), s, key)

    state = init_state(s, x)                      # the same, a call at a time
    for i in range(len(s.timesteps)):
      out = model_fn(model_input(s, i, x), s.timesteps[i])
      x, state = step(s, i, x, out, state, step_noise(s, i, x, key))

`model_fn(x, t)` returns the raw network output (eps, v or x0, as `cfg.prediction_type` says)
for the already scaled input x at the float32 timestep t (EDM: the fractional c_noise = log(sigma) / 4);
classifier-free guidance belongs in it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsd.diffusion import schedules
from jaxsd.diffusion.schedules import SchedulerConfig

# The Karras-sigma variants are the plain sampler with use_karras_sigmas=True.
_KARRAS = {"dpmpp_2m_karras": "dpmpp_2m", "dpmpp_2m_sde_karras": "dpmpp_2m_sde"}
ALIASES = {"plms": "pndm", **_KARRAS}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


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
  coeffs: jax.Array | None = None  # [L, k] multistep weights (LMS, DPM++ 2M (SDE), UniPC)
  # [L, 3] (c_in, c_skip, c_out) per call: EDM's preconditioning, LCM's boundary condition (c_in = 1 there).
  scalings: jax.Array | None = None
  prk_calls: int = struct.field(pytree_node=False, default=0)  # PNDM: Runge-Kutta warm-up calls before PLMS


def _resolve(cfg: SchedulerConfig, sampler: str, use_karras_sigmas: bool | None) -> tuple[str, bool | None]:
  if sampler in _KARRAS:
    if use_karras_sigmas is False:
      raise ValueError(f"sampler {sampler!r} with use_karras_sigmas=False: pick one.")
    sampler, use_karras_sigmas = _KARRAS[sampler], (None if cfg.edm else True)
  get(sampler)  # raises for an unknown name
  sampler = ALIASES.get(sampler, sampler)
  edm = tuple(k for k, r in _TABLE.items() if r.edm)
  if cfg.edm and not _TABLE[sampler].edm:  # a non-EDM sampler would feed the network inputs it never saw
    if sampler not in EDM_OF:
      raise ValueError(
          f"sampler {sampler!r} cannot sample a model with EDM preconditioning (its scheduler config "
          f"has sigma_data={cfg.sigma_data}); use one of {', '.join(edm)} (euler and dpmpp_2m map to them).")
    sampler = EDM_OF[sampler]
  elif _TABLE[sampler].edm and not cfg.edm:
    raise ValueError(f"sampler {sampler!r} is for models with EDM preconditioning (a scheduler config with sigma_data, "
                     f"e.g. {schedules.EDM_CLASSES[0]}'s); this model's is not one: use another sampler.")
  return sampler, use_karras_sigmas


def make_schedule(cfg: SchedulerConfig, sampler: str, num_steps: int, strength: float = 1.0, *,
                  use_karras_sigmas: bool | None = None, denoising_start: float | None = None,
                  denoising_end: float | None = None) -> Schedule:
  """Builds the schedule of `sampler` with `num_steps` steps, as diffusers' `set_timesteps`.

  Args:
    cfg: the model's noise schedule.
    sampler: one of SAMPLERS or ALIASES. On a config with EDM preconditioning (`cfg.edm`) euler and
      dpmpp_2m(_karras) run edm_euler and edm_dpmpp_2m, and the others raise; edm_* raise on other configs.
    num_steps: number of inference steps (diffusers' num_inference_steps).
    strength: img2img strength in (0, 1]; below 1 the schedule keeps the last
      int(num_steps * strength) steps, as StableDiffusionImg2ImgPipeline.get_timesteps.
    use_karras_sigmas: overrides cfg.use_karras_sigmas (Euler, Heun, LMS, DPM++, UniPC only).
    denoising_start: in (0, 1): run only the calls at timesteps below (1 - denoising_start) * T (replaces
      `strength`), as SDXL's img2img `get_timesteps` (a second-order sampler starts on a whole step).
    denoising_end: in (0, 1): stop before the first call at a timestep below (1 - denoising_end) * T, as
      SDXL's pipelines; the result is then still noisy (the base -> refiner hand-off).
  """
  sampler, karras = _resolve(cfg, sampler, use_karras_sigmas)
  row = _TABLE[sampler]
  cfg = cfg.for_class(row.scheduler_class)  # keys the file left out: this sampler's diffusers defaults
  cfg.check_implemented(row.scheduler_class, sampler, row.sets)
  if row.edm and (denoising_start is not None or denoising_end is not None):
    raise ValueError(f"{sampler} with denoising_start / denoising_end is not available: SDXL's cut compares "
                     "training timesteps, which an EDM schedule does not have (diffusers runs all or no steps).")
  if karras and not row.karras and use_karras_sigmas is not None:
    raise ValueError(f"use_karras_sigmas is not available for {sampler!r}; "
                     f"only for {tuple(k for k, r in _TABLE.items() if r.karras)}.")
  karras = (cfg.use_karras_sigmas if karras is None else karras) and row.karras
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: need an integer >= 1.")
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength}: must be in (0, 1] (1 = text-to-image, pure noise).")
  init_steps = min(int(num_steps * strength), num_steps)
  if init_steps < 1:
    raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no denoising step; "
                     "raise strength or num_steps.")
  start = (num_steps - init_steps) * row.order
  if cfg.prediction_type == "sample" and not row.predicts_sample:
    raise ValueError(f"{sampler!r} does not support prediction_type='sample' (nor does diffusers).")
  if row.check is not None:
    row.check(cfg)
  ac = schedules.alphas_cumprod_np(cfg)
  if cfg.rescale_betas_zero_snr:
    if "rescale_betas_zero_snr" not in schedules.DIFFUSERS_DEFAULTS[row.scheduler_class]:
      honour = ", ".join(
          k for k, r in _TABLE.items() if "rescale_betas_zero_snr" in schedules.DIFFUSERS_DEFAULTS[r.scheduler_class])
      raise ValueError(f"{sampler} with rescale_betas_zero_snr=True: diffusers' {row.scheduler_class} ignores the "
                       f"setting and would sample another noise schedule; use one of {honour}.")
    if row.sigma_space:  # diffusers: "close to 0 without being 0 so first sigma is not inf"
      ac[-1] = np.float32(2**-24)
  if denoising_start is not None:
    full = row.schedule(cfg, sampler, num_steps, 0, ac, karras)["timesteps"]
    calls = int(np.sum(full < _cutoff(cfg, "denoising_start", denoising_start)))
    if row.order == 2 and calls % 2 == 0:  # a second-order step's two calls stay together
      calls += 1
    start = len(full) - min(calls, len(full))
    if calls == 0:
      raise ValueError(f"denoising_start={denoising_start} with {num_steps} steps leaves no timestep below it; "
                       "lower denoising_start or raise the step count.")
  fields = row.schedule(cfg, sampler, num_steps, start, ac, karras)
  if denoising_end is not None:
    if denoising_start is not None and denoising_start >= denoising_end:
      raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}.")
    calls = int(np.sum(fields["timesteps"] >= _cutoff(cfg, "denoising_end", denoising_end)))
    if calls == 0:
      raise ValueError(f"denoising_end={denoising_end} with {num_steps} steps leaves no step; raise it.")
    fields = _first_calls(fields, calls)
  prk_calls = fields.pop("prk_calls", 0)
  clip = cfg.clip_sample_range if cfg.clip_sample and row.clips else None
  arrays = {k: None if v is None else jnp.asarray(v, jnp.float32) for k, v in fields.items()}
  return Schedule(**arrays, sampler=sampler, prediction_type=cfg.prediction_type, clip_sample_range=clip,
                  prk_calls=prk_calls)


def _cutoff(cfg: SchedulerConfig, name: str, fraction: float) -> int:
  """The timestep where a fraction of the denoising is done (SDXL's `discrete_timestep_cutoff`)."""
  if not (isinstance(fraction, float) and 0.0 < fraction < 1.0):
    raise ValueError(f"{name}={fraction!r}: must be a float in (0, 1), the fraction of denoising done.")
  T = cfg.num_train_timesteps
  return int(round(T - fraction * T))


def _first_calls(fields: dict, calls: int) -> dict:
  """The schedule fields of the first `calls` model calls only (each indexes calls, or calls + 1 levels)."""
  out = dict(fields)
  for k in ("timesteps", "alphas", "alphas_prev", "coeffs", "scalings"):
    if out.get(k) is not None:
      out[k] = out[k][:calls]
  for k in ("sigmas", "levels"):
    if out.get(k) is not None:
      out[k] = out[k][:calls + 1]
  return out


def _alpha_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """DDIM / PNDM / DDPM: per call, alpha_bar at the timestep and at the one it steps to (no Karras sigmas)."""
  del karras
  T, ratio = cfg.num_train_timesteps, cfg.num_train_timesteps // n
  final = np.float32(1.0) if cfg.set_alpha_to_one or sampler == "ddpm" else ac[0]
  ts = schedules.discrete_timesteps(cfg, n)
  if sampler == "pndm" and not cfg.skip_prk_steps:
    return _prk_schedule(cfg, n, start, ac, ts[::-1], final)
  if sampler == "pndm":  # PLMS repeats the second timestep: the first step is redone with the
    asc = ts[::-1]  # mean of two outputs, a second-order start in place of Runge-Kutta warm-up.
    ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
  ts = ts[start:]
  if sampler == "ddpm":  # steps to the next timestep of the list
    t_from, t_to = ts, np.append(ts[1:], -1)
  else:  # DDIM, PLMS: step to t - T // n, whatever the spacing
    t_from, t_to = ts.copy(), ts - ratio
    if sampler == "pndm" and len(ts) > 1:  # the repeated call steps from t + T // n to t again
      t_from[1], t_to[1] = ts[1] + ratio, ts[1]
  if t_from.max() >= T:
    raise ValueError(f"{sampler} with {n} steps reaches timestep {t_from.max()} >= {T}; choose other num_steps.")
  alphas_prev = np.where(t_to >= 0, ac[np.clip(t_to, 0, T - 1)], final).astype(np.float32)
  a = np.append(ac[ts], np.float32(1.0))  # as add_noise at timesteps[i] (PNDM's repeat included); then clean
  levels = np.stack([np.sqrt(a), np.sqrt(np.float32(1.0) - a)], 1)
  return dict(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(1.0), levels=levels, alphas=ac[t_from],
              alphas_prev=alphas_prev)


def _prk_schedule(cfg, n, start, ac, asc, final) -> dict:
  """PNDM with skip_prk_steps=False: three Runge-Kutta steps of four calls each on the last four timesteps
  (Liu et al. (2022) eq. 13), then PLMS; timesteps and alpha_bars as diffusers' PNDMScheduler builds them."""
  if start:
    raise ValueError("pndm with skip_prk_steps=False (Runge-Kutta warm-up) and strength < 1 is not implemented; "
                     "set skip_prk_steps=true in the scheduler config, or use another sampler for img2img.")
  if n < 4:  # (diffusers' set_timesteps fails there too)
    raise ValueError(f"pndm with skip_prk_steps=False (Runge-Kutta warm-up on the last four timesteps) needs at "
                     f"least 4 steps, not {n}; raise the step count or set skip_prk_steps=true.")
  T, ratio, half = cfg.num_train_timesteps, cfg.num_train_timesteps // n, cfg.num_train_timesteps // n // 2
  prk = (asc[-4:].repeat(2) + np.tile(np.array([0, half]), 4))[:-1].repeat(2)[1:-1][::-1]
  ts = np.concatenate([prk, asc[:-3][::-1]]).astype(np.int64)
  c, p = np.arange(len(ts)), len(prk)
  # A Runge-Kutta call steps from its step's first timestep, to the midpoint (even calls) or to where
  # the call was made (odd ones); a PLMS call steps from t to t - T // n.
  t_from = np.where(c < p, prk[np.minimum(c // 4 * 4, p - 1)], ts)
  t_to = np.where(c < p, ts - np.where(c % 2 == 1, 0, half), ts - ratio)
  if t_from.max() >= T:
    raise ValueError(f"pndm with {n} steps reaches timestep {t_from.max()} >= {T}; choose other num_steps.")
  alphas_prev = np.where(t_to >= 0, ac[np.clip(t_to, 0, T - 1)], final).astype(np.float32)
  a = np.append(ac[ts], np.float32(1.0))  # as add_noise at timesteps[i] (diffusers lists the PRK calls' too)
  levels = np.stack([np.sqrt(a), np.sqrt(np.float32(1.0) - a)], 1)
  return dict(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(1.0), levels=levels, alphas=ac[t_from],
              alphas_prev=alphas_prev, prk_calls=p)


def _sigma_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """Euler / Euler-a / Heun / LMS: sigma_i = sqrt((1 - alpha_bar) / alpha_bar) at fractional t."""
  ts = schedules.sigma_timesteps(cfg, n)
  train = schedules.train_sigmas(ac)
  log_sigmas = np.log(train)
  sig = np.interp(ts, np.arange(0, len(train)), train)
  if karras:
    sig = schedules.karras_sigmas(sig[-1].item(), sig[0].item(), n)
    ts = schedules.sigma_to_t(sig, log_sigmas)
  sig = np.concatenate([sig, [0.0]]).astype(np.float32)
  ts = ts.astype(np.float32)
  if sampler == "heun":  # every sigma but the first and last is visited twice
    sig = np.concatenate([sig[:1], sig[1:-1].repeat(2), sig[-1:]])
    ts = np.concatenate([ts[:1], ts[1:].repeat(2)])
  smax = sig.max()
  leading = schedules.timestep_spacing(cfg, "linspace") == "leading"  # x_T ~ N(0, sigma^2 + 1) there
  init = np.sqrt(smax * smax + np.float32(1)) if leading else smax
  fields = dict(timesteps=ts[start:], init_noise_sigma=init, sigmas=sig[start:],
                levels=np.stack([np.ones_like(sig[start:]), sig[start:]], 1))
  if sampler == "lms":
    fields["coeffs"] = _lms_coeffs(sig, start)
  return fields


def _lms_coeffs(sig: np.ndarray, start: int, order: int = 4) -> np.ndarray:
  """[L, order]: integrals over [sigma_j, sigma_j+1] of the Lagrange basis on the last sigmas.

  As diffusers, the order grows with the absolute step index j, while only the derivatives of
  this run exist (img2img starts with one).
  """
  sig = sig.astype(np.float64)
  nodes, weights = np.polynomial.legendre.leggauss(order)  # exact for these cubic integrands
  rows = []
  for k in range(len(sig) - 1 - start):
    j = start + k
    m = min(j + 1, order)
    a, b = sig[j], sig[j + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    row = np.zeros(order)
    for cur in range(min(m, k + 1)):
      basis = np.ones_like(tau)
      for other in range(m):
        if other != cur:
          basis *= (tau - sig[j - other]) / (sig[j - cur] - sig[j - other])
      row[cur] = (b - a) / 2 * np.sum(weights * basis)
    rows.append(row)
  return np.array(rows)


def _dpm_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """DPM-Solver++(2M) (SDE) and UniPC on the variance-preserving x = alpha x0 + alpha sigma eps, where
  alpha = 1 / sqrt(sigma^2 + 1): the timesteps and sigmas of diffusers' multistep solvers, then each one's weights."""
  ts = schedules.dpm_timesteps(cfg, n)
  train = schedules.train_sigmas(ac)
  if karras:
    sig = schedules.karras_sigmas(train[0].item(), train[-1].item(), n)
    ts = schedules.sigma_to_t(sig, np.log(train))
    if cfg.beta_schedule != "squaredcos_cap_v2" or sampler == "unipc":  # (UniPC rounds them all)
      ts = ts.round()
    ts = ts.astype(np.int64)
  else:
    sig = np.interp(ts, np.arange(0, len(train)), train)
  sig = np.concatenate([sig, [0.0]]).astype(np.float32)
  s0 = sig[start:]
  a0 = np.float32(1) / np.sqrt(s0 * s0 + np.float32(1))
  if sampler == "unipc":
    coeffs = _unipc_coeffs(sig, start, cfg.disable_corrector)
  else:
    alpha = 1 / np.sqrt(sig.astype(np.float64)**2 + 1)
    coeffs = _dpm_coeffs(sig, alpha, start, np.zeros(n, bool), sde=sampler == "dpmpp_2m_sde")
  return dict(timesteps=ts[start:].astype(np.float32), init_noise_sigma=np.float32(1.0), sigmas=sig[start:],
              coeffs=coeffs, levels=np.stack([a0, s0 * a0], 1))


def _unipc_coeffs(sig: np.ndarray, start: int, disable_corrector: tuple[int, ...]) -> np.ndarray:
  """[L, 8] weights of UniPC (Zhao et al. 2023; diffusers' defaults: order 2, B(h) = e^h - 1 ("bh2"), x0 model).

  Call i corrects the latents its model call saw (UniC: xc = c0 x + c1 xc_{i-1} + c2 x0_{i-1} + c3 x0_i
  + c4 x0_{i-2}, with the order of the step before; none at the first call nor after a step in
  `disable_corrector`), then predicts (UniP: x' = c5 xc + c6 x0_i + c7 x0_{i-1}); the order ramps up from 1,
  and the last step is first order (lower_order_final), onto sigma 0: x' = x0_i.
  """
  s64 = sig.astype(np.float64)
  alpha = 1 / np.sqrt(s64**2 + 1)
  vs = s64 * alpha  # the variance-preserving noise level
  with np.errstate(divide="ignore"):
    lam = -np.log(s64)

  def weights(h):  # h phi_1(h), B(h), and the b_1, b_2 of their eq. 5 / Algorithm 2 in h = -(lambda_t - lambda_s)
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    return h_phi_1, b_h, h_phi_k / b_h, (h_phi_k / hh - 0.5) * 2 / b_h

  n, rows, prev_order = len(sig) - 1, [], 1
  for i in range(n - start):
    k, c = start + i, np.zeros(8)
    if i > 0 and k - 1 not in disable_corrector:  # UniC, from the previous call's corrected latents
      h = lam[k] - lam[k - 1]
      h_phi_1, b_h, b1, b2 = weights(h)
      c[1], c[2] = vs[k] / vs[k - 1], -alpha[k] * h_phi_1
      if prev_order == 1:
        rho_t = 0.5
      else:
        r1 = (lam[k - 2] - lam[k - 1]) / h
        rho_1, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array([b1, b2]))
        c[4] = -alpha[k] * b_h * rho_1 / r1
        c[2] -= c[4]
      c[3] = -alpha[k] * b_h * rho_t
      c[2] -= c[3]
    else:
      c[0] = 1.0
    order = min(2, n - k, i + 1)
    if s64[k + 1] == 0:
      c[6] = 1.0
    else:  # UniP
      h = lam[k + 1] - lam[k]
      h_phi_1, b_h, _, _ = weights(h)
      c[5], c[6] = vs[k + 1] / vs[k], -alpha[k + 1] * h_phi_1
      if order == 2:
        r1 = (lam[k - 1] - lam[k]) / h
        c[7] = -alpha[k + 1] * b_h * 0.5 / r1
        c[6] -= c[7]
    rows.append(c)
    prev_order = order
  return np.array(rows).reshape(-1, 8)


def _dpm_coeffs(sig: np.ndarray, alpha: np.ndarray, start: int, first: np.ndarray, sde: bool = False) -> np.ndarray:
  """[L, 3]: per call from `start`, x' = c0 x + c1 x0_i + c2 x0_{i-1}: DPM-Solver++(2M), Lu et al. (2022b) eq. 16
  (midpoint), in lambda = -log(sigma) for x = alpha (x0 + sigma eps); first order (DPM-Solver++(1), i.e. DDIM)
  at the first call, where `first` says, and onto sigma 0 (x' = x0). With `sde`, [L, 4]: SDE-DPM-Solver++(2M)
  (Lu et al. 2022b, appendix; diffusers' sde-dpmsolver++), + c3 z with fresh standard normal noise z."""
  s64, alpha = sig.astype(np.float64), np.asarray(alpha, np.float64)
  with np.errstate(divide="ignore"):
    lam = -np.log(s64)
  coeffs = []
  for j in range(start, len(sig) - 1):
    if s64[j + 1] == 0:
      coeffs.append([0.0, 1.0, 0.0, 0.0])
      continue
    h = lam[j + 1] - lam[j]
    c_x = s64[j + 1] * alpha[j + 1] / (s64[j] * alpha[j]) * (np.exp(-h) if sde else 1.0)
    c_0 = -alpha[j + 1] * np.expm1(-2 * h if sde else -h)
    c_z = s64[j + 1] * alpha[j + 1] * np.sqrt(-np.expm1(-2 * h)) if sde else 0.0
    if j == start or first[j]:
      coeffs.append([c_x, c_0, 0.0, c_z])
    else:  # h = 0 (a last step from sigma_min to sigma_min) leaves x as it is, as diffusers' 1 / inf
      with np.errstate(divide="ignore"):
        half_over_r = 0.5 * h / (lam[j] - lam[j - 1])
      coeffs.append([c_x, c_0 * (1 + half_over_r), -c_0 * half_over_r, c_z])
  return np.array(coeffs).reshape(-1, 4)[:, :4 if sde else 3]


def _edm_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """EDM (Karras et al. 2022): sigmas from sigma_max to sigma_min, then 0 (or sigma_min); the model sees c_in x at
  c_noise = log(sigma) / 4 and denoises as c_skip x + c_out F (their Table 1), in diffusers' float32 arithmetic."""
  del ac, karras
  euler = sampler == "edm_euler"
  sig = schedules.edm_sigmas(cfg, n, float32_ramp=not euler)
  ts = np.float32(0.25) * np.log(sig.astype(np.float64)).astype(np.float32)  # (rounded as schedules.edm_sigmas)
  if cfg.final_sigmas_type == "zero":
    last = np.float32(0)
  else:  # Euler repeats its last sigma (a last step of size 0), DPM++ steps to sigma_min
    last = sig[-1] if euler else np.float32(cfg.sigma_min)
  sig = np.append(sig, last).astype(np.float32)
  s, d = sig[:-1], np.float32(cfg.sigma_data)
  var = s * s + np.float32(cfg.sigma_data**2)
  c_out = s * d / np.sqrt(var) * np.float32(-1 if cfg.prediction_type == "v_prediction" else 1)
  scalings = np.stack([np.float32(1) / np.sqrt(var), np.float32(cfg.sigma_data**2) / var, c_out], 1)
  levels = np.stack([np.ones_like(sig), np.append(s, np.float32(0))], 1)  # x = x0 + sigma eps; clean at the end
  fields = dict(timesteps=ts[start:], init_noise_sigma=np.float32((cfg.sigma_max**2 + 1)**0.5), sigmas=sig[start:],
                levels=levels[start:], scalings=scalings[start:])
  if not euler:  # diffusers' lower_order_final counts the whole schedule's steps, img2img's too
    first = np.zeros(n, bool)
    first[-1] = cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
    fields["coeffs"] = _dpm_coeffs(sig, np.ones_like(sig), start, first)
  return fields


def _lcm_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """LCM (Luo et al. 2023): n of the distillation's original_inference_steps timesteps, evenly skipped; per call
  alpha_bar at t and at the next timestep (1 after the last call, which returns the consistency estimate), and
  the boundary-condition scalings c_skip, c_out at timestep_scaling * t (sigma_data 0.5), as diffusers.

  set_alpha_to_one changes nothing: diffusers' LCMScheduler never steps past a timestep >= 0.
  """
  del sampler, karras
  T, orig = cfg.num_train_timesteps, cfg.original_inference_steps
  if orig > T:
    raise ValueError(f"lcm with original_inference_steps={orig} > num_train_timesteps={T}: lower it.")
  if n > orig:  # (diffusers refuses too)
    raise ValueError(f"lcm with num_steps={n} > original_inference_steps={orig}: its timesteps are a subset of the "
                     f"{orig} the model was distilled on; lower num_steps.")
  origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
  ts = origin[np.floor(np.linspace(0, orig, n, endpoint=False)).astype(np.int64)][start:]
  a = ac[ts]
  scaled = ts.astype(np.float32) * np.float32(cfg.timestep_scaling)
  var = scaled * scaled + np.float32(0.25)
  scalings = np.stack([np.ones_like(scaled), np.float32(0.25) / var, scaled / np.sqrt(var)], 1)
  levels = np.append(a, np.float32(1.0))
  return dict(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(1.0), alphas=a,
              alphas_prev=np.append(ac[ts[1:]], np.float32(1.0)), scalings=scalings,
              levels=np.stack([np.sqrt(levels), np.sqrt(np.float32(1.0) - levels)], 1))


def prepare_latents(schedule: Schedule, noise: jax.Array) -> jax.Array:
  """Text-to-image initial latents: standard normal `noise` times the schedule's initial sigma."""
  return noise.astype(jnp.float32) * schedule.init_noise_sigma


def noise_latents(schedule: Schedule, x0: jax.Array, noise: jax.Array, i: jax.Array | int = 0) -> jax.Array:
  """`x0` noised to the level of the latents before call i, as diffusers' `scheduler.add_noise`.

  i = 0 gives img2img's initial latents (the first timestep of a strength-truncated schedule);
  i = L gives x0 itself. Inpainting with a 4-channel U-Net re-noises the known region with it after
  every call (diffusers' latent blend).
  """
  a, b = schedule.levels[i, 0], schedule.levels[i, 1]
  return a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)


# --- One model call's update for each sampler: (schedule, i, x, out, state, noise) -> (x, state). ---


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
  """Implements deterministic DDIM (eta = 0), Song et al. (2021) eq. 12."""
  a, a_prev = s.alphas[i], s.alphas_prev[i]
  x0, eps = _x0_eps(s, out, x, jnp.sqrt(a), jnp.sqrt(1 - a))
  return jnp.sqrt(a_prev) * _clip(s, x0) + jnp.sqrt(1 - a_prev) * eps, state


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


# --- The samplers, one row each -------------------------------------------------------------------

StepFn = Callable[..., tuple[jax.Array, Any]]


class Sampler(NamedTuple):
  """What the loop needs of one sampler, as optax keeps a GradientTransformation: pure functions and facts."""

  init: Callable[[jax.Array], Any]  # latents -> the step's state (the earlier outputs of multistep methods)
  step: StepFn  # (schedule, i, x, fp32 model output, state, noise or None) -> (x, state): one call's update
  schedule: Callable[..., dict]  # (cfg, name, num_steps, start, alphas_cumprod, karras) -> Schedule fields
  scaled_input: bool = False  # the model sees x / sqrt(sigma^2 + 1) (the Euler family's x = x0 + sigma * eps;
  # EDM's c_in x)
  stochastic: bool = False  # each step draws fresh noise
  order: int = 1  # diffusers' `scheduler.order`: model calls per step, for img2img truncation
  karras: bool = False  # honours use_karras_sigmas (as in diffusers)
  clips: bool = False  # honours clip_sample
  predicts_sample: bool = True  # supports prediction_type="sample"
  check: Callable[[SchedulerConfig], None] | None = None  # raises for scheduler settings it lacks
  scheduler_class: str = ""  # the diffusers scheduler it follows: whose defaults fill keys a config leaves out
  edm: bool = False  # for models with EDM preconditioning only (SchedulerConfig.edm), and only it samples them
  sets: tuple[str, ...] = ()  # keys of UNIMPLEMENTED it chooses itself, whatever the config says
  # Steps in sigma = sqrt((1 - alpha_bar) / alpha_bar): with zero terminal SNR diffusers sets alpha_bar_T = 2^-24.
  sigma_space: bool = False


def _stateless(x):
  del x
  return ()


def _check_ddpm(cfg: SchedulerConfig) -> None:
  if cfg.variance_type != "fixed_small":
    raise ValueError(f"ddpm supports variance_type='fixed_small' only, not {cfg.variance_type!r}.")


_TABLE = {
    "ddim":
        Sampler(_stateless, ddim_step, _alpha_schedule, clips=True, scheduler_class="DDIMScheduler"),
    # State: the last three outputs, newest first; the latents the first call (the RK step) started from;
    # the Runge-Kutta sum of outputs (warm-up only).
    "pndm":
        Sampler(lambda x: (jnp.zeros((3,) + x.shape, x.dtype), jnp.zeros_like(x), jnp.zeros_like(x)), pndm_step,
                _alpha_schedule, predicts_sample=False, scheduler_class="PNDMScheduler"),
    "ddpm":
        Sampler(_stateless, ddpm_step, _alpha_schedule, stochastic=True, clips=True, check=_check_ddpm,
                scheduler_class="DDPMScheduler"),
    "euler":
        Sampler(_stateless, euler_step, _sigma_schedule, scaled_input=True, karras=True,
                scheduler_class="EulerDiscreteScheduler", sigma_space=True),
    "euler_a":
        Sampler(_stateless, euler_ancestral_step, _sigma_schedule, scaled_input=True, stochastic=True,
                predicts_sample=False, scheduler_class="EulerAncestralDiscreteScheduler", sigma_space=True),
    # State: the predictor's derivative, its step size and the latents it started from.
    "heun":
        Sampler(lambda x: (jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros_like(x)), heun_step, _sigma_schedule,
                scaled_input=True, order=2, karras=True, clips=True, scheduler_class="HeunDiscreteScheduler"),
    # State: the last four derivatives, newest first.
    "lms":
        Sampler(lambda x: jnp.zeros((4,) + x.shape, x.dtype), lms_step, _sigma_schedule, scaled_input=True, karras=True,
                scheduler_class="LMSDiscreteScheduler"),
    # State: the previous x0 prediction.
    "dpmpp_2m":
        Sampler(jnp.zeros_like, dpmpp_2m_step, _dpm_schedule, karras=True,
                scheduler_class="DPMSolverMultistepScheduler", sigma_space=True),
    "dpmpp_2m_sde":
        Sampler(jnp.zeros_like, dpmpp_2m_sde_step, _dpm_schedule, stochastic=True, karras=True,
                scheduler_class="DPMSolverMultistepScheduler", sigma_space=True, sets=("algorithm_type",)),
    # State: the previous call's corrected latents and the last two x0 predictions.
    "unipc":
        Sampler(lambda x: (jnp.zeros_like(x),) * 3, unipc_step, _dpm_schedule, karras=True,
                scheduler_class="UniPCMultistepScheduler", sigma_space=True),
    # EDM models (Playground v2.5, CosXL): the model sees c_in x, x = x0 + sigma eps.
    "edm_euler":
        Sampler(_stateless, edm_euler_step, _edm_schedule, scaled_input=True, predicts_sample=False,
                scheduler_class="EDMEulerScheduler", edm=True),
    # State: the previous x0 prediction.
    "edm_dpmpp_2m":
        Sampler(jnp.zeros_like, edm_dpmpp_2m_step, _edm_schedule, scaled_input=True, predicts_sample=False,
                scheduler_class="EDMDPMSolverMultistepScheduler", edm=True),
    # Latent consistency models and LCM-LoRA: 1-8 steps, fresh noise at every call but the last.
    "lcm":
        Sampler(_stateless, lcm_step, _lcm_schedule, stochastic=True, clips=True, scheduler_class="LCMScheduler"),
}
SAMPLERS = tuple(_TABLE)
# The sampler that follows each diffusers scheduler class (the first row of the class: its plain variant).
SAMPLER_OF: dict[str, str] = {
    c: next(k for k, r in _TABLE.items() if r.scheduler_class == c)
    for c in dict.fromkeys(r.scheduler_class for r in _TABLE.values())
}
# What a usual sampler choice means on a model with EDM preconditioning (make_schedule maps it; others are refused).
EDM_OF = {"euler": "edm_euler", "dpmpp_2m": "edm_dpmpp_2m"}


def get(name: str) -> Sampler:
  """The sampler called `name` (one of SAMPLERS or ALIASES)."""
  row = _TABLE.get(ALIASES.get(name, name))
  if row is None:
    raise ValueError(f"Unknown sampler {name!r}; valid: {', '.join(SAMPLERS + tuple(ALIASES))}.")
  return row


# --- One model call at a time: what `sample` runs, for loops of one's own ------------------------


def init_state(schedule: Schedule, x: jax.Array) -> Any:
  """The sampler's state before the first call, for latents `x`."""
  return _TABLE[schedule.sampler].init(x)


def model_input(schedule: Schedule, i: jax.Array, x: jax.Array) -> jax.Array:
  """What the model is given at call i: x, x / sqrt(sigma^2 + 1) for the Euler family, c_in x for EDM."""
  row = _TABLE[schedule.sampler]
  if row.edm:
    return x * schedule.scalings[i, 0]
  if row.scaled_input:
    return x / jnp.sqrt(schedule.sigmas[i]**2 + 1)
  return x


def step_noise(schedule: Schedule, i: jax.Array, x: jax.Array, key: jax.Array) -> jax.Array | None:
  """The fresh noise of call i of a stochastic sampler (None for the others), from fold_in(key, i).

  A batch of keys (shape [B], one per image) draws each image's noise from its own key, so an image
  does not depend on which batch or device it was sampled in.
  """
  if not _TABLE[schedule.sampler].stochastic:
    return None
  if key.ndim == 1:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(key)
  return jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)


def step(schedule: Schedule, i: jax.Array, x: jax.Array, out: jax.Array, state: Any,
         noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """One model call's update: latents after call i, given the model's output `out` at model_input(...)."""
  return _TABLE[schedule.sampler].step(schedule, i, x, out.astype(jnp.float32), state, noise)


def sample(model_fn: ModelFn, x: jax.Array, schedule: Schedule, key: jax.Array | None = None, *,
           noise: jax.Array | None = None, after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
           return_trajectory: bool = False, indexed: bool = False) -> jax.Array:
  """Runs the sampler of `schedule` from latents `x` (from prepare_latents or noise_latents).

  Args:
    model_fn: (scaled x, float32 t) -> network output; may return bf16, latents stay float32.
    x: initial latents.
    schedule: from make_schedule.
    key: PRNG key of the stochastic samplers (ddpm, euler_a, dpmpp_2m_sde, lcm), or a [B] batch of them (see
      `step_noise`).
    noise: optional [L, *x.shape] noise that replaces the key's (parity tests).
    after_step: optional (i, latents after call i) -> latents, applied after every call (inpainting's
      latent blend); the sampler's state is left as the step made it, as in diffusers.
    return_trajectory: return the [L, *x.shape] latents after every model call instead.
    indexed: model_fn takes the call's index i (0 .. L-1) as a third argument, for conditioning that
      changes from call to call (ControlNets acting on a window of the calls).

  Returns:
    The final latents (float32), or the trajectory.
  """
  s = schedule
  n = s.timesteps.shape[0]
  x = jnp.asarray(x, jnp.float32)
  stochastic = _TABLE[s.sampler].stochastic
  if noise is not None and noise.shape != (n,) + x.shape:
    raise ValueError(f"noise has shape {noise.shape}; expected {(n,) + x.shape} (one per model call).")
  if stochastic and noise is None and key is None:
    raise ValueError(f"sampler {s.sampler!r} is stochastic: pass a PRNG key (or noise).")

  def body(carry, i):
    x, state = carry
    out = model_fn(model_input(s, i, x), s.timesteps[i], *((i,) if indexed else ()))
    if out.shape != x.shape:
      raise ValueError(f"model_fn returned shape {out.shape} for latents of shape {x.shape}.")
    z = noise[i].astype(jnp.float32) if stochastic and noise is not None else step_noise(s, i, x, key)
    x, state = step(s, i, x, out, state, z)
    if after_step is not None:
      x = after_step(i, x)
    return (x, state), (x if return_trajectory else None)

  (x, _), traj = jax.lax.scan(body, (x, init_state(s, x)), jnp.arange(n))
  return traj if return_trajectory else x
