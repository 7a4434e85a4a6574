"""Every sampler against the diffusers PyTorch scheduler of the same name, step by step.

Both sides drive the same deterministic fake model from the same initial noise (and, for the
stochastic samplers, the same per-step noise, fed to diffusers through its `randn_tensor`) and
record the latents after every model call and the timesteps the model was called at.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline)

from jaxsd.diffusion import samplers  # noqa: E402
from jaxsd.diffusion.schedules import SchedulerConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from tests.diffusion.test_schedules import SD15, SD21  # noqa: E402  (the real SD scheduler configs)

CONFIGS = {"sd15": SD15, "sd21": SD21}
SPACINGS = [None, "leading", "trailing", "linspace"]  # None: the file names none (SD's own configs)

DIFFUSERS = {
    "ddim": diffusers.DDIMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "ddpm": diffusers.DDPMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
    "lms": diffusers.LMSDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_2m_karras": diffusers.DPMSolverMultistepScheduler,
    "edm_euler": diffusers.EDMEulerScheduler,
    "edm_dpmpp_2m": diffusers.EDMDPMSolverMultistepScheduler,
    "lcm": diffusers.LCMScheduler,
    "dpmpp_2m_sde": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_2m_sde_karras": diffusers.DPMSolverMultistepScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
}
# What diffusers' scheduler is built with on top of the config, for the samplers that choose settings.
SETS = {
    "dpmpp_2m_karras": dict(use_karras_sigmas=True),
    "dpmpp_2m_sde": dict(algorithm_type="sde-dpmsolver++"),
    "dpmpp_2m_sde_karras": dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
}
DETERMINISTIC = ["ddim", "pndm", "euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras"]
TOL = 1e-5  # max |ours - diffusers| per step, relative to max(1, max |latents| of that step)
MEASURED: dict[str, float] = {}  # largest scaled difference per sampler, printed at the end


def fake_model_torch(x, t):
  return 0.9 * x + 0.1 * torch.tanh(3 * x) * (1 + t / 1000) + 0.01 * torch.cos(t / 100)


def fake_model(x, t):
  return 0.9 * x + 0.1 * jnp.tanh(3 * x) * (1 + t / 1000) + 0.01 * jnp.cos(t / 100)


@functools.partial(jax.jit, static_argnames=("model_fn", "return_trajectory"))
def run(model_fn, x, schedule, key=None, noise=None, return_trajectory=True):
  return samplers.sample(model_fn, x, schedule, key, noise=noise, return_trajectory=return_trajectory)


def run_diffusers(sampler, cfg_dict, n, noise, strength=1.0, x0=None, step_noise=None, monkeypatch=None,
                  img2img=StableDiffusionImg2ImgPipeline):
  """diffusers' pipeline loop (the `img2img` pipeline's get_timesteps + add_noise when strength < 1)."""
  d = dict(cfg_dict, **SETS.get(sampler, {}))
  sch = DIFFUSERS[sampler].from_config(d)
  if step_noise is not None:  # the stochastic schedulers draw their noise through randn_tensor
    draws = iter(torch.from_numpy(z) for z in step_noise)
    monkeypatch.setattr(f"{type(sch).__module__}.randn_tensor", lambda *a, **k: next(draws))
  sch.set_timesteps(n)
  if strength < 1.0:
    timesteps, _ = img2img.get_timesteps(types.SimpleNamespace(scheduler=sch), n, strength, "cpu")
    lat = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
  else:
    timesteps = sch.timesteps
    lat = torch.from_numpy(noise) * sch.init_noise_sigma
  init, ts, traj = lat.numpy(), [], []
  for t in timesteps:
    out = fake_model_torch(sch.scale_model_input(lat, t), t.float())
    ts.append(float(t))
    lat = sch.step(out, t, lat).prev_sample
    traj.append(lat.numpy())
  return init, np.array(ts, np.float32), np.stack(traj)


def compare(name, ours, ref, tol=TOL):
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.all(np.isfinite(ref))
  scale = np.maximum(1.0, np.abs(ref).reshape(len(ref), -1).max(1))
  err = (np.abs(np.asarray(ours) - ref).reshape(len(ref), -1).max(1) / scale).max()
  MEASURED[name] = max(MEASURED.get(name, 0.0), float(err))
  assert err <= tol, f"{name}: max scaled difference {err:.3g} > {tol}"


def check_timesteps(sampler, cfg, ours, ref):
  karras = sampler in ("dpmpp_2m_karras",) or (cfg.use_karras_sigmas and sampler in ("euler", "heun", "lms"))
  if karras and not sampler.startswith("dpmpp"):  # fractional: numpy's vs torch's sqrt (1 ulp) shows
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
  elif samplers.get(sampler).edm:  # log(sigma) / 4: torch's float32 log is 1 ulp off now and then
    np.testing.assert_allclose(ours, ref, rtol=4e-7, atol=0)
  else:
    np.testing.assert_array_equal(ours, ref)


def latents(seed, shape=(1, 4, 8, 8)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_both(sampler, cfg_dict, n, monkeypatch=None, strength=1.0, tol=TOL, img2img=StableDiffusionImg2ImgPipeline):
  cfg = SchedulerConfig.from_dict(cfg_dict)
  s = samplers.make_schedule(cfg, sampler, n, strength)
  noise = latents(0)
  step_noise = None
  if samplers.get(sampler).stochastic:
    step_noise = np.stack([latents(100 + i) for i in range(len(s.timesteps))])
  x0 = latents(1) if strength < 1.0 else None
  init, ts, traj = run_diffusers(sampler, cfg_dict, n, noise, strength, x0, step_noise, monkeypatch, img2img)
  if strength < 1.0:
    x = samplers.noise_latents(s, jnp.asarray(x0), jnp.asarray(noise))
  else:
    x = samplers.prepare_latents(s, jnp.asarray(noise))
  np.testing.assert_allclose(x, init, rtol=1e-6, atol=1e-6)
  check_timesteps(sampler, cfg, np.asarray(s.timesteps), ts)
  ours = run(fake_model, x, s, None if step_noise is None else jax.random.key(0),
             None if step_noise is None else jnp.asarray(step_noise))
  compare(sampler, ours, traj, tol)
  return ours


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config", ["sd15", "sd21"])
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_matches_diffusers(sampler, config, spacing):
  d = dict(CONFIGS[config]) if spacing is None else dict(CONFIGS[config], timestep_spacing=spacing)
  run_both(sampler, d, 10)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config", ["sd15", "sd21"])
@pytest.mark.parametrize("sampler", ["ddpm", "euler_a"])
def test_stochastic_matches_diffusers_with_the_same_noise(sampler, config, spacing, monkeypatch):
  d = dict(CONFIGS[config]) if spacing is None else dict(CONFIGS[config], timestep_spacing=spacing)
  run_both(sampler, d, 10, monkeypatch)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "ddpm", "euler_a"])
def test_zero_terminal_snr_matches_diffusers(sampler, spacing, monkeypatch):
  """A v-prediction schedule with rescale_betas_zero_snr=True: with "trailing" spacing the first call is at
  t=999, where alpha_bar is 0 (DDIM, DDPM) or diffusers' 2^-24 (Euler, DPM-Solver: sigma ~4096).

  The rescaled alpha_bar differs from diffusers' by up to 4.4e-6 relative (torch's sqrt, see
  test_schedules), so the tolerance is 5e-5 here (measured: at most 1.8e-5, Euler) rather than 1e-5."""
  run_both(sampler, dict(SD21, rescale_betas_zero_snr=True, timestep_spacing=spacing), 10, monkeypatch, tol=5e-5)


@pytest.mark.parametrize("sampler", ["pndm", "heun", "lms"])
def test_zero_terminal_snr_refused_where_diffusers_ignores_it(sampler):
  with pytest.raises(ValueError, match="ignores the setting"):
    samplers.make_schedule(SchedulerConfig.from_dict(dict(SD21, rescale_betas_zero_snr=True)), sampler, 10)


@pytest.mark.parametrize("sampler", ["euler", "heun", "lms"])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_karras_sigmas_from_config(sampler, config):
  run_both(sampler, dict(CONFIGS[config], use_karras_sigmas=True), 10)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "heun", "lms", "dpmpp_2m"])
def test_sample_prediction_and_clipping(sampler, monkeypatch):
  # x0-prediction, with DDIM's / DDPM's / Heun's clip_sample on (diffusers' own defaults).
  run_both(sampler, dict(SD15, prediction_type="sample", clip_sample=True, clip_sample_range=1.5), 10, monkeypatch)


@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("sampler", DETERMINISTIC + ["ddpm", "euler_a"])
def test_other_step_counts(sampler, n, monkeypatch):
  # 7 steps: fractional linspace timesteps (Euler family), PNDM's integer step ratio.
  run_both(sampler, dict(SD21, timestep_spacing="linspace"), n, monkeypatch)


def test_pndm_50_steps_sd15():
  run_both("pndm", SD15, 50)


@pytest.mark.parametrize("strength", [0.6, 0.35, 0.95])
@pytest.mark.parametrize("sampler", DETERMINISTIC + ["ddpm", "euler_a"])
def test_img2img_matches_diffusers(sampler, strength, monkeypatch):
  run_both(sampler, SD15, 10, monkeypatch, strength=strength)


def test_img2img_sd21_trailing(monkeypatch):
  for sampler in ("ddim", "euler", "dpmpp_2m_karras"):
    run_both(sampler, dict(SD21, timestep_spacing="trailing"), 10, monkeypatch, strength=0.5)


# SDXL's released scheduler_config.json (EulerDiscreteScheduler, "leading").
SDXL = dict(SD15, _class_name="EulerDiscreteScheduler", timestep_spacing="leading", interpolation_type="linear",
            use_karras_sigmas=False)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_few_step_trailing_on_sdxl(sampler, n, monkeypatch):
  """SDXL-Turbo / Lightning settings: "trailing" spacing, 1-8 steps, on SDXL's Euler config; timesteps, sigmas
  and latents as diffusers' schedulers built with timestep_spacing="trailing". Set in code with
  `SchedulerConfig.replace`, the spacing holds for every sampler, also on a config that names none (whose
  left-out keys take each sampler class's default)."""
  ours = run_both(sampler, dict(SDXL, timestep_spacing="trailing"), n, monkeypatch)
  assert ours.shape[0] == n
  want = samplers.make_schedule(SchedulerConfig.from_dict(dict(SDXL, timestep_spacing="trailing")), sampler, n)
  for base in (SDXL, {k: v for k, v in SD15.items() if k != "timestep_spacing"}):
    got = samplers.make_schedule(SchedulerConfig.from_dict(base).replace(timestep_spacing="trailing"), sampler, n)
    np.testing.assert_array_equal(got.timesteps, want.timesteps)
    np.testing.assert_array_equal(got.sigmas, want.sigmas)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim", "lms"])
def test_denoising_end_and_start_cut_as_sdxl(sampler):
  """SDXL's base -> refiner hand-off: the base runs the calls at timesteps >= (1 - denoising_end) * T (as
  StableDiffusionXLPipeline filters them), the refiner those below (1 - denoising_start) * T (as
  StableDiffusionXLImg2ImgPipeline.get_timesteps, a second-order step kept whole); the cut keeps the rest of the
  schedule as it was (sigmas, multistep weights)."""
  from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
      StableDiffusionXLImg2ImgPipeline)

  cfg = SchedulerConfig.from_dict(SDXL)
  for n, fraction in ((10, 0.8), (7, 0.55), (25, 0.7)):
    sch = DIFFUSERS[sampler].from_config(SDXL)
    sch.set_timesteps(n)
    cutoff = int(round(1000 - fraction * 1000))
    full = samplers.make_schedule(cfg, sampler, n)
    end = samplers.make_schedule(cfg, sampler, n, denoising_end=fraction)
    k = len([t for t in sch.timesteps if t >= cutoff])
    np.testing.assert_array_equal(end.timesteps, sch.timesteps.numpy()[:k])
    for name in ("sigmas", "levels", "alphas", "coeffs"):
      if getattr(full, name) is not None:
        np.testing.assert_array_equal(getattr(end, name), getattr(full, name)[:len(getattr(end, name))])
    start = samplers.make_schedule(cfg, sampler, n, denoising_start=fraction)
    ts, calls = StableDiffusionXLImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sch), n, 0.3, "cpu",
                                                               denoising_start=fraction)
    np.testing.assert_array_equal(start.timesteps, ts.numpy())
    assert len(start.timesteps) == calls and len(end.timesteps) + calls >= len(full.timesteps)
  with pytest.raises(ValueError, match="denoising_start=0.9 must be below denoising_end=0.5"):
    samplers.make_schedule(cfg, sampler, 10, denoising_start=0.9, denoising_end=0.5)
  with pytest.raises(ValueError, match="a float in"):
    samplers.make_schedule(cfg, sampler, 10, denoising_end=1)


