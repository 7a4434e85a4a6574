"""SDXL parity with diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline on tiny random
base and refiner folders saved by diffusers (both text encoders, time ids, force_zeros_for_empty_prompt true
for the base and false for the refiner, as the released folders): final latents within 1e-4 x max(1, |latents|).

Every compiled program is a few seconds on a CPU, so the cases share programs where they can (same batch and
number of calls). The decoded uint8 images are compared with diffusers' (within 2 levels) by
tests/test_generate.py's `python -m sample` run on the same tiny base folder.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxsd
from tests import reference
from tests.diffusion.test_samplers_edm import PLAYGROUND  # Playground v2.5's real scheduler_config.json

PROMPTS = ["a red circle on the left", "a small blue square"]
PROMPTS_2 = ["a photo", "a drawing of a big square"]
NEGATIVE = ["", "a green triangle"]
HW = 16
SCHEDULERS = {
    "euler": diffusers.EulerDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  base_path, refiner_path, c = reference.make_tiny_sdxl_folders(tmp_path_factory.mktemp("sdxl"))
  return types.SimpleNamespace(base_path=base_path, refiner_path=refiner_path, c=c,
                               base=jaxsd.StableDiffusionXL.from_pretrained(base_path),
                               refiner=jaxsd.StableDiffusionXL.from_pretrained(refiner_path))


def _scheduler(path, sampler):
  return SCHEDULERS[sampler].from_pretrained(path, subfolder="scheduler")


def _torch_base(sdxl, sampler, cls=diffusers.StableDiffusionXLPipeline):
  c = sdxl.c
  pipe = cls(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
             tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=_scheduler(sdxl.base_path, sampler),
             force_zeros_for_empty_prompt=True, add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _torch_refiner(sdxl, sampler):
  c = sdxl.c
  pipe = diffusers.StableDiffusionXLImg2ImgPipeline(vae=c["vae"], text_encoder=None, text_encoder_2=c["text_encoder_2"],
                                                    tokenizer=None, tokenizer_2=c["tokenizer_2"],
                                                    unet=c["refiner_unet"],
                                                    scheduler=_scheduler(sdxl.refiner_path,
                                                                         sampler), requires_aesthetics_score=True,
                                                    force_zeros_for_empty_prompt=False, add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _close(name, ours, ref):
  diff = float(np.abs(np.asarray(ours) - ref).max())
  MEASURED[name] = diff
  assert ours.shape == ref.shape and diff < 1e-4 * max(1.0, float(np.abs(ref).max())), f"{name}: max |diff| {diff}"


def _noise(pipe, seed, n=len(PROMPTS)):
  return np.asarray(pipe.noise(seed, n, HW, HW))


# Each sampler with guidance by negative prompts (one empty: encoded, not zeroed), then without negative prompts,
# where the base folder's force_zeros_for_empty_prompt zeroes the unconditional embeddings. Euler, one prompt:
# size conditioning of both halves and guidance_rescale (diffusers pairs negative time ids with the wrong half
# of a batch of several: it repeats [negative, positive] per prompt); DDIM: clip_skip=1 (which diffusers applies
# to the prompt only, not to the negative prompt); all with second prompts. Euler's 3 steps and DPM++'s 4 are
# the base's calls before denoising_end in the hand-off test, which so reuses their programs.
CASES = {
    "euler":
        dict(
            n=1, steps=3, clip_skip=None,
            kw=dict(original_size=(32, 24), crops_coords_top_left=(4, 2), target_size=(16, 16),
                    negative_original_size=(8, 8), negative_crops_coords_top_left=(0, 4), negative_target_size=(24, 24),
                    guidance_rescale=0.7)),
    "ddim":
        dict(n=2, steps=5, clip_skip=1, kw={}),
    "dpmpp_2m":
        dict(n=2, steps=4, clip_skip=None, kw={}),
}


@pytest.mark.parametrize("sampler", list(CASES))
def test_latents_match_diffusers(sdxl, sampler):
  case = CASES[sampler]
  n = case["n"]
  pipe = sdxl.base if case["clip_skip"] is None else dataclasses.replace(sdxl.base, clip_skip=case["clip_skip"])
  latents = _noise(pipe, 0, n)
  tpipe = _torch_base(sdxl, sampler)
  for negative in (NEGATIVE[-n:], None):
    ours = pipe(PROMPTS[:n], negative, steps=case["steps"], guidance_scale=5.0, sampler=sampler, latents=latents,
                output="latent", prompts_2=PROMPTS_2[:n], **case["kw"])
    with torch.no_grad():
      ref = tpipe(prompt=PROMPTS[:n], prompt_2=PROMPTS_2[:n], negative_prompt=negative, height=HW, width=HW,
                  num_inference_steps=case["steps"], guidance_scale=5.0, latents=reference.nhwc_to_nchw(latents),
                  output_type="latent", clip_skip=case["clip_skip"], **case["kw"]).images
    _close(f"{sampler} negative={negative is not None}", ours, reference.nchw_to_nhwc(ref))
  # Zero unconditional embeddings are not the encoded empty prompt: the check above can tell them apart.
  empty = pipe(PROMPTS[:n], [""] * n, steps=case["steps"], guidance_scale=5.0, sampler=sampler, latents=latents,
               output="latent", prompts_2=PROMPTS_2[:n], **case["kw"])
  assert np.abs(empty - ours).max() > 1e-3


def test_base_to_refiner_hand_off(sdxl):
  """The base stops at denoising_end=0.6 and returns noisy latents; the refiner (aesthetic-score time ids,
  no first text encoder, no zeroing: its force_zeros_for_empty_prompt is false) continues from exactly those
  latents at denoising_start=0.6, without adding noise. Both halves against diffusers (Euler, SDXL's own;
  tests/diffusion/test_samplers.py checks the cut of the other samplers' schedules)."""
  latents = _noise(sdxl.base, 3, 1)
  base = sdxl.base(PROMPTS[:1], steps=6, guidance_scale=5.0, sampler="euler", latents=latents, output="latent",
                   denoising_end=0.6)
  with torch.no_grad():
    ref = _torch_base(sdxl, "euler")(prompt=PROMPTS[:1], num_inference_steps=6, guidance_scale=5.0, denoising_end=0.6,
                                     latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  _close("base denoising_end", base, reference.nchw_to_nhwc(ref))
  ours = sdxl.refiner.img2img(PROMPTS[:1], None, steps=6, guidance_scale=5.0, sampler="euler", output="latent",
                              image_latents=reference.nchw_to_nhwc(ref), denoising_start=0.6)
  with torch.no_grad():
    ref2 = _torch_refiner(sdxl, "euler")(prompt=PROMPTS[:1], image=ref, num_inference_steps=6, guidance_scale=5.0,
                                         denoising_start=0.6, output_type="latent").images
  _close("refiner denoising_start", ours, reference.nchw_to_nhwc(ref2))
  assert np.abs(ours - base).max() > 1e-2  # the refiner did denoise


def test_img2img_matches_diffusers(sdxl, monkeypatch):
  """img2img with strength from given image latents and noise (diffusers' randn_tensor returns ours): the base
  (DDIM) and the refiner (Euler) with aesthetic scores and negative sizes."""
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

  noise = _noise(sdxl.base, 4)
  image_latents = _noise(sdxl.base, 5) * 0.8
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  ours = sdxl.base.img2img(PROMPTS, None, strength=0.6, negative_prompts=NEGATIVE, steps=5, guidance_scale=5.0,
                           sampler="ddim", output="latent", noise=noise, image_latents=image_latents)
  ref_pipe = _torch_base(sdxl, "ddim", cls=diffusers.StableDiffusionXLImg2ImgPipeline)
  with torch.no_grad():
    ref = ref_pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=reference.nhwc_to_nchw(image_latents), strength=0.6,
                   num_inference_steps=5, guidance_scale=5.0, output_type="latent").images
  _close("base img2img ddim", ours, reference.nchw_to_nhwc(ref))
  # The refiner, one prompt, 3 of 6 Euler steps: the hand-off test's program, here adding noise.
  noise, image_latents = noise[:1], image_latents[:1]
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  kw = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, negative_original_size=(8, 8))
  ours = sdxl.refiner.img2img(PROMPTS[:1], None, strength=0.5, negative_prompts=NEGATIVE[1:], steps=6,
                              guidance_scale=5.0, output="latent", noise=noise, image_latents=image_latents, **kw)
  with torch.no_grad():
    ref = _torch_refiner(sdxl, "euler")(prompt=PROMPTS[:1], negative_prompt=NEGATIVE[1:],
                                        image=reference.nhwc_to_nchw(image_latents), strength=0.5,
                                        num_inference_steps=6, guidance_scale=5.0, output_type="latent", **kw).images
  _close("refiner img2img euler", ours, reference.nchw_to_nhwc(ref))
  print("SDXL max |diff|:", {k: f"{v:.1e}" for k, v in MEASURED.items()})


