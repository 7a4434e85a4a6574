"""FreeU (`pipe.enable_freeu` / `disable_freeu`) against diffusers' `enable_freeu` on the tiny random SD and SDXL
folders: final latents within 1e-4 x max(1, |latents|), FreeU moving diffusers' latents by far more than that, the
factors an input of the program (no recompile), and the plain program and images back, bit for bit, without it."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxsd
from jaxsd import aot
from jaxsd.freeu import RECOMMENDED
from jaxsd.models import freeu as freeu_math
from sample import __main__ as sample_main
from tests import reference
from tests.models import test_unet
from tests.test_commands import _one_error_line, _sample

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW = 16


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))
  return path, reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)


def _close(name, ours, ref, off=None):
  """ours within the pipeline tolerance of diffusers' `ref`; `off`, diffusers without FreeU, far (100 x) from it."""
  tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
  diff = float(np.abs(np.asarray(ours) - ref).max())
  print(f"{name}: max |jaxsd - diffusers| {diff:.2e} (tolerance {tol:.1e})" +
        ("" if off is None else f"; FreeU moves diffusers' latents by {np.abs(ref - off).max():.2e}"))
  assert np.asarray(ours).shape == ref.shape and diff < tol, f"{name}: max |diff| {diff}"
  if off is not None:
    assert np.abs(ref - off).max() > 100 * tol


def _torch_text(tpipe, latents, factors, guidance=7.5, **kw):
  """diffusers' final latents (NHWC), Euler 3 steps, with FreeU at `factors` (None: off)."""
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(tpipe.scheduler.config)
  if factors is None:
    tpipe.disable_freeu()
  else:
    tpipe.enable_freeu(*factors)
  try:
    with torch.no_grad():
      out = tpipe(PROMPTS, height=HW, width=HW, num_inference_steps=3, guidance_scale=guidance,
                  latents=reference.nhwc_to_nchw(latents), output_type="latent", **kw)
  finally:
    tpipe.disable_freeu()
  return reference.nchw_to_nhwc(out.images)


def test_text_to_image_matches_diffusers_and_values_compile_nothing(sd):
  """SD, guided: the SD 1.5 and SD 2.1 values against diffusers in one compiled program; disable_freeu gives the
  plain latents back bit for bit; a factor of 0 leaves FreeU off, as diffusers' blocks do."""
  path, tpipe, pipe = sd
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  kw = dict(height=HW, width=HW, steps=3, guidance_scale=7.5, sampler="euler", latents=latents, output="latent")
  plain = pipe(PROMPTS, NEGATIVE, **kw)
  off = _torch_text(tpipe, latents, None, negative_prompt=NEGATIVE)
  _close("sd text, off", plain, off)
  program = pipe._jitted(True, "latent", "text", True)
  for name in ("sd1", "sd2"):
    pipe.enable_freeu(*RECOMMENDED[name])
    ours = pipe(PROMPTS, NEGATIVE, **kw)
    if name == "sd1":
      traces = program._cache_size()  # the plain program and the one with FreeU's input
    _close(f"sd text, {name} values", ours, _torch_text(tpipe, latents, RECOMMENDED[name], negative_prompt=NEGATIVE),
           off)
  assert program._cache_size() == traces == 2  # other values: the same program
  pipe.enable_freeu(0.0, 0.2, 1.5, 1.6)  # off, as diffusers' `is_freeu_enabled` (the truth of every factor)
  np.testing.assert_array_equal(pipe(PROMPTS, NEGATIVE, **kw), plain)
  np.testing.assert_array_equal(_torch_text(tpipe, latents, (0.0, 0.2, 1.5, 1.6), negative_prompt=NEGATIVE), off)
  pipe.disable_freeu()
  assert pipe.freeu is None
  np.testing.assert_array_equal(pipe(PROMPTS, NEGATIVE, **kw), plain)
  assert program._cache_size() == 2


