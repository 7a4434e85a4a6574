"""The numpy side of each sampler's schedule: what its diffusers scheduler's `set_timesteps` computes.

Each builder is (cfg, sampler, num_steps, start, alphas_cumprod, karras) -> the fields of a `steps.Schedule`
from call `start` on: numpy arrays of timesteps, sigmas, alpha_bars, multistep weights and scalings (and PNDM's
count of Runge-Kutta calls). The `samplers` table names each sampler's builder; `samplers.make_schedule` calls
it and turns the fields into float32 jnp arrays.
"""

from __future__ import annotations

import numpy as np

from jaxsd.diffusion import schedules


def alpha_schedule(cfg, sampler, n, start, ac, karras, eta: float = 0.0) -> dict:
  """DDIM / PNDM / DDPM: per call, alpha_bar at the timestep and at the one it steps to (no Karras sigmas); DDIM
  with eta > 0 also the weights of eps and of fresh noise (`_ddim_eta_coeffs`)."""
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
  fields = dict(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(1.0), levels=levels, alphas=ac[t_from],
                alphas_prev=alphas_prev)
  if eta > 0:
    fields["coeffs"] = _ddim_eta_coeffs(ac[t_from], alphas_prev, t_from, eta)
  return fields


def _ddim_eta_coeffs(a, a_prev, ts, eta: float) -> np.ndarray:
  """[L, 2] float32 (sqrt(1 - a_prev - std^2), std) per call, std = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))
  (Song et al. (2021) eq. 16): DDIMScheduler.step's weights of eps and of fresh noise, in its float32 arithmetic.

  Where float32 rounding makes 1 - a_prev - std^2 a hair below 0 (eta = 1 onto alpha_bar 0 of a zero terminal SNR
  schedule) diffusers' step returns NaN; it is 0 here. An eta so large that it is truly negative is refused.
  """
  one = np.float32(1)
  variance = (one - a_prev) / (one - a) * (one - a / a_prev)
  std = np.float32(eta) * np.sqrt(variance)
  rest = one - a_prev - std * std
  if np.any(rest < -1e-6):
    k = int(np.argmax(rest < -1e-6))
    raise ValueError(f"eta={eta} is too large for ddim here: at timestep {ts[k]} its noise std exceeds sqrt(1 - "
                     "alpha_bar_prev), so the direction term is imaginary (diffusers returns NaN); use eta <= 1.")
  return np.stack([np.sqrt(np.maximum(rest, 0)), std], 1).astype(np.float32)


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


