"""T2I-Adapter pipeline parity with diffusers' StableDiffusionAdapterPipeline (one adapter and a MultiAdapter) and
StableDiffusionXLAdapterPipeline (adapter_conditioning_factor < 1) on the tiny random SD / SDXL models and tiny
random adapters saved by diffusers, the same initial latents passed in."""

from __future__ import annotations

import types

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jaxsd
from jaxsd.pipeline_t2i_adapter import StableDiffusionAdapter
from tests import reference
from tests.test_pipeline import DETERMINISTIC
from tests.test_pipeline_controlnet import HW, NEGATIVE, PROMPTS, _images

# The tiny models' VAE halves once (8x8 latents of 16 px images); their U-Nets have two levels of 32 and 64 channels:
# adapters unshuffle by 2 (SD: features at 8 and 4 px) or by 4 (SDXL layout: both at 4 px).
SD_ADAPTERS = (dict(in_channels=3, channels=(32, 64), num_res_blocks=1,
                    downscale_factor=2), dict(in_channels=1, channels=(32, 64), num_res_blocks=2, downscale_factor=2))
XL_ADAPTER = dict(in_channels=3, channels=(32, 64), num_res_blocks=1, downscale_factor=4,
                  adapter_type="full_adapter_xl")


def _adapter(kw, seed):
  torch.manual_seed(seed)
  adapter = diffusers.T2IAdapter(**kw)
  reference._jitter(adapter, seed=seed)
  return adapter.eval()


def _grey(seed):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (HW, HW), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i_adapter")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  adapters = [_adapter(kw, 30 + i) for i, kw in enumerate(SD_ADAPTERS)]
  folders = []
  for i, adapter in enumerate(adapters):
    folders.append(str(root / f"adapter{i}"))
    adapter.save_pretrained(folders[-1])
  base = jaxsd.StableDiffusion.from_pretrained(path)
  return types.SimpleNamespace(path=path, tpipe=reference.torch_pipeline(path), adapters=adapters, folders=folders,
                               base=base, one=StableDiffusionAdapter.from_pipeline(base, folders[0]),
                               two=StableDiffusionAdapter.from_pipeline(base, folders))


