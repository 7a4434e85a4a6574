"""Pipeline parity with diffusers' StableDiffusionPipeline on a tiny random model saved to disk."""

from __future__ import annotations

import copy
import json
import os
import warnings

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

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
  fn = pipe._jitted(True, "np", "text", True)
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


# img2img parity: each strength with a step count that keeps int(steps * strength) = 3 steps, so the
# strengths share one compiled program per sampler (the schedule is an argument of the program).
IMG2IMG = ((0.3, 10), (0.6, 5), (0.95, 4))
IMG2IMG_SD2 = ("ddim", "euler", "heun", "dpmpp_2m")


def scheduler(path, sampler):
  """The diffusers scheduler of `sampler`, from the folder's own config (the tests above change
  tpipe.scheduler, and a config taken from it would carry, e.g., use_karras_sigmas along)."""
  cls, kw = DETERMINISTIC[sampler]
  return cls.from_pretrained(path, subfolder="scheduler", **kw)


def _img2img_reference(monkeypatch, path, tpipe, sampler, strength, steps, image_latents, noise):
  """StableDiffusionImg2ImgPipeline given the image latents (4-channel `image`) and our noise (its
  `randn_tensor`, which draws img2img's noise, returns it)."""
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

  ref = diffusers.StableDiffusionImg2ImgPipeline(**tpipe.components)
  ref.set_progress_bar_config(disable=True)
  ref.scheduler = scheduler(path, sampler)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  with torch.no_grad():
    out = ref(PROMPTS, image=reference.nhwc_to_nchw(image_latents), strength=strength, num_inference_steps=steps,
              guidance_scale=7.5, negative_prompt=NEGATIVE, output_type="latent")
  return reference.nchw_to_nhwc(out.images)