def test_bf16_model_output_keeps_fp32_latents():
  s = samplers.make_schedule(SchedulerConfig(), "dpmpp_2m", 10)
  x = samplers.prepare_latents(s, jnp.asarray(latents(0)))
  bf16 = lambda x, t: fake_model(x, t).astype(jnp.bfloat16)
  rounded = lambda x, t: fake_model(x, t).astype(jnp.bfloat16).astype(jnp.float32)
  got = run(bf16, x, s)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, run(rounded, x, s))
  # The latents are not rounded to bf16 between steps: they differ from a bf16 copy of themselves.
  assert np.any(np.asarray(got[-1]) != np.asarray(got[-1].astype(jnp.bfloat16).astype(jnp.float32)))


def test_jit_does_not_recompile():
  traces = []

  def model(x, t):
    traces.append(1)
    return fake_model(x, t)

  f = jax.jit(lambda x, s, key: samplers.sample(model, x, s, key))
  cfg = SchedulerConfig()
  x = jnp.asarray(latents(0))
  f(x, samplers.make_schedule(cfg, "euler_a", 10), jax.random.key(0))
  # Another schedule (other spacing, img2img) of the same length reuses the compiled program.
  f(x + 1, samplers.make_schedule(cfg.replace(timestep_spacing="trailing"), "euler_a", 10), jax.random.key(1))
  f(x, samplers.make_schedule(cfg, "euler_a", 20, strength=0.5), jax.random.key(2))
  assert len(traces) == 1 and f._cache_size() == 1


