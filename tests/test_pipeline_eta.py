"""diffusers' `eta` through the pipeline calls, `generate` and `python -m sample`: ddim's noise and tcd's gamma against
diffusers' StableDiffusionPipeline(..., eta=...) on a tiny folder, fed jaxsd's per-call noise; the refusals."""

from __future__ import annotations

import os

import diffusers
import jax
import numpy as np
import pytest
import torch

import jaxsd
from jaxsd.diffusion import samplers
from sample import __main__ as sample_main
from tests import reference
from tests.test_commands import _one_error_line, _sample
from tests.test_pipeline import HW, NEGATIVE, PROMPTS, _folder_with

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))
  return path, reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)


def _reference(tpipe, module, draws, steps, noise, eta):
  """diffusers' latents, its scheduler module's randn_tensor returning jaxsd's noise of each call in turn."""
  pending = list(draws)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(module, "randn_tensor", lambda *a, **k: pending.pop(0))
    with torch.no_grad():
      ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=steps, guidance_scale=6.0,
                  latents=reference.nhwc_to_nchw(noise), output_type="latent", eta=eta).images
  assert not pending  # diffusers drew each of them once
  return reference.nchw_to_nhwc(ref)


def _draws(pipe, sampler, steps, eta, noise, seed, calls):
  schedule = pipe.sampling_schedule(sampler, steps, eta=eta)
  keys = pipe.sampler_keys(seed, len(PROMPTS))
  return [reference.nhwc_to_nchw(samplers.step_noise(schedule, i, noise, keys)) for i in range(calls)]


def test_ddim_eta_matches_diffusers_pipeline(folder):
  """StableDiffusionPipeline with DDIMScheduler (from the SD 1 folder's PNDM config: clip_sample on, as diffusers
  reads it) and eta=0.7; the other noise (another seed) moves the latents; eta=0 is plain ddim."""
  from diffusers.schedulers import scheduling_ddim

  path, tpipe, pipe = folder
  tpipe.scheduler = diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")
  steps, eta, seed = 5, 0.7, 2
  noise = np.asarray(pipe.noise(seed, len(PROMPTS), HW, HW))
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, sampler="ddim", seed=seed,
              latents=noise, output="latent", eta=eta)
  ref = _reference(tpipe, scheduling_ddim, _draws(pipe, "ddim", steps, eta, noise, seed, steps), steps, noise, eta)
  assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
  other = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, sampler="ddim", seed=seed + 1,
               latents=noise, output="latent", eta=eta)
  assert np.abs(other - ours).max() > 1e-3  # the sampler keys (from the seed) draw the steps' noise
  plain = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, sampler="ddim", seed=seed + 1,
               latents=noise, output="latent")
  again = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, sampler="ddim", seed=seed,
               latents=noise, output="latent", eta=0.0)
  np.testing.assert_array_equal(plain, again)  # eta 0: no noise drawn, whatever the seed