def test_refiner_img2img_as_the_command_runs_it_matches_diffusers(sdxl, monkeypatch):
  """`python -m sample --model refiner --init-image` (generate.generate) conditioned the negative half on the
  positive aesthetic score (6) instead of diffusers' 2.5, as text-to-image does: its images were off by ~60 levels.
  The images equal StableDiffusionXLImg2ImgPipeline's from the same image latents and noise within 2 levels."""
  from PIL import Image

  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module
  from jaxsd import generate

  pipe, seed = sdxl.refiner, 3
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (HW, HW, 3), dtype=np.uint8))
  got = generate.generate(pipe, PROMPTS[:1], steps=4, guidance_scale=5.0, seed=seed, init_image=image, strength=0.5,
                          negative_prompt=NEGATIVE[1], progress=False, devices=jax.local_devices()[:1]).images
  image_latents = pipe.encode_images(pipe.vae_params, jnp.asarray(np.asarray(image, np.float32)[None] / 255),
                                     pipe.posterior_keys(seed, 1))  # as generate draws them for job 0
  noise = _noise(pipe, seed, 1)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  with torch.no_grad():
    ref = _torch_refiner(sdxl, "euler")(prompt=PROMPTS[:1], negative_prompt=NEGATIVE[1:],
                                        image=reference.nhwc_to_nchw(image_latents), strength=0.5,
                                        num_inference_steps=4, guidance_scale=5.0, output_type="np").images
  assert np.abs(got.astype(int) - np.round(ref * 255).astype(int)).max() <= 2


