"""IP-Adapter attention masks (`ip_adapter_masks=`) against diffusers' `IPAdapterMaskProcessor` +
`cross_attention_kwargs={"ip_adapter_masks": ...}` on the tiny models of tests/test_ip_adapter.py: one adapter with
two images in the left and right halves, two adapters with a mask each, SDXL, and the checks around them."""

from __future__ import annotations

import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

import jaxsd
from jaxsd.models import mask_downsample, transformer
from tests import reference
from tests.test_ip_adapter import (NEGATIVE, PROMPTS, WEIGHT, _euler, _images, _one_line, _two_adapter_folder,
                                   make_adapter_folder)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("ip_masks_sd")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  tpipe = reference.torch_pipeline(path)
  adapter = make_adapter_folder(str(root / "adapter"), tpipe.unet)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT, image_encoder_folder="image_encoder")
  tpipe.scheduler = _euler(path)
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(adapter, weight_name=WEIGHT)
  return path, adapter, tpipe, pipe


def _halves(height: int, width: int, size_factor: int = 3) -> list:
  """Left and right masks as PIL images `size_factor` times the picture's size (the Lanczos resize acts), the left
  one an ellipse, the right one a rectangle."""
  h, w = height * size_factor, width * size_factor
  y, x = np.mgrid[:h, :w]
  left = ((x - w / 4) / (w / 4))**2 + ((y - h / 2) / (h / 2.5))**2 <= 1
  right = (x >= w // 2) & (y >= h // 6)
  return [Image.fromarray((m * 255).astype(np.uint8)) for m in (left, right)]


def _diffusers(tpipe, latents, height: int, width: int, masks=None, guidance: float = 7.5, negative=NEGATIVE, **kw):
  extra = {} if masks is None else {"cross_attention_kwargs": {"ip_adapter_masks": masks}}
  with torch.no_grad():
    out = tpipe(PROMPTS, negative_prompt=negative, height=height, width=width, num_inference_steps=3,
                guidance_scale=guidance, latents=reference.nhwc_to_nchw(latents), output_type="latent", **extra, **kw)
  return reference.nchw_to_nhwc(out.images)


def _ours(pipe, latents, guidance: float = 7.5, negative=NEGATIVE, **kw):
  return pipe(PROMPTS, negative, steps=3, guidance_scale=guidance, sampler="euler", latents=latents, output="latent",
              **kw)


def test_one_adapter_two_images_in_two_halves_matches_diffusers(sd):
  """diffusers' documented use: ip_adapter_image=[[face1, face2]] with a mask each (left, right) and per-image scales
  [[0.7, 0.4]], on a 16x24 picture (queries 8x12 and 4x6), PIL masks at 3x the size (Lanczos, binarised, as
  IPAdapterMaskProcessor). New masks of the same size compile nothing, and act."""
  _, _, tpipe, pipe = sd
  images = _images(2, seed=41)
  latents = np.asarray(pipe.noise(11, 2, 16, 24))
  masks = _halves(16, 24)
  processed = IPAdapterMaskProcessor().preprocess(masks, height=16, width=24)  # (2, 1, 16, 24)
  for p in (tpipe, pipe):
    p.set_ip_adapter_scale([[0.7, 0.4]])
  try:
    ref = _diffusers(tpipe, latents, 16, 24, [processed.reshape(1, 2, 16, 24)], ip_adapter_image=[images])
    ours = _ours(pipe, latents, ip_adapter_image=[images], ip_adapter_masks=masks)
    reference.check_close(ours, ref, "one adapter, two images in two halves (PIL masks)")
    program = pipe._jitted(True, "latent", "text", True)
    traces = program._cache_size()
    swapped = _ours(pipe, latents, ip_adapter_image=[images], ip_adapter_masks=[masks[::-1]])
    assert program._cache_size() == traces  # the masks are an input
    assert np.abs(swapped - ours).max() > 1e-2 * np.abs(ours).max()
  finally:
    for p in (tpipe, pipe):
      p.set_ip_adapter_scale(1.0)


def test_two_adapters_with_a_mask_each_match_diffusers(sd, tmp_path):
  """A plain and a Plus adapter (tests/test_ip_adapter.py's pair), each with its image and mask, on a 16x24 picture:
  diffusers' (adapters, 1, H, W) tensor as IPAdapterMaskProcessor gives it, jaxsd from the PIL masks and from that
  array; masks of ones are no masks; the second adapter unmasked (None) and the first's mask square, in diffusers'
  layout (its rounding for 8x12 queries: 10x9, padded to 96; 4x6 ones: 4x6)."""
  path, adapter, _, _ = sd
  tpipe = reference.torch_pipeline(path)
  folder, names = _two_adapter_folder(adapter, tpipe.unet, tmp_path / "two")
  tpipe.load_ip_adapter(str(folder), subfolder="", weight_name=names)
  tpipe.set_ip_adapter_scale([0.8, 0.6])
  tpipe.scheduler = _euler(path)
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(folder, weight_name=names, scale=[0.8, 0.6])
  images = _images(2, seed=43)
  latents = np.asarray(pipe.noise(12, 2, 16, 24))
  masks = _halves(16, 24)
  processed = IPAdapterMaskProcessor().preprocess(masks, height=16, width=24)
  ref = _diffusers(tpipe, latents, 16, 24, processed, ip_adapter_image=images)
  ours = _ours(pipe, latents, ip_adapter_image=images, ip_adapter_masks=masks)
  reference.check_close(ours, ref, "two adapters, a mask each (PIL)")
  layout = _ours(pipe, latents, ip_adapter_image=images, ip_adapter_masks=processed.numpy())
  np.testing.assert_array_equal(layout, ours)
  ones = _ours(pipe, latents, ip_adapter_image=images, ip_adapter_masks=[np.ones((16, 24))] * 2)  # (no compile)
  reference.check_close(ones, _diffusers(tpipe, latents, 16, 24, ip_adapter_image=images),
                        "two adapters, masks of ones vs no masks")
  square = IPAdapterMaskProcessor().preprocess(_halves(16, 16)[:1], height=16, width=16)
  with pytest.warns(UserWarning, match="aspect ratio of the mask"):
    one = _ours(pipe, latents, ip_adapter_image=images, ip_adapter_masks=[square.numpy(), None])
  reference.check_close(one, _diffusers(tpipe, latents, 16, 24, [square, None], ip_adapter_image=images),
                        "two adapters, a square mask on 16x24 and None")


def test_sdxl_mask_matches_diffusers(tmp_path):
  """StableDiffusionXLPipeline, one adapter, one image in the left half, scale 0.8 under guidance, on a 16x24
  picture with diffusers' square (1, 1, 16, 16) layout (the tiny U-Net's attentions have 4x6 queries)."""
  base, _, _ = reference.make_tiny_sdxl_folders(str(tmp_path))
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
  tpipe.set_progress_bar_config(disable=True)
  adapter = make_adapter_folder(str(tmp_path / "adapter"), tpipe.unet, seed=1)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT, image_encoder_folder="image_encoder")
  tpipe.set_ip_adapter_scale(0.8)
  tpipe.scheduler = _euler(base)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base)
  pipe.load_ip_adapter(adapter, weight_name=WEIGHT, scale=0.8)
  image = _images(1, seed=45)[0]
  latents = np.asarray(pipe.noise(13, 2, 16, 24))
  processed = IPAdapterMaskProcessor().preprocess(_halves(16, 16)[:1], height=16, width=16)
  ref = _diffusers(tpipe, latents, 16, 24, [processed], guidance=5.0, negative=None, ip_adapter_image=image)
  ours = _ours(pipe, latents, guidance=5.0, negative=None, ip_adapter_image=image, ip_adapter_masks=[processed.numpy()])
  reference.check_close(ours, ref, "SDXL, one image in the left half, a square mask on 16x24")


