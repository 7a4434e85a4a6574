"""ControlNet img2img and inpainting against diffusers' StableDiffusionControlNetImg2ImgPipeline and
StableDiffusionControlNetInpaintPipeline on tiny random SD 1 folders (4-channel: img2img and latent-blend
inpainting; 9-channel inpainting U-Net) and tiny perturbed ControlNets, the same noise and image latents
passed to both (diffusers' `randn_tensor` returns ours; its VAE encoder gives its mean, which we are given)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import jaxsd
from tests import reference
from tests.test_pipeline import scheduler
from tests.test_pipeline_controlnet import _controlnet

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("controlnet-images")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  tpipe = reference.torch_pipeline(path)
  nets = [_controlnet(tpipe.unet, seed) for seed in (20, 21)]
  folders = []
  for i, net in enumerate(nets):
    folders.append(str(root / f"cn{i}"))
    net.save_pretrained(folders[-1])
  inpaint_path = reference.make_tiny_sd_folder(str(root / "sd-inpaint"), in_channels=9)
  return dict(path=path, tpipe=tpipe, nets=nets, folders=folders, inpaint_path=inpaint_path,
              pipe=jaxsd.StableDiffusion.from_pretrained(path))


def _control_images(seed, n=len(PROMPTS)):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (HW, HW, 3), dtype=np.uint8)) for _ in range(n)]


def _masks():
  masks = np.zeros((2, HW, HW), np.uint8)
  masks[0, 4:12, 8:16] = 255
  masks[1, :, :HW // 2] = 255
  return masks


def _check(ours, ref, what):
  diff = np.abs(ours - ref).max()
  print(f"{what}: max |diff| {diff:.2e}")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"{what}: max |diff| {diff}"


def _multi(nets):
  return nets if len(nets) > 1 else nets[0]


@pytest.mark.parametrize("sampler, strength, steps, n, kw", [
    ("ddim", 0.6, 5, 1, dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.7)),
    ("dpmpp_2m", 0.95, 4, 2, dict(controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.3])),
    ("euler", 0.5, 6, 1, dict(guess_mode=True)),
])
def test_img2img_matches_diffusers(models, monkeypatch, sampler, strength, steps, n, kw):
  """Final latents as diffusers' ControlNet img2img, given the image latents and noise; the ControlNets'
  window counts the model calls that run after strength cut the schedule, as diffusers' controlnet_keep."""
  from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

  m = models
  pipe = m["pipe"].with_controlnet(m["folders"][:n])
  noise = np.asarray(pipe.noise(4, 2, HW, HW))
  image_latents = np.asarray(pipe.noise(5, 2, HW, HW)) * 0.8
  # Several ControlNets: one image each for the batch (diffusers' img2img refuses a list of lists).
  controls = [_control_images(30)] if n == 1 else [_control_images(30 + k, 1)[0] for k in range(n)]
  ours = pipe.img2img(PROMPTS, None, controls[0] if n == 1 else controls, strength=strength, negative_prompts=NEGATIVE,
                      steps=steps, guidance_scale=7.5, sampler=sampler, output="latent", noise=noise,
                      image_latents=image_latents, **kw)
  ref_pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(**m["tpipe"].components,
                                                                controlnet=_multi(m["nets"][:n]))
  ref_pipe.scheduler = scheduler(m["path"], sampler)
  ref_pipe.set_progress_bar_config(disable=True)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  with torch.no_grad():
    out = ref_pipe(PROMPTS, image=reference.nhwc_to_nchw(image_latents),
                   control_image=controls[0] if n == 1 else controls, strength=strength, num_inference_steps=steps,
                   guidance_scale=7.5, negative_prompt=NEGATIVE, height=HW, width=HW, output_type="latent", **kw)
  _check(ours, reference.nchw_to_nhwc(out.images), f"ControlNet img2img {sampler} strength {strength} x{n}")


def test_img2img_settings_compile_nothing_and_the_controlnet_steers(models):
  """Scales, windows and strengths of the same schedule length reuse the one program; scale 0 is img2img
  without the ControlNet (to fp32 rounding), scale 1 is not."""
  pipe = models["pipe"]
  steered = pipe.with_controlnet(models["folders"][0])
  noise = np.asarray(pipe.noise(6, 2, HW, HW))
  image_latents = np.asarray(pipe.noise(7, 2, HW, HW)) * 0.8
  common = dict(steps=5, sampler="ddim", output="latent", noise=noise, image_latents=image_latents)
  plain = pipe.img2img(PROMPTS, None, strength=0.6, **common)
  off = steered.img2img(PROMPTS, None, _control_images(1), strength=0.6, controlnet_conditioning_scale=0.0, **common)
  np.testing.assert_allclose(off, plain, atol=1e-5)
  program = steered._jitted(True, "latent", "img2img", False)
  before = program._cache_size()
  on = steered.img2img(PROMPTS, None, _control_images(1), strength=0.65, control_guidance_end=0.5, **common)
  assert program._cache_size() == before
  assert np.abs(on - plain).max() > 1e-2