def test_img2img_matches_diffusers(folders, monkeypatch):
  """Deterministic samplers at strengths 0.3, 0.6, 0.95: final latents as diffusers' img2img, given the
  same image latents and noise; one compiled program per sampler for the three strengths. Every sampler
  on the SD 1 (epsilon) folder; on the SD 2 (v) folder DDIM, Euler, Heun and DPM++ 2M, whose
  v-prediction steps the text-to-image parity tests cover for all of them (test time: each sampler is a
  compiled program). PNDM there reads the folder's DDIM config as diffusers does, without
  skip_prk_steps, so with its Runge-Kutta warm-up, which jaxsd refuses for img2img (not implemented)."""
  path, tpipe, pipe = folders
  sd2 = tpipe.scheduler.config.prediction_type == "v_prediction"
  noise = np.asarray(pipe.noise(4, len(PROMPTS), HW, HW))
  image_latents = np.asarray(pipe.noise(5, len(PROMPTS), HW, HW)) * 0.8
  worst = {}
  program = pipe._jitted(True, "latent", "img2img", False)
  if sd2:
    with pytest.raises(ValueError, match="Runge-Kutta"):
      pipe.img2img(PROMPTS, None, strength=0.6, steps=5, sampler="pndm", noise=noise, image_latents=image_latents)
  for sampler in (IMG2IMG_SD2 if sd2 else DETERMINISTIC):
    for strength, steps in IMG2IMG:
      ours = pipe.img2img(PROMPTS, None, strength=strength, negative_prompts=NEGATIVE, steps=steps, guidance_scale=7.5,
                          sampler=sampler, output="latent", noise=noise, image_latents=image_latents)
      if strength == IMG2IMG[0][0]:
        compiled = program._cache_size()
      ref = _img2img_reference(monkeypatch, path, tpipe, sampler, strength, steps, image_latents, noise)
      diff = np.abs(ours - ref).max()
      worst[sampler, strength] = diff
      assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"{sampler} at strength {strength}: max |diff| {diff}"
    # Same schedule length and shapes: the other strengths reused the first one's program.
    assert program._cache_size() == compiled, sampler
  print("img2img max |diff|:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_img2img_encodes_images_with_per_image_keys(folders):
  """Without image_latents, img2img encodes the images, sampling image i's posterior with
  posterior_keys(seed)[i]: the same as passing those latents (no new sampling program)."""
  path, tpipe, pipe = folders
  image = np.random.default_rng(1).integers(0, 256, (1, HW, HW, 3), dtype=np.uint8)
  images = np.concatenate([image, image])
  kw = dict(strength=0.6, negative_prompts=NEGATIVE, steps=5, guidance_scale=7.5, sampler="ddim", seed=3)
  latents = np.asarray(pipe._encoder()(pipe.vae_params, images.astype(np.float32) / 255, pipe.posterior_keys(3, 2)))
  assert np.abs(latents[0] - latents[1]).max() > 0.01  # one image twice: two posterior samples, not the mean
  ours = pipe.img2img(PROMPTS, images, output="latent", **kw)
  given = pipe.img2img(PROMPTS, None, output="latent", image_latents=latents, **kw)
  np.testing.assert_allclose(ours, given, atol=1e-6)


def _masks():
  """Two masks: a white (repaint) block, and a white left half; 16x16 uint8."""
  masks = np.zeros((2, HW, HW), np.uint8)
  masks[0, 4:12, 8:16] = 255
  masks[1, :, :HW // 2] = 255
  return masks


def test_inpaint_latent_blend_matches_diffusers(folders, monkeypatch):
  """A 4-channel U-Net inpaints by re-noising the known region after every step: final latents as
  diffusers' StableDiffusionInpaintPipeline, given the same image latents and noise (SD1: Heun from pure
  noise; SD2-v: DPM++ 2M from the image noised at strength 0.7)."""
  path, tpipe, pipe = folders
  sd2 = pipe.scheduler_config.prediction_type == "v_prediction"
  sampler, strength, steps = ("dpmpp_2m", 0.7, 5) if sd2 else ("heun", 1.0, 4)
  images = np.random.default_rng(0).integers(0, 256, (2, HW, HW, 3), dtype=np.uint8)
  noise = np.asarray(pipe.noise(6, 2, HW, HW))
  image_latents = np.asarray(pipe.noise(7, 2, HW, HW)) * 0.8
  ours = pipe.inpaint(PROMPTS, images, _masks(), strength=strength, negative_prompts=NEGATIVE, steps=steps,
                      guidance_scale=7.5, sampler=sampler, output="latent", latents=noise, image_latents=image_latents)
  ref = reference.inpaint_reference(monkeypatch, tpipe.components, scheduler(path, sampler), PROMPTS, NEGATIVE,
                                    [Image.fromarray(m) for m in _masks()], image_latents, noise, image_latents,
                                    strength, steps)
  diff = np.abs(ours - ref).max()
  print(f"inpaint (4-channel blend) {sampler} strength {strength}: max |diff| {diff:.2e}")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"max |diff| {diff}"
  # The known region ends as the image's own latents (the last blend is with the clean latents).
  f = pipe.vae.config.downsampling_factor
  keep = 1 - _masks()[:, ::f, ::f, None] / 255
  np.testing.assert_allclose(ours * keep, image_latents * keep, atol=1e-5)
  with pytest.raises(ValueError, match="9-channel inpainting U-Nets"):
    pipe.inpaint(PROMPTS, images, _masks(), steps=2, sampler="ddim", masked_image_latents=image_latents)


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
  with warnings.catch_warnings():  # numpy's overflow casting 1e39 to float32 printed a RuntimeWarning first
    warnings.simplefilter("error")
    with pytest.raises(ValueError, match="guidance_scale=1e"):
      pipe(PROMPTS, height=HW, width=HW, steps=2, guidance_scale=1e39)
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


def test_seeds_are_64_bit_and_negative_ones_are_refused():
  """Seeds below 2**32 draw the keys they always did; larger ones (torch takes 64-bit seeds) no longer wrap
  around onto them (2**32 drew seed 0's images, -1 seed 4294967295's, 2**63 crashed)."""
  import jax.numpy as jnp

  keys = lambda seed: np.asarray(jax.random.key_data(jaxsd.StableDiffusion.image_keys(seed, 2)))
  old = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(2))
  np.testing.assert_array_equal(keys(5), np.asarray(jax.random.key_data(old)))
  drawn = [keys(s).tobytes() for s in (0, 2**32 - 1, 2**32, 2**33, 2**63, 2**64 - 1)]
  assert len(set(drawn)) == len(drawn)
  for bad in (-1, 2**64, 1.5):
    with pytest.raises(ValueError, match=r"use a whole number in \[0, 2\*\*64\)"):
      jaxsd.StableDiffusion.image_keys(bad, 1)


def test_sizes_the_unet_does_not_halve_evenly_match_diffusers(tmp_path):
  """Height and width need only be multiples of the VAE's factor, as in diffusers: a 4-level U-Net (factor 8)
  behind a factor-2 VAE at 24x40 px (latents 12x20 -> 6x10 -> 3x5 -> 2x3, upsampled back to each skip's
  size) used to be refused as not a multiple of 16."""
  import diffusers

  _, vae, text_encoder, tokenizer, scheduler = reference.tiny_components()
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(32, 32, 32, 32),
                                        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 3,
                                        up_block_types=("UpBlock2D",) * 3 + ("CrossAttnUpBlock2D",),
                                        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4).eval()
  path = str(tmp_path / "deep")
  diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(path)
  pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(path), reference.torch_pipeline(path)
  h, w = 24, 40
  latents = np.asarray(pipe.noise(0, len(PROMPTS), h, w))
  ours = pipe(PROMPTS, NEGATIVE, height=h, width=w, steps=3, guidance_scale=5.0, sampler="ddim", latents=latents,
              output="latent")
  cls, kw = DETERMINISTIC["ddim"]
  tpipe.scheduler = cls.from_config(tpipe.scheduler.config, **kw)
  with torch.no_grad():
    ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=h, width=w, num_inference_steps=3, guidance_scale=5.0,
                latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  ref = reference.nchw_to_nhwc(ref)
  assert ours.shape == ref.shape == (len(PROMPTS), 12, 20, 4)
  assert np.abs(ours - ref).max() < 3e-4 * max(1.0, np.abs(ref).max())
  with pytest.raises(ValueError, match="height=20 must be a positive multiple of 8"):
    pipe(PROMPTS, height=20, width=w, steps=2)