def test_the_command_takes_the_pipelines_guidance_scale(sdxl, monkeypatch):
  """`python -m sample` without --guidance: the pipeline call's scale, diffusers' (SDXL 5; SD 7.5). The command's
  own default, 7.5, guided every SDXL image harder than diffusers' and jaxsd's SDXL calls do."""
  from jaxsd import generate
  from sample import __main__ as sample_main

  seen = []

  def check_inputs(prompts, negatives, height, width, steps, sampler, output, guidance_scale):
    seen.append(guidance_scale)
    raise ValueError("stop here")  # before anything compiles

  image = np.zeros((1, HW, HW, 3), np.float32)
  for pipe, kw in ((sdxl.base, {}), (sdxl.refiner, dict(init_image=image))):
    monkeypatch.setattr(pipe, "check_inputs", check_inputs)
    with pytest.raises(ValueError, match="stop here"):
      generate.generate(pipe, PROMPTS[:1], steps=2, progress=False, **kw)
  assert seen == [5.0, 5.0]
  want = {
      c: inspect.signature(getattr(diffusers, c).__call__).parameters["guidance_scale"].default
      for c in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionPipeline")
  }
  assert want == {
      "StableDiffusionXLPipeline": 5.0,
      "StableDiffusionXLImg2ImgPipeline": 5.0,
      "StableDiffusionPipeline": 7.5
  }
  assert inspect.signature(jaxsd.StableDiffusion.__call__).parameters["guidance_scale"].default == 7.5
  assert sample_main.parse(["--model", "m", "--prompt", "x"]).guidance is None


def test_the_command_takes_the_pipelines_strength(sdxl, monkeypatch):
  """Without --strength: the pipeline call's, diffusers' (SDXL img2img 0.3, inpainting 0.9999); the command's own
  defaults (0.6, 1) were SD's for every model."""
  from jaxsd import generate

  seen = []

  def generate_fn(sampler, steps, guided, output, strength, task, **kw):
    seen.append((task, strength))
    raise ValueError("stop here")  # before anything compiles

  monkeypatch.setattr(sdxl.base, "generate_fn", generate_fn)
  image, mask = np.zeros((1, HW, HW, 3), np.float32), np.ones((1, HW, HW), np.float32)
  for kw in (dict(init_image=image), dict(init_image=image, mask_image=mask)):
    with pytest.raises(ValueError, match="stop here"):
      generate.generate(sdxl.base, PROMPTS[:1], steps=10, progress=False, **kw)
  want = [(task, inspect.signature(getattr(diffusers, c).__call__).parameters["strength"].default)
          for task, c in (("img2img", "StableDiffusionXLImg2ImgPipeline"), ("inpaint",
                                                                            "StableDiffusionXLInpaintPipeline"))]
  assert seen == want == [("img2img", 0.3), ("inpaint", 0.9999)]


