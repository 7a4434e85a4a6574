"""tcd, kdpm2, kdpm2_a, dpmpp_2s and deis against their diffusers schedulers, step by step, as test_samplers does for
the others; the folder defaults they give, what they refuse, and one end-to-end pipeline check.

The stochastic ones (tcd with eta > 0, kdpm2_a) draw call i's noise in jaxsd; diffusers is given that same noise
at the call that draws it (kdpm2_a draws in the second call of a step only, tcd in every call but the last).
"""

from __future__ import annotations

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
from tests.diffusion.test_samplers import compare, fake_model, fake_model_torch, latents, run  # noqa: E402
from tests.diffusion.test_schedules import SD15, SD21  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASS = {
    "tcd": "TCDScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_2s": "DPMSolverSinglestepScheduler",
    "deis": "DEISMultistepScheduler",
}
NEW = tuple(CLASS)


def run_both(sampler, cfg_dict, n, strength=1.0, eta=None, tol=1e-5):
  """jaxsd and diffusers' pipeline loop (img2img: StableDiffusionImg2ImgPipeline.get_timesteps and add_noise) from the
  same latents with the same noise per call; returns jaxsd's trajectory."""
  s = samplers.make_schedule(SchedulerConfig.from_dict(cfg_dict), sampler, n, strength, eta=eta)
  sch = getattr(diffusers, CLASS[sampler]).from_config(cfg_dict)
  step_noise = np.stack([latents(100 + i) for i in range(len(s.timesteps))])
  call = [0]
  module = __import__(type(sch).__module__, fromlist=["randn_tensor"])
  original = getattr(module, "randn_tensor", None)  # (the deterministic ones import none)
  module.randn_tensor = lambda *a, **k: torch.from_numpy(step_noise[call[0]])
  try:
    sch.set_timesteps(n)
    noise, x0 = latents(0), latents(1)
    if strength < 1.0:
      timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sch), n, strength,
                                                                  "cpu")
      lat = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
      x = samplers.noise_latents(s, jnp.asarray(x0), jnp.asarray(noise))
    else:
      timesteps, lat = sch.timesteps, torch.from_numpy(noise) * sch.init_noise_sigma
      x = samplers.prepare_latents(s, jnp.asarray(noise))
    np.testing.assert_allclose(x, lat.numpy(), rtol=1e-6, atol=1e-6)
    kw = dict(eta=eta or 0.0) if sampler == "tcd" else {}  # (what the pipelines pass: their eta=0.0 by default)
    ts, traj = [], []
    for i, t in enumerate(timesteps):
      call[0] = i
      out = fake_model_torch(sch.scale_model_input(lat, t), t.float())
      ts.append(float(t))
      lat = sch.step(out, t, lat, **kw).prev_sample
      traj.append(lat.numpy())
  finally:
    if original is None:
      del module.randn_tensor
    else:
      module.randn_tensor = original
  if sampler.startswith("kdpm2"):
    # Fractional midpoint timesteps: numpy's vs torch's float32 log shows. kdpm2_a's midpoint before the last step
    # is ill-conditioned in diffusers' float32: sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels to ~4e-6 of its
    # terms, so the midpoint sigma lands within ~1.5% of sigma_min and sigma_to_t gives 0 to ~0.02 by the CPU's
    # rounding (0.0 on an AVX-512 Intel host, 0.0096 at 2 steps on an AMD EPYC host, torch's CPU capability AVX2).
    # jaxsd rounds as diffusers does on the first; the cancellation is (sigma_next / sigma)^2, ~4e-6 at 2 steps only.
    np.testing.assert_allclose(s.timesteps, ts, rtol=0, atol=3e-2)
  else:
    np.testing.assert_array_equal(s.timesteps, np.array(ts, np.float32))
  stochastic = samplers.get(sampler).stochastic
  ours = run(fake_model, x, s,
             jax.random.key(0) if stochastic else None,
             jnp.asarray(step_noise) if stochastic else None)
  compare(sampler, ours, np.stack(traj), tol)
  return ours


@pytest.mark.parametrize("n", [1, 2, 4, 25])
@pytest.mark.parametrize("sampler", NEW)
def test_matches_diffusers(sampler, n):
  """SD 1.5's config (a PNDM file: each class's own defaults fill in what it leaves out), 1 to 25 steps."""
  # kdpm2_a at 2 steps: diffusers' first midpoint is the ill-conditioned one (run_both), and its CPU-dependent rounding
  # moves the trajectory by up to 3.8e-4 (AMD EPYC, AVX2; < 1e-5 on an AVX-512 Intel host, where it rounds as ours).
  ours = run_both(sampler, SD15, n, tol=1e-3 if (sampler, n) == ("kdpm2_a", 2) else 1e-5)
  assert ours.shape[0] == (2 * n - 1 if sampler.startswith("kdpm2") else n)


