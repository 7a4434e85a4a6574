"""`python -m sample --controlnet ... --control-image ...` (in process, 8 simulated devices; text-to-image,
img2img and inpainting): the images written are the ControlNet pipeline call's; bad input exits 2 with one line, before loading or compiling, writing nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import jaxsd
from tests import reference
from tests.test_pipeline_controlnet import _controlnet

HW = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample-controlnet")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  tpipe = reference.torch_pipeline(path)
  nets = []
  for seed in (10, 11):
    nets.append(str(root / f"cn{seed}"))
    _controlnet(tpipe.unet, seed).save_pretrained(nets[-1])
  rng = np.random.default_rng(0)
  images = [str(root / "edges.png"), str(root / "depth.png")]
  Image.fromarray(rng.integers(0, 256, (HW, HW, 3), dtype=np.uint8)).save(images[0])
  Image.fromarray(rng.integers(0, 256, (24, 20, 4), dtype=np.uint8), "RGBA").save(images[1])  # resized, RGB'd
  return path, nets, images, root


@pytest.fixture
def main():
  from sample.__main__ import main

  return main


def test_cli_writes_the_pipeline_call_images(folders, main, tmp_path):
  """Two ControlNets with their own scales and guidance windows: the images written equal
  `pipe.with_controlnet([...])(...)` with the same seed and the control images as files (one RGBA of
  another size: converted and resized as the library does), within one uint8 level."""
  path, nets, images, _ = folders
  out = tmp_path / "out"
  argv = [
      "--model", path, "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", "2", "--steps", "3",
      "--sampler", "ddim", "--guidance", "6", "--seed", "5", "--negative-prompt", "a green triangle", "--controlnet",
      nets[0], "--control-image", images[0], "--controlnet", nets[1], "--control-image", images[1],
      "--controlnet-scale", "0.7", "1.3", "--control-guidance-start", "0", "0.3", "--control-guidance-end", "0.7", "1",
      "--out",
      str(out), "--no-progress"
  ]
  assert main(argv) == 0
  names = [
      "a_red_circle-seed5-0000.png", "a_red_circle-seed5-0001.png", "a_blue_square-seed5-0000.png",
      "a_blue_square-seed5-0001.png"
  ]
  assert sorted(os.listdir(out)) == sorted(names + ["grid.png"])
  written = np.stack([np.asarray(Image.open(out / n)) for n in names])

  pipe = jaxsd.StableDiffusion.from_pretrained(path).with_controlnet(nets)
  # Job j's noise is drawn from fold_in(key(seed), j): the call's batch in job order is the same draw.
  control = [Image.open(im).convert("RGB") for im in images]
  prompts = ["a red circle"] * 2 + ["a blue square"] * 2
  kw = dict(steps=3, sampler="ddim", guidance_scale=6.0, seed=5, control_guidance_start=[0.0, 0.3],
            control_guidance_end=[0.7, 1.0])
  ours = pipe(prompts, control, "a green triangle", controlnet_conditioning_scale=[0.7, 1.3], **kw)
  diff = np.abs(written.astype(int) - ours.astype(int)).max()
  print(f"sample --controlnet x2 vs the pipeline call: max uint8 diff {diff}")
  assert written.shape == (4, HW, HW, 3) and diff <= 1
  off = pipe(prompts, control, "a green triangle", controlnet_conditioning_scale=0.0, **kw)  # the same program
  assert np.abs(off.astype(int) - written.astype(int)).max() > 2  # the ControlNets matter


def test_cli_controlnet_img2img_and_inpainting_write_the_pipeline_calls_images(folders, main, tmp_path):
  """--controlnet with --init-image (img2img, strength 0.7) and with --mask --padding-mask-crop (the control
  image cut to the mask's box with the init image): the images written equal the pipeline's `img2img` /
  `inpaint` calls with the same seed, within one uint8 level, the conditioning scale defaulting as
  diffusers' (0.8 for img2img, 0.5 for inpainting)."""
  path, nets, images, root = folders
  rng = np.random.default_rng(1)
  big = 2 * HW
  files = {name: str(root / f"{name}.png") for name in ("init", "init_big", "control_big", "mask_big")}
  Image.fromarray(rng.integers(0, 256, (HW, HW, 3), dtype=np.uint8)).save(files["init"])
  Image.fromarray(rng.integers(0, 256, (big, big, 3), dtype=np.uint8)).save(files["init_big"])
  Image.fromarray(rng.integers(0, 256, (big, big, 3), dtype=np.uint8)).save(files["control_big"])
  mask = np.zeros((big, big), np.uint8)
  mask[4:12, 18:28] = 255
  Image.fromarray(mask).save(files["mask_big"])
  pipe = jaxsd.StableDiffusion.from_pretrained(path).with_controlnet(nets[0])
  common = [
      "--model", path, "--prompt", "a red circle", "--num-images", "2", "--steps", "3", "--sampler", "ddim",
      "--guidance", "6", "--seed", "5", "--controlnet", nets[0], "--no-progress"
  ]
  kw = dict(steps=3, sampler="ddim", guidance_scale=6.0, seed=5)
  load = lambda f: Image.open(f).convert("RGB")
  prompts = ["a red circle"] * 2

  out = tmp_path / "img2img"
  assert main(common +
              ["--control-image", images[0], "--init-image", files["init"], "--strength", "0.7", "--out",
               str(out)]) == 0
  written = np.stack([np.asarray(Image.open(out / f"a_red_circle-seed5-000{k}.png")) for k in range(2)])
  ours = pipe.img2img(prompts, [load(files["init"])] * 2, load(images[0]), strength=0.7, **kw)
  diff = np.abs(written.astype(int) - ours.astype(int)).max()
  print(f"sample --controlnet --init-image vs pipe.img2img: max uint8 diff {diff}")
  assert diff <= 1

  out = tmp_path / "inpaint"
  assert main(common + [
      "--control-image", files["control_big"], "--init-image", files["init_big"], "--mask", files["mask_big"],
      "--padding-mask-crop", "2", "--height",
      str(HW), "--width",
      str(HW), "--out",
      str(out)
  ]) == 0
  written = np.stack([np.asarray(Image.open(out / f"a_red_circle-seed5-000{k}.png")) for k in range(2)])
  ours = pipe.inpaint(prompts, [load(files["init_big"])] * 2, [Image.open(files["mask_big"])] * 2,
                      load(files["control_big"]), padding_mask_crop=2, height=HW, width=HW, **kw)
  diff = np.abs(written.astype(int) - ours.astype(int)).max()
  print(f"sample --controlnet --mask --padding-mask-crop vs pipe.inpaint: max uint8 diff {diff}")
  assert written.shape == (2, big, big, 3) and diff <= 1
  off = pipe.inpaint(prompts, [load(files["init_big"])] * 2, [Image.open(files["mask_big"])] * 2,
                     load(files["control_big"]), padding_mask_crop=2, height=HW, width=HW,
                     controlnet_conditioning_scale=0.0, **kw)
  assert np.abs(off.astype(int) - written.astype(int)).max() > 2  # the ControlNet matters inside the box


def test_cli_bad_controlnet_input_exits_2_before_compiling(folders, main, tmp_path, capsys):
  path, nets, images, root = folders
  Image.new("CMYK", (HW, HW)).save(tmp_path / "cmyk.jpg")
  Image.new("LAB", (HW, HW)).save(tmp_path / "lab.tif")
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "odd.png")
  (tmp_path / "empty").mkdir()
  one = ["--controlnet", nets[0]]
  cases = [
      (one, "0 --control-image for 1 --controlnet"),
      (one + ["--control-image", images[0], "--control-image", images[1]], "2 --control-image for 1 --controlnet"),
      (["--control-image", images[0]], "--control-image needs --controlnet"),
      (["--guess-mode"], "--guess-mode needs --controlnet"),
      (one + ["--control-image", str(tmp_path / "none.png")], "no such file"),
      (one + ["--control-image", str(tmp_path / "cmyk.jpg")], "'CMYK'"),
      (one + ["--control-image", str(tmp_path / "lab.tif")], "mode 'LAB'"),
      (["--controlnet", str(tmp_path / "nowhere"), "--control-image", images[0]], "no such folder"),
      (one + ["--control-image", images[0], "--controlnet-scale", "1", "2"], "2 values for 1 ControlNets"),
      (one + ["--control-image", images[0], "--control-guidance-start", "0.5", "--control-guidance-end", "0.4"],
       "start < end"),
      (one + ["--control-image", images[0], "--mask", images[0]], "--mask needs --init-image"),
      # It sets the output size: the message named a height=20 the user had not given.
      (one + ["--control-image", str(tmp_path / "odd.png")], "the control image is 20x20 pixels (WxH) and sets the "
       "output size, whose sides must be multiples of 8 for this model: give height and width (--height / --width"),
      (["--controlnet", str(tmp_path / "empty"), "--control-image", images[0]], "config.json"),
  ]
  capsys.readouterr()
  for extra, message in cases:
    argv = ["--model", path, "--prompt", "x", "--steps", "2", "--no-progress", "--out", str(tmp_path / "o")] + extra
    assert main(argv) == 2, extra
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, (extra, err)
  assert not (tmp_path / "o").exists()
