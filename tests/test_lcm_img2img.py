"""img2img on an LCM folder as diffusers' AutoPipelineForImage2Image runs it: LatentConsistencyModelImg2ImgPipeline
(strength into LCMScheduler.set_timesteps) for a LatentConsistencyModelPipeline folder, StableDiffusionImg2ImgPipeline
(the schedule cut by strength) for an SD folder with an LCMScheduler."""

from __future__ import annotations

import inspect
import os

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import jaxsd
from jaxsd.diffusion import samplers
from jaxsd.diffusion.schedules import SchedulerConfig
from tests import reference

PROMPTS = ["a red circle on the left", "a small blue square"]
HW = 16
GUIDANCE = 8.5
# (strength, steps): every strength with every step count.
GRID = [(s, n) for n in (2, 4, 8) for s in (0.3, 0.5, 1.0)]


def _lcm_scheduler():
  # SimianLuo/LCM_Dreamshaper_v7's scheduler settings.
  return diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                original_inference_steps=50, set_alpha_to_one=True, steps_offset=1,
                                timestep_spacing="leading", clip_sample=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"lcm": a LatentConsistencyModelPipeline folder, "sd": the same networks and LCMScheduler as a
  StableDiffusionPipeline folder}: a tiny LCM-distilled U-Net (time_cond_proj_dim) in both."""
  root = tmp_path_factory.mktemp("lcm_img2img")
  unet, vae, text_encoder, tokenizer, _ = reference.tiny_components(seed=6, time_cond_proj_dim=32)
  parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_lcm_scheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  out = {}
  for name, cls in (("lcm", diffusers.LatentConsistencyModelPipeline), ("sd", diffusers.StableDiffusionPipeline)):
    cls(**parts).save_pretrained(root / name)
    out[name] = str(root / name)
  return out


def _inputs(pipe):
  noise = np.asarray(pipe.noise(4, len(PROMPTS), HW, HW))
  image_latents = np.asarray(pipe.noise(5, len(PROMPTS), HW, HW)) * 0.8
  return noise, image_latents


def _auto_img2img(path, monkeypatch, noise, draws):
  """diffusers' AutoPipelineForImage2Image for the folder, with our noise: img2img's initial noise and the LCM
  scheduler's per-step draws (`draws`, consumed in order) come from its randn_tensor."""
  from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as lcm_module
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as sd_module
  from diffusers.schedulers import scheduling_lcm

  tpipe = diffusers.AutoPipelineForImage2Image.from_pretrained(path, safety_checker=None)
  tpipe.set_progress_bar_config(disable=True)
  for module in (lcm_module, sd_module):
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: reference.nhwc_to_nchw(noise))
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: draws.pop(0))
  return tpipe


def _step_draws(schedule, noise, seed):
  keys = jaxsd.StableDiffusion.sampler_keys(seed, noise.shape[0])
  n = schedule.timesteps.shape[0]
  return [reference.nhwc_to_nchw(samplers.step_noise(schedule, i, noise, keys)) for i in range(n)]


