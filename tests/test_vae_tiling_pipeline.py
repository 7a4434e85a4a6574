"""VAE tiling and slicing on the pipelines (`enable_vae_tiling` / `enable_vae_slicing`, `python -m sample
--vae-tiling`) against diffusers' StableDiffusionPipeline with `vae.enable_tiling()`, on the tiny SD folder (its VAE:
sample_size 16, factor 2, so 16-pixel / 8-latent tiles; 24x40 images cut 2 x 4 tiles, the last ones partial)."""

from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest
import torch

import jaxsd
from tests import reference

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
H, W = 24, 40


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))
  return path, reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)


def _torch_run(tpipe, latents, tiling=True, output_type="np"):
  """diffusers' float images (NHWC, [0, 1]) or final latents, Euler 2 steps from `latents`, with
  `vae.enable_tiling()` or not."""
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(tpipe.scheduler.config)
  if tiling:
    tpipe.vae.enable_tiling()
  try:
    with torch.no_grad():
      out = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=2, guidance_scale=7.5,
                  latents=reference.nhwc_to_nchw(latents), output_type=output_type).images
  finally:
    tpipe.vae.disable_tiling()
  return out if output_type == "np" else reference.nchw_to_nhwc(out)


def _decode_text(pipe, latents):
  return jax.jit(pipe.decode).lower(pipe.vae_params, latents).as_text()


def test_text_to_image_matches_diffusers_with_tiling(sd):
  """The same latents -> diffusers' tiled images: the pipeline's decode within 1e-4, a whole call's uint8 images
  within a level of rounding."""
  path, tpipe, pipe = sd
  latents = np.asarray(pipe.noise(0, len(PROMPTS), H, W))
  ref, ref_latents = _torch_run(tpipe, latents), _torch_run(tpipe, latents, output_type="latent")
  pipe.enable_vae_tiling()
  try:
    ours = pipe(PROMPTS, NEGATIVE, height=H, width=W, steps=2, guidance_scale=7.5, sampler="euler", latents=latents)
    floats = np.asarray(jax.jit(pipe.decode)(pipe.vae_params, ref_latents))
  finally:
    pipe.disable_vae_tiling()
  reference.check_close(floats, ref, "tiled images (float)")
  assert ours.dtype == np.uint8 and np.abs(ours.astype(int) - (ref * 255).round().astype(int)).max() <= 1
  untiled = _torch_run(tpipe, latents, tiling=False)
  print(f"tiling moves diffusers' images by {np.abs(untiled - ref).max() * 255:.1f} levels")
  assert np.abs(untiled - ref).max() * 255 > 10


def test_turning_tiling_off_gives_the_old_program(sd):
  """Tiling is a static part of the program key: on, another program (the tiles' loop in it); off again, the same
  jitted program as before, its decode's lowered text unchanged, and the same fingerprint for saved programs."""
  _, _, pipe = sd
  latents = np.asarray(pipe.noise(0, 2, H, W))
  program, fingerprint = pipe._jitted(True, "np", "text", True), pipe.program_fingerprint()
  plain = _decode_text(pipe, latents)
  assert "stablehlo.while" not in plain
  pipe.enable_vae_tiling()
  try:
    assert pipe._jitted(True, "np", "text", True) is not program
    assert "stablehlo.while" in _decode_text(pipe, latents)  # (the full tiles' decoder under lax.map)
    assert pipe.program_fingerprint() != fingerprint  # a plain program saved by jaxsd.aot is not run
  finally:
    pipe.disable_vae_tiling()
  assert pipe._jitted(True, "np", "text", True) is program
  assert _decode_text(pipe, latents) == plain and pipe.program_fingerprint() == fingerprint


def test_within_one_tile_tiling_changes_nothing(sd):
  """Images no larger than a tile (16 pixels here): the untiled decode and encode, bit for bit (the same program)."""
  _, _, pipe = sd
  latents, keys = np.asarray(pipe.noise(0, 2, 16, 16)), pipe.posterior_keys(0, 2)
  images = np.full((2, 16, 16, 3), 0.5, np.float32)
  plain = _decode_text(pipe, latents), jax.jit(pipe.encode_images).lower(pipe.vae_params, images, keys).as_text()
  pipe.enable_vae_tiling()
  try:
    tiled = _decode_text(pipe, latents), jax.jit(pipe.encode_images).lower(pipe.vae_params, images, keys).as_text()
  finally:
    pipe.disable_vae_tiling()
  assert tiled == plain


