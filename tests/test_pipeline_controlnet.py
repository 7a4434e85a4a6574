"""ControlNet pipeline parity with diffusers' StableDiffusionControlNetPipeline (one ControlNet and two) on a
tiny random SD 1 folder and tiny random ControlNets saved by diffusers, the same initial latents passed in."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import jaxsd
from tests import reference
from tests.test_pipeline import DETERMINISTIC

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW = 16


def _controlnet(unet, seed):
  """A ControlNet from the U-Net's encoder (diffusers' from_unet), its conditioning embedding downsampling
  by 2 as the tiny VAE does, every weight perturbed (the zero convolutions would hide everything)."""
  net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return net.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("controlnet")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  tpipe = reference.torch_pipeline(path)
  nets = [_controlnet(tpipe.unet, seed) for seed in (10, 11)]
  folders = []
  for i, net in enumerate(nets):
    folders.append(str(root / f"cn{i}"))
    net.save_pretrained(folders[-1])
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  return path, tpipe, nets, pipe.with_controlnet(folders[0]), pipe.with_controlnet(folders)


def _images(seed):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (HW, HW, 3), dtype=np.uint8)) for _ in PROMPTS]


def _reference(path, tpipe, nets, sampler, latents, images, guidance=7.5, **kw):
  cls, skw = DETERMINISTIC[sampler]
  ref = diffusers.StableDiffusionControlNetPipeline(vae=tpipe.vae, text_encoder=tpipe.text_encoder,
                                                    tokenizer=tpipe.tokenizer, unet=tpipe.unet,
                                                    controlnet=nets if len(nets) > 1 else nets[0],
                                                    scheduler=cls.from_pretrained(path, subfolder="scheduler",
                                                                                  **skw), safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
  return run_reference(ref, latents, images, NEGATIVE, guidance, **kw)


def run_reference(ref, latents, images, negative, guidance, **kw) -> np.ndarray:
  """A diffusers ControlNet pipeline's final latents (NHWC) for PROMPTS at HW, 4 steps, from `latents`."""
  ref.set_progress_bar_config(disable=True)
  with torch.no_grad():
    out = ref(PROMPTS, image=images, negative_prompt=negative, height=HW, width=HW, num_inference_steps=4,
              guidance_scale=guidance, latents=reference.nhwc_to_nchw(latents), output_type="latent", **kw)
  return reference.nchw_to_nhwc(out.images)


def _check(ours, ref, what):
  diff = np.abs(ours - ref).max()
  print(f"{what}: max |diff| {diff:.1e}")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"{what}: max |diff| {diff}"


def test_one_controlnet_matches_diffusers_and_scales_compile_nothing(models):
  """DDIM, one ControlNet: several scales and control_guidance_start/end against diffusers, all in one
  compiled program; the ControlNet changes the result."""
  path, tpipe, nets, pipe, _ = models
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  images = _images(0)
  program = pipe._jitted(True, "latent", "text", True)
  for kw in (dict(controlnet_conditioning_scale=0.8),
             dict(controlnet_conditioning_scale=1.3, control_guidance_start=0.25, control_guidance_end=0.75)):
    ours = pipe(PROMPTS, images, NEGATIVE, steps=4, sampler="ddim", latents=latents, output="latent", **kw)
    _check(ours, _reference(path, tpipe, nets[:1], "ddim", latents, images, **kw), f"ddim {kw}")
  off = pipe(PROMPTS, images, NEGATIVE, steps=4, sampler="ddim", latents=latents, output="latent",
             controlnet_conditioning_scale=0.0)
  assert program._cache_size() == 1
  assert np.abs(ours - off).max() > 1e-2


def test_two_controlnets_match_diffusers_multicontrolnet(models):
  """Heun (two model calls per step: keep is per call, as diffusers), two ControlNets with their own scales
  and guidance windows, residuals summed."""
  path, tpipe, nets, _, multi = models
  latents = np.asarray(multi.noise(1, len(PROMPTS), HW, HW))
  images = [list(pair) for pair in zip(_images(1), _images(2))]  # diffusers' nesting: per prompt, per ControlNet
  kw = dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.3],
            control_guidance_end=[0.6, 1.0])
  ours = multi(PROMPTS, images, NEGATIVE, steps=4, sampler="heun", latents=latents, output="latent", **kw)
  _check(ours, _reference(path, tpipe, nets, "heun", latents, images, **kw), "heun, two ControlNets")
  batches = [np.stack([np.asarray(im) for im in _images(seed)]) for seed in (1, 2)]  # one array per ControlNet
  per_controlnet = multi(PROMPTS, batches, NEGATIVE, steps=4, sampler="heun", latents=latents, output="latent", **kw)
  np.testing.assert_array_equal(per_controlnet, ours)


def test_guess_mode_matches_diffusers(models):
  """Guess mode under guidance: residuals 0.1x..1x, the unconditional half unsteered (Euler); and without
  guidance, where only the scaling changes."""
  path, tpipe, nets, pipe, _ = models
  latents = np.asarray(pipe.noise(2, len(PROMPTS), HW, HW))
  images = _images(3)
  for guidance in (5.0, 1.0):
    ours = pipe(PROMPTS, images, NEGATIVE, steps=4, guidance_scale=guidance, sampler="euler", latents=latents,
                output="latent", guess_mode=True, controlnet_conditioning_scale=0.9)
    ref = _reference(path, tpipe, nets[:1], "euler", latents, images, guidance=guidance, guess_mode=True,
                     controlnet_conditioning_scale=0.9)
    _check(ours, ref, f"euler, guess mode, guidance {guidance}")


