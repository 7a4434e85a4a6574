"""The EDM samplers (Karras et al. 2022 preconditioning) against diffusers' EDM schedulers, step by step, and the
rule that keeps EDM models and the other samplers apart."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (  # noqa: E402
    StableDiffusionXLImg2ImgPipeline)

from jaxsd.diffusion import samplers  # noqa: E402
from jaxsd.diffusion.schedules import SchedulerConfig  # noqa: E402
from tests.diffusion.test_samplers import fake_model, latents, run_both  # noqa: E402
from tests.diffusion.test_schedules import SD15  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# playgroundai/playground-v2.5-1024px-aesthetic scheduler/scheduler_config.json.
PLAYGROUND = {
    "_class_name": "EDMDPMSolverMultistepScheduler",
    "_diffusers_version": "0.27.0.dev0",
    "algorithm_type": "dpmsolver++",
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "sample_max_value": 1.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False
}
# stabilityai/cosxl as diffusers' docs set it up (EDMEulerScheduler, exponential sigmas, v-prediction).
COSXL = dict(_class_name="EDMEulerScheduler", sigma_min=0.002, sigma_max=120.0, sigma_data=1.0,
             sigma_schedule="exponential", prediction_type="v_prediction")
CLASS = {"edm_euler": "EDMEulerScheduler", "edm_dpmpp_2m": "EDMDPMSolverMultistepScheduler"}
EDM = tuple(CLASS)


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", EDM)
def test_edm_matches_diffusers(sampler, schedule, prediction_type, final, n):
  """Sigmas and c_noise timesteps bit for bit; latents at TOL. With sigma_min, Euler's last step repeats the last
  sigma (a step of size 0) and DPM++ steps to sigma_min: as diffusers."""
  run_both(
      sampler,
      dict(_class_name=CLASS[sampler], sigma_schedule=schedule, prediction_type=prediction_type,
           final_sigmas_type=final), n)


@pytest.mark.parametrize("n", [1, 2, 4, 10, 14, 15, 25, 50])
def test_playground_v2_5_config(n):
  """Playground v2.5's real file; from 15 steps on, lower_order_final no longer applies (the last step is still
  first order, onto sigma 0)."""
  cfg = SchedulerConfig.from_dict(PLAYGROUND)
  assert cfg.edm and cfg.sigma_data == 0.5 and samplers.SAMPLER_OF[PLAYGROUND["_class_name"]] == "edm_dpmpp_2m"
  ours = run_both("edm_dpmpp_2m", PLAYGROUND, n)
  assert ours.shape[0] == n
  s = samplers.make_schedule(cfg, "edm_dpmpp_2m", n)
  np.testing.assert_allclose(s.init_noise_sigma, math.sqrt(80.0**2 + 1), rtol=1e-7)


@pytest.mark.parametrize("n", [1, 4, 20])
def test_cosxl_config(n):
  run_both("edm_euler", COSXL, n)


@pytest.mark.parametrize("lower_order_final, euler_at_final", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("n", [10, 20])
def test_edm_dpmpp_2m_final_step_order(lower_order_final, euler_at_final, n):
  """With final_sigmas_type="sigma_min" the last step is second order unless lower_order_final (below 15 steps)
  or euler_at_final make it first order."""
  run_both(
      "edm_dpmpp_2m",
      dict(PLAYGROUND, final_sigmas_type="sigma_min", lower_order_final=lower_order_final,
           euler_at_final=euler_at_final), n)


@pytest.mark.parametrize("strength", [0.6, 0.35, 0.95])
@pytest.mark.parametrize("config", ["playground", "cosxl"])
@pytest.mark.parametrize("sampler", EDM)
def test_edm_img2img_matches_diffusers(sampler, config, strength):
  """strength < 1 as StableDiffusionXLImg2ImgPipeline.get_timesteps (the same truncation and set_begin_index as
  StableDiffusionImg2ImgPipeline's), add_noise x0 + sigma * noise at the first kept sigma."""
  d = dict(PLAYGROUND if config == "playground" else COSXL, _class_name=CLASS[sampler])
  run_both(sampler, d, 10, strength=strength, img2img=StableDiffusionXLImg2ImgPipeline)
  # lower_order_final counts the whole schedule's 20 steps
  run_both(sampler, d, 20, strength=strength, img2img=StableDiffusionXLImg2ImgPipeline)


def test_usual_samplers_map_to_edm_ones():
  cfg = SchedulerConfig.from_dict(PLAYGROUND)
  for name, want in (("euler", "edm_euler"), ("dpmpp_2m", "edm_dpmpp_2m"), ("dpmpp_2m_karras", "edm_dpmpp_2m")):
    got, ref = samplers.make_schedule(cfg, name, 12), samplers.make_schedule(cfg, want, 12)
    assert got.sampler == want
    np.testing.assert_array_equal(got.sigmas, ref.sigmas)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps)
  # A live diffusers config (keys it filled in _use_default_values) is an EDM one too.
  live = dict(diffusers.EDMEulerScheduler.from_config({}).config)
  assert SchedulerConfig.from_dict(live).edm
  assert samplers.make_schedule(SchedulerConfig.from_dict(live), "euler", 5).sampler == "edm_euler"