def test_img2img_matches_diffusers(sd, monkeypatch):
  """SD img2img (DDIM, strength 0.6), given the image latents and noise, as diffusers' img2img pipeline."""
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

  path, tpipe, pipe = sd
  noise = np.asarray(pipe.noise(4, len(PROMPTS), HW, HW))
  image_latents = np.asarray(pipe.noise(5, len(PROMPTS), HW, HW)) * 0.8
  factors = (0.8, 0.3, 1.3, 1.5)
  ref = diffusers.StableDiffusionImg2ImgPipeline(**tpipe.components)
  ref.set_progress_bar_config(disable=True)
  ref.scheduler = diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  refs = {}
  for on in (False, True):
    if on:
      ref.enable_freeu(*factors)
    try:
      with torch.no_grad():
        out = ref(PROMPTS, image=reference.nhwc_to_nchw(image_latents), strength=0.6, num_inference_steps=5,
                  guidance_scale=7.5, negative_prompt=NEGATIVE, output_type="latent")
    finally:
      ref.disable_freeu()
    refs[on] = reference.nchw_to_nhwc(out.images)
  pipe.enable_freeu(*factors)
  try:
    ours = pipe.img2img(PROMPTS, None, strength=0.6, negative_prompts=NEGATIVE, steps=5, guidance_scale=7.5,
                        sampler="ddim", output="latent", noise=noise, image_latents=image_latents)
  finally:
    pipe.disable_freeu()
  _close("sd img2img", ours, refs[True], refs[False])


def test_sdxl_text_to_image_matches_diffusers(tmp_path):
  """SDXL base (its first up block a CrossAttnUpBlock2D, the second an UpBlock2D), guided, with the SDXL values."""
  base_path, _, c = reference.make_tiny_sdxl_folders(tmp_path)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base_path)
  tpipe = diffusers.StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                              text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                              tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=c["scheduler"],
                                              force_zeros_for_empty_prompt=True, add_watermarker=False)
  tpipe.set_progress_bar_config(disable=True)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  pipe.enable_freeu(*RECOMMENDED["sdxl"])
  ours = pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=3, guidance_scale=5.0, sampler="euler", latents=latents,
              output="latent")
  refs = [_torch_text(tpipe, latents, f, guidance=5.0, negative_prompt=NEGATIVE) for f in (RECOMMENDED["sdxl"], None)]
  _close("sdxl text", ours, *refs)


def test_unet_at_odd_and_one_pixel_sizes_matches_diffusers():
  """The U-Net alone, three levels (FreeU in up blocks 0 and 1, not 2), latents of 3 x 13: up block 0 filters 1 x 4
  features (the 2 x 2 box around (H // 2, W // 2) starts at row -1, which Python's slicing reads as row 0), up block 1
  2 x 7 ones (odd, the box off-centre)."""
  torch_model = test_unet._torch_unet("inpaint")
  model, params = test_unet._flax(torch_model)
  sample, t, context = test_unet._inputs(model.config, size=(3, 13))
  factors = (0.7, 0.3, 1.4, 1.6)
  torch_model.enable_freeu(*factors)
  ref = test_unet._torch_apply(torch_model, sample, t, context)
  torch_model.disable_freeu()
  off = test_unet._torch_apply(torch_model, sample, t, context)
  out = test_unet._jit(model.apply)({"params": params}, sample, t, context, freeu=jnp.asarray(factors))
  _close("unet 3x13", out, ref, off)


def test_fourier_filter_as_diffusers():
  """The filter alone at odd and tiny sizes (the centre box), fp32 and bf16 (its FFT in float32, the result cast
  back, as diffusers)."""
  from diffusers.utils.torch_utils import fourier_filter

  rng = np.random.default_rng(0)
  for h, w in ((1, 1), (1, 2), (2, 3), (3, 5), (5, 4)):
    x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    ref = fourier_filter(reference.nhwc_to_nchw(x), threshold=1, scale=0.3)
    np.testing.assert_allclose(freeu_math.fourier_filter(jnp.asarray(x), 1, 0.3), reference.nchw_to_nhwc(ref),
                               atol=1e-6, err_msg=f"{h}x{w}")
  x = rng.standard_normal((1, 4, 6, 3)).astype(np.float32)
  ours = freeu_math.fourier_filter(jnp.asarray(x, jnp.bfloat16), 1, 0.3)
  ref = fourier_filter(reference.nhwc_to_nchw(x).to(torch.bfloat16), threshold=1, scale=0.3)
  assert ours.dtype == jnp.bfloat16 and ref.dtype == torch.bfloat16
  np.testing.assert_allclose(np.asarray(ours, np.float32), reference.nchw_to_nhwc(ref), atol=2e-2)


@pytest.mark.parametrize("values, message", [
    ((float("nan"), 0.2, 1.5, 1.6), "s1=nan must be a finite number"),
    ((0.9, float("inf"), 1.5, 1.6), "s2=inf"),
    ((0.9, 0.2, 1e39, 1.6), r"b1=1e\+39"),
    ((0.9, 0.2, 1.5, "1.6"), "b2='1.6'"),
    ((0.9, 0.2, True, 1.6), "b1=True"),
], ids=["nan", "inf", "inf_in_fp32", "string", "bool"])
def test_bad_values_are_refused(sd, values, message):
  pipe = sd[2]
  with pytest.raises(ValueError, match=message):
    pipe.enable_freeu(*values)
  assert pipe.freeu is None