def test_stochastic_key():
  s = samplers.make_schedule(SchedulerConfig(), "ddpm", 10)
  x = jnp.asarray(latents(0))
  a, b, c = (run(fake_model, x, s, jax.random.key(k), return_trajectory=False) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
  assert np.all(np.isfinite(np.asarray(c)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="dpm++"), "Unknown sampler 'dpm\\+\\+'; valid: ddim, pndm"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.0), "num_steps"),
    (dict(num_steps=1001), "num_steps"),
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(strength=0.05), "no denoising step"),
    (dict(sampler="ddim", use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(sampler="dpmpp_2m_karras", use_karras_sigmas=False), "pick one"),
])
def test_make_schedule_errors(kwargs, match):
  kw = dict(sampler="euler", num_steps=10) | kwargs
  with pytest.raises(ValueError, match=match):
    samplers.make_schedule(SchedulerConfig(), **kw)


@pytest.mark.parametrize(
    "cfg, sampler, match",
    [
        (SchedulerConfig(skip_prk_steps=False), "pndm", "at least 4 steps"),  # diffusers fails there too
        (SchedulerConfig(prediction_type="sample"), "plms", "prediction_type"),
        (SchedulerConfig(prediction_type="sample"), "euler_a", "prediction_type"),
        (SchedulerConfig(variance_type="learned_range"), "ddpm", "variance_type"),
    ])
