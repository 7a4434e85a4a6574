"""padding_mask_crop (jaxsd.mask_crop) against diffusers: the crop box as VaeImageProcessor.get_crop_region
finds it, and `pipe.inpaint(..., padding_mask_crop=...)` as StableDiffusionInpaintPipeline's PIL output on a
tiny 9-channel folder, the same noise and posterior samples passed in."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jaxsd
from jaxsd import mask_crop
from tests import reference
from tests.test_pipeline import scheduler

HW = 16  # the size the crop is inpainted at (the tiny model's own)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd-inpaint")), in_channels=9)
  return path, jaxsd.StableDiffusion.from_pretrained(path)


def test_crop_region_is_diffusers():
  """Random boxes (edges, corners, thin strips, whole image), paddings and output aspects."""
  from diffusers.image_processor import VaeImageProcessor

  rng = np.random.default_rng(0)
  for _ in range(300):
    h, w = rng.integers(4, 40, 2)
    mask = np.zeros((h, w), np.uint8)
    y1, x1 = rng.integers(0, h), rng.integers(0, w)
    y2, x2 = rng.integers(y1 + 1, h + 1), rng.integers(x1 + 1, w + 1)
    mask[y1:y2, x1:x2] = rng.integers(1, 256)
    width, height, pad = int(rng.choice([8, 16, 24, 48])), int(rng.choice([8, 16, 32])), int(rng.integers(0, 12))
    theirs = VaeImageProcessor.get_crop_region(Image.fromarray(mask), width, height, pad=pad)
    assert mask_crop.crop_region(mask, width, height, pad) == tuple(theirs), (mask.shape, (y1, y2, x1, x2), pad)


def _diffusers(monkeypatch, path, sampler, image, mask, pad, strength, steps, noise, posterior):
  """diffusers' PIL output; `randn_tensor` gives our initial noise and our VAE posterior noise, in order."""
  import diffusers
  from diffusers.models.autoencoders import vae as vae_module
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

  tpipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None,
                                                                   requires_safety_checker=False)
  tpipe.set_progress_bar_config(disable=True)
  tpipe.scheduler = scheduler(path, sampler)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  queue = [reference.nhwc_to_nchw(x) for x in posterior]
  monkeypatch.setattr(vae_module, "randn_tensor", lambda shape, **_: queue.pop(0))
  with torch.no_grad():
    out = tpipe("a red circle", image=image, mask_image=mask, padding_mask_crop=pad, strength=strength, height=HW,
                width=HW, num_inference_steps=steps, guidance_scale=7.5, negative_prompt="a green triangle",
                output_type="pil").images[0]
  assert not queue, "diffusers drew fewer posterior samples than expected"
  return np.asarray(out)