def test_controlnet_pipeline_keeps_freeu_and_aot_refuses_it(sd, tmp_path):
  """with_controlnet keeps the factors (as diffusers' ControlNet pipeline shares the U-Net); jaxsd.aot refuses to
  save a program with FreeU on (its calls trace as usual)."""
  path, tpipe, pipe = sd
  pipe.enable_freeu(*RECOMMENDED["sd1"])
  try:
    net = diffusers.ControlNetModel.from_unet(tpipe.unet, conditioning_embedding_out_channels=(8, 16))
    net.save_pretrained(tmp_path / "cn")
    controlled = pipe.with_controlnet(str(tmp_path / "cn"))
    assert controlled.freeu == RECOMMENDED["sd1"]
    assert set(controlled.freeu_inputs()) == {"freeu"}
    with pytest.raises(ValueError, match="FreeU is on"):
      aot.save_program(pipe, str(tmp_path / "programs"), batch=1, steps=2, sampler="ddim")
  finally:
    pipe.disable_freeu()


@pytest.mark.parametrize("args, message", [
    (["--freeu", "nan", "0.2", "1.5", "1.6"], "--freeu: s1=nan must be a finite number"),
    (["--freeu", "0.9", "0.2", "1.5", "1e39"], "--freeu: b2=1e+39"),
], ids=["nan", "inf_in_fp32"])
def test_command_bad_values_exit_2_with_one_line(tmp_path, capsys, args, message):
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", *args)) == 2
  assert message in _one_error_line(capsys)


def test_command_flag_takes_four_numbers_and_reaches_the_pipeline(tmp_path, capsys, monkeypatch):
  from jaxsd import pipeline

  with pytest.raises(SystemExit) as e:  # argparse: usage and the error, exit 2
    sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--freeu", "0.9", "0.2"))
  assert e.value.code == 2 and "expected 4 arguments" in capsys.readouterr().err
  seen = []

  class FakePipe:

    def enable_freeu(self, *values):
      seen.append(values)
      raise ValueError("stop here")

  monkeypatch.setattr(pipeline, "load", lambda path, **kw: FakePipe())
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--freeu", "0.9", "0.2", "1.5", "1.6")) == 2
  assert seen == [(0.9, 0.2, 1.5, 1.6)]
  assert "stop here" in _one_error_line(capsys)


def test_generate_gives_every_device_the_factors(sd, monkeypatch):
  """`jaxsd.generate` (what `python -m sample --freeu` runs, pmapped): its program (`generate_fn`) takes the factors
  (FreeU's FFTs in it); every device gets them (a stand-in program writes them into its images), and none without
  FreeU."""
  from jaxsd import generate

  _, _, pipe = sd
  fn = pipe.generate_fn("ddim", 2, True, "np")
  ids = pipe.tokenize(PROMPTS)
  args = (pipe.params, ids, ids, pipe.noise(0, 2, HW, HW), jnp.float32(7.5), pipe.sampler_keys(0, 2))
  assert "stablehlo.fft" in jax.jit(fn).lower(*args, freeu=jnp.ones(4)).as_text()

  def stand_in(*_, **__):

    def program(params, ids, uncond_ids, noise, guidance_scale, keys, **inputs):
      images = jnp.zeros(noise.shape[:1] + (HW, HW, 3), jnp.uint8)
      if "freeu" in inputs:
        images = images.at[:, 0, :4, 0].set(jnp.round(inputs["freeu"] * 100).astype(jnp.uint8))
      return images

    return program

  monkeypatch.setattr(pipe, "generate_fn", stand_in)
  kw = dict(num_images=2, steps=2, sampler="ddim", height=HW, width=HW, progress=False, devices=jax.local_devices()[:2])
  pipe.enable_freeu(*RECOMMENDED["sd1"])
  try:
    images = generate.generate(pipe, PROMPTS, **kw).images
  finally:
    pipe.disable_freeu()
  assert images.shape[0] == 4
  np.testing.assert_array_equal(images[:, 0, :4, 0], np.broadcast_to([90, 20, 150, 160], (4, 4)))
  assert not generate.generate(pipe, PROMPTS, **kw).images.any()
