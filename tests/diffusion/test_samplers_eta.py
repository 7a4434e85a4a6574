"""ddim with diffusers' eta against DDIMScheduler.step(eta=...) step by step, fed jaxsd's per-call noise as
`variance_noise`; eta = 0 exactly as before; what eta refuses; the noise per image, whatever the batch.
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

# SD 2.1's v-prediction config with zero terminal SNR (the first call at alpha_bar 0), trailing spacing.
ZERO_SNR = dict(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def diffusers_ddim(cfg_dict, n, eta, step_noise, strength=1.0):
  """diffusers' pipeline loop with DDIMScheduler.step(eta=eta, variance_noise=call i's noise): (init, trajectory)."""
  sch = diffusers.DDIMScheduler.from_config(cfg_dict)
  sch.set_timesteps(n)
  noise = torch.from_numpy(latents(0))
  if strength < 1.0:
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sch), n, strength,
                                                                "cpu")
    lat = sch.add_noise(torch.from_numpy(latents(1)), noise, timesteps[:1])
  else:
    timesteps, lat = sch.timesteps, noise * sch.init_noise_sigma
  init, traj = lat.numpy(), []
  for i, t in enumerate(timesteps):
    out = fake_model_torch(sch.scale_model_input(lat, t), t.float())
    lat = sch.step(out, t, lat, eta=eta, variance_noise=torch.from_numpy(step_noise[i])).prev_sample
    traj.append(lat.numpy())
  return init, np.stack(traj)


def run_both(cfg_dict, n, eta, strength=1.0, tol=1e-5):
  s = samplers.make_schedule(SchedulerConfig.from_dict(cfg_dict), "ddim", n, strength, eta=eta)
  assert samplers.stochastic(s)
  step_noise = np.stack([latents(100 + i) for i in range(len(s.timesteps))])
  init, traj = diffusers_ddim(cfg_dict, n, eta, step_noise, strength)
  if strength < 1.0:
    x = samplers.noise_latents(s, jnp.asarray(latents(1)), jnp.asarray(latents(0)))
  else:
    x = samplers.prepare_latents(s, jnp.asarray(latents(0)))
  np.testing.assert_allclose(x, init, rtol=1e-6, atol=1e-6)
  ours = run(fake_model, x, s, jax.random.key(0), jnp.asarray(step_noise))
  compare(f"ddim eta={eta}", ours, traj, tol)
  return ours, traj


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(eta):
  """Text-to-image and img2img (strength 0.5), epsilon (SD 1.5's config) and v-prediction (SD 2.1's), zero terminal
  SNR, x0-prediction with clip_sample: each call's latents as DDIMScheduler.step(eta=...) given the same noise."""
  run_both(SD15, 10, eta)
  run_both(SD15, 10, eta, strength=0.5)
  run_both(SD21, 10, eta)
  run_both(SD21, 10, eta, strength=0.5)
  run_both(ZERO_SNR, 4, eta)
  run_both(dict(SD15, prediction_type="sample", clip_sample=True, clip_sample_range=0.5), 10, eta)


def test_ddim_eta_noise_reaches_the_latents():
  """Each call adds eta * sigma_t of its noise: other noise, other latents. An eta above 1 is legal (as diffusers)
  while the direction term stays real: for SD 1.5's config up to about 1.0456 at 50 steps (1.0072 at 10)."""
  s = samplers.make_schedule(SchedulerConfig.from_dict(SD15), "ddim", 10, eta=0.5)
  x = jnp.asarray(latents(0))
  a, b = (run(fake_model, x, s, jax.random.key(k), return_trajectory=False) for k in (0, 1))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
  run_both(SD15, 50, 1.04)


def test_ddim_eta_zero_is_the_deterministic_program():
  """eta = 0 (and None) gives the schedule and the traced program of plain ddim: no coeffs, no noise drawn."""
  cfg = SchedulerConfig.from_dict(SD15)
  plain = samplers.make_schedule(cfg, "ddim", 10)
  for s in (samplers.make_schedule(cfg, "ddim", 10, eta=0.0), samplers.make_schedule(cfg, "ddim", 10, eta=0)):
    assert jax.tree.structure(s) == jax.tree.structure(plain) and s.coeffs is None
    jax.tree.map(np.testing.assert_array_equal, s, plain)
    assert not samplers.stochastic(s)
    assert samplers.step_noise(s, 0, jnp.zeros((1, 4, 8, 8)), jax.random.key(0)) is None
  x = jnp.asarray(latents(0))
  f = lambda sch, x: samplers.sample(fake_model, x, sch)  # no key: a sampler that drew noise would raise
  assert str(jax.make_jaxpr(f)(plain, x)) == str(jax.make_jaxpr(f)(samplers.make_schedule(cfg, "ddim", 10, eta=0.0), x))
  np.testing.assert_array_equal(jax.jit(f)(plain, x), jax.jit(f)(samplers.make_schedule(cfg, "ddim", 10, eta=0.0), x))