def test_all_ones_is_no_mask_and_a_mask_acts():
  """One cross-attention (a 4x6 query grid, one image of 4 tokens at scale 0.7): a mask of ones is no mask (within
  float noise); a half mask changes the output. (In the pipelines: `test_two_adapters_with_a_mask_each_...`.)"""
  attn = transformer.Attention(heads=2, dim_head=8)
  rng = np.random.default_rng(0)
  x, text, tokens = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 24, 16), (2, 7, 16), (2, 4, 16)))
  prompt = lambda masks=None: transformer.ImagePrompt(text, tokens, jnp.float32(0.7), masks)  # noqa: E731
  params = attn.init(jax.random.key(0), x, text, prompt())
  plain = attn.apply(params, x, text, prompt())
  ones = attn.apply(params, x, text, prompt(jnp.ones((1, 4, 6))))
  half = attn.apply(params, x, text, prompt(jnp.ones((1, 4, 6)).at[:, :, 3:].set(0)))
  print(f"attention, ones vs no mask: {np.abs(ones - plain).max():.1e}; a half mask: {np.abs(half - plain).max():.1e}")
  assert np.abs(ones - plain).max() <= 1e-6 * np.abs(plain).max()
  assert np.abs(half - plain).max() > 1e-2 * np.abs(plain).max()
  np.testing.assert_allclose(np.asarray(mask_downsample.downsample(jnp.ones((1, 16, 24)), 96)), 1, atol=1e-6)