def _folder_with(path, scheduler=None, unet_updates=None, index_updates=None) -> str:
  """The tiny SD 1 folder saved by diffusers, with another scheduler, U-Net config keys or model_index entries."""
  unet, vae, text_encoder, tokenizer, own = reference.tiny_components()
  if unet_updates:
    state = unet.state_dict()
    unet = diffusers.UNet2DConditionModel.from_config({**unet.config, **unet_updates}).eval()
    if all(v.shape == state[k].shape for k, v in unet.state_dict().items()):
      unet.load_state_dict(state)  # the same weights; else (other widths) a random U-Net
  diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    scheduler=scheduler or own, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(path)
  if index_updates:
    index = os.path.join(path, "model_index.json")
    with open(index) as f:
      d = json.load(f)
    d.update(index_updates)
    with open(index, "w") as f:
      json.dump(d, f)
  return str(path)


def test_a_folders_own_scheduler_is_the_default_as_in_diffusers(tmp_path):
  """With no sampler given, the folder's scheduler runs (diffusers runs the folder's; jaxsd ran PNDM): an Euler
  folder (SD-Turbo-like, trailing spacing), and a model_index.json naming DDIM over a PNDM scheduler_config.json
  (diffusers builds the index's class, with clip_sample forced off), and a UniPC folder, whose steps_offset=0 is
  forced to 1 as StableDiffusionPipeline forces it on any config that has the key."""
  base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  cases = [
      (_folder_with(tmp_path / "euler", diffusers.EulerDiscreteScheduler(timestep_spacing="trailing",
                                                                         **base)), "euler"),
      (_folder_with(tmp_path / "ddim_index", index_updates={"scheduler": ["diffusers", "DDIMScheduler"]}), "ddim"),
      (_folder_with(tmp_path / "unipc", diffusers.UniPCMultistepScheduler(steps_offset=0, **base)), "unipc"),
  ]
  for path, sampler in cases:
    pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(path), reference.torch_pipeline(path)
    assert pipe.default_sampler == sampler and type(tpipe.scheduler).__name__.lower().startswith(sampler)
    latents = _latents(pipe)
    ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=4, latents=latents, output="latent")
    with torch.no_grad():
      ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=4,
                  latents=reference.nhwc_to_nchw(latents), output_type="latent").images
    ref = reference.nchw_to_nhwc(ref)
    assert np.abs(ours - ref).max() < 3e-4 * max(1.0, np.abs(ref).max()), sampler
  assert tpipe.scheduler.config.steps_offset == 1 and pipe.scheduler_config.steps_offset == 1  # (the UniPC folder)