@pytest.mark.parametrize("where, size, box, pad, strength", [
    ("middle", (40, 32), (14, 12, 22, 19), 3, 1.0),
    ("edge", (24, 40), (0, 5, 9, 20), 2, 0.7),
])
def test_inpaint_with_padding_mask_crop_matches_diffusers(inpainting, monkeypatch, where, size, box, pad, strength):
  """A soft-edged mask in the middle of a tall image (pure noise, Euler) and one on the left edge of a wide
  image (from the noised crop, DDIM): the written images as diffusers' within a few uint8 levels."""
  path, pipe = inpainting
  h, w = size
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  levels = np.zeros((h, w), np.uint8)
  x1, y1, x2, y2 = box
  levels[y1:y2, x1:x2] = 255
  levels[y1, x1:x2] = 100  # grey: outside the binarised mask, inside the box and half-transparent when pasted
  mask = Image.fromarray(levels)
  sampler, steps, seed = ("euler", 4, 3) if strength == 1.0 else ("ddim", 5, 4)

  ours = pipe.inpaint("a red circle", image, mask, strength=strength, negative_prompts="a green triangle", steps=steps,
                      sampler=sampler, seed=seed, padding_mask_crop=pad, output="pil")[0]
  noise = np.asarray(pipe.noise(seed, 1, HW, HW))
  keys = pipe.posterior_keys(seed, 1)
  draw = lambda keys: np.asarray(jax.vmap(lambda k: jax.random.normal(k, noise.shape[1:]))(keys))
  masked = draw(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
  posterior = [masked] if strength == 1.0 else [draw(keys), masked]  # diffusers: the image's first
  theirs = _diffusers(monkeypatch, path, sampler, image, mask, pad, strength, steps, noise, posterior)

  ours = np.asarray(ours)
  assert ours.shape == theirs.shape == (h, w, 3)
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  print(f"padding_mask_crop {where} ({sampler}, strength {strength}): max |uint8 diff| {diff.max()}")
  assert diff.max() <= 2
  crop_box = mask_crop.crop_region(levels, HW, HW, pad)
  outside = np.ones((h, w), bool)
  outside[crop_box[1]:crop_box[3], crop_box[0]:crop_box[2]] = False
  np.testing.assert_array_equal(ours[outside], np.asarray(image)[outside])  # untouched outside the box
  assert np.abs(ours[y1 + 1:y2, x1:x2].astype(int) - np.asarray(image)[y1 + 1:y2, x1:x2]).max() > 0


def test_bad_padding_is_refused_before_compiling(inpainting):
  path, pipe = inpainting
  image, mask = np.zeros((1, 24, 24, 3), np.uint8), np.full((1, 24, 24), 255, np.uint8)
  before = dict(pipe._compiled)
  for bad, match in ((-1, ">= 0 pixels"), (2.5, "whole number"), (True, "whole number"), ("4", "whole number")):
    with pytest.raises(ValueError, match=match):
      pipe.inpaint("x", image, mask, padding_mask_crop=bad, steps=2)
  with pytest.raises(ValueError, match="all black"):
    pipe.inpaint("x", image, np.zeros((1, 24, 24), np.uint8), padding_mask_crop=2, steps=2)
  with pytest.raises(ValueError, match="output='latent' with padding_mask_crop"):
    pipe.inpaint("x", image, mask, padding_mask_crop=2, steps=2, output="latent")
  with pytest.raises(ValueError, match="height=20 must be a positive multiple"):
    pipe.inpaint("x", image, mask, padding_mask_crop=2, steps=2, height=20)
  with pytest.raises(ValueError, match="without padding_mask_crop the output is the images' size"):
    pipe.inpaint("x", image, mask, steps=2, height=16, width=16)
  assert pipe._compiled == before


def test_cli_padding_mask_crop_writes_the_library_images(inpainting, tmp_path, capsys, monkeypatch):
  """In-process `python -m sample --padding-mask-crop`: the image written is `pipe.inpaint(...,
  padding_mask_crop=)`'s (same seed), at the init image's size; bad values exit 2, one line, nothing written."""
  from sample.__main__ import main

  path, pipe = inpainting
  rng = np.random.default_rng(2)
  image = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
  levels = np.zeros((24, 40), np.uint8)
  levels[8:14, 20:30] = 255
  image.save(tmp_path / "image.png")
  Image.fromarray(levels).save(tmp_path / "mask.png")
  Image.fromarray(np.zeros_like(levels)).save(tmp_path / "black.png")
  base = [
      "--model", path, "--prompt", "a red circle", "--steps", "4", "--sampler", "euler", "--seed", "3", "--no-progress",
      "--init-image",
      str(tmp_path / "image.png")
  ]
  assert main(base +
              ["--mask", str(tmp_path / "mask.png"), "--padding-mask-crop", "3", "--out",
               str(tmp_path / "o")]) == 0
  written = np.asarray(Image.open(tmp_path / "o" / "a_red_circle-seed3-0000.png"))
  ours = pipe.inpaint("a red circle", image, Image.fromarray(levels), steps=4, sampler="euler", seed=3,
                      padding_mask_crop=3)[0]
  assert written.shape == (24, 40, 3)
  assert np.abs(written.astype(int) - ours.astype(int)).max() <= 1

  capsys.readouterr()
  cases = [(["--padding-mask-crop", "3"], "--padding-mask-crop applies to inpainting"),
           (["--mask", str(tmp_path / "mask.png"), "--padding-mask-crop", "-1"], "must be >= 0"),
           (["--mask", str(tmp_path / "black.png"), "--padding-mask-crop", "2"], "all black")]
  for extra, message in cases:
    assert main(base + extra + ["--out", str(tmp_path / "bad")]) == 2, extra
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, (extra, err)
  with pytest.raises(SystemExit) as e:  # argparse: not an integer
    main(base + ["--mask", str(tmp_path / "mask.png"), "--padding-mask-crop", "2.5"])
  assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()