@pytest.mark.parametrize("sampler", NEW)
def test_img2img_and_v_prediction_match_diffusers(sampler):
  """img2img strength 0.5 (SD's get_timesteps: KDPM2 starts on a whole step), and SD 2.1's v-prediction config."""
  run_both(sampler, SD15, 10, strength=0.5)
  run_both(sampler, SD21, 10)


@pytest.mark.parametrize("sampler", ["kdpm2", "kdpm2_a", "dpmpp_2s", "deis"])
def test_karras_sigmas_match_diffusers(sampler):
  run_both(sampler, dict(SD15, use_karras_sigmas=True), 10)
  ref = samplers.make_schedule(SchedulerConfig.from_dict(SD15), sampler, 10, use_karras_sigmas=True)
  np.testing.assert_array_equal(
      ref.timesteps,
      samplers.make_schedule(SchedulerConfig.from_dict(dict(SD15, use_karras_sigmas=True)), sampler, 10).timesteps)


@pytest.mark.parametrize("eta, n", [(0.3, 4), (1.0, 8), (0.3, 6)])
def test_tcd_eta_matches_diffusers(eta, n):
  """TCDScheduler.step's eta (gamma): the prediction is carried to floor((1 - eta) t_prev), then noised back up to
  t_prev with fresh noise (none after the last call); also for img2img."""
  run_both("tcd", SD15, n, eta=eta)
  run_both("tcd", SD15, n, strength=0.5, eta=eta)


def test_tcd_settings_match_diffusers():
  """Zero terminal SNR (TCD honours it: v-prediction, the first call at alpha_bar 0; tolerance as
  test_zero_terminal_snr_matches_diffusers), x0-prediction, another original_inference_steps; eta=0 (the pipelines'
  default) is deterministic: no noise reaches the latents."""
  run_both("tcd", dict(SD21, rescale_betas_zero_snr=True), 4, eta=0.3, tol=5e-5)
  run_both("tcd", dict(SD15, prediction_type="sample"), 4, eta=0.5)
  run_both("tcd", dict(SD15, original_inference_steps=25), 4, eta=0.3)
  s = samplers.make_schedule(SchedulerConfig.from_dict(SD15), "tcd", 4)
  np.testing.assert_array_equal(s.timesteps, [999, 759, 499, 259])
  np.testing.assert_array_equal(s.coeffs, [[1, 0]] * 4)
  x = jnp.asarray(latents(0))
  a, b = (run(fake_model, x, s, jax.random.key(k), return_trajectory=False) for k in (0, 1))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [4, 10])
def test_dpmpp_2s_settings_match_diffusers(n):
  """A final step onto sigma_min at second order (final_sigmas_type="sigma_min", lower_order_final=False, an even
  step count), its first-order variant, x0-prediction, and a config naming a spacing (the class reads none)."""
  run_both("dpmpp_2s", dict(SD15, final_sigmas_type="sigma_min", lower_order_final=False), n)
  run_both("dpmpp_2s", dict(SD15, final_sigmas_type="sigma_min", lower_order_final=True), n)
  run_both("dpmpp_2s", dict(SD15, prediction_type="sample"), n)
  run_both("dpmpp_2s", dict(SD15, timestep_spacing="trailing"), n)


def test_deis_settings_match_diffusers():
  """Spacings, x0-prediction, no lower-order last step (15 steps and more, or lower_order_final=False), and a
  DPMSolverMultistep file, whose dpmsolver++ / midpoint DEIS's __init__ runs as deis / logrho."""
  for spacing in ("leading", "trailing"):
    run_both("deis", dict(SD15, timestep_spacing=spacing), 10)
  run_both("deis", dict(SD15, prediction_type="sample"), 8)
  run_both("deis", dict(SD15, lower_order_final=False), 8)
  run_both("deis", SD15, 16)
  dpm = dict(diffusers.DPMSolverMultistepScheduler.from_config(SD15).config)
  dpm.pop("_use_default_values")
  run_both("deis", dpm, 10)


def test_kdpm2_spacings_match_diffusers():
  for sampler in ("kdpm2", "kdpm2_a"):
    for spacing in ("leading", "trailing"):
      run_both(sampler, dict(SD21, timestep_spacing=spacing), 6)


def test_folders_default_to_them():
  """SAMPLER_OF: a folder that ships one of these classes samples with its own sampler (it ran dpmpp_2m)."""
  for sampler, cls in CLASS.items():
    assert samplers.SAMPLER_OF[cls] == sampler and samplers.get(sampler).scheduler_class == cls