def test_tcd_eta_matches_diffusers_pipeline(tmp_path):
  """A TCDScheduler folder (its sampler by default) with eta=0.3, TCD's model cards' value: noise at every call but
  the last, as diffusers."""
  from diffusers.schedulers import scheduling_tcd

  base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  path = _folder_with(tmp_path / "tcd", diffusers.TCDScheduler(**base))
  pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(path), reference.torch_pipeline(path)
  assert pipe.default_sampler == "tcd"
  steps, eta, seed = 4, 0.3, 2
  noise = np.asarray(pipe.noise(seed, len(PROMPTS), HW, HW))
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=steps, guidance_scale=6.0, seed=seed, latents=noise,
              output="latent", eta=eta)
  ref = _reference(tpipe, scheduling_tcd, _draws(pipe, "tcd", steps, eta, noise, seed, steps - 1), steps, noise, eta)
  assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_eta_through_generate_and_img2img(folder):
  """`generate(..., eta=)` draws each image's step noise from its own sampler key, as the call does: 8 devices give
  1 device's images; img2img takes eta too; a sampler without eta is refused before anything compiles."""
  from jaxsd import generate

  _, _, pipe = folder
  kw = dict(height=HW, width=HW, steps=4, guidance_scale=6.0, seed=3, sampler="ddim")
  assert jax.local_device_count() == 8
  many = generate.generate(pipe, PROMPTS, num_images=2, progress=False, eta=0.8, **kw)
  one = generate.generate(pipe, PROMPTS, num_images=2, progress=False, devices=jax.local_devices()[:1], eta=0.8, **kw)
  assert many.devices == 8 and one.devices == 1
  np.testing.assert_array_equal(many.images, one.images)
  want = pipe([p for p in PROMPTS for _ in range(2)], eta=0.8, **kw)
  assert np.abs(one.images.astype(int) - want.astype(int)).max() <= 1
  lat = np.asarray(pipe.noise(5, 1, HW, HW))
  image = dict(noise=lat, image_latents=0.5 * lat)  # (the same noise and image: only the step noise differs)
  a, b = (pipe.img2img(PROMPTS[:1], None, strength=0.8, steps=4, sampler="ddim", seed=seed, eta=1.0, output="latent",
                       **image) for seed in (3, 4))
  assert np.abs(a - b).max() > 1e-3
  compiled = dict(pipe._compiled)
  for call in (lambda: pipe(PROMPTS[:1], height=HW, width=HW, steps=2, sampler="euler", eta=0.5),
               lambda: pipe.img2img(PROMPTS[:1], None, steps=2, sampler="euler", eta=0.5, **image),
               lambda: generate.generate(pipe, PROMPTS[:1], steps=2, sampler="euler", progress=False, eta=0.5)):
    with pytest.raises(ValueError, match="euler sampler, which has no eta .* ddim, tcd"):
      call()
  with pytest.raises(ValueError, match="eta=-1"):
    generate.generate(pipe, PROMPTS[:1], steps=2, sampler="ddim", progress=False, eta=-1.0)
  assert pipe._compiled.keys() == compiled.keys()


@pytest.mark.parametrize("args, message", [
    (["--eta", "-0.5"], "--eta -0.5: must be a finite number >= 0"),
    (["--eta", "nan"], "--eta nan"),
    (["--eta", "0.5", "--sampler", "euler"], "--eta 0.5 with --sampler euler, which has no eta: use one of ddim, tcd"),
    (["--eta", "0.5", "--sampler", "dpmpp_2m_karras"], "which has no eta"),
])
def test_sample_eta_flag_exits_2_before_loading(tmp_path, capsys, args, message):
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", *args)) == 2
  assert message in _one_error_line(capsys)
  assert not os.path.exists(tmp_path / "out")


def test_sample_eta_flag_reaches_generate(tmp_path, monkeypatch, capsys):
  from jaxsd import generate, pipeline_xl

  seen = {}

  def fake_generate(pipe, prompts, **kw):
    seen.update(kw)
    raise ValueError("stop here")

  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: object.__new__(jaxsd.StableDiffusion))
  monkeypatch.setattr(generate, "generate", fake_generate)
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--sampler", "ddim", "--eta", "0.4")) == 2
  assert seen["eta"] == 0.4 and "stop here" in _one_error_line(capsys)
  assert sample_main.parse(["--model", "m", "--prompt", "x"]).eta == 0.0


def test_controlnet_ddim_eta_matches_diffusers(folder, tmp_path):
  """StableDiffusionControlNetPipeline(..., eta=0.6) with DDIM: the ControlNet calls pass eta to the schedule too."""
  from diffusers.schedulers import scheduling_ddim

  from tests.test_pipeline_controlnet import _controlnet, _images, _reference

  path, tpipe, pipe = folder
  net = _controlnet(tpipe.unet, 10)
  net.save_pretrained(tmp_path / "cn")
  pipe = pipe.with_controlnet(str(tmp_path / "cn"))
  latents, images, eta = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW)), _images(0), 0.6
  ours = pipe(PROMPTS, images, NEGATIVE, steps=4, sampler="ddim", latents=latents, output="latent", eta=eta)
  pending = _draws(pipe, "ddim", 4, eta, latents, 0, 4)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(scheduling_ddim, "randn_tensor", lambda *a, **k: pending.pop(0))
    ref = _reference(path, tpipe, [net], "ddim", latents, images, eta=eta)
  assert not pending
  assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