def test_lcm_folder_img2img_matches_latent_consistency_img2img_pipeline(folders, monkeypatch):
  """A LatentConsistencyModelPipeline folder: AutoPipelineForImage2Image builds LatentConsistencyModelImg2ImgPipeline,
  whose strength picks the LCM timesteps (all `steps` U-Net calls run: 4 at strength 0.5, not 2). Final latents
  equal at strengths 0.3 / 0.5 / 1 with 2 / 4 / 8 steps, one compiled program per step count."""
  pipe = jaxsd.StableDiffusion.from_pretrained(folders["lcm"])
  assert pipe.pipeline_class_name == "LatentConsistencyModelPipeline" and pipe.lcm_img2img
  assert pipe.default_sampler == "lcm"
  noise, image_latents = _inputs(pipe)
  program = pipe._jitted(False, "latent", "img2img", False)
  worst = {}
  for strength, steps in GRID:
    schedule = pipe.sampling_schedule("lcm", steps, strength, "img2img")
    assert schedule.timesteps.shape == (steps,)  # every step runs, whatever the strength
    draws = _step_draws(schedule, noise, seed=0)
    tpipe = _auto_img2img(folders["lcm"], monkeypatch, noise, draws)
    assert type(tpipe).__name__ == "LatentConsistencyModelImg2ImgPipeline"
    with torch.no_grad():
      ref = tpipe(PROMPTS, image=reference.nhwc_to_nchw(image_latents), strength=strength, num_inference_steps=steps,
                  guidance_scale=GUIDANCE, output_type="latent").images
    assert len(draws) == 1  # one draw per call but the last, as jaxsd
    np.testing.assert_array_equal(schedule.timesteps, tpipe.scheduler.timesteps.numpy())
    ref = reference.nchw_to_nhwc(ref)
    ours = pipe.img2img(PROMPTS, None, strength=strength, steps=steps, guidance_scale=GUIDANCE, sampler="lcm",
                        output="latent", noise=noise, image_latents=image_latents)
    worst[strength, steps] = diff = np.abs(ours - ref).max()
    assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"strength {strength}, {steps} steps: max |diff| {diff}"
  assert program._cache_size() == 3  # one per step count (2, 4, 8), none per strength
  print("LCM img2img max |diff|:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_sd_folder_with_lcm_scheduler_keeps_the_cut_schedule(folders, monkeypatch):
  """The same networks in a StableDiffusionPipeline folder (an LCMScheduler, as with an LCM-LoRA): diffusers builds
  StableDiffusionImg2ImgPipeline, which runs the last int(steps * strength) steps of the 4-step schedule."""
  pipe = jaxsd.StableDiffusion.from_pretrained(folders["sd"])
  assert pipe.pipeline_class_name == "StableDiffusionPipeline" and not pipe.lcm_img2img
  noise, image_latents = _inputs(pipe)
  for strength, steps in ((0.5, 4), (0.3, 8)):
    schedule = pipe.sampling_schedule("lcm", steps, strength, "img2img")
    assert schedule.timesteps.shape == (int(steps * strength),)
    draws = _step_draws(schedule, noise, seed=0)
    tpipe = _auto_img2img(folders["sd"], monkeypatch, noise, draws)
    assert type(tpipe).__name__ == "StableDiffusionImg2ImgPipeline"
    with torch.no_grad():
      ref = tpipe(PROMPTS, image=reference.nhwc_to_nchw(image_latents), strength=strength, num_inference_steps=steps,
                  guidance_scale=GUIDANCE, output_type="latent").images
    ref = reference.nchw_to_nhwc(ref)
    ours = pipe.img2img(PROMPTS, None, strength=strength, steps=steps, guidance_scale=GUIDANCE, sampler="lcm",
                        output="latent", noise=noise, image_latents=image_latents)
    diff = np.abs(ours - ref).max()
    assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"strength {strength}, {steps} steps: max |diff| {diff}"


# SimianLuo/LCM_Dreamshaper_v7's scheduler config (the keys LCMScheduler reads).
DREAMSHAPER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                   num_train_timesteps=1000, original_inference_steps=50, prediction_type="epsilon",
                   set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")


@pytest.mark.parametrize("kw", [{}, dict(original_inference_steps=25), dict(original_inference_steps=100)])
def test_lcm_timesteps_with_strength_equal_lcm_scheduler(kw):
  """make_schedule(..., lcm_strength_in_schedule=True) gives LCMScheduler.set_timesteps(n, strength=s)'s timesteps
  exactly, and refuses where diffusers does (int(original_inference_steps * strength) < n)."""
  d = dict(DREAMSHAPER, **kw)
  cfg = SchedulerConfig.from_dict(dict(d, _class_name="LCMScheduler"))
  for n in (1, 2, 3, 4, 6, 8, 25, 50):
    for strength in (0.02, 0.05, 0.1, 0.3, 0.5, 0.58, 0.75, 0.99, 1.0):
      sch = diffusers.LCMScheduler(**d)
      try:
        sch.set_timesteps(n, strength=strength)
      except ValueError:
        with pytest.raises(ValueError, match="lcm with "):
          samplers.make_schedule(cfg, "lcm", n, strength, lcm_strength_in_schedule=True)
        continue
      s = samplers.make_schedule(cfg, "lcm", n, strength, lcm_strength_in_schedule=True)
      np.testing.assert_array_equal(s.timesteps, sch.timesteps.numpy(), err_msg=f"{n} steps, strength {strength}")
      a = sch.alphas_cumprod.numpy()[sch.timesteps.numpy()]  # img2img's first noise level is the first timestep's
      np.testing.assert_allclose(s.levels[0], [np.sqrt(a[0]), np.sqrt(1 - a[0])], rtol=1e-6)


def test_lcm_strength_in_schedule_refusals():
  cfg = SchedulerConfig.from_dict(dict(DREAMSHAPER, _class_name="LCMScheduler"))
  with pytest.raises(ValueError, match=r"keeps int\(50 \* 0.05\) = 2 .* fewer than num_steps=4"):
    samplers.make_schedule(cfg, "lcm", 4, 0.05, lcm_strength_in_schedule=True)
  with pytest.raises(ValueError, match="for the lcm sampler"):
    samplers.make_schedule(cfg, "ddim", 4, 0.5, lcm_strength_in_schedule=True)
  with pytest.raises(ValueError, match="must be in"):
    samplers.make_schedule(cfg, "lcm", 4, 0.0, lcm_strength_in_schedule=True)
  # The cut schedule would leave no step here (int(4 * 0.1) = 0); the LCM one runs 4 (5 timesteps below 100).
  with pytest.raises(ValueError, match="leaves no denoising step"):
    samplers.make_schedule(cfg, "lcm", 4, 0.1)
  np.testing.assert_array_equal(
      samplers.make_schedule(cfg, "lcm", 4, 0.1, lcm_strength_in_schedule=True).timesteps, [99, 79, 59, 39])


def test_lcm_folder_inpaint_and_other_samplers_keep_the_cut_schedule(folders):
  """diffusers has no LCM inpainting pipeline (AUTO_INPAINT_PIPELINES_MAPPING has no "lcm"), and
  LatentConsistencyModelImg2ImgPipeline runs only an LCM scheduler: inpainting, and img2img with another sampler,
  cut the schedule by strength as StableDiffusion(Inpaint|Img2Img)Pipeline."""
  from diffusers.pipelines import auto_pipeline

  assert "lcm" in auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING
  assert "lcm" not in auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING
  pipe = jaxsd.StableDiffusion.from_pretrained(folders["lcm"])
  assert pipe.sampling_schedule("lcm", 4, 0.5, "inpaint").timesteps.shape == (2,)
  assert pipe.sampling_schedule("ddim", 4, 0.5, "img2img").timesteps.shape == (2,)
  assert pipe.sampling_schedule("lcm", 4, 0.5, "img2img").timesteps.shape == (4,)


def test_sample_command_img2img_on_an_lcm_folder(folders, tmp_path):
  """python -m sample --init-image --strength on a LatentConsistencyModelPipeline folder (in-process, 8 devices):
  LCM's defaults (lcm, 4 steps, guidance 8.5) and the image of `StableDiffusion.img2img` with strength in the LCM
  timesteps."""
  from sample import __main__ as sample_main

  pipe = jaxsd.StableDiffusion.from_pretrained(folders["lcm"])
  init = np.random.default_rng(3).integers(0, 256, (HW, HW, 3), dtype=np.uint8)
  Image.fromarray(init).save(tmp_path / "init.png")
  out = tmp_path / "out"
  argv = [
      "--model", folders["lcm"], "--prompt", "a red circle", "--init-image",
      str(tmp_path / "init.png"), "--strength", "0.5", "--seed", "2", "--out",
      str(out), "--no-progress"
  ]
  assert sample_main.main(argv) == 0
  written = np.asarray(Image.open(out / "a_red_circle-seed2-0000.png")).astype(int)
  kw = dict(strength=0.5, steps=4, guidance_scale=GUIDANCE, sampler="lcm", seed=2)
  want = pipe.img2img(["a red circle"], init[None], **kw)[0].astype(int)
  assert np.abs(written - want).max() <= 1  # (the Python call matches diffusers: the first test)
  # Without --strength: the pipeline's img2img default, diffusers' (LatentConsistencyModelImg2ImgPipeline's and
  # StableDiffusionImg2ImgPipeline's: 0.8; jaxsd's was 0.6).
  for cls in (diffusers.LatentConsistencyModelImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline):
    assert inspect.signature(cls.__call__).parameters["strength"].default == inspect.signature(
        jaxsd.StableDiffusion.img2img).parameters["strength"].default
  assert os.path.isfile(out / "grid.png")