def test_unsupported_settings(cfg, sampler, match):
  with pytest.raises(ValueError, match=match):
    samplers.make_schedule(cfg, sampler, 3 if match == "at least 4 steps" else 10)
  if match == "at least 4 steps":
    with pytest.raises(ValueError, match="strength < 1 is not implemented"):
      samplers.make_schedule(cfg, sampler, 10, strength=0.5)


def _without(d, *keys):
  return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.parametrize("config, spacing, n",
                         [(c, sp, n) for c in ("sd15", "sd21") for sp in SPACINGS for n in (4, 10)] +
                         [("sd15", None, 5), ("sd21", "trailing", 7), ("sd15", None, 50)])
def test_pndm_runge_kutta_warmup_matches_diffusers(config, spacing, n):
  # A config without skip_prk_steps means False to diffusers' PNDMScheduler: 12 Runge-Kutta calls first
  # (4 steps: the fewest diffusers runs; 7: a step ratio that is not a divisor).
  d = _without(CONFIGS[config], "skip_prk_steps")
  if spacing is not None:
    d["timestep_spacing"] = spacing
  run_both("pndm", d, n)
  s = samplers.make_schedule(SchedulerConfig.from_dict(d), "pndm", n)
  assert s.prk_calls == 12 and len(s.timesteps) == 12 + n - 3