def test_inpaint_matches_diffusers(sdxl, monkeypatch):
  """StableDiffusionXLInpaintPipeline on the 4-channel base (latent blend), given the image latents and our noise:
  diffusers' default strength 0.9999 (4 of 5 Euler steps, from the noised image), negative prompts; the known
  region ends as the image's own latents."""
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module
  from PIL import Image

  from tests.test_inpaint import _masks

  noise = _noise(sdxl.base, 6)
  image_latents = _noise(sdxl.base, 7) * 0.8
  images = np.random.default_rng(0).integers(0, 256, (2, HW, HW, 3), dtype=np.uint8)
  ours = sdxl.base.inpaint(PROMPTS, images, _masks(), negative_prompts=NEGATIVE, steps=5, guidance_scale=5.0,
                           output="latent", latents=noise, image_latents=image_latents)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  ref_pipe = _torch_base(sdxl, "euler", cls=diffusers.StableDiffusionXLInpaintPipeline)
  with torch.no_grad():
    ref = ref_pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=reference.nhwc_to_nchw(image_latents),
                   mask_image=[Image.fromarray(m) for m in _masks()], num_inference_steps=5, guidance_scale=5.0,
                   output_type="latent").images
  _close("base inpaint euler", ours, reference.nchw_to_nhwc(ref))
  print(f"SDXL inpaint: max |diff| {MEASURED['base inpaint euler']:.1e}")
  keep = 1 - _masks()[:, ::2, ::2, None] / 255
  np.testing.assert_allclose(ours * keep, image_latents * keep, atol=1e-5)
  # No negative prompts: zero unconditional embeddings (force_zeros_for_empty_prompt), as diffusers.
  ours = sdxl.base.inpaint(PROMPTS, images, _masks(), steps=5, guidance_scale=5.0, output="latent", latents=noise,
                           image_latents=image_latents)
  with torch.no_grad():
    ref = ref_pipe(prompt=PROMPTS, image=reference.nhwc_to_nchw(image_latents),
                   mask_image=[Image.fromarray(m) for m in _masks()], num_inference_steps=5, guidance_scale=5.0,
                   output_type="latent").images
  _close("base inpaint euler, no negative prompts", ours, reference.nchw_to_nhwc(ref))


def test_inpainting_unet_folder_matches_diffusers(tmp_path, monkeypatch):
  """An SDXL inpainting folder as diffusers/stable-diffusion-xl-1.0-inpainting-0.1 is laid out
  (StableDiffusionXLInpaintPipeline, a 9-channel U-Net) loads by the kind-telling loader as SDXL and inpaints as
  diffusers does, given the image latents, the masked-image latents and our noise."""
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module
  from PIL import Image

  from tests.test_inpaint import _masks

  c = reference.tiny_sdxl_components(seed=3, in_channels=9)
  parts = {k: c[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")}
  tpipe = diffusers.StableDiffusionXLInpaintPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
  tpipe.set_progress_bar_config(disable=True)
  tpipe.save_pretrained(tmp_path / "inpaint")
  pipe = jaxsd.pipeline_xl.load(str(tmp_path / "inpaint"))
  assert isinstance(pipe, jaxsd.StableDiffusionXL) and pipe.inpainting_unet
  noise, image_latents, masked_latents = (_noise(pipe, s) * (1 if s == 6 else 0.8) for s in (6, 7, 8))
  images = np.random.default_rng(0).integers(0, 256, (2, HW, HW, 3), dtype=np.uint8)
  ours = pipe.inpaint(PROMPTS, images, _masks(), negative_prompts=NEGATIVE, steps=5, guidance_scale=5.0,
                      output="latent", latents=noise, image_latents=image_latents, masked_image_latents=masked_latents)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  with torch.no_grad():
    ref = tpipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=reference.nhwc_to_nchw(image_latents),
                mask_image=[Image.fromarray(m) for m in _masks()],
                masked_image_latents=reference.nhwc_to_nchw(masked_latents), num_inference_steps=5, guidance_scale=5.0,
                output_type="latent").images
  _close("base 9-channel inpaint euler", ours, reference.nchw_to_nhwc(ref))


def test_edm_folder_as_playground_v25_matches_diffusers(tmp_path):
  """A folder laid out as Playground v2.5 (an SDXL U-Net trained with EDM preconditioning: its scheduler is
  EDMDPMSolverMultistepScheduler; its VAE normalises latents per channel, latents_mean / latents_std) samples with
  the EDM samplers by default, and `euler` means EDM's Euler there, as diffusers' EDMEulerScheduler: latents within
  1e-4 of diffusers' and the decoded images within 2 levels; a sampler of the DDPM family is refused."""
  c = reference.tiny_sdxl_components(seed=4)
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
                                scaling_factor=0.5, force_upcast=False, latents_mean=[-1.6, 1.7, 1.4, 2.9],
                                latents_std=[8.4, 6.1, 7.2, 7.7])
  reference._jitter(vae, seed=9)
  parts = {k: c[k] for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
  tpipe = diffusers.StableDiffusionXLPipeline(
      **parts, vae=vae.eval(), scheduler=diffusers.EDMDPMSolverMultistepScheduler.from_config(PLAYGROUND),
      force_zeros_for_empty_prompt=True, add_watermarker=False)
  tpipe.set_progress_bar_config(disable=True)
  tpipe.save_pretrained(tmp_path / "pg")
  pipe = jaxsd.pipeline_xl.load(str(tmp_path / "pg"))
  assert pipe.default_sampler == "edm_dpmpp_2m" and pipe.scheduler_config.edm
  latents = _noise(pipe, 1)
  for sampler, cls in ((None, diffusers.EDMDPMSolverMultistepScheduler), ("euler", diffusers.EDMEulerScheduler)):
    tpipe.scheduler = cls.from_config(PLAYGROUND)
    for output in ("latent", "np"):
      ours = pipe(PROMPTS, NEGATIVE, steps=4, guidance_scale=3.0, sampler=sampler, latents=latents, output=output)
      with torch.no_grad():
        ref = tpipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=4,
                    guidance_scale=3.0, latents=reference.nhwc_to_nchw(latents), output_type=output).images
      if output == "latent":
        _close(f"playground-like {cls.__name__}", ours, reference.nchw_to_nhwc(ref))
      else:
        assert np.abs(ours.astype(int) - np.round(ref * 255).astype(int)).max() <= 2
  with pytest.raises(ValueError, match="EDM"):
    pipe(PROMPTS, steps=4, sampler="ddim")