@pytest.mark.parametrize("sampler, kw, match", [
    ("dpmpp_2s", dict(solver_order=3), "dpmpp_2s with solver_order=3 is not implemented"),
    ("dpmpp_2s", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+' is not implemented"),
    ("dpmpp_2s", dict(solver_type="heun"), "solver_type='heun' is not implemented"),
    ("dpmpp_2s", dict(lambda_min_clipped=-5.1), "lambda_min_clipped=-5.1 is not implemented"),
    ("deis", dict(solver_order=3), "deis with solver_order=3 is not implemented"),
    ("deis", dict(use_exponential_sigmas=True), "use_exponential_sigmas=True is not implemented"),
    ("kdpm2", dict(use_beta_sigmas=True), "kdpm2 with use_beta_sigmas=True is not implemented"),
    ("kdpm2_a", dict(use_exponential_sigmas=True), "use_exponential_sigmas=True is not implemented"),
    ("kdpm2", dict(prediction_type="sample"), "prediction_type='sample'"),
    ("kdpm2_a", dict(prediction_type="sample"), "prediction_type='sample'"),
    ("kdpm2", dict(rescale_betas_zero_snr=True), "KDPM2DiscreteScheduler ignores the setting"),
    ("dpmpp_2s", dict(rescale_betas_zero_snr=True), "ignores the setting"),
    ("deis", dict(rescale_betas_zero_snr=True), "ignores the setting"),
])
def test_unsupported_settings_refused(sampler, kw, match):
  cfg = SchedulerConfig.from_dict(dict(SD15, _class_name=CLASS[sampler], **kw))
  with pytest.raises(ValueError, match=match):
    samplers.make_schedule(cfg, sampler, 10)


def test_tcd_refusals():
  cfg = SchedulerConfig.from_dict(dict(SD15, _class_name="TCDScheduler"))
  with pytest.raises(ValueError, match="tcd with num_steps=51 > original_inference_steps=50"):
    samplers.make_schedule(cfg, "tcd", 51)
  with pytest.raises(ValueError, match="eta=1.5: must be in \\[0, 1\\]"):
    samplers.make_schedule(cfg, "tcd", 4, eta=1.5)
  with pytest.raises(ValueError, match="the lcm sampler, which has no eta"):  # (ddim takes it: test_samplers_eta)
    samplers.make_schedule(cfg, "lcm", 4, eta=0.3)
  edm = SchedulerConfig.from_dict(dict(_class_name="EDMDPMSolverMultistepScheduler"))
  for sampler in NEW:
    with pytest.raises(ValueError, match="cannot sample a model with EDM preconditioning"):
      samplers.make_schedule(edm, sampler, 4)


@pytest.mark.parametrize("sampler, eta", [("tcd", 0.3), ("kdpm2_a", None)])
def test_noise_is_per_image_key(sampler, eta):
  """The stochastic ones draw through step_noise: with a key per image, an image does not depend on the batch (nor
  the device) it is sampled in."""
  s = samplers.make_schedule(SchedulerConfig(), sampler, 4, eta=eta)
  x = jnp.asarray(latents(0, (3, 4, 8, 8)))
  keys = jax.random.split(jax.random.key(5), 3)
  both = run(fake_model, x, s, keys, return_trajectory=False)
  alone = run(fake_model, x[1:2], s, keys[1:2], return_trajectory=False)
  np.testing.assert_allclose(both[1:2], alone, rtol=0, atol=1e-6)
  other = run(fake_model, x[1:2], s, keys[2:3], return_trajectory=False)
  assert np.abs(np.asarray(other) - np.asarray(alone)).max() > 1e-3


def test_pipeline_folders_match_diffusers(tmp_path, monkeypatch):
  """Tiny SD folders saved with TCDScheduler, KDPM2AncestralDiscreteScheduler and DPMSolverSinglestepScheduler:
  jaxsd's default sampler is the folder's, and its latents are diffusers' StableDiffusionPipeline's (kdpm2_a with
  jaxsd's per-call noise fed to diffusers' randn_tensor)."""
  from diffusers.schedulers import scheduling_k_dpm_2_ancestral_discrete as kdpm2_a_module

  import jaxsd
  from tests import reference
  from tests.test_pipeline import HW, NEGATIVE, PROMPTS, _folder_with

  base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  for sampler, steps in (("tcd", 4), ("kdpm2_a", 3), ("dpmpp_2s", 5)):
    path = _folder_with(tmp_path / sampler, getattr(diffusers, CLASS[sampler])(**base))
    pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(path), reference.torch_pipeline(path)
    assert pipe.default_sampler == sampler
    noise = np.asarray(pipe.noise(2, len(PROMPTS), HW, HW))
    ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, seed=2, latents=noise,
                output="latent")
    draws = []  # (tcd runs the pipelines' eta=0: no noise)
    if sampler == "kdpm2_a":
      schedule = samplers.make_schedule(pipe.scheduler_config, sampler, steps)
      keys = pipe.sampler_keys(2, len(PROMPTS))
      draws = [
          reference.nhwc_to_nchw(samplers.step_noise(schedule, i, noise, keys)) for i in range(1, 2 * steps - 1, 2)
      ]
      monkeypatch.setattr(kdpm2_a_module, "randn_tensor", lambda *a, **k: draws.pop(0))
    with torch.no_grad():
      ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=steps, guidance_scale=6.0,
                  latents=reference.nhwc_to_nchw(noise), output_type="latent").images
    ref = reference.nchw_to_nhwc(ref)
    assert not draws  # diffusers drew each of them once
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), sampler
