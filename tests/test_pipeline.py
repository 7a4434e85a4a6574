"""Pipeline parity with diffusers' StableDiffusionPipeline on a tiny random model saved to disk."""

from __future__ import annotations

import copy
import os

import diffusers
import jax
import numpy as np
import pytest
import torch

import jaxsd
from tests import reference

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW = 16

# Our sampler name -> the diffusers scheduler (and options) that defines it, swapped in as diffusers'
# docs do (`X.from_config(pipe.scheduler.config)`): keys the folder's config lacks take X's defaults,
# so PNDM runs its Runge-Kutta warm-up on the SD 2 folder (a DDIM config, no skip_prk_steps) and
# DDIM clips x0 on the SD 1 folder (a PNDM config, no clip_sample), in diffusers and here alike.
DETERMINISTIC = {
    "pndm": (diffusers.PNDMScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {
        "use_karras_sigmas": True
    }),
}


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def folders(request, tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")), sd2=request.param)
  return path, reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)


def _latents(pipe, seed=0):
  return np.asarray(pipe.noise(seed, len(PROMPTS), HW, HW))


def _torch_run(tpipe, sampler, latents, steps, guidance, output_type, size=HW):
  cls, kw = DETERMINISTIC[sampler]
  tpipe.scheduler = cls.from_config(tpipe.scheduler.config, **kw)
  with torch.no_grad():
    out = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance, latents=reference.nhwc_to_nchw(latents), output_type=output_type)
  return out.images


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_latents_match_diffusers(folders, sampler):
  path, tpipe, pipe = folders
  latents = _latents(pipe)
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=6, guidance_scale=7.5, sampler=sampler, latents=latents,
              output="latent")
  ref = reference.nchw_to_nhwc(_torch_run(tpipe, sampler, latents, 6, 7.5, "latent"))
  diff = np.abs(ours - ref).max()
  # DDIM on the SD 1 folder clips x0 (clip_sample=True, DDIM's default): measured 1.1e-4 there.
  tol = 3e-4 if sampler == "ddim" and pipe.scheduler_config.for_class("DDIMScheduler").clip_sample else 1e-4
  assert diff < tol * max(1.0, np.abs(ref).max()), f"{sampler}: max |diff| {diff}"


def test_images_match_diffusers_within_uint8_levels(folders):
  path, tpipe, pipe = folders
  latents = _latents(pipe, seed=3)
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=5, guidance_scale=5.0, sampler="pndm", latents=latents,
              output="np")
  ref = _torch_run(tpipe, "pndm", latents, 5, 5.0, "np")  # float in [0, 1]
  ref_u8 = (ref * 255).round().astype(np.uint8)
  assert ours.dtype == np.uint8 and ours.shape == (2, HW, HW, 3)
  assert np.abs(ours.astype(int) - ref_u8.astype(int)).max() <= 2


def test_no_guidance_skips_unconditional_pass(folders):
  path, tpipe, pipe = folders
  latents = _latents(pipe, seed=1)
  ours = pipe(PROMPTS, height=HW, width=HW, steps=4, guidance_scale=1.0, sampler="ddim", latents=latents,
              output="latent")
  ref = reference.nchw_to_nhwc(_torch_run(tpipe, "ddim", latents, 4, 1.0, "latent"))
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_second_call_compiles_nothing(folders):
  path, tpipe, pipe = folders
  pipe(PROMPTS, height=HW, width=HW, steps=3, sampler="euler", seed=0)
  (fn,) = [f for k, f in pipe._compiled.items() if k[:2] == ("euler", 3)]
  size = fn._cache_size()
  out1 = pipe(PROMPTS, height=HW, width=HW, steps=3, sampler="euler", seed=5, guidance_scale=3.0)
  assert fn._cache_size() == size
  assert out1.shape == (2, HW, HW, 3)


