"""`python -m sample` and the pmapped generation: 8 simulated devices give the single-device images."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import jaxsd
from jaxsd import generate
import tests
from sample import __main__ as sample_main
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def pipe(folder):
  return jaxsd.StableDiffusion.from_pretrained(folder)


def test_eight_devices_equal_one_device(pipe, tmp_path):
  assert jax.local_device_count() == 8
  kw = dict(num_images=5, steps=3, sampler="dpmpp_2m", guidance_scale=4.0, seed=7, progress=False)
  prompts = ["a red circle", "a blue square"]
  many = generate.generate(pipe, prompts, out_dir=str(tmp_path / "eight"), **kw)
  # Same per-device batch: the same compiled program per image, so the images are bit-identical.
  one = generate.generate(pipe, prompts, devices=jax.local_devices()[:1], **kw)
  assert many.devices == 8 and one.devices == 1
  assert many.images.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(many.images, one.images)
  # A different batch size changes XLA's blocking of the float sums: equal to within one uint8 level.
  three = generate.generate(pipe, prompts, devices=jax.local_devices()[:1], batch_per_device=3, **kw)
  assert np.abs(three.images.astype(int) - many.images.astype(int)).max() <= 1
  # And both equal the plain pipeline call on the same prompts/noise.
  direct = pipe([p for p in prompts for _ in range(5)], height=16, width=16, steps=3, sampler="dpmpp_2m",
                guidance_scale=4.0, latents=np.asarray(pipe.noise(7, 10, 16, 16)))
  assert np.abs(direct.astype(int) - many.images.astype(int)).max() <= 1
  names = sorted(os.listdir(tmp_path / "eight"))
  assert "grid.png" in names and "a_red_circle-seed7-0004.png" in names and len(names) == 11


def test_file_names_are_distinct_and_earlier_images_are_kept(pipe, tmp_path):
  """Prompts whose slugs coincide used to overwrite each other's files ("a cat" / "A cat.", two prompts in
  other scripts, a prompt given twice), and a second run into the folder replaced the first's images."""
  prompts = ["a cat", "A cat.", "\u732b", "\u72ac", "a dog", "a cat"]
  names = generate.image_filenames(prompts, 3, 2)
  assert len(set(names)) == len(names) == 12
  assert names[8:10] == ["a_dog-seed3-0000.png", "a_dog-seed3-0001.png"]  # a slug of its own: as before
  assert names[0].startswith("a_cat-") and names[10].endswith("-0002.png")  # "a cat" again: its count goes on
  out = tmp_path / "o"
  kw = dict(num_images=1, steps=2, sampler="euler", guidance_scale=1.0, seed=3, progress=False, out_dir=str(out))
  first = generate.generate(pipe, ["a red circle", "A red circle!"], **kw)
  before = {f: open(f, "rb").read() for f in first.files}
  second = generate.generate(pipe, ["a red circle", "A red circle!"], **kw)
  assert len(set(first.files)) == 2 and not set(first.files) & set(second.files)
  assert {f: open(f, "rb").read() for f in first.files} == before
  assert sorted(os.listdir(out)) == sorted([os.path.basename(f) for f in first.files + second.files] +
                                           ["grid.png", "grid-1.png"])
  np.testing.assert_array_equal(first.images, second.images)


def test_images_are_written_as_their_batch_ends(pipe, tmp_path, monkeypatch):
  """A run stopped late (Ctrl-C, a crash) keeps the images of the batches it finished: they used to be written only
  after the last batch, so every image was lost."""
  real = pipe.noise

  def noise(seed, batch, height, width, offset=0):
    if offset >= 2:  # the third batch (one image per batch on one device)
      raise KeyboardInterrupt
    return real(seed, batch, height, width, offset=offset)

  monkeypatch.setattr(pipe, "noise", noise)
  out = tmp_path / "o"
  with pytest.raises(KeyboardInterrupt):
    generate.generate(pipe, ["a red circle"], num_images=4, steps=2, sampler="euler", guidance_scale=1.0, seed=3,
                      progress=False, out_dir=str(out), devices=jax.local_devices()[:1])
  assert sorted(os.listdir(out)) == generate.image_filenames(["a red circle"], 3, 4)[:2]


def test_a_run_killed_while_writing_a_png_leaves_no_partial_png(tmp_path, monkeypatch):
  """`python -m sample` killed while a PNG is written: it was written in place, so a kill left a cut-short PNG
  under the image's name (and a rerun then numbered its own image past it). It is written under a hidden
  temporary name and then given its name, so only whole PNGs carry images' names."""
  image = np.zeros((16, 16, 3), np.uint8)
  reference.kill_while_saving_images(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    generate.save_new(image, str(tmp_path / "a_cat-seed0-0000.png"))
  monkeypatch.undo()
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]
  assert generate.save_new(image, str(tmp_path / "a_cat-seed0-0000.png")) == str(tmp_path / "a_cat-seed0-0000.png")
  assert os.listdir(tmp_path) == ["a_cat-seed0-0000.png"]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_cat-seed0-0000.png")), image)


