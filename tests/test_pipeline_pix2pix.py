"""InstructPix2Pix (an 8-channel U-Net that edits an image as the prompt instructs) against diffusers'
StableDiffusionInstructPix2PixPipeline on a tiny random folder saved to disk, in Python and on the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import diffusers
import numpy as np
from PIL import Image
import pytest
import torch

import jaxsd
from jaxsd import generate, pipeline_xl
from sample import __main__ as sample_main
from tests import reference

PROMPTS = ["make it red", "turn the square into a circle"]
NEGATIVE = ["", "blurry"]
HW = 16
SAMPLERS = {
    "euler": diffusers.EulerDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("pix2pix")), in_channels=8)


@pytest.fixture(scope="module")
def pipes(folder):
  tpipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
  tpipe.set_progress_bar_config(disable=True)
  return tpipe, jaxsd.StableDiffusion.from_pretrained(folder)


def _images(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (len(PROMPTS), HW, HW, 3), dtype=np.uint8)


def _theirs(tpipe, sampler, images, latents, steps, guidance, image_guidance, negative=NEGATIVE, **kw):
  tpipe.scheduler = SAMPLERS[sampler].from_config(tpipe.scheduler.config)
  with torch.no_grad():
    out = tpipe(PROMPTS, image=[Image.fromarray(im) for im in images], negative_prompt=negative,
                num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                latents=reference.nhwc_to_nchw(latents), output_type="latent", **kw)
  return reference.nchw_to_nhwc(out.images)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_latents_match_diffusers(pipes, sampler):
  """Guided (three U-Net copies per call: text + image, image, neither), the final latents as diffusers' within 3e-4 of
  their scale; the image and the prompt both move them (not a plain text-to-image). The two guidance terms multiply
  the U-Nets' float32 differences (7.5 + 1.5 here): under 1e-4 on an AVX-512 Intel host, 1.4e-4 for ddim on an AMD
  EPYC host (torch's CPU capability AVX2: its kernels round otherwise)."""
  tpipe, pipe = pipes
  images, latents = _images(), np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  kw = dict(negative_prompts=NEGATIVE, steps=4, guidance_scale=7.5, image_guidance_scale=1.5, sampler=sampler,
            latents=latents, output="latent")
  ours = pipe.instruct_pix2pix(PROMPTS, images, **kw)
  ref = _theirs(tpipe, sampler, images, latents, 4, 7.5, 1.5)
  diff = np.abs(ours - ref).max()
  assert diff < 3e-4 * max(1.0, np.abs(ref).max()), f"{sampler}: max |diff| {diff}"
  other_image = pipe.instruct_pix2pix(PROMPTS, _images(1), **kw)
  other_prompt = pipe.instruct_pix2pix(["make it blue", "add a hat"], images, **kw)
  assert np.abs(other_image - ours).max() > 100 * diff and np.abs(other_prompt - ours).max() > 100 * diff


@pytest.mark.parametrize("guidance,image_guidance", [(7.5, 0.9), (1.0, 1.5), (3.0, 1.0)])
def test_guidance_settings_as_diffusers(pipes, guidance, image_guidance):
  """Guidance only where guidance_scale > 1 and image_guidance_scale >= 1 (diffusers' do_classifier_free_guidance):
  one U-Net copy otherwise; at image_guidance_scale 1 the image term cancels and the text one stays."""
  tpipe, pipe = pipes
  images, latents = _images(2), np.asarray(pipe.noise(5, len(PROMPTS), HW, HW))
  ours = pipe.instruct_pix2pix(PROMPTS, images, negative_prompts=NEGATIVE, steps=3, guidance_scale=guidance,
                               image_guidance_scale=image_guidance, sampler="euler", latents=latents, output="latent")
  ref = _theirs(tpipe, "euler", images, latents, 3, guidance, image_guidance)
  diff = np.abs(ours - ref).max()
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"({guidance}, {image_guidance}): max |diff| {diff}"


def test_image_latents_are_the_posterior_mode_and_images_within_a_level(pipes):
  """The image's latents are the VAE posterior's mode, unscaled (diffusers' retrieve_latents(..., "argmax")): given
  as `image_latents` they give the same result; the decoded images are diffusers' within one uint8 level."""
  tpipe, pipe = pipes
  images, latents = _images(3), np.asarray(pipe.noise(7, len(PROMPTS), HW, HW))
  with torch.no_grad():
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    mode = reference.nchw_to_nhwc(tpipe.vae.encode(x).latent_dist.mode())
  ours_mode = np.asarray(pipe.encode_image_modes(pipe.vae_params, images.astype(np.float32) / 255))
  np.testing.assert_allclose(ours_mode, mode, atol=1e-5)
  kw = dict(steps=3, sampler="euler", latents=latents, output="latent")
  a = pipe.instruct_pix2pix(PROMPTS, images, **kw)
  b = pipe.instruct_pix2pix(PROMPTS, None, image_latents=mode, **kw)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))  # (torch's mode: 1e-5 apart)
  ours = pipe.instruct_pix2pix(PROMPTS, images, steps=3, sampler="euler", latents=latents)
  tpipe.scheduler = SAMPLERS["euler"].from_config(tpipe.scheduler.config)
  with torch.no_grad():
    ref = tpipe(PROMPTS, image=[Image.fromarray(im) for im in images], num_inference_steps=3,
                latents=reference.nhwc_to_nchw(latents), output_type="np").images
  assert ours.dtype == np.uint8 and ours.shape == images.shape
  assert np.abs(ours.astype(int) - (ref * 255).round().astype(int)).max() <= 1


