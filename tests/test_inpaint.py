"""Inpainting U-Nets (9 input channels) against diffusers' StableDiffusionInpaintPipeline, the checks on
images and masks (jaxsd.conditioning), and `python -m sample --init-image --mask` end to end.

The 4-channel method (latent blend) is tested in test_pipeline.py on its SD1 and SD2 folders.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import jaxsd
from jaxsd import conditioning
from tests import reference
from tests.test_pipeline import scheduler

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW = 16


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd-inpaint")), in_channels=9)
  import diffusers

  tpipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None,
                                                                   requires_safety_checker=False)
  return path, tpipe, jaxsd.StableDiffusion.from_pretrained(path)


def _masks():
  masks = np.zeros((2, HW, HW), np.uint8)
  masks[0, 4:12, 8:16] = 255
  masks[1, :, :HW // 2] = 255
  return masks


@pytest.mark.parametrize("sampler, strength, steps", [("euler", 1.0, 4), ("pndm", 0.6, 5)])
def test_inpainting_unet_matches_diffusers(inpainting, monkeypatch, sampler, strength, steps):
  """Latents + downsampled mask + masked-image latents into a 9-channel U-Net: final latents as diffusers',
  from pure noise (strength 1, Euler: the initial sigma scales the noise) and from the noised image."""
  path, tpipe, pipe = inpainting
  assert pipe.unet.config.in_channels == 9 and pipe.inpainting_unet
  images = np.random.default_rng(0).integers(0, 256, (2, HW, HW, 3), dtype=np.uint8)
  noise = np.asarray(pipe.noise(1, 2, HW, HW))
  image_latents = np.asarray(pipe.noise(2, 2, HW, HW)) * 0.8
  masked_latents = np.asarray(pipe.noise(3, 2, HW, HW)) * 0.8
  ours = pipe.inpaint(PROMPTS, images, _masks(), strength=strength, negative_prompts=NEGATIVE, steps=steps,
                      guidance_scale=7.5, sampler=sampler, output="latent", latents=noise,
                      masked_image_latents=masked_latents, image_latents=image_latents)
  ref = reference.inpaint_reference(monkeypatch, tpipe.components, scheduler(path, sampler), PROMPTS, NEGATIVE,
                                    [Image.fromarray(m) for m in _masks()], image_latents, noise, masked_latents,
                                    strength, steps)
  diff = np.abs(ours - ref).max()
  print(f"inpaint (9-channel) {sampler} strength {strength}: max |diff| {diff:.2e}")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"max |diff| {diff}"


def test_inpainting_unet_refuses_other_tasks(inpainting):
  path, tpipe, pipe = inpainting
  with pytest.raises(ValueError, match="inpainting U-Net .*9 input channels.*only inpaints"):
    pipe(PROMPTS, height=HW, width=HW, steps=2)
  with pytest.raises(ValueError, match="only inpaints"):
    pipe.img2img(PROMPTS, np.zeros((2, HW, HW, 3), np.uint8), steps=2)
  images = np.zeros((2, HW, HW, 3), np.uint8)
  with pytest.raises(ValueError, match="mask_images have size"):
    pipe.inpaint(PROMPTS, images, np.zeros((2, 8, 8), np.uint8), steps=2)
  with pytest.raises(ValueError, match="strength"):
    pipe.inpaint(PROMPTS, images, _masks(), strength=0.0, steps=2)


def test_images_and_masks_are_read_as_diffusers_reads_them():
  rgba = Image.fromarray(np.full((4, 6, 4), 200, np.uint8), "RGBA")
  grey = Image.fromarray(np.full((4, 6), 100, np.uint8), "L")
  np.testing.assert_allclose(conditioning.as_images([rgba, grey])[:, 0, 0], [[200 / 255] * 3, [100 / 255] * 3])
  with pytest.raises(ValueError, match="CMYK"):
    conditioning.as_images(Image.new("CMYK", (6, 4)))
  with pytest.raises(ValueError, match=r"RGB, NHWC"):
    conditioning.as_images(np.zeros((1, 4, 6, 4), np.uint8))
  # Masks: greyscale, binarised at one half (127 -> keep, 128 -> repaint), white = repaint.
  m = conditioning.as_masks(Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).convert("RGB"))
  np.testing.assert_array_equal(m[0, 0, :, 0], [0, 0, 1, 1])
  with pytest.raises(ValueError, match="'HSV'"):
    conditioning.as_masks(Image.new("HSV", (4, 4)))
  with pytest.raises(ValueError, match="single-channel"):
    conditioning.as_masks(np.zeros((1, 4, 4, 3), np.uint8))
  # The masked image (what 9-channel U-Nets see encoded) as diffusers' image and mask processors make it.
  from diffusers.image_processor import VaeImageProcessor

  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (HW, HW, 3), dtype=np.uint8))
  mask = Image.fromarray(_masks()[0])
  init = VaeImageProcessor(vae_scale_factor=8).preprocess(image).numpy()
  cond = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                           do_convert_grayscale=True).preprocess(mask).numpy()
  theirs = np.transpose(init * (cond < 0.5), (0, 2, 3, 1))
  ours = conditioning.masked_images(conditioning.as_images(image), conditioning.as_masks(mask)) * 2 - 1
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  # Nearest downsampling to the latents keeps pixel (8i, 8j), as torch's interpolate.
  big = np.zeros((1, 16, 16, 1), np.float32)
  big[0, 8, 0] = 1
  np.testing.assert_array_equal(conditioning.latent_mask(big, 8)[0, :, :, 0], [[0, 0], [1, 0]])


def test_high_bit_grey_images_read_as_their_8bit_twins(tmp_path):
  """16-bit depth maps (and 32-bit integer / float grey images) as init, control or mask images read as the 8-bit
  image they hold: PIL's convert("RGB"), which diffusers' load_image calls, clips them at 255 (nearly white)."""
  rng = np.random.default_rng(0)
  eight = rng.integers(0, 256, (6, 10)).astype(np.uint8)
  base = eight.astype(np.int64) * 257  # 0..65535; noise below half a step of 257 keeps each value's 8-bit twin
  sixteen = np.clip(base + rng.integers(-128, 129, eight.shape), 0, 65535).astype(np.uint16)
  Image.fromarray(eight).save(tmp_path / "eight.png")
  Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
  Image.fromarray(sixteen.astype(np.int32)).save(tmp_path / "int32.tif")
  Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "float.tif")
  assert Image.open(tmp_path / "sixteen.png").mode == "I;16" and Image.open(tmp_path / "int32.tif").mode == "I"
  assert Image.open(tmp_path / "float.tif").mode == "F"
  want = np.asarray(conditioning.load_image(str(tmp_path / "eight.png")))
  assert np.asarray(Image.open(tmp_path / "sixteen.png").convert("RGB")).mean() > 200  # what PIL alone gives
  for name in ("sixteen.png", "int32.tif", "float.tif"):
    np.testing.assert_array_equal(np.asarray(conditioning.load_image(str(tmp_path / name))), want, err_msg=name)
    np.testing.assert_array_equal(conditioning.as_images(Image.open(tmp_path / name)), want[None] / np.float32(255))
    np.testing.assert_array_equal(np.asarray(conditioning.load_mask(str(tmp_path / name))), eight, err_msg=name)
    np.testing.assert_array_equal(conditioning.mask_levels(Image.open(tmp_path / name)), eight[None] / np.float32(255))


def test_arrays_out_of_range_are_refused_before_compiling(inpainting):
  """Floats of 0..255 (`np.asarray(image).astype(np.float32)`) and other integer types were taken as floats in
  [0, 1]: images 255 times too bright, encoded into garbage without a word; masks binarised at 0.5 of 255."""
  pixels = np.random.default_rng(0).integers(0, 256, (1, HW, HW, 3))
  for images, match in ((pixels.astype(np.float32), "values from 0 to 255; give uint8 .0..255. or floats in .0, 1."),
                        (pixels, "an array of int64; give uint8"), (np.full((1, 4, 4, 3), np.nan), "values from nan")):
    with pytest.raises(ValueError, match=match):
      conditioning.as_images(images)
  with pytest.raises(ValueError, match="mask_images: values from 0 to 255"):
    conditioning.as_masks(_masks().astype(np.int64))
  near = np.clip(pixels / 255 + 1e-4, 0, None)  # float error past 1 is no mistake
  np.testing.assert_array_equal(conditioning.as_images(near), near.astype(np.float32))
  np.testing.assert_array_equal(conditioning.as_masks(_masks() > 0), conditioning.as_masks(_masks()))  # booleans
  _, _, pipe = inpainting
  sizes = lambda: {k: f._cache_size() for k, f in pipe._compiled.items()}
  before = sizes()
  with pytest.raises(ValueError, match="init images: values from 0 to 255"):
    pipe.inpaint(PROMPTS[:1], pixels.astype(np.float32), _masks()[:1], steps=2)
  assert sizes() == before


def test_files_are_turned_upright_by_their_exif_orientation_as_diffusers_does(tmp_path):
  """A camera JPEG stored sideways with EXIF orientation 6 (turn 90 degrees clockwise) and a mask saved the same
  way load upright, pixel for pixel as diffusers.utils.load_image gives them."""
  from diffusers.utils import load_image as diffusers_load_image

  pixels = np.zeros((8, 12, 3), np.uint8)
  pixels[:2, :3] = 255  # a white corner, top left as stored
  exif = Image.Exif()
  exif[0x0112] = 6
  for name, make in (("image.jpg", lambda: Image.fromarray(pixels)), ("mask.png",
                                                                      lambda: Image.fromarray(pixels[..., 0]))):
    make().save(tmp_path / name, exif=exif, **({"quality": 100} if name.endswith("jpg") else {}))
  image = conditioning.load_image(str(tmp_path / "image.jpg"))
  theirs = diffusers_load_image(str(tmp_path / "image.jpg"))
  assert image.size == theirs.size == (8, 12)  # width, height: turned
  np.testing.assert_array_equal(np.asarray(image), np.asarray(theirs))
  assert np.asarray(image)[0, -1].min() > 200 and np.asarray(image)[-1, 0].max() < 50  # the corner is top right now
  mask = conditioning.load_mask(str(tmp_path / "mask.png"))
  assert mask.size == (8, 12) and np.asarray(mask)[0, -1] == 255 and np.asarray(mask)[-1, 0] == 0


def test_cli_inpaints_and_reports_bad_inputs(inpainting, tmp_path, capsys, monkeypatch):
  """In-process `python -m sample`: inpainting writes images; bad inputs exit 2 with one line, before compiling."""
  from sample.__main__ import main

  path, tpipe, pipe = inpainting
  image = tmp_path / "image.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (HW, HW, 4), dtype=np.uint8), "RGBA").save(image)
  mask = tmp_path / "mask.png"
  Image.fromarray(_masks()[0]).save(mask)
  base = ["--model", path, "--prompt", "a red circle", "--steps", "2", "--sampler", "ddim", "--no-progress"]
  rc = main(base + ["--init-image", str(image), "--mask", str(mask), "--num-images", "2", "--out", str(tmp_path / "o")])
  assert rc == 0
  names = sorted(os.listdir(tmp_path / "o"))
  assert names == ["a_red_circle-seed0-0000.png", "a_red_circle-seed0-0001.png", "grid.png"]
  out = [np.asarray(Image.open(tmp_path / "o" / n)) for n in names[:2]]
  assert out[0].shape == (HW, HW, 3) and np.abs(out[0].astype(int) - out[1].astype(int)).max() > 0

  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.png")
  Image.new("I;16", (8, 8)).save(tmp_path / "int16.png")
  Image.new("CMYK", (HW, HW)).save(tmp_path / "cmyk.jpg")
  cases = [
      (["--init-image", str(image), "--mask", str(tmp_path / "small.png")], "mask is 8x8"),
      (["--init-image", str(image), "--mask", str(tmp_path / "int16.png")], "mask is 8x8"),  # read, then sized
      (["--init-image", str(tmp_path / "cmyk.jpg"), "--mask",
        str(mask)], "'CMYK'"),
      (["--init-image", str(image)], "only inpaints"),  # a 9-channel model without a mask
      ([], "only inpaints"),  # nor text-to-image
      (["--mask", str(mask)], "--mask needs --init-image"),
  ]
  capsys.readouterr()
  for extra, message in cases:
    assert main(base + extra + ["--out", str(tmp_path / "bad")]) == 2, extra
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, (extra, err)
  assert not os.path.exists(tmp_path / "bad")