def _inpaint_reference(monkeypatch, m, tpipe, nets, sampler, images, masks, controls, noise, strength, steps, **kw):
  """diffusers' ControlNet inpainting final latents: given the pixel images (so that it masks them itself), its
  VAE encoder's mean in place of a posterior sample, our noise."""
  from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as module

  ref = diffusers.StableDiffusionControlNetInpaintPipeline(**tpipe.components, controlnet=_multi(nets))
  ref.scheduler = scheduler(m["path"], sampler)
  ref.set_progress_bar_config(disable=True)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
  with torch.no_grad():
    out = ref(PROMPTS, image=[Image.fromarray(x) for x in images], mask_image=[Image.fromarray(x) for x in masks],
              control_image=controls, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
              negative_prompt=NEGATIVE, height=HW, width=HW, output_type="latent", **kw)
  return reference.nchw_to_nhwc(out.images)


def _encoded_mean(tpipe, images) -> np.ndarray:
  """The scaled mean latents of the reference VAE (what the patched diffusers pipeline uses) of images in
  [-1, 1], NHWC."""
  x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
  with torch.no_grad():
    mean = tpipe.vae.encode(x).latent_dist.mode() * tpipe.vae.config.scaling_factor
  return reference.nchw_to_nhwc(mean)


@pytest.mark.parametrize("nine, sampler, strength, steps", [(False, "dpmpp_2m", 0.7, 5), (True, "euler", 1.0, 4)])
def test_inpaint_matches_diffusers(models, monkeypatch, nine, sampler, strength, steps):
  """A 4-channel U-Net (latent blend, from the noised image) and a 9-channel inpainting U-Net (from pure
  noise) under a ControlNet: final latents as diffusers', the ControlNet seeing the 4 latent channels."""
  m = models
  path = m["inpaint_path"] if nine else m["path"]
  tpipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
      path, safety_checker=None, requires_safety_checker=False) if nine else m["tpipe"]
  pipe = jaxsd.StableDiffusion.from_pretrained(path).with_controlnet(m["folders"][0])
  assert pipe.inpainting_unet == nine
  images = np.random.default_rng(0).integers(0, 256, (2, HW, HW, 3), dtype=np.uint8)
  masks = _masks()
  pixels = images.astype(np.float32) / 127.5 - 1
  masked = pixels * (masks[..., None] < 128)  # the repainted region grey (0), as diffusers masks
  noise = np.asarray(pipe.noise(8, 2, HW, HW))
  controls = _control_images(40)
  kw = dict(controlnet_conditioning_scale=0.9, control_guidance_end=0.8)
  ours = pipe.inpaint(PROMPTS, images, masks, controls, strength=strength, negative_prompts=NEGATIVE, steps=steps,
                      guidance_scale=7.5, sampler=sampler, output="latent", latents=noise,
                      image_latents=_encoded_mean(tpipe, pixels),
                      masked_image_latents=_encoded_mean(tpipe, masked) if nine else None, **kw)
  ref = _inpaint_reference(monkeypatch, m, tpipe, m["nets"][:1], sampler, images, masks, controls, noise, strength,
                           steps, **kw)
  _check(ours, ref, f"ControlNet inpaint ({9 if nine else 4}-channel) {sampler} strength {strength}")


def test_inpaint_with_padding_mask_crop_crops_the_control_images(models):
  """With padding_mask_crop the control images are cropped to the mask's box with the images: the result is
  the plain pipeline's on the crops with the cropped control images, pasted back; the unmasked pixels stay."""
  from jaxsd import mask_crop

  pipe = models["pipe"].with_controlnet(models["folders"][0])
  big = 2 * HW
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (1, big, big, 3), dtype=np.uint8)
  masks = np.zeros((1, big, big), np.uint8)
  masks[0, 2:10, 20:30] = 255
  control = rng.integers(0, 256, (1, big, big, 3), dtype=np.uint8)
  kw = dict(steps=3, sampler="ddim", guidance_scale=7.5, seed=2)
  out = pipe.inpaint(PROMPTS[:1], images, masks, control, padding_mask_crop=2, height=HW, width=HW, **kw)
  crops = mask_crop.crop(images.astype(np.float32) / 255, masks.astype(np.float32) / 255, HW, HW, 2)
  box = crops.boxes[0]
  control_crop = np.asarray(mask_crop.resize_and_fill(Image.fromarray(control[0]).crop(box), HW, HW))[None]
  direct = pipe.inpaint(PROMPTS[:1], crops.images, crops.masks, control_crop, **kw)
  np.testing.assert_array_equal(out, mask_crop.paste(direct, crops))
  assert (out[0][masks[0] == 0] == images[0][masks[0] == 0]).mean() > 0.99
  with pytest.raises(ValueError, match="give them the images' size"):
    pipe.inpaint(PROMPTS[:1], images, masks, control[:, :HW, :HW], padding_mask_crop=2, height=HW, width=HW, **kw)
