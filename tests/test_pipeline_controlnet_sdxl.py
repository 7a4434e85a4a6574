"""SDXL ControlNet pipeline parity with diffusers' StableDiffusionXLControlNet(Img2Img|Inpaint)Pipeline (one
ControlNet and two) on a tiny random SDXL base and tiny random SDXL ControlNets saved by diffusers, the same initial
latents passed in."""

from __future__ import annotations

import types

import diffusers
import numpy as np
import pytest
import torch

import jaxsd
from tests import reference
from tests.test_pipeline_controlnet import HW, NEGATIVE, PROMPTS, _check, _controlnet, _images, run_reference

# HW 16: the tiny SDXL's VAE halves once, 8x8 latents, as the SD test's.


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
  root = tmp_path_factory.mktemp("xl_controlnet")
  base, refiner, c = reference.make_tiny_sdxl_folders(str(root / "models"))
  nets = [_controlnet(c["unet"], seed) for seed in (20, 21)]  # from_unet: text_time addition embedding
  folders = []
  for i, net in enumerate(nets):
    folders.append(str(root / f"cn{i}"))
    net.save_pretrained(folders[-1])
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base)
  return types.SimpleNamespace(base=base, refiner=refiner, c=c, nets=nets, folders=folders, pipe=pipe,
                               one=pipe.with_controlnet(folders[0]), two=pipe.with_controlnet(folders))


def _torch_pipeline(cls, xl, nets):
  """A diffusers SDXL ControlNet pipeline of class `cls` on the tiny base, its folder's Euler scheduler."""
  c = xl.c
  ref = cls(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
            tokenizer_2=c["tokenizer_2"], unet=c["unet"], controlnet=nets if len(nets) > 1 else nets[0],
            scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(xl.base, subfolder="scheduler"),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  return ref


def _reference(xl, nets, latents, images, negative=NEGATIVE, guidance=5.0, **kw):
  ref = _torch_pipeline(diffusers.StableDiffusionXLControlNetPipeline, xl, nets)
  return run_reference(ref, latents, images, negative, guidance, **kw)


def test_one_sdxl_controlnet_matches_diffusers(xl):
  """The folder's sampler (Euler), negative prompts, a scale and a guidance window; then no negative prompts
  (zero unconditional embeddings, force_zeros_for_empty_prompt), where the ControlNet sees the zeros too. The
  scales compile nothing new and the ControlNet changes the result."""
  latents = np.asarray(xl.pipe.noise(0, len(PROMPTS), HW, HW))
  images = _images(0)
  kw = dict(controlnet_conditioning_scale=1.3, control_guidance_start=0.25, control_guidance_end=0.75)
  ours = xl.one(PROMPTS, images, NEGATIVE, steps=4, latents=latents, output="latent", **kw)
  _check(ours, _reference(xl, xl.nets[:1], latents, images, **kw), f"sdxl euler {kw}")
  zeros = xl.one(PROMPTS, images, steps=4, latents=latents, output="latent", controlnet_conditioning_scale=0.8)
  _check(zeros, _reference(xl, xl.nets[:1], latents, images, negative=None, controlnet_conditioning_scale=0.8),
         "sdxl euler, zero unconditional embeddings")
  off = xl.one(PROMPTS, images, NEGATIVE, steps=4, latents=latents, output="latent", controlnet_conditioning_scale=0.0)
  assert xl.one._jitted(True, "latent", "text", True)._cache_size() == 1
  assert np.abs(ours - off).max() > 1e-2


def test_two_sdxl_controlnets_and_guess_mode_match_diffusers(xl):
  """Two ControlNets with their own scales and windows (residuals summed); guess mode under guidance, where only
  the conditional half (its pooled embeddings and time ids too) goes through the ControlNet."""
  latents = np.asarray(xl.pipe.noise(1, len(PROMPTS), HW, HW))
  images = [_images(1)[0], _images(2)[1]]  # one image per ControlNet for the batch (diffusers' SDXL takes no nesting)
  kw = dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.3],
            control_guidance_end=[0.6, 1.0])
  ours = xl.two(PROMPTS, images, NEGATIVE, steps=4, latents=latents, output="latent", **kw)
  _check(ours, _reference(xl, xl.nets, latents, images, **kw), "sdxl, two ControlNets")
  guess = xl.one(PROMPTS, _images(3), NEGATIVE, steps=4, latents=latents, output="latent", guess_mode=True,
                 controlnet_conditioning_scale=0.9)
  _check(guess, _reference(xl, xl.nets[:1], latents, _images(3), guess_mode=True, controlnet_conditioning_scale=0.9),
         "sdxl, guess mode")


