"""dpmpp_sde against diffusers' DPMSolverSDEScheduler (A1111's DPM++ SDE), step by step and through
StableDiffusionPipeline; its noise; the folder default, the Karras alias, the command line and what it refuses.

diffusers draws the noise of each call from a torchsde Brownian tree (BrownianTreeNoiseSampler); jaxsd draws it from
the loop's key. The parity tests give diffusers a Brownian path built from jaxsd's draws (`BrownianPath`): the first
call of a step gets its draw, the second (over the whole step, which holds the first's half) the first's increment
plus its own draw over the rest, as a Brownian tree would. `test_noise_is_distributed_as_the_brownian_tree` checks that
jaxsd's noise has the Brownian tree's statistics.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torchsde")  # (diffusers' DPMSolverSDEScheduler imports it)

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline)
from diffusers.schedulers import scheduling_dpmsolver_sde  # noqa: E402

from jaxsd.diffusion import samplers  # noqa: E402
from jaxsd.diffusion.schedules import SchedulerConfig  # noqa: E402
from tests.diffusion.test_samplers import MEASURED, compare, fake_model, fake_model_torch, latents, run  # noqa: E402
from tests.diffusion.test_schedules import SD15, SD21  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
]


class BrownianPath:
  """diffusers' noise sampler fed jaxsd's draws: (sigma, sigma_next) -> (W(sigma_next) - W(sigma)) / sqrt|sigma -
  sigma_next| of a path W whose increment over each new interval is the next draw, scaled; an interval that extends the
  previous one from the same sigma (a step's second call: sigma_k -> sigma_k+1 after sigma_k -> its midpoint) holds
  that one's increment plus the next draw over the rest, as torchsde's Brownian tree."""

  def __init__(self, draws):
    self.draws, self.used, self.last = list(draws), 0, None

  def __call__(self, sigma, sigma_next):
    a, b = float(sigma), float(sigma_next)
    z = np.asarray(self.draws[self.used], np.float64)
    self.used += 1
    if self.last is not None and self.last[0] == a and a > self.last[1] > b:
      w = self.last[2] + np.sqrt(self.last[1] - b) * z
    else:
      w = np.sqrt(a - b) * z
    self.last = (a, b, w)
    return torch.from_numpy((w / np.sqrt(a - b)).astype(np.float32))


class Independent(BrownianPath):
  """Each call's draw as it is: no Brownian increment shared between a step's two calls."""

  def __call__(self, sigma, sigma_next):
    self.used += 1
    return torch.from_numpy(np.asarray(self.draws[self.used - 1]))


def diffusers_run(cfg_dict, n, noise_sampler, strength=1.0):
  """diffusers' pipeline loop (img2img: StableDiffusionImg2ImgPipeline.get_timesteps and add_noise) with
  `noise_sampler` in place of the Brownian tree: (initial latents, timesteps, sigmas, trajectory)."""
  sch = diffusers.DPMSolverSDEScheduler.from_config(cfg_dict)
  sch.set_timesteps(n)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", lambda *a, **k: noise_sampler)
    if strength < 1.0:
      timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sch), n, strength,
                                                                  "cpu")
      lat = sch.add_noise(torch.from_numpy(latents(1)), torch.from_numpy(latents(0)), timesteps[:1])
    else:
      timesteps, lat = sch.timesteps, torch.from_numpy(latents(0)) * sch.init_noise_sigma
    init, traj = lat.numpy(), []
    for t in timesteps:
      out = fake_model_torch(sch.scale_model_input(lat, t), t.float())
      lat = sch.step(out, t, lat).prev_sample
      traj.append(lat.numpy())
  sigmas = sch.sigmas.numpy()[len(sch.sigmas) - len(timesteps) - 1:]
  return init, timesteps.numpy(), sigmas, np.stack(traj)


def run_both(cfg_dict, n, strength=1.0, label="", draws=None, path=BrownianPath, tol=1e-5):
  """jaxsd's trajectory and diffusers' from the same latents and the same noise: jaxsd's draws for each call (latents
  100 + i, or `draws`), given to diffusers through `path`. Returns (ours, diffusers')."""
  s = samplers.make_schedule(SchedulerConfig.from_dict(cfg_dict), "dpmpp_sde", n, strength)
  calls = len(s.timesteps)
  assert calls == 2 * min(int(n * strength), n) - 1
  step_noise = np.stack([latents(100 + i) for i in range(calls)])
  sampler = path(step_noise if draws is None else draws)
  init, ts, sigmas, traj = diffusers_run(cfg_dict, n, sampler, strength)
  assert sampler.used == calls - 1  # a draw at every call but the last (an Euler step onto sigma 0)
  if strength < 1.0:
    x = samplers.noise_latents(s, jnp.asarray(latents(1)), jnp.asarray(latents(0)))
  else:
    x = samplers.prepare_latents(s, jnp.asarray(latents(0)))
  np.testing.assert_allclose(x, init, rtol=1e-6, atol=1e-6)
  # Fractional (midpoint, Karras) timesteps: torch's float32 sqrt / log / exp of the training sigmas are an ulp or two
  # off numpy's at a few timesteps, which moves sigma_to_t's interpolation by as much. Which ulp depends on the CPU
  # torch runs on (its vector functions differ by ISA): equal bit for bit on an AVX-512 Intel host, up to 3.1e-7
  # relative on the timesteps and 8.9e-8 on the sigmas on an AMD EPYC host (torch's CPU capability AVX2).
  np.testing.assert_allclose(s.timesteps, ts.astype(np.float32), rtol=1e-6, atol=0)
  np.testing.assert_allclose(s.levels[:, 1], sigmas, rtol=4e-7, atol=0)  # (the sigmas add_noise reads)
  ours = np.asarray(run(fake_model, x, s, jax.random.key(0), jnp.asarray(step_noise)))
  if tol is not None:
    compare(f"dpmpp_sde {label}", ours, traj, tol)
  return ours, traj


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_matches_diffusers(n, karras):
  """SD 1.5's config (a PNDM file: DPMSolverSDEScheduler's defaults fill in what it leaves out), 1 to 25 steps, with
  and without Karras sigmas (the config's use_karras_sigmas and the dpmpp_sde_karras alias schedule alike)."""
  cfg = dict(SD15, use_karras_sigmas=karras)
  run_both(cfg, n, label=f"n={n}{' karras' if karras else ''}")
  if karras:
    alias = samplers.make_schedule(SchedulerConfig.from_dict(SD15), "dpmpp_sde_karras", n)
    ref = samplers.make_schedule(SchedulerConfig.from_dict(cfg), "dpmpp_sde", n)
    assert alias.sampler == "dpmpp_sde"
    for a, b in zip(jax.tree.leaves(alias), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("karras", [False, True])
def test_img2img_v_prediction_and_spacings_match_diffusers(karras):
  """img2img strength 0.5 and 0.3 (SD's get_timesteps: the run starts on a whole step), SD 2.1's v-prediction, and the
  leading / trailing spacings (leading: init_noise_sigma is sqrt(sigma_max^2 + 1))."""
  for name, cfg in (("sd15", SD15), ("sd21", SD21)):
    cfg = dict(cfg, use_karras_sigmas=karras)
    for strength in (0.5, 0.3):
      run_both(cfg, 10, strength, label=f"{name} strength={strength}{' karras' if karras else ''}")
  run_both(dict(SD21, use_karras_sigmas=karras), 10, label=f"sd21{' karras' if karras else ''}")
  for spacing in ("leading", "trailing"):
    run_both(dict(SD21, timestep_spacing=spacing, use_karras_sigmas=karras), 6,
             label=f"sd21 {spacing}{' karras' if karras else ''}")


def test_noise_reaches_the_latents():
  """Other keys draw other noise, which moves every image; diffusers given other noise (other draws, or the same draws
  with independent noise at each step's second call) no longer agrees with jaxsd."""
  s = samplers.make_schedule(SchedulerConfig.from_dict(SD15), "dpmpp_sde", 10)
  x = samplers.prepare_latents(s, jnp.asarray(latents(0)))
  a, b = (np.asarray(run(fake_model, x, s, jax.random.key(k), return_trajectory=False)) for k in (0, 1))
  assert np.abs(a - b).max() > 1e-2
  other = np.stack([latents(200 + i) for i in range(len(s.timesteps))])
  for kw in (dict(draws=other), dict(path=Independent)):
    ours, ref = run_both(SD15, 10, tol=None, **kw)
    assert np.abs(ours[-1] - ref[-1]).max() > 1e-3, kw


def _jaxsd_noise(s, i, key, shape):
  """The noise jaxsd adds at call i (divided by its weight), read off `samplers.step` on zero latents, zero output."""
  zero = jnp.zeros(shape)
  state = samplers.init_state(s, zero)
  for j in (i - 1, i) if i % 2 else (i,):
    z, state = samplers.step(s, j, zero, zero, state, samplers.step_noise(s, j, zero, key))
  return np.asarray(z / s.coeffs[i, 2]).reshape(-1)


def test_noise_is_distributed_as_the_brownian_tree():
  """Not the Brownian tree's numbers, its distribution: each call's noise is standard normal, a step's second call's
  (over sigma_k -> sigma_k+1) correlates with its first call's (sigma_k -> midpoint) as sqrt((sigma_k - sigma_mid) /
  (sigma_k - sigma_k+1)), the share of the first's increment in it, and steps are independent; measured on diffusers'
  BrownianTreeNoiseSampler and on jaxsd's per-call noise over 4 x 64 x 64 values."""
  s = samplers.make_schedule(SchedulerConfig.from_dict(SD15), "dpmpp_sde", 10)
  shape = (1, 4, 64, 64)
  sig = np.asarray(s.sigmas, np.float64)
  tree = scheduling_dpmsolver_sde.BrownianTreeNoiseSampler(torch.zeros(shape), sig[sig > 0].min(), sig.max(), seed=3)
  for k in (0, 4, 7):  # steps early, middle and late (the last has no midpoint)
    first, second, after = 2 * k, 2 * k + 1, 2 * k + 2
    rho = float(s.coeffs[second, 3])
    np.testing.assert_allclose(rho, np.sqrt((sig[first] - sig[second]) / (sig[first] - sig[after])), rtol=1e-6)
    assert 0.7 < rho < 0.95  # (1 / sqrt(1 + sqrt(sigma_k+1 / sigma_k)) at the geometric mean)
    theirs = [tree(sig[first], sig[second]), tree(sig[first], sig[after]), tree(sig[after], sig[after + 1])]
    theirs = [np.asarray(z, np.float64).reshape(-1) for z in theirs]
    ours = [_jaxsd_noise(s, i, jax.random.key(7), shape).astype(np.float64) for i in (first, second, after)]
    for z in (theirs, ours):
      for one in z:
        assert abs(one.mean()) < 0.03 and abs(one.std() - 1) < 0.03
      assert abs(np.corrcoef(z[0], z[1])[0, 1] - rho) < 0.03, (k, rho, np.corrcoef(z[0], z[1])[0, 1])
      assert abs(np.corrcoef(z[1], z[2])[0, 1]) < 0.03


def test_noise_is_per_image_key():
  """The noise comes through step_noise: with a key per image, an image does not depend on its batch."""
  s = samplers.make_schedule(SchedulerConfig(), "dpmpp_sde", 4)
  x = jnp.asarray(latents(0, (3, 4, 8, 8)))
  keys = jax.random.split(jax.random.key(5), 3)
  both = run(fake_model, x, s, keys, return_trajectory=False)
  alone = run(fake_model, x[1:2], s, keys[1:2], return_trajectory=False)
  np.testing.assert_allclose(both[1:2], alone, rtol=0, atol=1e-6)


def test_folder_default_and_row():
  """A folder that ships DPMSolverSDEScheduler samples with dpmpp_sde (it ran dpmpp_2m, diffusers' from_config swap,
  which still runs on it); two calls per step (img2img keeps whole steps)."""
  assert samplers.SAMPLER_OF["DPMSolverSDEScheduler"] == "dpmpp_sde"
  row = samplers.get("dpmpp_sde")
  assert row.scheduler_class == "DPMSolverSDEScheduler" and row.order == 2 and row.stochastic
  assert samplers.get("dpmpp_sde_karras") is row
  d = dict(diffusers.DPMSolverSDEScheduler(beta_schedule="scaled_linear", noise_sampler_seed=4).config)
  d.pop("_use_default_values", None)
  cfg = SchedulerConfig.from_dict(d)
  assert len(samplers.make_schedule(cfg, "dpmpp_sde", 5).timesteps) == 9  # (noise_sampler_seed: see the docstring)
  samplers.make_schedule(cfg, "dpmpp_2m", 5)


@pytest.mark.parametrize("kw, match", [
    (dict(use_exponential_sigmas=True), "dpmpp_sde with use_exponential_sigmas=True is not implemented"),
    (dict(use_beta_sigmas=True), "dpmpp_sde with use_beta_sigmas=True is not implemented"),
    (dict(prediction_type="sample"), "prediction_type='sample'"),
    (dict(rescale_betas_zero_snr=True), "DPMSolverSDEScheduler ignores the setting"),
])
def test_unsupported_settings_refused(kw, match):
  cfg = SchedulerConfig.from_dict(dict(SD15, _class_name="DPMSolverSDEScheduler", **kw))
  with pytest.raises(ValueError, match=match):
    samplers.make_schedule(cfg, "dpmpp_sde", 10)


def test_other_refusals():
  cfg = SchedulerConfig.from_dict(SD15)
  with pytest.raises(ValueError, match="dpmpp_sde_karras.*with use_karras_sigmas=False"):
    samplers.make_schedule(cfg, "dpmpp_sde_karras", 10, use_karras_sigmas=False)
  with pytest.raises(ValueError, match="the dpmpp_sde sampler, which has no eta"):
    samplers.make_schedule(cfg, "dpmpp_sde", 10, eta=0.5)
  with pytest.raises(ValueError, match="cannot sample a model with EDM preconditioning"):
    samplers.make_schedule(SchedulerConfig.from_dict(dict(_class_name="EDMEulerScheduler")), "dpmpp_sde", 4)
  with pytest.raises(ValueError, match="stochastic: pass a PRNG key"):
    samplers.sample(fake_model, jnp.zeros((1, 4, 8, 8)), samplers.make_schedule(cfg, "dpmpp_sde", 4))


def test_sample_command_takes_it(tmp_path, monkeypatch, capsys):
  """`python -m sample --sampler dpmpp_sde` (and dpmpp_sde_karras) reaches generate."""
  import jaxsd
  from jaxsd import generate, pipeline_xl
  from sample import __main__ as sample_main
  from tests.test_commands import _one_error_line, _sample

  seen = []

  def fake_generate(pipe, prompts, **kw):
    seen.append(kw["sampler"])
    raise ValueError("stop here")

  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: object.__new__(jaxsd.StableDiffusion))
  monkeypatch.setattr(generate, "generate", fake_generate)
  for name in ("dpmpp_sde", "dpmpp_sde_karras"):
    assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--sampler", name)) == 2
    assert "stop here" in _one_error_line(capsys)
  assert seen == ["dpmpp_sde", "dpmpp_sde_karras"]


@pytest.mark.parametrize("karras", [False, True])
def test_pipeline_matches_diffusers(tmp_path, karras):
  """A tiny SD folder saved with DPMSolverSDEScheduler (use_karras_sigmas: A1111's DPM++ SDE Karras): jaxsd's default
  sampler is dpmpp_sde, and its latents are diffusers' StableDiffusionPipeline's, diffusers' noise sampler given a
  Brownian path through jaxsd's per-call noise of each image."""
  import jaxsd
  from tests import reference
  from tests.test_pipeline import HW, NEGATIVE, PROMPTS, _folder_with

  scheduler = diffusers.DPMSolverSDEScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              use_karras_sigmas=karras)
  path = _folder_with(tmp_path / "sde", scheduler)
  pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(path), reference.torch_pipeline(path)
  assert pipe.default_sampler == "dpmpp_sde"
  steps, seed = 3, 2
  noise = np.asarray(pipe.noise(seed, len(PROMPTS), HW, HW))
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, seed=seed, latents=noise,
              output="latent")
  schedule = pipe.sampling_schedule("dpmpp_sde", steps)
  keys = pipe.sampler_keys(seed, len(PROMPTS))
  draws = [reference.nhwc_to_nchw(samplers.step_noise(schedule, i, noise, keys)).numpy() for i in range(2 * steps - 2)]
  brownian = BrownianPath(draws)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", lambda *a, **k: brownian)
    with torch.no_grad():
      ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=steps, guidance_scale=6.0,
                  latents=reference.nhwc_to_nchw(noise), output_type="latent").images
  ref = reference.nchw_to_nhwc(ref)
  assert brownian.used == len(draws)  # diffusers drew each of them once
  err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
  MEASURED[f"dpmpp_sde pipeline{' karras' if karras else ''}"] = float(err)
  assert err <= 1e-4
  other = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, seed=seed + 1, latents=noise,
               output="latent")
  assert np.abs(other - ours).max() > 1e-3  # the sampler keys (from the seed) draw the steps' noise


def test_report_measured_differences():
  """Runs last: the largest scaled difference per comparison (pytest -s shows it)."""
  for name, err in sorted(MEASURED.items()):
    if name.startswith("dpmpp_sde"):
      print(f"{name:40s} max |ours - diffusers| / max(1, |x|) = {err:.2e}")