@pytest.mark.parametrize("sampler", DETERMINISTIC + ["ddpm", "euler_a"])
def test_config_with_keys_left_out_matches_diffusers(sampler, monkeypatch):
  # An SD 2.x-like DDIM file that names only its betas and prediction type: every other key is the
  # default of the scheduler class that runs (clip_sample=True and set_alpha_to_one=True for DDIM,
  # steps_offset=0 everywhere, skip_prk_steps=False for PNDM), read directly or through a live
  # DDIMScheduler's config, as a pipeline swaps schedulers.
  d = {
      "_class_name": "DDIMScheduler",
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "beta_end": 0.012,
      "prediction_type": "v_prediction"
  }
  run_both(sampler, d, 10, monkeypatch)
  run_both(sampler, dict(diffusers.DDIMScheduler.from_config(d).config), 10, monkeypatch)


@pytest.mark.parametrize(
    "scheduler_class, kw",
    [
        ("UniPCMultistepScheduler", {}),  # solver_type "bh2": DPMSolverMultistep's __init__ maps it to midpoint
        ("DPMSolverSinglestepScheduler", {}),  # lower_order_final False
        ("DPMSolverMultistepScheduler", dict(lower_order_final=False, euler_at_final=True)),
    ])
def test_dpmpp_2m_on_other_solvers_folders_as_diffusers_swaps_them(scheduler_class, kw):
  """`python -m sample`'s default dpmpp_2m on a folder that ships another solver: as diffusers'
  DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) runs it (refused before, for keys that either
  map to what dpmpp_2m does or change nothing with the final sigma at zero)."""
  d = dict(
      getattr(diffusers, scheduler_class)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          **kw).config)
  d.pop("_use_default_values", None)  # as save_pretrained writes the file: every key given
  for n in (10, 20):
    run_both("dpmpp_2m", d, n)


def test_aliases_and_sample_errors():
  cfg = SchedulerConfig()
  a, b = samplers.make_schedule(cfg, "plms", 10), samplers.make_schedule(cfg, "pndm", 10)
  assert a.sampler == "pndm" and np.array_equal(a.timesteps, b.timesteps)
  k = samplers.make_schedule(cfg, "dpmpp_2m_karras", 10)
  assert not np.array_equal(k.sigmas, samplers.make_schedule(cfg, "dpmpp_2m", 10).sigmas)
  np.testing.assert_array_equal(k.sigmas, samplers.make_schedule(cfg, "dpmpp_2m", 10, use_karras_sigmas=True).sigmas)
  x = jnp.zeros((1, 4, 8, 8))
  with pytest.raises(ValueError, match="PRNG key"):
    samplers.sample(fake_model, x, samplers.make_schedule(cfg, "euler_a", 10))
  with pytest.raises(ValueError, match="noise has shape"):
    samplers.sample(fake_model, x, samplers.make_schedule(cfg, "ddpm", 10), noise=jnp.zeros((9, 1, 4, 8, 8)))


# SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json (the keys LCMScheduler reads).
LCM_DREAMSHAPER = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None
}
LCM_CONFIGS = {"sd15": SD15, "dreamshaper": LCM_DREAMSHAPER}


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("config", ["sd15", "dreamshaper"])
def test_lcm_matches_diffusers(config, n, monkeypatch):
  """LCM-LoRA on SD 1.5's config (a PNDM file: LCMScheduler's own defaults fill in original_inference_steps and
  timestep_scaling) and LCM Dreamshaper's: timesteps 999, 759, 499, 259 for 4 steps; fresh noise at every call but
  the last (diffusers draws none there), which returns the consistency estimate."""
  ours = run_both("lcm", LCM_CONFIGS[config], n, monkeypatch)
  s = samplers.make_schedule(SchedulerConfig.from_dict(LCM_CONFIGS[config]), "lcm", n)
  if n == 4:
    np.testing.assert_array_equal(s.timesteps, [999, 759, 499, 259])
  # The last call does not use its noise: other noise there leaves the result as it was.
  x = samplers.prepare_latents(s, jnp.asarray(latents(0)))
  z = jnp.asarray(np.stack([latents(100 + i) for i in range(n)]))
  other = run(fake_model, x, s, None, z.at[-1].set(7.0), return_trajectory=False)
  np.testing.assert_array_equal(other, ours[-1])


@pytest.mark.parametrize("n, strength", [(2, 0.5), (4, 0.6), (4, 0.75), (8, 0.35), (8, 0.9)])
@pytest.mark.parametrize("config", ["sd15", "dreamshaper"])
def test_lcm_img2img_matches_diffusers(config, n, strength, monkeypatch):
  # StableDiffusionImg2ImgPipeline (LCM-LoRA): get_timesteps keeps the last int(n * strength) of the n timesteps.
  run_both("lcm", LCM_CONFIGS[config], n, monkeypatch, strength=strength)


@pytest.mark.parametrize("kw", [
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", clip_sample=True, clip_sample_range=1.5),
    dict(clip_sample=True, clip_sample_range=0.8),
    dict(original_inference_steps=25, timestep_scaling=4.0),
    dict(original_inference_steps=100, set_alpha_to_one=False),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=999),
])
def test_lcm_settings_match_diffusers(kw, monkeypatch):
  for n in (1, 4, 6):
    run_both("lcm", dict(LCM_DREAMSHAPER, **kw), n, monkeypatch)


def test_lcm_zero_terminal_snr_matches_diffusers(monkeypatch):
  # LCMScheduler honours rescale_betas_zero_snr (alpha_bar at t=999 is 0: v-prediction only); see
  # test_zero_terminal_snr_matches_diffusers for the tolerance.
  run_both("lcm", dict(LCM_DREAMSHAPER, prediction_type="v_prediction", rescale_betas_zero_snr=True), 4, monkeypatch,
           tol=5e-5)


def test_lcm_refuses_what_diffusers_refuses():
  cfg = SchedulerConfig.from_dict(LCM_DREAMSHAPER)
  with pytest.raises(ValueError, match="num_steps=51 > original_inference_steps=50"):
    samplers.make_schedule(cfg, "lcm", 51)
  with pytest.raises(ValueError, match="original_inference_steps=2000 > num_train_timesteps=1000"):
    samplers.make_schedule(cfg.replace(original_inference_steps=2000), "lcm", 4)
  for n in (50, 51):  # diffusers' own check
    sch = diffusers.LCMScheduler.from_config(LCM_DREAMSHAPER)
    if n > 50:
      with pytest.raises(ValueError):
        sch.set_timesteps(n)
    else:
      sch.set_timesteps(n)
      np.testing.assert_array_equal(samplers.make_schedule(cfg, "lcm", n).timesteps, sch.timesteps.numpy())


@pytest.mark.parametrize("n", [1, 2, 10, 20])
@pytest.mark.parametrize("spacing", [None, "trailing"])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_2m_sde_karras"])
def test_dpmpp_2m_sde_matches_diffusers(sampler, config, spacing, n, monkeypatch):
  """DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" (what diffusers' docs call DPM++ 2M SDE
  (Karras)): fresh noise at every call, none left in the last (onto sigma 0)."""
  d = dict(CONFIGS[config]) if spacing is None else dict(CONFIGS[config], timestep_spacing=spacing)
  run_both(sampler, d, n, monkeypatch)