def test_the_folder_and_what_an_instruct_pix2pix_unet_refuses(folder, pipes, tmp_path):
  """The folder's own sampler (Euler ancestral) is the default and its pipeline class is kept on saving; text-to-image,
  img2img and inpainting are refused, saying what to call; a 4-channel model refuses instruct_pix2pix."""
  _, pipe = pipes
  assert pipe.default_sampler == "euler_a" and pipe.pix2pix_unet
  pipe.save_pretrained(str(tmp_path / "saved"))
  index = json.load(open(tmp_path / "saved" / "model_index.json"))
  assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
  with pytest.raises(ValueError, match="InstructPix2Pix U-Net .*instruct_pix2pix"):
    pipe(PROMPTS, height=HW, width=HW, steps=2)
  with pytest.raises(ValueError, match="InstructPix2Pix U-Net"):
    pipe.img2img(PROMPTS, _images(), steps=2)
  with pytest.raises(ValueError, match="image_latents have shape"):
    pipe.instruct_pix2pix(PROMPTS, _images(), image_latents=np.zeros((2, 4, 4, 4)), steps=2)
  with pytest.raises(ValueError, match="2 prompts for 1 init images"):
    pipe.instruct_pix2pix(PROMPTS, _images()[:1], steps=2)
  plain = reference.make_tiny_sd_folder(str(tmp_path / "plain"))
  with pytest.raises(ValueError, match="takes 4 input channels; InstructPix2Pix needs 8"):
    jaxsd.StableDiffusion.from_pretrained(plain).instruct_pix2pix(PROMPTS, _images(), steps=2)