def test_init_image_of_a_size_the_vae_cannot_take_names_the_image(pipe):
  """Its size is the output's; the message used to name --height, which the user had not given."""
  with pytest.raises(ValueError, match=r"the init image is 24x20 pixels \(WxH\).*e\.g\. to 24x16"):
    generate.generate(pipe, ["a cat"], init_image=np.zeros((1, 20, 24, 3), np.float32), steps=2, progress=False)


def _run(args, cwd):
  env = dict(os.environ, XLA_FLAGS=tests.xla_flags(2), JAX_PLATFORMS="cpu",
             JAXSD_CACHE_DIR=os.path.join(cwd, "xla_cache"))
  return subprocess.run([sys.executable, "-m", "sample", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_cli_writes_images_and_benchmark_line(folder, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\na green triangle on the left\n")
  out = tmp_path / "out"
  r = _run([
      "--model", folder, "--prompts-file",
      str(prompts), "--num-images", "2", "--steps", "2", "--sampler", "euler", "--out",
      str(out), "--benchmark", "--no-progress"
  ], str(tmp_path))
  assert r.returncode == 0, r.stderr
  line = json.loads(r.stdout.strip().splitlines()[-1])
  assert line["devices"] == 2 and line["images"] == 4 and line["seconds_per_step"] > 0
  assert line["compile_seconds"] > 0
  assert sorted(os.listdir(out)) == sorted([
      "a_red_circle-seed0-0000.png", "a_red_circle-seed0-0001.png", "a_green_triangle_on_the_left-seed0-0000.png",
      "a_green_triangle_on_the_left-seed0-0001.png", "grid.png"
  ])


@pytest.mark.parametrize("args,message", [
    (["--height", "20"], "multiple of 8"),
    (["--steps", "0"], "at least 1"),
    (["--sampler", "warp"], "sampler"),
    (["--prompts-file", "/nonexistent.txt"], "no such file"),
])
def test_cli_bad_input_exits_with_a_message(folder, tmp_path, args, message):
  base = ["--model", folder, "--out", str(tmp_path / "o"), "--no-progress"]
  if "--prompts-file" not in args:
    base += ["--prompt", "a red circle"]
  r = _run(base + args, str(tmp_path))
  assert r.returncode == 2
  assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_model_and_empty_prompts(tmp_path):
  r = _run(["--model", str(tmp_path / "none"), "--prompt", "x", "--no-progress"], str(tmp_path))
  assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  r = _run(["--model", str(tmp_path), "--prompts-file", str(empty), "--no-progress"], str(tmp_path))
  assert r.returncode == 2 and "no prompts" in r.stderr


def test_sample_command_runs_an_sdxl_folder(tmp_path):
  """`python -m sample` (in-process, 8 devices) detects SDXL from model_index.json and writes diffusers'
  StableDiffusionXLPipeline images from the same noise (within 2 uint8 levels); without --negative-prompt the
  folder's force_zeros_for_empty_prompt applies, as diffusers' default."""
  import torch
  from PIL import Image

  from sample import __main__ as sample_main

  base, _, c = reference.make_tiny_sdxl_folders(str(tmp_path / "sdxl"))
  out = tmp_path / "out"
  argv = [
      "--model", base, "--prompt", "a red circle", "--num-images", "2", "--steps", "3", "--sampler", "euler",
      "--guidance", "5", "--seed", "1", "--out",
      str(out), "--no-progress"
  ]
  assert sample_main.main(argv) == 0
  names = sorted(os.listdir(out))
  assert names == ["a_red_circle-seed1-0000.png", "a_red_circle-seed1-0001.png", "grid.png"]
  written = np.stack([np.asarray(Image.open(out / n)) for n in names[:2]])
  noise = jax.vmap(lambda k: jax.random.normal(k, (8, 8, 4)))(jaxsd.StableDiffusion.image_keys(1, 2))
  import diffusers

  ref = diffusers.StableDiffusionXLPipeline.from_pretrained(base, add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  with torch.no_grad():
    images = ref(prompt=["a red circle"] * 2, num_inference_steps=3, guidance_scale=5.0,
                 latents=reference.nhwc_to_nchw(noise), output_type="np").images
  assert np.abs(written.astype(int) - (images * 255).round().astype(int)).max() <= 2


def test_a_host_without_a_batch_does_not_claim_a_grid(folder, tmp_path, capsys, monkeypatch):
  """On several hosts each takes every N-th batch: one image on 2 hosts leaves host 1 nothing. It wrote no image
  and no grid (rightly), but said "wrote 0 images and a grid to OUT/" (measured with 2 real processes x 2
  devices: host 1's last line). Host 1 of 2, simulated in this process."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  out = tmp_path / "out"
  argv = [
      "--model", folder, "--prompt", "a red circle", "--num-images", "1", "--steps", "1", "--out",
      str(out), "--no-progress"
  ]
  assert sample_main.main(argv) == 0
  assert not out.exists() or os.listdir(out) == []
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert "wrote no images" in last and "grid" not in last, last


def test_cli_timestep_spacing_overrides_the_folders(folder, pipe, tmp_path):
  """--timestep-spacing trailing (few-step Turbo / Lightning models) samples as the Python pipeline with
  scheduler_config.replace(timestep_spacing="trailing"), not as the folder's own spacing."""
  images = {}
  for spacing in ("trailing", "leading"):
    out = tmp_path / spacing
    argv = [
        "--model", folder, "--prompt", "a red circle", "--steps", "2", "--sampler", "euler", "--height", "16",
        "--width", "16", "--timestep-spacing", spacing, "--out",
        str(out), "--no-progress"
    ]
    assert sample_main.main(argv) == 0
    images[spacing] = np.asarray(Image.open(out / "a_red_circle-seed0-0000.png")).astype(int)
  trailing = dataclasses.replace(pipe, scheduler_config=pipe.scheduler_config.replace(timestep_spacing="trailing"))
  want = trailing(["a red circle"], height=16, width=16, steps=2, sampler="euler", seed=0)[0].astype(int)
  assert np.abs(images["trailing"] - want).max() <= 1
  assert np.abs(images["leading"] - want).max() > 1
  # lcm (and the EDM samplers) place their steps by their own schedule: the flag would be ignored, so it is refused.
  argv = [
      "--model", folder, "--prompt", "a red circle", "--sampler", "lcm", "--timestep-spacing", "trailing", "--out",
      str(tmp_path / "lcm")
  ]
  assert sample_main.main(argv) == 2 and not os.path.exists(tmp_path / "lcm")


def test_every_calls_defaults_are_diffusers():
  """Each pipeline call's defaults (steps, guidance, strength, ControlNet scales and windows, ...) are those of the
  diffusers pipeline it follows, which `generate` and `python -m sample` take when a flag is not given (img2img's
  strength was 0.6 where diffusers' is 0.8, SDXL inpainting's guidance 5 where it is 7.5)."""
  import inspect

  import diffusers

  from jaxsd import pipeline_controlnet as pc, pipeline_xl

  pairs = [
      (jaxsd.StableDiffusion.__call__, "StableDiffusionPipeline"),
      (jaxsd.StableDiffusion.img2img, "StableDiffusionImg2ImgPipeline"),
      (jaxsd.StableDiffusion.inpaint, "StableDiffusionInpaintPipeline"),
      (jaxsd.StableDiffusion.instruct_pix2pix, "StableDiffusionInstructPix2PixPipeline"),
      (pipeline_xl.StableDiffusionXL.__call__, "StableDiffusionXLPipeline"),
      (pipeline_xl.StableDiffusionXL.img2img, "StableDiffusionXLImg2ImgPipeline"),
      (pipeline_xl.StableDiffusionXL.inpaint, "StableDiffusionXLInpaintPipeline"),
      (pipeline_xl.StableDiffusionXL.instruct_pix2pix, "StableDiffusionXLInstructPix2PixPipeline"),
      (pc.StableDiffusionControlNet.__call__, "StableDiffusionControlNetPipeline"),
      (pc.StableDiffusionControlNet.img2img, "StableDiffusionControlNetImg2ImgPipeline"),
      (pc.StableDiffusionControlNet.inpaint, "StableDiffusionControlNetInpaintPipeline"),
      (pc.StableDiffusionXLControlNet.__call__, "StableDiffusionXLControlNetPipeline"),
      (pc.StableDiffusionXLControlNet.img2img, "StableDiffusionXLControlNetImg2ImgPipeline"),
      (pc.StableDiffusionXLControlNet.inpaint, "StableDiffusionXLControlNetInpaintPipeline"),
  ]
  names = {
      "steps": "num_inference_steps",
      "prompts": "prompt",
      "negative_prompts": "negative_prompt",
      "prompts_2": "prompt_2",
      "negative_prompts_2": "negative_prompt_2"
  }
  compared, differ = 0, []
  for ours, theirs in pairs:
    want = inspect.signature(getattr(diffusers, theirs).__call__).parameters
    for name, p in inspect.signature(ours).parameters.items():
      q = want.get(names.get(name, name))
      if q is None or p.default is inspect.Parameter.empty or name in ("prompts", "negative_prompts"):
        continue
      compared += 1
      if p.default != q.default:
        differ.append(f"{ours.__qualname__}({name}={p.default!r}): {theirs} has {q.default!r}")
  assert not differ, differ
  assert compared > 80  # the names line up (steps, guidance_scale, strength, controlnet_conditioning_scale, ...)