@pytest.mark.parametrize("sampler",
                         [s for s in samplers.SAMPLERS if s not in EDM and s not in samplers.EDM_OF] + ["plms"])
def test_other_samplers_refuse_edm_models(sampler):
  with pytest.raises(ValueError, match="EDM preconditioning.*use one of edm_euler, edm_dpmpp_2m"):
    samplers.make_schedule(SchedulerConfig.from_dict(PLAYGROUND), sampler, 10)


@pytest.mark.parametrize("sampler", EDM)
def test_edm_samplers_refuse_other_models(sampler):
  for d in (SD15, dict(SD15, _class_name="EulerDiscreteScheduler", sigma_min=0.1, sigma_max=10.0)):
    cfg = SchedulerConfig.from_dict(d)
    assert not cfg.edm
    with pytest.raises(ValueError, match=f"{sampler}' is for models with EDM preconditioning"):
      samplers.make_schedule(cfg, sampler, 10)


@pytest.mark.parametrize("kw, match", [
    (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+' is not implemented"),
    (dict(solver_order=3), "solver_order=3 is not implemented"),
    (dict(solver_type="heun"), "solver_type='heun' is not implemented"),
    (dict(prediction_type="sample"), "prediction_type='sample'"),
    (dict(sigma_schedule="linear"), "sigma_schedule"),
    (dict(sigma_min=0.0), "sigma_min"),
])
def test_edm_unsupported_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    samplers.make_schedule(SchedulerConfig.from_dict(dict(PLAYGROUND, **kw)), "edm_dpmpp_2m", 10)


def test_edm_settings_diffusers_maps():
  # EDMDPMSolverMultistepScheduler's __init__ runs UniPC's / DEIS's solver_type and "deis" as midpoint dpmsolver++.
  run_both("edm_dpmpp_2m", dict(PLAYGROUND, solver_type="bh2"), 10)
  run_both("edm_dpmpp_2m", dict(PLAYGROUND, algorithm_type="deis", final_sigmas_type="sigma_min"), 10)


@pytest.mark.parametrize("kw", [dict(denoising_start=0.5), dict(denoising_end=0.5)])
def test_edm_refuses_denoising_start_end(kw):
  """SDXL compares c_noise timesteps (about -1.6 to 1.1) with a training timestep cutoff: diffusers runs every
  step (denoising_start) or none (denoising_end). Refused, not imitated."""
  with pytest.raises(ValueError, match="denoising_start / denoising_end is not available"):
    samplers.make_schedule(SchedulerConfig.from_dict(PLAYGROUND), "edm_dpmpp_2m", 10, **kw)


def test_edm_schedules_share_one_compiled_program():
  """The preconditioning is per-call arrays (Schedule.scalings), not static: other EDM models' schedules of the same
  length (another sigma_data, sigma schedule) and img2img reuse the compiled loop."""
  traces = []

  def model(x, t):
    traces.append(1)
    return fake_model(x, t)

  f = jax.jit(lambda x, s: samplers.sample(model, x, s))
  x = jnp.asarray(latents(0))
  f(x, samplers.make_schedule(SchedulerConfig.from_dict(PLAYGROUND), "edm_dpmpp_2m", 10))
  f(
      x,
      samplers.make_schedule(SchedulerConfig.from_dict(dict(PLAYGROUND, sigma_data=1.0, sigma_schedule="exponential")),
                             "edm_dpmpp_2m", 10))
  f(x, samplers.make_schedule(SchedulerConfig.from_dict(PLAYGROUND), "edm_dpmpp_2m", 20, strength=0.5))
  assert len(traces) == 1 and f._cache_size() == 1