def test_image_encoding_matches_diffusers_with_tiling(sd):
  """img2img's and inpainting's encoder (`_encoder`) tiles as diffusers' `vae.encode` with tiling: the scaled
  posterior sample mean + std * eps, eps drawn from the images' keys."""
  _, tpipe, pipe = sd
  images = np.random.RandomState(0).uniform(0, 1, (2, H, W, 3)).astype(np.float32)
  keys = pipe.posterior_keys(3, 2)
  pipe.enable_vae_tiling()
  try:
    ours = np.asarray(pipe._encoder()(pipe.vae_params, images, keys))
  finally:
    pipe.disable_vae_tiling()
  tpipe.vae.enable_tiling()
  try:
    with torch.no_grad():
      post = tpipe.vae.encode(reference.nhwc_to_nchw(images * 2 - 1)).latent_dist
  finally:
    tpipe.vae.disable_tiling()
  eps = np.asarray(jax.vmap(lambda k: jax.random.normal(k, ours.shape[1:]))(keys))
  ref = (reference.nchw_to_nhwc(post.mean) + reference.nchw_to_nhwc(post.std) * eps) * pipe.vae.config.scaling_factor
  reference.check_close(ours, ref, "tiled image latents")


def test_slicing_gives_the_same_images(sd):
  _, _, pipe = sd
  latents = np.asarray(pipe.noise(1, 2, H, W))
  plain = np.asarray(jax.jit(pipe.decode)(pipe.vae_params, latents))
  pipe.enable_vae_slicing()
  try:
    assert "stablehlo.while" in _decode_text(pipe, latents)  # one image at a time
    sliced = np.asarray(jax.jit(pipe.decode)(pipe.vae_params, latents))
  finally:
    pipe.disable_vae_slicing()
  np.testing.assert_allclose(sliced, plain, rtol=0, atol=1e-5)


def test_controlnet_pipeline_keeps_the_settings(sd, tmp_path):
  """with_controlnet keeps tiling and slicing; its programs key on them too."""
  path, tpipe, pipe = sd
  net = diffusers.ControlNetModel.from_unet(tpipe.unet, conditioning_embedding_out_channels=(8, 16))
  net.save_pretrained(tmp_path / "cn")
  pipe.enable_vae_tiling()
  pipe.enable_vae_slicing()
  try:
    controlled = pipe.with_controlnet(str(tmp_path / "cn"))
  finally:
    pipe.disable_vae_tiling()
    pipe.disable_vae_slicing()
  assert controlled.vae_tiling and controlled.vae_slicing and not pipe.vae_tiling
  assert controlled.vae_key() == (("vae", True, True),) and pipe.vae_key() == ()
  controlled._jitted(True, "np", "text", True)  # (keyed, not traced)
  assert [key[-1] for key in controlled._compiled] == [("vae", True, True)]


def test_the_sample_commands_program_tiles(sd):
  """`python -m sample --vae-tiling` calls enable_vae_tiling (tests/test_commands.py); the program `jaxsd.generate`
  pmaps (`generate_fn`) then decodes in tiles (their loop in its text), and without it does not."""
  _, _, pipe = sd
  ids = pipe.tokenize(PROMPTS)
  args = (pipe.params, ids, ids, pipe.noise(0, 2, H, W), np.float32(7.5), pipe.sampler_keys(0, 2))
  lower = lambda: jax.jit(pipe.generate_fn("ddim", 1, True, "np")).lower(*args).as_text()
  plain = lower()
  pipe.enable_vae_tiling()
  try:
    tiled = lower()
  finally:
    pipe.disable_vae_tiling()
  assert "stablehlo.while" in tiled and tiled.count("stablehlo.while") > plain.count("stablehlo.while")