def test_save_pretrained_keeps_the_folders_pipeline_and_scheduler_classes(tmp_path):
  """A folder jaxsd saves names the pipeline and scheduler classes of the one it came from in model_index.json,
  which is what diffusers builds (jaxsd wrote StableDiffusionPipeline and PNDMScheduler whatever the folder was:
  a saved Euler or LCM folder came back as PNDM), so it reloads with the same default sampler in jaxsd and the same
  classes in diffusers; a Flax prefix is dropped (the weights written are PyTorch's)."""
  base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  unet, vae, text_encoder, tokenizer, _ = reference.tiny_components(seed=6, time_cond_proj_dim=32)
  diffusers.LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=diffusers.LCMScheduler(**base), safety_checker=None,
                                           feature_extractor=None,
                                           requires_safety_checker=False).save_pretrained(tmp_path / "lcm")
  flax_index = {"_class_name": "FlaxStableDiffusionPipeline", "scheduler": ["diffusers", "FlaxDDIMScheduler"]}
  # A ControlNet pipeline's folder loaded as SD (its controlnet/ not read) is saved as a StableDiffusionPipeline's:
  # its own class would name a controlnet the saved folder does not have.
  control_index = {"_class_name": "StableDiffusionControlNetPipeline", "controlnet": ["diffusers", "ControlNetModel"]}
  cases = [
      (_folder_with(tmp_path / "euler", diffusers.EulerDiscreteScheduler(**base)), "StableDiffusionPipeline",
       "EulerDiscreteScheduler", "euler"),
      (_folder_with(tmp_path / "flax", index_updates=flax_index), "StableDiffusionPipeline", "DDIMScheduler", "ddim"),
      (_folder_with(tmp_path / "control",
                    index_updates=control_index), "StableDiffusionPipeline", "PNDMScheduler", "pndm"),
      (str(tmp_path / "lcm"), "LatentConsistencyModelPipeline", "LCMScheduler", "lcm"),
  ]
  for path, pipeline_class, scheduler_class, sampler in cases:
    pipe = jaxsd.StableDiffusion.from_pretrained(path)
    out = path + "_saved"
    pipe.save_pretrained(out)
    with open(os.path.join(out, "model_index.json")) as f:
      index = json.load(f)
    assert (index["_class_name"], index["scheduler"]) == (pipeline_class, ["diffusers", scheduler_class]), path
    again = jaxsd.StableDiffusion.from_pretrained(out)
    assert again.default_sampler == pipe.default_sampler == sampler
    assert again.lcm_img2img == pipe.lcm_img2img == (sampler == "lcm")
    tpipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert (type(tpipe).__name__, type(tpipe.scheduler).__name__) == (pipeline_class, scheduler_class)


def test_a_dpm_sde_folder_samples_with_dpmpp_2m_sde_by_default(tmp_path):
  """A folder whose DPMSolverMultistepScheduler says algorithm_type="sde-dpmsolver++" (diffusers runs DPM++ 2M SDE)
  defaulted to dpmpp_2m, which refuses that config: every call without a sampler failed."""
  path = _folder_with(
      tmp_path / "sde",
      diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                                            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  assert pipe.default_sampler == "dpmpp_2m_sde"
  kw = dict(height=HW, width=HW, steps=3, seed=2, output="latent")
  np.testing.assert_array_equal(pipe(PROMPTS[:1], **kw), pipe(PROMPTS[:1], sampler="dpmpp_2m_sde", **kw))


def test_folders_that_describe_themselves_otherwise(tmp_path):
  """U-Net configs diffusers accepts: sample_size as [height, width] (the default size), cross_attention_dim per
  block; parts of different models and an SDXL folder are refused in one line naming the folder."""
  rect = _folder_with(tmp_path / "rect", unet_updates={"sample_size": [8, 12], "cross_attention_dim": [32, 32]})
  pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(rect), reference.torch_pipeline(rect)
  assert pipe.default_hw == (16, 24)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), 16, 24))
  ours = pipe(PROMPTS, NEGATIVE, steps=3, latents=latents, sampler="pndm", output="latent")
  with torch.no_grad():
    ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3, latents=reference.nhwc_to_nchw(latents),
                output_type="latent").images
  assert ours.shape == (2, 8, 12, 4)
  np.testing.assert_allclose(ours, reference.nchw_to_nhwc(ref), atol=3e-4 * max(1.0, float(ref.abs().max())))
  mixed = _folder_with(tmp_path / "mixed", unet_updates={"cross_attention_dim": 48})
  with pytest.raises(ValueError, match=r"mixed: the U-Net's cross_attention_dim=48 but the text encoder's hidden_size"):
    jaxsd.StableDiffusion.from_pretrained(mixed)
  with open(os.path.join(rect, "model_index.json")) as f:
    index = json.load(f)
  with open(os.path.join(rect, "model_index.json"), "w") as f:
    json.dump({**index, "_class_name": "StableDiffusionXLPipeline"}, f)
  with pytest.raises(ValueError, match="is an SDXL folder: load it with jaxsd.StableDiffusionXL.from_pretrained"):
    jaxsd.StableDiffusion.from_pretrained(rect)