@pytest.mark.parametrize("strength", [0.6, 0.35])
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_2m_sde_karras"])
def test_dpmpp_2m_sde_img2img_and_settings(sampler, strength, monkeypatch):
  run_both(sampler, SD15, 10, monkeypatch, strength=strength)
  # A DPMSolverMultistep file naming algorithm_type="dpmsolver++": the sampler chooses its own, as diffusers'
  # from_config(config, algorithm_type="sde-dpmsolver++"); its x0-prediction; zero terminal SNR (tolerance: see
  # test_zero_terminal_snr_matches_diffusers).
  dpm = dict(diffusers.DPMSolverMultistepScheduler.from_config(SD21).config)
  dpm.pop("_use_default_values")
  run_both(sampler, dpm, 8, monkeypatch)
  run_both(sampler, dict(SD15, prediction_type="sample"), 8, monkeypatch)
  run_both(sampler, dict(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 8, monkeypatch, tol=5e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 20])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_unipc_matches_diffusers(config, spacing, n):
  """UniPCMultistepScheduler with its defaults (bh2, order 2, x0 model, lower_order_final): the corrector reuses
  the model call of the next step, so one call per step; the latents compared are its predictions."""
  d = dict(CONFIGS[config]) if spacing is None else dict(CONFIGS[config], timestep_spacing=spacing)
  run_both("unipc", d, n)


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_karras_sigmas=True),
        dict(use_karras_sigmas=True, prediction_type="v_prediction"),
        dict(prediction_type="sample"),
        dict(disable_corrector=[0, 3]),
        dict(solver_type="midpoint"),  # UniPC's __init__ runs DPM-Solver's solver types as bh2
    ])
def test_unipc_settings_match_diffusers(kw):
  for n in (4, 12):
    run_both("unipc", dict(SD15, **kw), n)


@pytest.mark.parametrize("strength", [0.6, 0.35, 0.95])
def test_unipc_img2img_and_zero_snr(strength):
  run_both("unipc", SD15, 10, strength=strength)
  run_both("unipc", dict(SD21, timestep_spacing="trailing"), 10, strength=strength)
  run_both("unipc", dict(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10, strength=strength,
           tol=5e-5)


def test_unipc_folder(monkeypatch):
  """A folder that ships UniPC: its sampler is unipc now (SAMPLER_OF), and dpmpp_2m still runs on it as diffusers
  swaps the scheduler (test_dpmpp_2m_on_other_solvers_folders_as_diffusers_swaps_them)."""
  d = dict(diffusers.UniPCMultistepScheduler.from_config(SD15).config)
  d.pop("_use_default_values")
  d["_class_name"] = "UniPCMultistepScheduler"
  assert samplers.SAMPLER_OF[d["_class_name"]] == "unipc"
  run_both("unipc", d, 10)
  for key, value in (("solver_order", 3), ("solver_type", "bh1"), ("predict_x0", False), ("lower_order_final", False)):
    with pytest.raises(ValueError, match=f"unipc with {key}={value!r} is not implemented"):
      samplers.make_schedule(SchedulerConfig.from_dict(dict(d, **{key: value})), "unipc", 10)


def test_sampler_of_follows_the_table():
  """SAMPLER_OF: every row's diffusers class, to the first row of that class (its plain variant)."""
  assert set(samplers.SAMPLER_OF) == {samplers.get(n).scheduler_class for n in samplers.SAMPLERS}
  for cls, name in samplers.SAMPLER_OF.items():
    assert samplers.get(name).scheduler_class == cls
  assert samplers.SAMPLER_OF["DPMSolverMultistepScheduler"] == "dpmpp_2m"
  assert samplers.SAMPLER_OF["EDMDPMSolverMultistepScheduler"] == "edm_dpmpp_2m"
  assert samplers.SAMPLER_OF["LCMScheduler"] == "lcm"
  assert samplers.SAMPLER_OF["PNDMScheduler"] == "pndm"


def test_report_measured_differences():
  """Runs last: prints the largest scaled difference measured per sampler (pytest -s shows it)."""
  for name, err in sorted(MEASURED.items()):
    print(f"{name:16s} max |ours - diffusers| / max(1, |x|) = {err:.2e}")
