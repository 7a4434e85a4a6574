"""The standard Stable Diffusion samplers as pure JAX functions over a model function.

Each sampler follows the diffusers PyTorch scheduler of the same name step for step (timesteps,
sigmas, multistep bookkeeping, quirks included), so a run reproduces the diffusers pipeline.
`make_schedule` builds everything the loop indexes into a `Schedule` pytree of float32 arrays;
`sample` runs the whole loop in one `lax.scan`, one model call per iteration (Heun calls the
model twice per step, as do KDPM2 (ancestral) and DPM++ SDE but in their last, and PNDM once more than its step
count, or 9 more with its Runge-Kutta warm-up, as in diffusers). What each sampler needs is one `Sampler` row (state
init, step, schedule builder, facts); the schedule builders (numpy) live in `set_timesteps`, the updates (jnp) and
`Schedule` in `steps`, and this module holds the table and the API. `init_state`, `model_input`, `step_noise` and
`step` are the loop's body one call at a time, for loops of one's own. A scheduler config is read as
the diffusers class of the sampler reads it: keys it leaves out take that class's defaults
(`SchedulerConfig.for_class`).

The samplers (SAMPLERS; SAMPLER_OF maps each diffusers class to its own):
  ddim, pndm (alias plms), ddpm                  DDIM (eta: fresh noise, as diffusers) / PNDM / DDPMScheduler
  euler, euler_a, heun, lms                      (Ancestral)Euler / Heun / LMSDiscreteScheduler
  dpmpp_2m, dpmpp_2m_sde (+ _karras aliases)     DPMSolverMultistepScheduler, dpmsolver++ / sde-dpmsolver++
  unipc                                          UniPCMultistepScheduler (bh2, order 2)
  lcm                                            LCMScheduler (latent consistency models, LCM-LoRA)
  tcd                                            TCDScheduler (trajectory consistency distillation: TCD-LoRA, Hyper-SD)
  kdpm2, kdpm2_a                                 KDPM2(Ancestral)DiscreteScheduler (A1111's DPM2 / DPM2 a)
  dpmpp_2s                                       DPMSolverSinglestepScheduler, dpmsolver++ order 2 (A1111's DPM++ 2S)
  deis                                           DEISMultistepScheduler (logrho, order 2)
  dpmpp_sde (+ _karras alias)                    DPMSolverSDEScheduler (A1111's DPM++ SDE (Karras))
  edm_euler, edm_dpmpp_2m                        EDMEuler / EDMDPMSolverMultistepScheduler
The EDM samplers are for models with EDM preconditioning (Playground v2.5, CosXL: `SchedulerConfig.edm`) and
only they sample those: on such a config euler and dpmpp_2m(_karras) mean them, the others are refused.
The stochastic samplers draw their noise from the loop's key (`step_noise`), not from torch's generator. dpmpp_sde's
is therefore not the torchsde Brownian tree diffusers draws from: the same distribution (a step's second call's noise
holds its first call's, as the tree's increments do), not the same numbers, and not the tree's consistency across step
counts; a config's noise_sampler_seed (torch's) is not read.

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

from jaxsd.diffusion import schedules, set_timesteps, set_timesteps_more, steps
from jaxsd.diffusion.schedules import SchedulerConfig
from jaxsd.diffusion.steps import Schedule

# The Karras-sigma variants are the plain sampler with use_karras_sigmas=True.
_KARRAS = {"dpmpp_2m_karras": "dpmpp_2m", "dpmpp_2m_sde_karras": "dpmpp_2m_sde", "dpmpp_sde_karras": "dpmpp_sde"}
ALIASES = {"plms": "pndm", **_KARRAS}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


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
                  denoising_end: float | None = None, lcm_strength_in_schedule: bool = False,
                  eta: float | None = None) -> Schedule:
  """Builds the schedule of `sampler` with `num_steps` steps, as diffusers' `set_timesteps`.

  Args:
    cfg: the model's noise schedule.
    sampler: one of SAMPLERS or ALIASES. On a config with EDM preconditioning (`cfg.edm`) euler and
      dpmpp_2m(_karras) run edm_euler and edm_dpmpp_2m, and the others raise; edm_* raise on other configs.
    num_steps: number of inference steps (diffusers' num_inference_steps).
    strength: img2img strength in (0, 1]; below 1 the schedule keeps the last
      int(num_steps * strength) steps, as StableDiffusionImg2ImgPipeline.get_timesteps (also for `lcm`: an SD
      folder with LCMScheduler or an LCM-LoRA), unless `lcm_strength_in_schedule`.
    use_karras_sigmas: overrides cfg.use_karras_sigmas (Euler, Heun, LMS, DPM++, UniPC, KDPM2, DEIS only).
    denoising_start: in (0, 1): run only the calls at timesteps below (1 - denoising_start) * T (replaces
      `strength`), as SDXL's img2img `get_timesteps` (a second-order sampler starts on a whole step).
    denoising_end: in (0, 1): stop before the first call at a timestep below (1 - denoising_end) * T, as
      SDXL's pipelines; the result is then still noisy (the base -> refiner hand-off).
    lcm_strength_in_schedule: `lcm` only: `strength` goes into LCMScheduler.set_timesteps, as
      LatentConsistencyModelImg2ImgPipeline (what diffusers' AutoPipelineForImage2Image builds for a
      LatentConsistencyModelPipeline folder): all `num_steps` calls run, on timesteps taken from the lowest
      int(original_inference_steps * strength) of the distillation's (at least `num_steps` of them).
    eta: diffusers' pipelines' `eta`, for the samplers whose scheduler's step takes it (ETA_SAMPLERS): ddim's
      weight of fresh noise (DDIMScheduler.step: std eta * sigma_t of Song et al. (2021) eq. 16; 0 deterministic
      DDIM, 1 DDPM-like; above 1 as long as the direction term stays real), tcd's gamma (TCDScheduler.step, in
      [0, 1]). None or 0.0 (the pipelines' default) is deterministic: ddim's schedule and program are then those
      without eta, and draw no noise. A positive eta gives ddim a `coeffs` array, so other positive values reuse
      its compiled program. Other samplers refuse eta != 0 (diffusers ignores it there silently).
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
  schedule_kw = {}
  if lcm_strength_in_schedule:
    if sampler != "lcm" or denoising_start is not None:
      raise ValueError(f"lcm_strength_in_schedule is LatentConsistencyModelImg2ImgPipeline's strength, for the lcm "
                       f"sampler without denoising_start; got sampler {sampler!r}"
                       f"{'' if denoising_start is None else ' and denoising_start'}.")
    schedule_kw["strength"] = strength  # every call runs, on timesteps below strength * T
  if eta is not None:
    _check_eta(sampler, eta)
    if eta > 0 or sampler == "tcd":
      schedule_kw["eta"] = float(eta)
  init_steps = num_steps if lcm_strength_in_schedule else min(int(num_steps * strength), num_steps)
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
  fields = row.schedule(cfg, sampler, num_steps, start, ac, karras, **schedule_kw)
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


def _check_eta(sampler: str, eta) -> None:
  """Raises for an eta that `sampler` does not take: not a finite number >= 0, != 0 where the sampler has none,
  above 1 for tcd (TCDScheduler asserts it)."""
  if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not np.isfinite(eta):
    raise ValueError(f"eta={eta!r}: must be a finite number >= 0 (0: deterministic).")
  if eta < 0:
    raise ValueError(f"eta={eta}: must be >= 0 (0: deterministic DDIM, 1: DDPM-like; TCD's gamma in [0, 1]).")
  if eta != 0 and not _TABLE[sampler].eta:
    raise ValueError(f"eta={eta} with the {sampler} sampler, which has no eta (diffusers ignores it there): use one "
                     f"of {', '.join(ETA_SAMPLERS)}, or drop eta.")
  if sampler == "tcd" and eta > 1:
    raise ValueError(f"eta={eta}: must be in [0, 1] for tcd (its gamma: 0 deterministic, 1 fully stochastic), as "
                     "diffusers.")


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
  eta: bool = False  # its diffusers step takes the pipelines' eta (DDIM's noise weight, TCD's gamma)


def _stateless(x):
  del x
  return ()


def _heun_init(x):
  return jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros_like(x)


def _check_ddpm(cfg: SchedulerConfig) -> None:
  if cfg.variance_type != "fixed_small":
    raise ValueError(f"ddpm supports variance_type='fixed_small' only, not {cfg.variance_type!r}.")


_TABLE = {
    "ddim":
        Sampler(_stateless, steps.ddim_step, set_timesteps.alpha_schedule, clips=True, scheduler_class="DDIMScheduler",
                eta=True),
    # State: the last three outputs, newest first; the latents the first call (the RK step) started from;
    # the Runge-Kutta sum of outputs (warm-up only).
    "pndm":
        Sampler(lambda x: (jnp.zeros((3,) + x.shape, x.dtype), jnp.zeros_like(x), jnp.zeros_like(x)), steps.pndm_step,
                set_timesteps.alpha_schedule, predicts_sample=False, scheduler_class="PNDMScheduler"),
    "ddpm":
        Sampler(_stateless, steps.ddpm_step, set_timesteps.alpha_schedule, stochastic=True, clips=True,
                check=_check_ddpm, scheduler_class="DDPMScheduler"),
    "euler":
        Sampler(_stateless, steps.euler_step, set_timesteps.sigma_schedule, scaled_input=True, karras=True,
                scheduler_class="EulerDiscreteScheduler", sigma_space=True),
    "euler_a":
        Sampler(_stateless, steps.euler_ancestral_step, set_timesteps.sigma_schedule, scaled_input=True,
                stochastic=True, predicts_sample=False, scheduler_class="EulerAncestralDiscreteScheduler",
                sigma_space=True),
    # State: the predictor's derivative, its step size and the latents it started from.
    "heun":
        Sampler(_heun_init, steps.heun_step, set_timesteps.sigma_schedule, scaled_input=True, order=2, karras=True,
                clips=True, scheduler_class="HeunDiscreteScheduler"),
    # State: the last four derivatives, newest first.
    "lms":
        Sampler(lambda x: jnp.zeros((4,) + x.shape, x.dtype), steps.lms_step, set_timesteps.sigma_schedule,
                scaled_input=True, karras=True, scheduler_class="LMSDiscreteScheduler"),
    # State: the previous x0 prediction.
    "dpmpp_2m":
        Sampler(jnp.zeros_like, steps.dpmpp_2m_step, set_timesteps.dpm_schedule, karras=True,
                scheduler_class="DPMSolverMultistepScheduler", sigma_space=True),
    "dpmpp_2m_sde":
        Sampler(jnp.zeros_like, steps.dpmpp_2m_sde_step, set_timesteps.dpm_schedule, stochastic=True, karras=True,
                scheduler_class="DPMSolverMultistepScheduler", sigma_space=True, sets=("algorithm_type",)),
    # State: the previous call's corrected latents and the last two x0 predictions.
    "unipc":
        Sampler(lambda x: (jnp.zeros_like(x),) * 3, steps.unipc_step, set_timesteps.dpm_schedule, karras=True,
                scheduler_class="UniPCMultistepScheduler", sigma_space=True),
    # EDM models (Playground v2.5, CosXL): the model sees c_in x, x = x0 + sigma eps.
    "edm_euler":
        Sampler(_stateless, steps.edm_euler_step, set_timesteps.edm_schedule, scaled_input=True, predicts_sample=False,
                scheduler_class="EDMEulerScheduler", edm=True),
    # State: the previous x0 prediction.
    "edm_dpmpp_2m":
        Sampler(jnp.zeros_like, steps.edm_dpmpp_2m_step, set_timesteps.edm_schedule, scaled_input=True,
                predicts_sample=False, scheduler_class="EDMDPMSolverMultistepScheduler", edm=True),
    # Latent consistency models and LCM-LoRA: 1-8 steps, fresh noise at every call but the last.
    "lcm":
        Sampler(_stateless, steps.lcm_step, set_timesteps.lcm_schedule, stochastic=True, clips=True,
                scheduler_class="LCMScheduler"),
    # TCD-LoRA, Hyper-SD: LCM's timesteps; fresh noise at every call but the last when eta > 0.
    "tcd":
        Sampler(_stateless, steps.tcd_step, set_timesteps.tcd_schedule, stochastic=True, scheduler_class="TCDScheduler",
                eta=True),
    # State: the latents the step started from (its first call's).
    "kdpm2":
        Sampler(jnp.zeros_like, steps.kdpm2_step, set_timesteps_more.kdpm2_schedule, scaled_input=True, order=2,
                karras=True, predicts_sample=False, scheduler_class="KDPM2DiscreteScheduler"),
    "kdpm2_a":
        Sampler(jnp.zeros_like, steps.kdpm2_step, set_timesteps_more.kdpm2_schedule, scaled_input=True, order=2,
                stochastic=True, karras=True, predicts_sample=False, scheduler_class="KDPM2AncestralDiscreteScheduler"),
    # State: the latents the last first-order call started from, and the previous x0 prediction.
    "dpmpp_2s":
        Sampler(lambda x: (jnp.zeros_like(x),) * 2, steps.dpmpp_2s_step, set_timesteps_more.dpm_singlestep_schedule,
                karras=True, scheduler_class="DPMSolverSinglestepScheduler"),
    # State: the previous eps prediction.
    "deis":
        Sampler(jnp.zeros_like, steps.deis_step, set_timesteps_more.deis_schedule, karras=True,
                scheduler_class="DEISMultistepScheduler"),
    # State: the latents the step started from (its first call's), and that call's noise.
    "dpmpp_sde":
        Sampler(lambda x: (jnp.zeros_like(x),) * 2, steps.dpmpp_sde_step, set_timesteps_more.dpm_sde_schedule,
                scaled_input=True, stochastic=True, order=2, karras=True, predicts_sample=False,
                scheduler_class="DPMSolverSDEScheduler"),
}
SAMPLERS = tuple(_TABLE)
ETA_SAMPLERS = tuple(k for k, r in _TABLE.items() if r.eta)  # those that take `make_schedule`'s eta
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


def stochastic(schedule: Schedule) -> bool:
  """Whether the sampler of `schedule` draws fresh noise at its calls: a stochastic sampler's row, or one that takes
  eta with an eta > 0 (ddim: its schedule then has `coeffs`), decided when tracing."""
  row = _TABLE[schedule.sampler]
  return row.stochastic or (row.eta and schedule.coeffs is not None)


def step_noise(schedule: Schedule, i: jax.Array, x: jax.Array, key: jax.Array) -> jax.Array | None:
  """The fresh noise of call i of a stochastic sampler (None for the others), from fold_in(key, i).

  A batch of keys (shape [B], one per image) draws each image's noise from its own key, so an image
  does not depend on which batch or device it was sampled in.
  """
  if not stochastic(schedule):
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
    key: PRNG key of the stochastic samplers (ddpm, euler_a, dpmpp_2m_sde, lcm, tcd, kdpm2_a, dpmpp_sde; ddim with
      eta > 0), or a [B] batch of them (see `step_noise`).
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
  draws = stochastic(s)
  if noise is not None and noise.shape != (n,) + x.shape:
    raise ValueError(f"noise has shape {noise.shape}; expected {(n,) + x.shape} (one per model call).")
  if draws and noise is None and key is None:
    raise ValueError(f"sampler {s.sampler!r} is stochastic: pass a PRNG key (or noise).")

  def body(carry, i):
    x, state = carry
    out = model_fn(model_input(s, i, x), s.timesteps[i], *((i,) if indexed else ()))
    if out.shape != x.shape:
      raise ValueError(f"model_fn returned shape {out.shape} for latents of shape {x.shape}.")
    z = noise[i].astype(jnp.float32) if draws and noise is not None else step_noise(s, i, x, key)
    x, state = step(s, i, x, out, state, z)
    if after_step is not None:
      x = after_step(i, x)
    return (x, state), (x if return_trajectory else None)

  (x, _), traj = jax.lax.scan(body, (x, init_state(s, x)), jnp.arange(n))
  return traj if return_trajectory else x