def test_save_pretrained_loads_in_diffusers(sdxl, tmp_path):
  """Both folders saved by jaxsd load in diffusers' own pipelines to the same weights, tokenizers, scheduler and
  pipeline config (force_zeros_for_empty_prompt, requires_aesthetics_score)."""
  for pipe, cls, source in ((sdxl.base, diffusers.StableDiffusionXLPipeline, sdxl.base_path),
                            (sdxl.refiner, diffusers.StableDiffusionXLImg2ImgPipeline, sdxl.refiner_path)):
    out = tmp_path / os.path.basename(source)
    pipe.save_pretrained(out)
    back, ref = cls.from_pretrained(out), cls.from_pretrained(source)
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ref.config)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
      a, b = getattr(back, name), getattr(ref, name)
      assert (a is None) == (b is None), name
      if a is not None:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    read = set(inspect.signature(type(ref.scheduler).__init__).parameters)  # what the scheduler reads
    assert {
        k: v for k, v in back.scheduler.config.items() if k in read
    } == {
        k: v for k, v in ref.scheduler.config.items() if k in read
    }
    for name in ("tokenizer", "tokenizer_2"):
      if getattr(ref, name) is not None:
        assert getattr(back, name)(PROMPTS,
                                   padding="max_length").input_ids == getattr(ref, name)(PROMPTS,
                                                                                         padding="max_length").input_ids