def test_uint8_images_and_one_image_for_the_batch(models):
  """A uint8 array is the same as the PIL images; one image serves every prompt; size from the image."""
  path, tpipe, nets, pipe, _ = models
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  images = _images(0)
  kw = dict(steps=4, sampler="ddim", latents=latents, output="latent", controlnet_conditioning_scale=0.8)
  from_pil = pipe(PROMPTS, [images[0]] * 2, NEGATIVE, **kw)
  from_array = pipe(PROMPTS, np.asarray(images[0]), NEGATIVE, **kw)
  np.testing.assert_allclose(from_array, from_pil, atol=1e-6)


@pytest.mark.parametrize("images, kw, match", [
    (lambda im: im, {}, "not a list of entries for 2 ControlNets"),
    (lambda im: [im], {}, "1 entries for 2 ControlNets"),
    (lambda im: [[im, im, im]], {}, "one list per prompt"),
    (lambda im: [im, im], dict(controlnet_conditioning_scale=[1.0]), "1 values for 2 ControlNets"),
    (lambda im: [im, im], dict(control_guidance_start=0.5, control_guidance_end=0.5), "start < end"),
    (lambda im: [im, im], dict(control_guidance_end=[1.0, 1.2]), "start < end <= 1"),
    (lambda im: [im, np.stack([np.asarray(im)] * 3)], {}, "3 control images for ControlNet 1 and 2 prompts"),
    (lambda im: [im, np.zeros((2, 8, 8, 3), np.uint8)], {}, "output's size"),
    (lambda im: [im.resize((HW, 20)), im], {}, r"the control image is 16x20 pixels \(WxH\) and sets the output size"),
])
def test_bad_input_is_refused_before_compiling(models, images, kw, match):
  *_, multi = models
  sizes = lambda: {k: f._cache_size() for k, f in multi._compiled.items()}
  before = sizes()
  with pytest.raises(ValueError, match=match):
    multi(PROMPTS, images(_images(0)[0]), steps=2, **kw)
  assert sizes() == before


def test_a_controlnet_for_another_model_is_refused(models, tmp_path):
  path, tpipe, *_ = models
  other = diffusers.ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8,
                                    conditioning_embedding_out_channels=(8, 16),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
  other.save_pretrained(tmp_path / "other")
  with pytest.raises(ValueError, match="does not match the U-Net"):
    jaxsd.StableDiffusion.from_pretrained(path).with_controlnet(str(tmp_path / "other"))


def test_swap_unet_on_a_controlnet_pipeline_checks_the_controlnets(models, tmp_path):
  """swap_unet on a ControlNet pipeline took a U-Net the ControlNet cannot steer (another layers_per_block) and the
  next call failed while tracing; now it is refused at the swap, naming the file, and the pipeline keeps its U-Net."""
  _, _, _, pipe, _ = models
  diffusers.UNet2DConditionModel(sample_size=8, layers_per_block=2, block_out_channels=(32, 64),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 norm_num_groups=8, attention_head_dim=4).save_pretrained(tmp_path / "deep")
  unet, params = pipe.unet, pipe.unet_params
  with pytest.raises(ValueError, match="deep: ControlNet 0 .* does not match the U-Net's"):
    pipe.swap_unet(str(tmp_path / "deep"))
  assert pipe.unet is unet and pipe.unet_params is params


def test_module_and_params_pairs_are_taken_as_they_are(models, tmp_path):
  path, tpipe, nets, pipe, _ = models
  nets[0].save_pretrained(tmp_path / "cn")
  pair = jaxsd.load_controlnet(str(tmp_path / "cn"))
  steered = jaxsd.StableDiffusion.from_pretrained(path).with_controlnet([pair, str(tmp_path / "cn")])
  assert steered.controlnets[0] is pair[0] and steered.controlnet_params[0] is pair[1]
  assert steered.controlnets[1].config == pair[0].config


def test_sd2_folder_matches_diffusers(tmp_path):
  """SD 2 layout (v-prediction, linear projections, upcast attention, heads per block): DPM++ 2M."""
  path = reference.make_tiny_sd_folder(str(tmp_path / "sd2"), sd2=True)
  tpipe = reference.torch_pipeline(path)
  net = _controlnet(tpipe.unet, 12)
  net.save_pretrained(tmp_path / "cn")
  pipe = jaxsd.StableDiffusion.from_pretrained(path).with_controlnet(str(tmp_path / "cn"))
  latents = np.asarray(pipe.noise(4, len(PROMPTS), HW, HW))
  images = _images(4)
  kw = dict(controlnet_conditioning_scale=0.9, control_guidance_end=0.8)
  ours = pipe(PROMPTS, images, NEGATIVE, steps=4, sampler="dpmpp_2m", latents=latents, output="latent", **kw)
  _check(ours, _reference(path, tpipe, [net], "dpmpp_2m", latents, images, **kw), "sd2 dpmpp_2m")