def test_masks_that_do_not_fit_are_refused_in_one_line_before_compiling(sd):
  _, _, _, pipe = sd
  images = _images(2, seed=49)
  masks = _halves(16, 16)
  latents = np.asarray(pipe.noise(15, 2, 16, 16))
  program = pipe._jitted(True, "latent", "text", True)
  traces = program._cache_size()
  cases = [
      (dict(ip_adapter_image=[images], ip_adapter_masks=masks[:1]), "1 mask for 2 images of IP-Adapter 0"),
      (dict(ip_adapter_image=images[0], ip_adapter_masks=[masks]), "2 masks for 1 image of IP-Adapter 0"),
      (dict(ip_adapter_image=images[0], ip_adapter_masks=np.ones((2, 1, 1, 16, 16))), "must be single-channel"),
      (dict(ip_adapter_image=images[0], ip_adapter_masks=[np.ones((2, 1, 16, 16))]), "has shape \\(2, 1, 16, 16\\)"),
      (dict(ip_adapter_image=images[0], ip_adapter_masks=np.full((16, 16), 3.0)), "values from 3 to 3"),
      (dict(ip_adapter_image=images[0], ip_adapter_masks=[np.full((1, 1, 16, 16), np.nan)]), "not all finite"),
      (dict(ip_adapter_image=[images], ip_adapter_masks=[masks[0], np.ones((16, 16))]), "all as PIL images or all"),
      (dict(ip_adapter_image=images[0], ip_adapter_masks=[np.ones(
          (1, 1, 1, 64))]), "a 1x64 mask cannot be brought to an attention of 16 positions"),  # (the 4x4 level's)
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      _ours(pipe, latents, **kwargs)
    _one_line(e)
  pipe.set_ip_adapter_scale([[0.5, 0.5]])
  try:
    for kwargs, match in ((dict(ip_adapter_image=[images]), "per-image scales \\[0.5, 0.5\\]: they need"),
                          (dict(ip_adapter_image=images[0], ip_adapter_masks=masks[0]), "2 per-image scales for 1")):
      with pytest.raises(ValueError, match=match) as e:
        _ours(pipe, latents, **kwargs)
      _one_line(e)
  finally:
    pipe.set_ip_adapter_scale(1.0)
  assert program._cache_size() == traces
  plain = jaxsd.StableDiffusion.from_pretrained(sd[0])
  with pytest.raises(ValueError, match="need an IP-Adapter"):
    plain(PROMPTS, steps=1, height=16, width=16, ip_adapter_masks=masks[0])


def _sample_on_one_device(monkeypatch):
  """`python -m sample`'s main, its generate on one device (for time)."""
  from jaxsd import generate
  from sample.__main__ import main

  real = generate.generate
  monkeypatch.setattr(generate, "generate", lambda *a, **kw: real(*a, devices=jax.local_devices()[:1], **kw))
  return main


def test_sample_ip_adapter_mask_writes_the_pipelines_image(sd, tmp_path, capsys, monkeypatch):
  """python -m sample --ip-adapter ... --ip-adapter-image ... --ip-adapter-mask left.png on a 16x24 picture: the
  pipeline call's image with ip_adapter_masks; the right half's mask gives another (the same program)."""
  main = _sample_on_one_device(monkeypatch)
  path, adapter, _, pipe = sd
  png, out = str(tmp_path / "prompt.png"), str(tmp_path / "out")
  masks = [str(tmp_path / f"{side}.png") for side in ("left", "right")]
  _images(1, seed=47)[0].save(png)
  for im, mask in zip(_halves(16, 24), masks):
    im.save(mask)
  argv = ["--model", path, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "24", "--out", out]
  argv += ["--sampler", "euler", "--no-progress", "--ip-adapter", os.path.join(adapter, WEIGHT)]
  argv += ["--ip-adapter-image", png, "--ip-adapter-mask", masks[0]]
  assert main(argv) == 0, capsys.readouterr().err
  written = np.asarray(Image.open(os.path.join(out, "a_cat-seed0-0000.png")))
  call = lambda mask: pipe(["a cat"], height=16, width=24, steps=2, sampler="euler", ip_adapter_image=Image.open(png),
                           ip_adapter_masks=Image.open(mask))[0]
  assert np.abs(written.astype(int) - call(masks[0]).astype(int)).max() <= 1
  other = call(masks[1])
  print(f"the right half's mask: max |diff| {np.abs(written.astype(int) - other.astype(int)).max()}")
  assert np.abs(written.astype(int) - other.astype(int)).max() > 2


def test_sample_an_image_and_embeds_with_a_mask_each(sd, tmp_path, capsys, monkeypatch):
  """Two adapters (plain, Plus), the first given --ip-adapter-image, the second --ip-adapter-embeds (its hidden
  states, (2, 1, L, D)), a mask each (left, right): the pipeline call's image with both images and masks."""
  main = _sample_on_one_device(monkeypatch)
  path, adapter, _, _ = sd
  folder, names = _two_adapter_folder(adapter, reference.torch_pipeline(path).unet, tmp_path / "two")
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(folder, weight_name=names)
  images = _images(2, seed=51)
  png, npy, out = str(tmp_path / "prompt.png"), str(tmp_path / "plus.npy"), str(tmp_path / "out")
  masks = [str(tmp_path / f"{side}.png") for side in ("left", "right")]
  images[0].save(png)
  cond, uncond = pipe.encode_ip_adapter_image(images[1], 1)
  np.save(npy, np.stack([uncond, cond]))
  for im, mask in zip(_halves(16, 24), masks):
    im.save(mask)
  argv = ["--model", path, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "24", "--out", out]
  argv += ["--sampler", "euler", "--no-progress"]
  argv += ["--ip-adapter", str(folder / names[0]), "--ip-adapter", str(folder / names[1])]
  argv += ["--ip-adapter-image", png, "--ip-adapter-embeds", npy]  # the k-th of them for the k-th adapter
  argv += ["--ip-adapter-mask", masks[0], "--ip-adapter-mask", masks[1]]
  assert main(argv) == 0, capsys.readouterr().err
  written = np.asarray(Image.open(os.path.join(out, "a_cat-seed0-0000.png")))
  want = pipe(["a cat"], height=16, width=24, steps=2, sampler="euler", ip_adapter_image=[Image.open(png), images[1]],
              ip_adapter_masks=[Image.open(m) for m in masks])[0]
  assert np.abs(written.astype(int) - want.astype(int)).max() <= 1
  # `--ip-adapter-mask none`: the second adapter everywhere, as diffusers' None in ip_adapter_masks.
  argv[argv.index(masks[1])] = "none"
  shutil.rmtree(out)
  assert main(argv) == 0, capsys.readouterr().err
  unmasked = np.asarray(Image.open(os.path.join(out, "a_cat-seed0-0000.png")))
  want = pipe(["a cat"], height=16, width=24, steps=2, sampler="euler", ip_adapter_image=[Image.open(png), images[1]],
              ip_adapter_masks=[Image.open(masks[0]), None])[0]
  assert np.abs(unmasked.astype(int) - want.astype(int)).max() <= 1
  moved = np.abs(unmasked.astype(int) - written.astype(int)).max()
  assert moved > 8, f"the second adapter unmasked moved the image by {moved} levels only"
  print("none vs right-half mask: max", moved, "levels")
