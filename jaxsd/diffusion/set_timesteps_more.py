"""The schedules of the solvers that follow diffusers' KDPM2 (ancestral), DPMSolverSinglestep, DEISMultistep and
DPMSolverSDE schedulers: what each one's `set_timesteps` computes, then each call's weights, as `set_timesteps` does for
the others.
"""

from __future__ import annotations

import numpy as np

from jaxsd.diffusion import schedules, set_timesteps


def _f32(fn, x):
  """A float32 function as torch computes it: torch's float32 log and exp are within an ulp of the exact value, so
  the float64 value rounded agrees more often than numpy's float32 functions."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return fn(np.asarray(x, np.float64)).astype(np.float32)


def _log_midpoint(a, b):
  """exp(lerp(log a, log b, 0.5)) in float32, as torch (its lerp at weight 0.5: end - (end - start) * 0.5)."""
  la, lb = _f32(np.log, a), _f32(np.log, b)
  with np.errstate(invalid="ignore"):
    return _f32(np.exp, lb - (lb - la) * np.float32(0.5))


def kdpm2_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """KDPM2 / KDPM2 ancestral: two calls per step but the last, at sigma_k then at a midpoint sigma (geometric mean of
  sigma_k and sigma_k+1; of sigma_k and the ancestral sigma_down for kdpm2_a), as diffusers interleaves them.

  Per call: `sigmas` the sigma the model sees (and divides by), `coeffs` (the step's sigma difference, the ancestral
  noise's scale sigma_up), `levels` at diffusers' repeated sigmas (as its add_noise reads them).
  """
  ts, sig = set_timesteps.discrete_sigmas(cfg, n, ac, karras, round_karras=True)
  up = np.zeros_like(sig)
  if sampler == "kdpm2_a":
    nxt = np.append(sig[1:], np.float32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
      up = np.sqrt(nxt * nxt * (sig * sig - nxt * nxt) / (sig * sig))
      down = np.sqrt(nxt * nxt - up * up)
    down[-1] = 0
    mid = _log_midpoint(sig, down)
    mid[-2:] = 0
    target = down[:n]
  else:
    mid = _log_midpoint(sig, np.roll(sig, 1))[1:]  # mid[k]: between sigma_k and sigma_k+1
    target = sig[1:]
  mid, s = mid[:n], sig[:n]
  t_mid = schedules.sigma_to_t(mid[:-1], np.log(schedules.train_sigmas(ac))).astype(np.float32)
  # Calls: (sigma_0, its midpoint), ..., (sigma_n-1): the last step is one Euler step onto sigma 0.
  seen = np.stack([s, mid], 1).reshape(-1)[:-1]
  steps = np.stack([mid - s, target - s], 1).reshape(-1)[:-1]
  noise = np.stack([np.zeros_like(s), up[:n]], 1).reshape(-1)[:-1]
  calls = np.stack([ts.astype(np.float32), np.append(t_mid, 0)], 1).reshape(-1)[:-1]
  levels = np.concatenate([sig[:1], sig[1:].repeat(2)])[:-1]  # diffusers' sigmas: each but the first twice, then 0
  leading = schedules.timestep_spacing(cfg, "linspace") == "leading"
  smax = sig.max()
  return dict(timesteps=calls[start:], init_noise_sigma=np.sqrt(smax * smax + np.float32(1)) if leading else smax,
              sigmas=np.append(seen, np.float32(0))[start:], coeffs=np.stack([steps, noise], 1)[start:],
              levels=np.stack([np.ones_like(levels), levels], 1)[start:])


def _vp_sigmas(cfg, n, ac, karras, timesteps) -> tuple[np.ndarray, np.ndarray]:
  """The timesteps and float32 sigmas of diffusers' DPM-Solver family before the final sigma (Karras timesteps
  rounded, as DPMSolverSinglestep and DEIS do)."""
  train = schedules.train_sigmas(ac)
  if karras:
    sig = schedules.karras_sigmas(train[0].item(), train[-1].item(), n)
    return schedules.sigma_to_t(sig, np.log(train)).round().astype(np.int64), sig
  return timesteps, np.interp(timesteps, np.arange(0, len(train)), train)


def _vp_fields(ts, sig, start, coeffs) -> dict:
  """Schedule fields on the variance-preserving x = alpha x0 + alpha sigma eps; clean after the last call."""
  s0 = sig[start:]
  a0 = np.float32(1) / np.sqrt(s0 * s0 + np.float32(1))
  levels = np.stack([a0, s0 * a0], 1)
  levels[-1] = (1, 0)
  return dict(timesteps=ts[start:].astype(np.float32), init_noise_sigma=np.float32(1.0), sigmas=s0, coeffs=coeffs,
              levels=levels)


def singlestep_orders(n: int, lower_order_final: bool, final_sigmas_type: str) -> list[int]:
  """DPMSolverSinglestepScheduler.get_order_list at solver_order 2 (set_timesteps turns lower_order_final on for an
  odd step count or a final sigma of 0)."""
  if lower_order_final or n % 2 or final_sigmas_type == "zero":
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
  else:
    orders = [1, 2] * (n // 2)
  if final_sigmas_type == "zero":
    orders[-1] = 1
  return orders


def dpm_singlestep_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """DPM-Solver++(2S) as DPMSolverSinglestepScheduler: linspace timesteps whatever the config's spacing (the class
  reads none), orders 1, 2, 1, 2, ... (`singlestep_orders`; first order at img2img's first call), onto sigma 0 or
  sigma_min. coeffs [L, 4]: x' = c0 x_start + c1 x0_i + c2 x0_i-1, with x_start = x at a first-order call (c3 = 0),
  the latents the previous call started from at a second-order one (c3 = 1)."""
  T = cfg.num_train_timesteps
  ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  ts, sig = _vp_sigmas(cfg, n, ac, karras, ts)
  last = schedules.train_sigmas(ac)[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
  sig = np.append(sig, last).astype(np.float32)
  s64 = sig.astype(np.float64)
  alpha = 1 / np.sqrt(s64**2 + 1)
  with np.errstate(divide="ignore"):
    lam = -np.log(s64)
  orders, rows = singlestep_orders(n, cfg.lower_order_final, cfg.final_sigmas_type), []
  for k in range(start, n):
    with np.errstate(divide="ignore", invalid="ignore"):
      if orders[k] == 1 or k == start:  # (diffusers: no earlier output to pair with at the run's first call)
        c_x = np.nan_to_num(s64[k + 1] * alpha[k + 1] / (s64[k] * alpha[k]))
        rows.append([c_x, -alpha[k + 1] * np.expm1(-(lam[k + 1] - lam[k])), 0.0, 0.0])
        continue
      h, r0 = lam[k + 1] - lam[k - 1], (lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k - 1])
      c = -alpha[k + 1] * np.expm1(-h)
      rows.append([s64[k + 1] * alpha[k + 1] / (s64[k - 1] * alpha[k - 1]), 0.5 * c / r0, c - 0.5 * c / r0, 1.0])
  return _vp_fields(ts, sig, start, np.array(rows).reshape(-1, 4))


def deis_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """DEIS as DEISMultistepScheduler: DPM-Solver's timesteps; the last sigma is sigma_min (the first training
  timestep's; Karras: the last sigma again), so, as diffusers, the result keeps that little noise. coeffs [L, 3]:
  x' = c0 x + c1 eps_i + c2 eps_i-1, first order at the run's first call and (below 15 steps, lower_order_final) the
  last, else the logrho second-order step."""
  ts, sig = _vp_sigmas(cfg, n, ac, karras, schedules.dpm_timesteps(cfg, n))
  sig = np.append(sig, sig[-1] if karras else schedules.train_sigmas(ac)[0]).astype(np.float32)
  rho = sig.astype(np.float64)
  alpha = 1 / np.sqrt(rho**2 + 1)
  lam = -np.log(rho)

  def ind(t, b, c):  # the integral of the Lagrange basis (log t - log c) / (log b - log c) over t
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))

  rows = []
  for k in range(start, n):
    if k == start or (k == n - 1 and cfg.lower_order_final and n < 15):
      rows.append([alpha[k + 1] / alpha[k], -rho[k + 1] * alpha[k + 1] * np.expm1(lam[k + 1] - lam[k]), 0.0])
      continue
    t, s0, s1 = rho[k + 1], rho[k], rho[k - 1]
    c1, c2 = ind(t, s0, s1) - ind(s0, s0, s1), ind(t, s1, s0) - ind(s0, s1, s0)
    rows.append([alpha[k + 1] / alpha[k], alpha[k + 1] * c1, alpha[k + 1] * c2])
  return _vp_fields(ts, sig, start, np.array(rows).reshape(-1, 3))


def _ancestral_move(t, sigma_to):
  """(weight of x, weight of x0, sigma_up) of DPMSolverSDEScheduler.step's ancestral DPM-Solver++(1) move from t =
  -log sigma towards sigma_to, x' = (sigma_down / sigma) x - expm1(t - t_down) x0 + sigma_up z (k-diffusion's
  get_ancestral_step, eta = 1), in its float32 arithmetic."""
  sigma = _f32(np.exp, -t)
  up = np.minimum(sigma_to, np.sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)))
  t_down = -_f32(np.log, np.sqrt(sigma_to * sigma_to - up * up))
  return _f32(np.exp, -t_down) / sigma, -_f32(np.expm1, t - t_down), up


def dpm_sde_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, r = 1/2) as DPMSolverSDEScheduler: two calls per step but the
  last, at sigma_k then at the midpoint sigma exp(-(t_k + t_k+1) / 2), t = -log sigma (the geometric mean), as
  diffusers interleaves them; the last step is one Euler step onto sigma 0.

  Per call: `sigmas` the sigma the model sees, `coeffs` [L, 5]: x' = c0 x_start + c1 x0 + c2 z with z = c3 z_prev +
  c4 noise, x_start the call's latents (even calls: towards the midpoint) or the step's first ones (odd calls: the whole
  step with the midpoint's x0). c3 and c4 make the odd call's noise the Brownian increment over the whole step, which
  holds the even call's half, as in diffusers' Brownian tree: c3 = sqrt((sigma_k - sigma_mid) / (sigma_k -
  sigma_k+1)) is their correlation. `levels` at diffusers' repeated sigmas (as its add_noise reads them).
  """
  T = cfg.num_train_timesteps
  ts = schedules.sigma_timesteps(cfg, n).astype(np.float64)  # (whole numbers unless linspace)
  if schedules.timestep_spacing(cfg, "linspace") == "linspace":
    ts = np.linspace(0, T - 1, n)[::-1].copy()  # float64 here (Euler's are float32)
  train = schedules.train_sigmas(ac)
  log_train = np.log(train)
  sig = np.interp(ts, np.arange(0, len(train)), train)
  if karras:  # between the ends of the interpolated sigmas, as diffusers; timesteps not rounded
    sig = schedules.karras_sigmas(sig[-1].item(), sig[0].item(), n)
    ts = schedules.sigma_to_t(sig, log_train)
  t = -np.log(sig)
  t_mid = schedules.sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), log_train)  # float64, as diffusers
  sig = np.append(sig, 0).astype(np.float32)
  s, nxt = sig[:-2], sig[1:-1]  # the steps with a midpoint: all but the last
  # Their moves in torch's float32 (t = -log sigma as diffusers' t_fn; the midpoint sigma the model sees).
  t, t_next = -_f32(np.log, s), -_f32(np.log, nxt)
  mid = _f32(np.exp, -(t + (t_next - t) * np.float32(0.5)))
  rho = np.sqrt((s.astype(np.float64) - mid) / (s.astype(np.float64) - nxt))
  coeffs = np.zeros((2 * n - 1, 5))
  coeffs[0:-1:2, :3] = np.stack(_ancestral_move(t, mid), 1)
  coeffs[0:-1:2, 4] = 1  # an even call's noise is its own
  coeffs[1::2, :3] = np.stack(_ancestral_move(t, _f32(np.exp, -t_next)), 1)
  coeffs[1::2, 3], coeffs[1::2, 4] = rho, np.sqrt(1 - rho * rho)
  coeffs[-1] = (0, 1, 0, 0, 0)  # Euler onto sigma 0: x0
  seen = np.append(np.stack([s, mid], 1).reshape(-1), sig[-2])
  calls = np.append(np.stack([ts[:-1], t_mid], 1).reshape(-1), ts[-1]).astype(np.float32)
  levels = np.concatenate([sig[:1], sig[1:-1].repeat(2), sig[-1:]])  # diffusers' sigmas: each inner one twice
  leading = schedules.timestep_spacing(cfg, "linspace") == "leading"
  smax = sig.max()
  return dict(timesteps=calls[start:], init_noise_sigma=np.sqrt(smax * smax + np.float32(1)) if leading else smax,
              sigmas=np.append(seen, np.float32(0))[start:], coeffs=coeffs[start:],
              levels=np.stack([np.ones_like(levels), levels], 1)[start:])