def test_default_size_is_the_models_and_follows_given_latents(folders):
  """As diffusers: without height/width the size is unet.sample_size x the VAE factor (512 for SD 1.5, 768
  for SD 2.1); with `latents` given and no size, the size is theirs (no 512x512 mismatch error)."""
  path, tpipe, pipe = folders
  native = tpipe.unet.config.sample_size * tpipe.vae_scale_factor
  assert pipe.default_size == native
  out = pipe(PROMPTS, steps=2, sampler="ddim", output="latent")
  assert out.shape == pipe.latent_shape(len(PROMPTS), native, native)
  other = native // 2 if native >= 16 else native * 2
  latents = np.asarray(pipe.noise(0, len(PROMPTS), other, other))
  ours = pipe(PROMPTS, NEGATIVE, steps=3, guidance_scale=7.5, sampler="ddim", latents=latents, output="latent")
  ref = reference.nchw_to_nhwc(_torch_run(tpipe, "ddim", latents, 3, 7.5, "latent", size=other))
  assert ours.shape == latents.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_img2img_runs_and_strength_controls_change(folders):
  path, tpipe, pipe = folders
  init = np.zeros((2, HW, HW, 3), np.uint8)
  init[:, :, :HW // 2] = 255
  weak = pipe.img2img(PROMPTS, init, strength=0.2, steps=10, sampler="ddim", output="latent")
  strong = pipe.img2img(PROMPTS, init, strength=1.0, steps=10, sampler="ddim", output="latent")
  z0 = np.asarray(
      jax.jit(pipe.encode_images)(pipe.vae_params, init.astype(np.float32) / 255,
                                  jax.random.fold_in(jax.random.key(0), 1)))
  # A low strength stays near the encoded image; full strength moves much further from it.
  assert np.abs(weak - z0).mean() < np.abs(strong - z0).mean()
  pil = pipe.img2img(PROMPTS[0], init[:1], strength=0.5, steps=4, sampler="euler", output="pil")
  assert pil[0].size == (HW, HW)


def test_bad_input_is_reported(folders):
  path, tpipe, pipe = folders
  with pytest.raises(ValueError, match="multiple of 8"):
    pipe(PROMPTS, height=12, width=HW, steps=2)
  with pytest.raises(ValueError, match="at least 1"):
    pipe(PROMPTS, height=HW, width=HW, steps=0)
  with pytest.raises(ValueError, match="unknown sampler|sampler"):
    pipe(PROMPTS, height=HW, width=HW, steps=2, sampler="nope")
  with pytest.raises(ValueError, match="no prompts"):
    pipe([], height=HW, width=HW, steps=2)
  with pytest.raises(FileNotFoundError, match="incomplete: no unet/"):
    jaxsd.StableDiffusion.from_pretrained(str(tmp_empty(path)))


def tmp_empty(path):
  import os
  import tempfile

  d = tempfile.mkdtemp()
  os.makedirs(os.path.join(d, "vae"))
  return d


def test_fp16_variant_sharded_folder_loads_every_network(folders, tmp_path):
  # diffusers' own fp16 + sharded layout for every network (*.fp16-0000k-of-0000n.safetensors listed
  # in *.safetensors.index.fp16.json): the fp32 folder's weights rounded to fp16, exactly.
  path, tpipe, pipe = folders
  copy.deepcopy(tpipe).to(torch.float16).save_pretrained(tmp_path, variant="fp16", max_shard_size="100KB")
  assert os.path.exists(tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json")
  assert os.path.exists(tmp_path / "text_encoder" / "model.safetensors.index.fp16.json")
  got = jaxsd.StableDiffusion.from_pretrained(str(tmp_path), variant="fp16")
  rounded = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), tree)
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), rounded(getattr(pipe, name)))
  with pytest.raises(FileNotFoundError, match="no network has weights of variant='bf16'"):
    jaxsd.StableDiffusion.from_pretrained(path, variant="bf16")