def test_ddim_eta_values_share_one_program():
  """A positive eta lives in the schedule's `coeffs` (an argument): other positive values reuse the trace."""
  cfg = SchedulerConfig.from_dict(SD15)
  traces = []

  @jax.jit
  def f(s, x, key):
    traces.append(1)
    return samplers.sample(fake_model, x, s, key)

  x, key = jnp.asarray(latents(0)), jax.random.key(0)
  outs = [f(samplers.make_schedule(cfg, "ddim", 10, eta=eta), x, key) for eta in (0.3, 0.7, 1.0)]
  assert len(traces) == 1
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-3


def test_ddim_eta_noise_is_per_image():
  """With one key per image (the pipelines' sampler keys) an image's noise, so its latents, do not depend on the
  batch it is in: what makes 8 devices give 1 device's images."""
  s = samplers.make_schedule(SchedulerConfig.from_dict(SD15), "ddim", 6, eta=0.8)
  keys = jax.random.split(jax.random.key(3), 4)
  x = jnp.asarray(np.concatenate([latents(k) for k in range(4)]))
  whole = run(fake_model, x, s, keys, return_trajectory=False)
  for k in range(4):
    one = run(fake_model, x[k:k + 1], s, keys[k:k + 1], return_trajectory=False)
    np.testing.assert_allclose(whole[k:k + 1], one, rtol=0, atol=1e-6)


def test_ddim_eta_one_zero_snr_stays_finite():
  """eta = 1 from alpha_bar 0 (zero terminal SNR): the first step's 1 - alpha_bar_prev - std^2 is 0 exactly, which
  DDIMScheduler.step computes in float32 as a rounding residue and takes the square root of. By the CPU's rounding
  (torch's vector functions differ by ISA) that is a hair below 0 (NaN from then on: seen at 10 steps on an AVX-512
  Intel host) or above (sqrt(residue) ~ 2e-4 of a direction term: seen on an AMD EPYC host, torch's CPU capability
  AVX2, trajectory 7.6e-4 from jaxsd's at the first step, 1.2e-6 at the last). jaxsd takes 0 there."""
  n, eta = 10, 1.0
  s = samplers.make_schedule(SchedulerConfig.from_dict(ZERO_SNR), "ddim", n, eta=eta)
  step_noise = np.stack([latents(100 + i) for i in range(n)])
  _, traj = diffusers_ddim(ZERO_SNR, n, eta, step_noise)
  ours = run(fake_model, samplers.prepare_latents(s, jnp.asarray(latents(0))), s, jax.random.key(0),
             jnp.asarray(step_noise))
  assert np.isfinite(np.asarray(ours)).all()
  assert float(s.coeffs[0, 0]) == 0.0
  if np.isnan(traj).any():
    assert np.isnan(traj[0]).all()  # the residue's NaN, from the first step on
  else:  # the residue's square root, then diffusers' trajectory converging on jaxsd's
    compare("ddim zero-snr eta=1", ours, traj, 2e-3)
    compare("ddim zero-snr eta=1, last step", np.asarray(ours)[-1:], traj[-1:], 1e-5)


def test_eta_refusals():
  cfg = SchedulerConfig.from_dict(SD15)
  for bad in (-0.1, float("nan"), float("inf"), True, "0.5"):
    with pytest.raises(ValueError, match="eta="):
      samplers.make_schedule(cfg, "ddim", 10, eta=bad)
  with pytest.raises(ValueError, match="euler sampler, which has no eta .* use one of ddim, tcd"):
    samplers.make_schedule(cfg, "euler", 10, eta=0.3)
  with pytest.raises(ValueError, match="dpmpp_2m sampler, which has no eta"):
    samplers.make_schedule(cfg, "dpmpp_2m_karras", 10, eta=1.0)
  with pytest.raises(ValueError, match=r"eta=1.5: must be in \[0, 1\] for tcd"):
    samplers.make_schedule(cfg, "tcd", 4, eta=1.5)
  with pytest.raises(ValueError, match="eta=3.0 is too large for ddim"):
    samplers.make_schedule(cfg, "ddim", 10, eta=3.0)
  # eta = 0 is every sampler's (the pipelines pass their default, 0.0, whatever the sampler).
  np.testing.assert_array_equal(
      samplers.make_schedule(cfg, "euler", 10, eta=0.0).sigmas,
      samplers.make_schedule(cfg, "euler", 10).sigmas)
  assert samplers.ETA_SAMPLERS == ("ddim", "tcd")