def test_ip_adapter_as_diffusers(folder, tmp_path):
  """A loaded IP-Adapter (diffusers' SD InstructPix2Pix pipeline takes one; scale 0.7): the image's embeddings in the
  text copy, the unconditional ones (zeros) in the other two, as diffusers' three-chunk rows. Final latents within
  3e-4 of diffusers', guided and unguided (one copy), for one image every prompt sees and with the embeddings given;
  the adapter's image moves them. PAG is refused (test_sdxl_refuses_an_ip_adapter: SDXL's)."""
  from tests import test_ip_adapter

  tpipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
  tpipe.set_progress_bar_config(disable=True)
  adapter = test_ip_adapter.make_adapter_folder(str(tmp_path / "adapter"), tpipe.unet)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=test_ip_adapter.WEIGHT, image_encoder_folder="image_encoder")
  pipe = jaxsd.StableDiffusion.from_pretrained(folder)
  pipe.load_ip_adapter(adapter, weight_name=test_ip_adapter.WEIGHT)
  tpipe.set_ip_adapter_scale(0.7)
  pipe.set_ip_adapter_scale(0.7)
  ip_image, other = test_ip_adapter._images(2, seed=3)
  images, latents = _images(4), np.asarray(pipe.noise(4, len(PROMPTS), HW, HW))
  diffs = {}
  for guidance, image_guidance in ((7.5, 1.5), (1.0, 1.5)):
    kw = dict(negative_prompts=NEGATIVE, steps=3, guidance_scale=guidance, image_guidance_scale=image_guidance,
              sampler="euler", latents=latents, output="latent")
    ref = _theirs(tpipe, "euler", images, latents, 3, guidance, image_guidance, ip_adapter_image=ip_image)
    ours = pipe.instruct_pix2pix(PROMPTS, images, ip_adapter_image=ip_image, **kw)
    scale = max(1.0, np.abs(ref).max())
    diffs[guidance, image_guidance] = np.abs(ours - ref).max() / scale
    assert diffs[guidance, image_guidance] < 3e-4, (guidance, image_guidance, diffs)
    moved = pipe.instruct_pix2pix(PROMPTS, images, ip_adapter_image=other, **kw)
    assert np.abs(moved - ours).max() > 1e-2 * scale  # (an adapter left out of any copy fails the parity above)
    if guidance > 1:
      with torch.no_grad():  # diffusers' SD layout (unconditional row first), as every jaxsd call takes them
        embeds = torch.cat(tpipe.encode_image(ip_image, "cpu", 1)[::-1])[:, None]
      given = pipe.instruct_pix2pix(PROMPTS, images, ip_adapter_image_embeds=[embeds.numpy()], **kw)
      assert np.abs(given - ref).max() / scale < 3e-4
  print("pix2pix IP-Adapter max scaled |diff|:", {k: f"{v:.1e}" for k, v in diffs.items()})
  # `python -m sample`'s path (pmapped, per-job keys): the call's images with the same seed, within a level.
  got = generate.generate(pipe, PROMPTS[:1], steps=3, sampler="euler", init_image=images[:1], seed=3,
                          ip_adapter_image=ip_image, progress=False).images[0]
  want = pipe.instruct_pix2pix(PROMPTS[:1], images[:1], steps=3, sampler="euler", seed=3, ip_adapter_image=ip_image)[0]
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  pipe.enable_pag(["mid"])
  for run in (lambda: pipe.instruct_pix2pix(PROMPTS, images, ip_adapter_image=ip_image, steps=2), lambda: generate.
              generate(pipe, PROMPTS[:1], steps=2, init_image=images[:1], ip_adapter_image=ip_image, progress=False)):
    with pytest.raises(ValueError, match="Perturbed-Attention Guidance .* disable_pag"):
      run()


def test_sample_command_edits_the_init_image(folder, pipes, tmp_path, capsys):
  """`python -m sample --model <pix2pix folder> --init-image IMG [--image-guidance-scale S]` writes the images
  `instruct_pix2pix` makes with the same seed; --strength and a mask are refused, and --image-guidance-scale on a
  plain model, each before anything compiles (exit code 2)."""
  _, pipe = pipes
  image = _images(4)[0]
  Image.fromarray(image).save(tmp_path / "in.png")
  argv = [
      "--model", folder, "--prompt", "make it red", "--init-image",
      str(tmp_path / "in.png"), "--steps", "3", "--sampler", "euler", "--image-guidance-scale", "1.2", "--seed", "3",
      "--out",
      str(tmp_path / "out"), "--no-progress"
  ]
  assert sample_main.main(argv) == 0
  got = np.asarray(Image.open(tmp_path / "out" / "make_it_red-seed3-0000.png")).astype(int)
  want = pipe.instruct_pix2pix(["make it red"], image[None], steps=3, sampler="euler", image_guidance_scale=1.2,
                               seed=3)[0].astype(int)
  assert np.abs(got - want).max() <= 1
  default = generate.generate(pipe, ["make it red"], steps=3, sampler="euler", init_image=image[None], seed=3,
                              progress=False).images[0].astype(int)
  assert np.abs(default - pipe.instruct_pix2pix(["make it red"], image[None], steps=3, sampler="euler", seed=3)[0]).max(
  ) <= 1  # image_guidance_scale 1.5, the call's
  Image.fromarray(np.full((HW, HW), 255, np.uint8)).save(tmp_path / "mask.png")
  plain = reference.make_tiny_sd_folder(str(tmp_path / "plain"))
  mask = str(tmp_path / "mask.png")
  without_scale = argv[:argv.index("--image-guidance-scale")] + argv[argv.index("--image-guidance-scale") + 2:]
  for args, model, message in (
      (argv + ["--strength", "0.5"], folder, "strength does not apply to an InstructPix2Pix model"),
      (argv + ["--mask", mask], folder, "--image-guidance-scale applies to an InstructPix2Pix model editing"),
      (without_scale + ["--mask", mask], folder, "takes 8 input channels; inpainting needs 4 .* or 9"),
      (argv, plain, "image_guidance_scale applies to an InstructPix2Pix model .*this one is not"),
  ):
    args = list(args)
    args[1] = model
    out = tmp_path / ("refused" + str(len(os.listdir(tmp_path))))
    args[args.index("--out") + 1] = str(out)
    capsys.readouterr()
    assert sample_main.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.fixture(scope="module")