def _sd_reference(sd, adapters, sampler, latents, images, guidance=7.5, **kw):
  cls, skw = DETERMINISTIC[sampler]
  t = sd.tpipe
  ref = diffusers.StableDiffusionAdapterPipeline(vae=t.vae, text_encoder=t.text_encoder, tokenizer=t.tokenizer,
                                                 unet=t.unet, adapter=adapters if len(adapters) > 1 else adapters[0],
                                                 scheduler=cls.from_pretrained(sd.path, subfolder="scheduler",
                                                                               **skw), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
  return _run(ref, latents, images, NEGATIVE, guidance, **kw)


def _run(ref, latents, images, negative, guidance, **kw) -> np.ndarray:
  ref.set_progress_bar_config(disable=True)
  with torch.no_grad():
    out = ref(PROMPTS, image=images, negative_prompt=negative, height=HW, width=HW, num_inference_steps=4,
              guidance_scale=guidance, latents=reference.nhwc_to_nchw(latents), output_type="latent", **kw)
  return reference.nchw_to_nhwc(out.images)


def test_one_adapter_matches_diffusers_and_scales_compile_nothing(sd):
  """DDIM, one adapter, two scales against diffusers in one compiled program; scale 0 is the plain pipeline's
  latents exactly, and the adapter moves them."""
  latents = np.asarray(sd.base.noise(0, len(PROMPTS), HW, HW))
  images = _images(0)
  kw = dict(steps=4, sampler="ddim", latents=latents, output="latent")
  for scale in (0.8, 1.3):
    ours = sd.one(PROMPTS, images, NEGATIVE, adapter_conditioning_scale=scale, **kw)
    ref = _sd_reference(sd, sd.adapters[:1], "ddim", latents, images, adapter_conditioning_scale=scale)
    reference.check_close(ours, ref, f"sd ddim, adapter scale {scale}")
  off = sd.one(PROMPTS, images, NEGATIVE, adapter_conditioning_scale=0.0, **kw)
  assert sd.one._jitted(True, "latent", "text", True)._cache_size() == 1
  np.testing.assert_array_equal(off, sd.base(PROMPTS, NEGATIVE, height=HW, width=HW, **kw))
  assert np.abs(ours - off).max() > 1e-2


def test_multi_adapter_matches_diffusers(sd):
  """Heun (two model calls per step), an RGB and a grey adapter weighted by their scales (MultiAdapter)."""
  latents = np.asarray(sd.base.noise(1, len(PROMPTS), HW, HW))
  images = [_images(1), _grey(2)]  # per adapter, one image per prompt (diffusers' nesting)
  scales = [0.7, 1.2]
  ours = sd.two(PROMPTS, images, NEGATIVE, steps=4, sampler="heun", latents=latents, output="latent",
                adapter_conditioning_scale=scales)
  ref = _sd_reference(sd, sd.adapters, "heun", latents, images, adapter_conditioning_scale=scales)
  reference.check_close(ours, ref, "sd heun, two adapters")


@pytest.mark.parametrize("images, kw, match", [
    (lambda im: None, {}, "needs adapter images"),
    (lambda im: im, {}, "not a list of entries for 2 T2I-Adapters"),
    (lambda im: [im], {}, "1 entries for 2 T2I-Adapters"),
    (lambda im: [im, im.convert("L")], dict(adapter_conditioning_scale=[1.0]), "1 values for 2 T2I-Adapters"),
    (lambda im: [im, im.convert("L")], dict(adapter_conditioning_scale=float("nan")), "finite numbers"),
    (lambda im: [im, np.zeros((HW, HW, 3), np.uint8)], {}, r"adapter_images\[1\]: .* takes 1-channel images"),
    (lambda im: [im, np.zeros((3, HW, HW), np.uint8)], {}, "3 images for T2I-Adapter 1 and 2 prompts"),
    (lambda im: [np.zeros((8, 8, 3), np.uint8), im], dict(height=HW, width=HW), "the output 16x16"),
    (lambda im: [im, im], dict(height=12), "height=12: .* multiples of 8"),
])
def test_bad_input_is_refused_before_compiling(sd, images, kw, match):
  sizes = lambda: {k: f._cache_size() for k, f in sd.two._compiled.items()}  # noqa: E731
  before = sizes()
  with pytest.raises(ValueError, match=match):
    sd.two(PROMPTS, images(_images(0)[0]), steps=2, **kw)
  assert sizes() == before
  with pytest.raises(ValueError, match="text-to-image only"):
    sd.one.img2img(PROMPTS, _images(0))


def test_an_adapter_for_another_model_is_refused(sd, tmp_path):
  _adapter(dict(SD_ADAPTERS[0], channels=(32, 32)), 5).save_pretrained(tmp_path / "narrow")
  with pytest.raises(ValueError, match="feature map 1 .* has 32 channels .* down block 1 takes 64"):
    StableDiffusionAdapter.from_pipeline(sd.base, str(tmp_path / "narrow"))
  _adapter(dict(SD_ADAPTERS[0], downscale_factor=4), 6).save_pretrained(tmp_path / "coarse")
  with pytest.raises(ValueError, match="T2I-Adapter 1 downscales by 4"):
    StableDiffusionAdapter.from_pipeline(sd.base, [sd.folders[0], str(tmp_path / "coarse")])


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
  root = tmp_path_factory.mktemp("xl_t2i_adapter")
  base, _, c = reference.make_tiny_sdxl_folders(str(root / "models"))
  adapter = _adapter(XL_ADAPTER, 40)
  adapter.save_pretrained(root / "adapter")
  pipe = StableDiffusionAdapter.from_pipeline(jaxsd.StableDiffusionXL.from_pretrained(base), str(root / "adapter"))
  return types.SimpleNamespace(base=base, c=c, adapter=adapter, pipe=pipe)


def test_sdxl_adapter_with_a_conditioning_factor_matches_diffusers(xl):
  """The folder's sampler (Euler), the features in the first int(4 x 0.5) = 2 calls only; another factor and scale
  compile nothing."""
  assert isinstance(xl.pipe, jaxsd.StableDiffusionXLAdapter)
  c = xl.c
  ref = diffusers.StableDiffusionXLAdapterPipeline(
      vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
      tokenizer_2=c["tokenizer_2"], unet=c["unet"], adapter=xl.adapter,
      scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(xl.base, subfolder="scheduler"),
      force_zeros_for_empty_prompt=True)
  latents = np.asarray(xl.pipe.noise(3, len(PROMPTS), HW, HW))
  images = _images(3)
  kw = dict(steps=4, latents=latents, output="latent")
  for factor, scale in ((0.5, 0.9), (1.0, 1.1)):
    ours = xl.pipe(PROMPTS, images, NEGATIVE, adapter_conditioning_scale=scale, adapter_conditioning_factor=factor,
                   **kw)
    want = _run(ref, latents, images, NEGATIVE, 5.0, adapter_conditioning_scale=scale,
                adapter_conditioning_factor=factor)
    reference.check_close(ours, want, f"sdxl euler, factor {factor}, scale {scale}")
  assert xl.pipe._jitted(True, "latent", "text", True)._cache_size() == 1
  with pytest.raises(ValueError, match="adapter_conditioning_factor=1.5"):
    xl.pipe(PROMPTS, images, adapter_conditioning_factor=1.5, **kw)


def test_sample_command_writes_the_pipeline_calls_images(sd, tmp_path, monkeypatch):
  """`python -m sample --t2i-adapter A --adapter-image IMG --adapter-scale S` (in process; generate on one device,
  for time: tests/test_generate.py covers the pmap) writes the pipeline call's images, within one uint8 level: there
  one image (another size, resized) serves both prompts. An SD model refuses --adapter-factor."""
  from jaxsd import generate
  from sample.__main__ import main

  real = generate.generate
  monkeypatch.setattr(generate, "generate", lambda *a, **kw: real(*a, devices=jax.local_devices()[:1], **kw))
  image = tmp_path / "edges.png"
  Image.fromarray(np.random.default_rng(7).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(image)  # resized
  argv = [
      "--model", sd.path, "--prompt", "a red circle", "--prompt", "a blue square", "--steps", "3", "--sampler", "ddim",
      "--seed", "5", "--t2i-adapter", sd.folders[0], "--adapter-image",
      str(image), "--adapter-scale", "0.8", "--height",
      str(HW), "--width",
      str(HW), "--out",
      str(tmp_path / "out"), "--no-progress"
  ]
  assert main(argv) == 0
  names = ("a_red_circle", "a_blue_square")
  written = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{n}-seed5-0000.png")) for n in names])
  ours = sd.one(["a red circle", "a blue square"], Image.open(image), height=HW, width=HW, steps=3, sampler="ddim",
                seed=5, adapter_conditioning_scale=0.8)
  diff = np.abs(written.astype(int) - ours.astype(int)).max()
  print(f"sample --t2i-adapter vs the pipeline call: max uint8 diff {diff}")
  assert diff <= 1
  assert main(argv + ["--adapter-factor", "0.5"]) == 2