def test_controlnets_for_the_other_family_and_the_refiner_are_refused(xl, tmp_path):
  sd = reference.make_tiny_sd_folder(str(tmp_path / "sd"))
  sd_net = _controlnet(reference.torch_pipeline(sd).unet, 5)
  sd_net.save_pretrained(tmp_path / "sd_cn")
  with pytest.raises(ValueError, match="ControlNet 0 is an SD 1.x / 2.x ControlNet; this is an SDXL model"):
    xl.pipe.with_controlnet(str(tmp_path / "sd_cn"))
  with pytest.raises(ValueError, match="ControlNet 0 is an SDXL ControlNet; this is an SD 1.x / 2.x model"):
    jaxsd.StableDiffusion.from_pretrained(sd).with_controlnet(xl.folders[0])
  with pytest.raises(ValueError, match="refiner"):
    jaxsd.StableDiffusionXL.from_pretrained(xl.refiner).with_controlnet(xl.folders[0])


def test_sdxl_controlnet_img2img_matches_diffusers(xl, monkeypatch):
  """StableDiffusionXLControlNetImg2ImgPipeline given the image latents and our noise: the folder's Euler at
  strength 0.6, a scale and a window (over the calls that run), SDXL's size conditioning of the output size."""
  from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img as module

  noise = np.asarray(xl.pipe.noise(2, len(PROMPTS), HW, HW))
  image_latents = np.asarray(xl.pipe.noise(3, len(PROMPTS), HW, HW)) * 0.8
  images = _images(4)
  kw = dict(controlnet_conditioning_scale=0.9, control_guidance_end=0.7)
  ours = xl.one.img2img(PROMPTS, None, images, strength=0.6, negative_prompts=NEGATIVE, steps=5, noise=noise,
                        image_latents=image_latents, output="latent", **kw)
  ref = _torch_pipeline(diffusers.StableDiffusionXLControlNetImg2ImgPipeline, xl, xl.nets[:1])
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  with torch.no_grad():
    out = ref(PROMPTS, image=reference.nhwc_to_nchw(image_latents), control_image=images, strength=0.6,
              num_inference_steps=5, guidance_scale=5.0, negative_prompt=NEGATIVE, height=HW, width=HW,
              output_type="latent", **kw)
  _check(ours, reference.nchw_to_nhwc(out.images), "sdxl ControlNet img2img")


def test_sdxl_controlnet_inpaint_matches_diffusers(xl, monkeypatch):
  """StableDiffusionXLControlNetInpaintPipeline (the 4-channel base, latent blend) given the pixel images (it masks
  them itself), its VAE encoder's mean instead of a posterior sample (we are given that mean) and our noise:
  diffusers' default strength 0.9999, a scale and a window."""
  from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint_sd_xl as module
  from PIL import Image

  from tests.test_inpaint import _masks

  c = xl.c
  images = np.random.default_rng(1).integers(0, 256, (2, HW, HW, 3), dtype=np.uint8)
  with torch.no_grad():
    pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    image_latents = reference.nchw_to_nhwc(c["vae"].encode(pixels).latent_dist.mode() * c["vae"].config.scaling_factor)
  noise = np.asarray(xl.pipe.noise(5, len(PROMPTS), HW, HW))
  controls = _images(5)
  kw = dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.8)
  ours = xl.one.inpaint(PROMPTS, images, _masks(), controls, negative_prompts=NEGATIVE, steps=5, output="latent",
                        latents=noise, image_latents=image_latents, **kw)
  ref = _torch_pipeline(diffusers.StableDiffusionXLControlNetInpaintPipeline, xl, xl.nets[:1])
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, **_: out.latent_dist.mode())
  with torch.no_grad():
    out = ref(PROMPTS, image=[Image.fromarray(x) for x in images], mask_image=[Image.fromarray(m) for m in _masks()],
              control_image=controls, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=5.0, height=HW,
              width=HW, output_type="latent", **kw)
  _check(ours, reference.nchw_to_nhwc(out.images), "sdxl ControlNet inpaint")


def test_the_command_takes_each_calls_default_scale(xl, monkeypatch):
  """`python -m sample` (generate.generate) without --controlnet-scale: the scale of the pipeline call it runs, as
  diffusers' pipelines default it. SDXL's inpainting took 0.5 (SD's StableDiffusionControlNetInpaintPipeline default),
  where StableDiffusionXLControlNetInpaintPipeline and `inpaint` here take 1."""
  import inspect

  from jaxsd import generate, pipeline_controlnet

  seen = []

  def stop(n, scale, start, end):
    seen.append(scale)
    raise ValueError("stop here")  # before anything compiles

  monkeypatch.setattr(pipeline_controlnet, "control_settings", stop)
  image = _images(0)[0]
  mask = np.zeros((HW, HW), np.uint8)
  mask[4:12, 4:12] = 255
  for kw in ({}, dict(init_image=image), dict(init_image=image, mask_image=mask)):
    with pytest.raises(ValueError, match="stop here"):
      generate.generate(xl.one, PROMPTS[:1], steps=2, control_images=image, progress=False, **kw)
  assert seen == [1.0, 0.8, 1.0]
  theirs = ("StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLControlNetInpaintPipeline")
  assert seen == [
      inspect.signature(getattr(diffusers, name).__call__).parameters["controlnet_conditioning_scale"].default
      for name in theirs
  ]