def xl_pipes(tmp_path_factory):
  c = reference.tiny_sdxl_components(in_channels=8)
  tpipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                                             text_encoder_2=c["text_encoder_2"],
                                                             tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"],
                                                             unet=c["unet"], scheduler=c["scheduler"],
                                                             force_zeros_for_empty_prompt=True, add_watermarker=False)
  tpipe.set_progress_bar_config(disable=True)
  folder = str(tmp_path_factory.mktemp("xl_pix2pix"))
  tpipe.save_pretrained(folder)
  return folder, tpipe, pipeline_xl.StableDiffusionXL.from_pretrained(folder)


def _theirs_xl(tpipe, sampler, images, latents, steps, guidance, image_guidance, **kw):
  tpipe.scheduler = SAMPLERS[sampler].from_config(tpipe.scheduler.config)
  with torch.no_grad():
    out = tpipe(PROMPTS, image=[Image.fromarray(im) for im in images], num_inference_steps=steps,
                guidance_scale=guidance, image_guidance_scale=image_guidance, height=HW, width=HW,
                latents=reference.nhwc_to_nchw(latents), output_type="latent", **kw)
  return reference.nchw_to_nhwc(out.images)


@pytest.mark.parametrize("options", [{}, {
    "negative_prompt": NEGATIVE,
    "guidance_rescale": 0.7
}, {
    "cosxl": True
}], ids=["zero-negatives", "negatives-rescaled", "cosxl-edit"])
def test_sdxl_latents_match_diffusers(xl_pipes, options):
  """SDXL (StableDiffusionXLInstructPix2PixPipeline): the size conditioning on all three copies, zero unconditional
  embeddings without negative prompts (force_zeros_for_empty_prompt), guidance_rescale against the text copy, and a
  CosXL Edit folder's scaled image latents (model_index.json's is_cosxl_edit): latents within 1e-4 of diffusers';
  `generate` (the command line's path) writes what the call makes."""
  folder, tpipe, pipe = xl_pipes
  options = dict(options)
  cosxl = options.pop("cosxl", False)
  tpipe.is_cosxl_edit = cosxl
  if cosxl:  # (a pipeline object of its own: programs are traced per object)
    pipe = dataclasses.replace(pipe, model_index=dict(pipe.model_index, is_cosxl_edit=True))
  images, latents = _images(6), np.asarray(pipe.noise(2, len(PROMPTS), HW, HW))
  ours = pipe.instruct_pix2pix(PROMPTS, images, negative_prompts=options.get("negative_prompt"), steps=3,
                               guidance_scale=5.0, image_guidance_scale=1.5, sampler="euler", latents=latents,
                               output="latent", guidance_rescale=options.get("guidance_rescale", 0.0))
  ref = _theirs_xl(tpipe, "euler", images, latents, 3, 5.0, 1.5, **options)
  diff = np.abs(ours - ref).max()
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"{options}: max |diff| {diff}"
  if not options and not cosxl:  # `generate` (python -m sample's path, pmapped) edits as the call does
    got = generate.generate(pipe, PROMPTS[:1], steps=3, sampler="euler", init_image=images[:1], seed=3,
                            progress=False).images[0]
    want = pipe.instruct_pix2pix(PROMPTS[:1], images[:1], steps=3, sampler="euler", seed=3)[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  if cosxl:
    plain = xl_pipes[2].instruct_pix2pix(PROMPTS, images, steps=3, guidance_scale=5.0, sampler="euler", latents=latents,
                                         output="latent")
    assert np.abs(plain - ours).max() > 100 * diff  # the scaling is seen


def test_sdxl_refuses_an_ip_adapter(xl_pipes, tmp_path):
  """diffusers' StableDiffusionXLInstructPix2PixPipeline takes no IP-Adapter: a loaded one is refused, saying so."""
  from tests import test_ip_adapter

  folder, tpipe, _ = xl_pipes
  pipe = pipeline_xl.StableDiffusionXL.from_pretrained(folder)
  adapter = test_ip_adapter.make_adapter_folder(str(tmp_path / "adapter"), tpipe.unet)
  pipe.load_ip_adapter(adapter, weight_name=test_ip_adapter.WEIGHT)
  for run in (lambda: pipe.instruct_pix2pix(PROMPTS, _images(), steps=2),
              lambda: generate.generate(pipe, PROMPTS[:1], steps=2, init_image=_images()[:1], progress=False)):
    with pytest.raises(ValueError, match="StableDiffusionXL.instruct_pix2pix does not take a loaded IP-Adapter"):
      run()