def test_fp16_variant_sharded_folder(sdxl, tmp_path):
  """diffusers' fp16 variant with sharded weights for every network: the fp32 weights rounded to fp16, exactly.
  In float16 the VAE runs in fp32 (its config says force_upcast: it would overflow), the rest in fp16."""
  c = sdxl.c
  pipe = diffusers.StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                             text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                             tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=c["scheduler"],
                                             add_watermarker=False)
  copy.deepcopy(pipe).to(torch.float16).save_pretrained(tmp_path, variant="fp16", max_shard_size="60KB")
  assert os.path.exists(tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json")
  assert os.path.exists(tmp_path / "text_encoder_2" / "model.safetensors.index.fp16.json")
  got = jaxsd.StableDiffusionXL.from_pretrained(str(tmp_path), variant="fp16")
  rounded = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), tree)
  for name in ("unet_params", "vae_params", "text_encoder_params", "text_encoder_2_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), rounded(getattr(sdxl.base, name)))
  half = jaxsd.StableDiffusionXL.from_pretrained(str(tmp_path), jnp.float16, variant="fp16")
  assert half.vae.dtype == jnp.float32 and half.unet.dtype == jnp.float16
  assert half.text_encoder_2.dtype == jnp.float16


def test_bad_input_is_reported(sdxl, tmp_path):
  with pytest.raises(ValueError, match="prompts_2"):
    sdxl.base(PROMPTS, steps=2, prompts_2=["one"])
  with pytest.raises(ValueError, match="denoising_end"):
    sdxl.base(PROMPTS, steps=2, denoising_end=1.5)
  with pytest.raises(ValueError, match="requires_aesthetics_score"):
    dataclasses.replace(sdxl.refiner, model_index={})(PROMPTS, steps=2)
  with pytest.raises(ValueError, match="is not a number"):  # prompt weighting (tests/test_prompt_syntax_xl.py)
    sdxl.base.text_inputs(["(red:1.2.3) circle"], None, 64, 64, prompt_weighting=True)
  with pytest.raises(FileNotFoundError, match="incomplete: no text_encoder_2/, tokenizer_2/"):
    jaxsd.StableDiffusionXL.from_pretrained(reference.make_tiny_sd_folder(str(tmp_path / "sd")))


def test_per_channel_latent_statistics_as_diffusers(sdxl, tmp_path):
  """A VAE config with latents_mean / latents_std (Playground v2.5's): diffusers' SDXL pipeline decodes
  latents * std / scaling_factor + mean; the decoded images agree within 1e-4, and jaxsd's encoding is the
  inverse map. Without the statistics the same latents decode differently (the check can fail)."""
  c = sdxl.c
  vae = copy.deepcopy(c["vae"])
  k = vae.config.latent_channels
  mean, std = [0.3 * (i - 1) for i in range(k)], [0.5 + 0.4 * i for i in range(k)]
  vae.register_to_config(latents_mean=mean, latents_std=std)
  tpipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=c["text_encoder"],
                                              text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                              tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                              scheduler=_scheduler(sdxl.base_path, "euler"),
                                              force_zeros_for_empty_prompt=True, add_watermarker=False)
  tpipe.set_progress_bar_config(disable=True)
  tpipe.save_pretrained(tmp_path)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(str(tmp_path))
  assert pipe.vae.config.latents_mean == tuple(mean)
  latents = _noise(pipe, 6, 1)
  final = pipe(PROMPTS[:1], steps=3, guidance_scale=5.0, sampler="euler", latents=latents, output="latent")
  ours = np.asarray(pipe.decode(pipe.vae_params, final))
  with torch.no_grad():
    ref = tpipe(prompt=PROMPTS[:1], height=HW, width=HW, num_inference_steps=3, guidance_scale=5.0,
                latents=reference.nhwc_to_nchw(latents), output_type="np").images
  _close("latents_mean/std decode", ours, ref)
  assert np.abs(np.asarray(sdxl.base.decode(pipe.vae_params, final)) - ours).max() > 1e-2
  z = jnp.asarray(latents)
  np.testing.assert_allclose(pipe.unscale_latents(pipe.scale_latents(z)), z, atol=1e-5)
  want = (z - jnp.asarray(mean)) * vae.config.scaling_factor / jnp.asarray(std)
  np.testing.assert_allclose(pipe.scale_latents(z), want, atol=1e-5)


def test_a_dpm_sde_folder_samples_with_dpmpp_2m_sde_by_default(sdxl, tmp_path):
  """An SDXL folder whose DPMSolverMultistepScheduler says algorithm_type="sde-dpmsolver++" (diffusers runs DPM++ 2M
  SDE): SD's folders took dpmpp_2m_sde since 2026-12-05, SDXL's defaulted to dpmpp_2m, which refuses that config, so
  every call without a sampler failed. Now the default is dpmpp_2m_sde, the same program as naming it."""
  tpipe = _torch_base(sdxl, "euler")
  tpipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(tpipe.scheduler.config,
                                                                      algorithm_type="sde-dpmsolver++")
  tpipe.save_pretrained(tmp_path)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(str(tmp_path))
  assert pipe.default_sampler == "dpmpp_2m_sde"
  kw = dict(steps=3, guidance_scale=5.0, latents=_noise(pipe, 7, 1), output="latent")
  np.testing.assert_array_equal(pipe(PROMPTS[:1], **kw), pipe(PROMPTS[:1], sampler="dpmpp_2m_sde", **kw))