def test_prompts_take_the_tokenizers_length(tmp_path):
  """diffusers pads and truncates prompts to the tokenizer's model_max_length (here 64 of the encoder's 77
  positions); jaxsd took the encoder's 77."""
  path = _folder_with(tmp_path / "short")
  config = os.path.join(path, "tokenizer", "tokenizer_config.json")
  with open(config) as f:
    d = json.load(f)
  with open(config, "w") as f:
    json.dump({**d, "model_max_length": 64}, f)
  pipe, tpipe = jaxsd.StableDiffusion.from_pretrained(path), reference.torch_pipeline(path)
  assert pipe.text_length == tpipe.tokenizer.model_max_length == 64 and pipe.tokenize(["a"]).shape == (1, 64)
  latents = _latents(pipe)
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=3, sampler="pndm", latents=latents, output="latent")
  with torch.no_grad():
    ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=3,
                latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  ref = reference.nchw_to_nhwc(ref)
  assert np.abs(ours - ref).max() < 3e-4 * max(1.0, np.abs(ref).max())


def test_guidance_embedding_unet_matches_diffusers(tmp_path):
  """An LCM-distilled U-Net (time_cond_proj_dim) takes the guidance scale as an input: diffusers' pipelines run no
  classifier-free guidance then (one U-Net half, negative prompts unused) and pass the scale's embedding as
  timestep_cond. Latents against diffusers at two scales."""
  path = reference.make_tiny_sd_folder(str(tmp_path / "lcm"), time_cond_proj_dim=16)
  tpipe, pipe = reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)
  assert pipe.guidance_embedded and not pipe.guided(8.0)
  latents = _latents(pipe, seed=2)
  outs = []
  for guidance in (8.0, 2.0):
    ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=4, guidance_scale=guidance, sampler="ddim",
                latents=latents, output="latent")
    ref = reference.nchw_to_nhwc(_torch_run(tpipe, "ddim", latents, 4, guidance, "latent"))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))
    outs.append(ours)
  assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the scale reaches the U-Net
  assert not any(k[0] for k in pipe._compiled if isinstance(k, tuple))  # no guided (two-half) program ran


def test_lcm_folder_matches_diffusers_latent_consistency_pipeline(tmp_path, monkeypatch):
  """A folder laid out as SimianLuo/LCM_Dreamshaper_v7 (LatentConsistencyModelPipeline: an LCM-distilled U-Net with
  time_cond_proj_dim, LCMScheduler) samples with `lcm` by default and matches diffusers' LatentConsistencyModelPipeline
  (4 steps, guidance 8.5 through the embedding; its per-step noise is ours, fed to diffusers' randn_tensor)."""
  from diffusers.schedulers import scheduling_lcm

  from jaxsd.diffusion import samplers

  unet, vae, text_encoder, tokenizer, _ = reference.tiny_components(seed=6, time_cond_proj_dim=32)
  scheduler = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     original_inference_steps=50, set_alpha_to_one=True, steps_offset=1,
                                     timestep_spacing="leading", clip_sample=False)
  tpipe = diffusers.LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
  tpipe.set_progress_bar_config(disable=True)
  tpipe.save_pretrained(tmp_path / "lcm")
  pipe = jaxsd.StableDiffusion.from_pretrained(str(tmp_path / "lcm"))
  assert pipe.default_sampler == "lcm" and pipe.guidance_embedded
  latents = _latents(pipe, seed=4)
  ours = pipe(PROMPTS, height=HW, width=HW, steps=4, guidance_scale=8.5, seed=4, latents=latents, output="latent")
  schedule = samplers.make_schedule(pipe.scheduler_config, "lcm", 4)
  keys = pipe.sampler_keys(4, len(PROMPTS))
  draws = [reference.nhwc_to_nchw(samplers.step_noise(schedule, i, latents, keys)) for i in range(4)]
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: draws.pop(0))
  with torch.no_grad():
    ref = tpipe(PROMPTS, height=HW, width=HW, num_inference_steps=4, guidance_scale=8.5,
                latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  assert len(draws) == 1  # diffusers draws no noise after the last step, as jaxsd
  ref = reference.nchw_to_nhwc(ref)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))
  # python -m sample's defaults for such a folder, as diffusers' LatentConsistencyModelPipeline: 4 steps, guidance 8.5.
  from jaxsd import generate
  got = generate.generate(pipe, PROMPTS[:1], height=HW, width=HW, seed=7, progress=False,
                          devices=jax.local_devices()[:1]).images
  want = pipe(PROMPTS[:1], height=HW, width=HW, steps=4, guidance_scale=8.5, seed=7, sampler="lcm")
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  other = pipe(PROMPTS[:1], height=HW, width=HW, steps=5, guidance_scale=8.5, seed=7, sampler="lcm")
  assert np.abs(other.astype(int) - want.astype(int)).max() > 1
  other = pipe(PROMPTS[:1], height=HW, width=HW, steps=4, guidance_scale=7.5, seed=7, sampler="lcm")
  assert np.abs(other.astype(int) - want.astype(int)).max() > 1