def discrete_sigmas(cfg, n, ac, karras, round_karras: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, n + 1 float32 sigmas ending in 0) of the sigma-based diffusers schedulers: sigma_i = sqrt((1 -
  alpha_bar) / alpha_bar) interpolated at fractional t, or Karras sigmas with their timesteps (rounded where the
  class rounds them: KDPM2)."""
  ts = schedules.sigma_timesteps(cfg, n)
  train = schedules.train_sigmas(ac)
  sig = np.interp(ts, np.arange(0, len(train)), train)
  if karras:
    sig = schedules.karras_sigmas(sig[-1].item(), sig[0].item(), n)
    ts = schedules.sigma_to_t(sig, np.log(train))
    ts = ts.round() if round_karras else ts
  return ts, np.concatenate([sig, [0.0]]).astype(np.float32)


def sigma_schedule(cfg, sampler, n, start, ac, karras) -> dict:
  """Euler / Euler-a / Heun / LMS: sigma_i = sqrt((1 - alpha_bar) / alpha_bar) at fractional t."""
  ts, sig = discrete_sigmas(cfg, n, ac, karras)
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


def dpm_schedule(cfg, sampler, n, start, ac, karras) -> dict:
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


def edm_schedule(cfg, sampler, n, start, ac, karras) -> dict:
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


def _distilled_timesteps(cfg, sampler, n, strength: float = 1.0) -> np.ndarray:
  """int64 [n], descending: LCM's / TCD's timesteps, n of the distillation's original_inference_steps evenly skipped
  ones (of the lowest int(original_inference_steps * strength) of them), with diffusers' checks."""
  T, orig = cfg.num_train_timesteps, cfg.original_inference_steps
  if orig > T:
    raise ValueError(f"{sampler} with original_inference_steps={orig} > num_train_timesteps={T}: lower it.")
  kept = int(orig * float(strength))  # as diffusers, in Python floats (50 * 0.58 -> 28)
  if strength < 1.0 and kept < n:  # (diffusers refuses too: "skipping_step < 1")
    raise ValueError(f"{sampler} with strength={strength} keeps int({orig} * {strength}) = {kept} of the "
                     f"original_inference_steps={orig} timesteps, fewer than num_steps={n}: raise strength to at "
                     f"least {n / orig} or lower num_steps.")
  if n > orig:  # (diffusers refuses too)
    raise ValueError(f"{sampler} with num_steps={n} > original_inference_steps={orig}: its timesteps are a subset of "
                     f"the {orig} the model was distilled on; lower num_steps.")
  origin = (np.arange(1, kept + 1) * (T // orig) - 1)[::-1]
  return origin[np.floor(np.linspace(0, kept, n, endpoint=False)).astype(np.int64)]


def lcm_schedule(cfg, sampler, n, start, ac, karras, strength: float = 1.0) -> dict:
  """LCM (Luo et al. 2023): n of the distillation's original_inference_steps timesteps, evenly skipped; per call
  alpha_bar at t and at the next timestep (1 after the last call, which returns the consistency estimate), and
  the boundary-condition scalings c_skip, c_out at timestep_scaling * t (sigma_data 0.5), as diffusers.

  `strength` < 1 is LCMScheduler.set_timesteps(strength=...) (LatentConsistencyModelImg2ImgPipeline): the n
  timesteps are taken from the lowest int(original_inference_steps * strength) of the distillation's, all n run.
  set_alpha_to_one changes nothing: diffusers' LCMScheduler never steps past a timestep >= 0.
  """
  del karras
  ts = _distilled_timesteps(cfg, sampler, n, strength)[start:]
  a = ac[ts]
  scaled = ts.astype(np.float32) * np.float32(cfg.timestep_scaling)
  var = scaled * scaled + np.float32(0.25)
  scalings = np.stack([np.ones_like(scaled), np.float32(0.25) / var, scaled / np.sqrt(var)], 1)
  levels = np.append(a, np.float32(1.0))
  return dict(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(1.0), alphas=a,
              alphas_prev=np.append(ac[ts[1:]], np.float32(1.0)), scalings=scalings,
              levels=np.stack([np.sqrt(levels), np.sqrt(np.float32(1.0) - levels)], 1))


def tcd_schedule(cfg, sampler, n, start, ac, karras, eta: float = 0.0) -> dict:
  """TCD (Zheng et al. 2024): LCM's timesteps (`_distilled_timesteps`); per call alpha_bar at t and at the earlier
  s = floor((1 - eta) t_prev) its prediction is carried to (t_prev: the next timestep, 0 after the last call), and
  the weights (sqrt(a_prev / a_s), sqrt(1 - a_prev / a_s)) of that prediction and of fresh noise, (1, 0) where
  diffusers draws none (eta = 0, the last call). As diffusers, the last call returns a prediction at t = 0, not x0.
  """
  del karras
  full = _distilled_timesteps(cfg, sampler, n)
  prev = np.append(full[1:], 0)
  # torch: (1 - eta) * an int64 tensor is float32
  to = np.floor(np.float32(1 - eta) * prev.astype(np.float32)).astype(np.int64)
  ts, prev, to = full[start:], prev[start:], to[start:]
  ratio = ac[prev] / ac[to]
  keep, fresh = np.sqrt(ratio), np.sqrt(np.float32(1) - ratio)
  if eta == 0:
    keep, fresh = np.ones_like(keep), np.zeros_like(fresh)
  keep[-1], fresh[-1] = 1, 0
  a = ac[ts]
  levels = np.append(a, np.float32(1.0))
  levels = np.stack([np.sqrt(levels), np.sqrt(np.float32(1.0) - levels)], 1)
  return dict(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(1.0), alphas=a, alphas_prev=ac[to],
              coeffs=np.stack([keep, fresh], 1), levels=levels)
