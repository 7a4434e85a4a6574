"""Perturbed-Attention Guidance parity with diffusers' StableDiffusionPAGPipeline, StableDiffusionPAGImg2ImgPipeline
and StableDiffusionXLPAGPipeline on tiny random models (the same initial latents passed in), the layer names as
diffusers matches them, and the calls and flags that are refused."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

import jaxsd
from jaxsd import pag
from tests import reference

HW = 16
PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("pag_sd")))
  return path, reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  base, _, _ = reference.make_tiny_sdxl_folders(str(tmp_path_factory.mktemp("pag_sdxl")))
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
  return base, tpipe, jaxsd.StableDiffusionXL.from_pretrained(base)


def _reference(cls, tpipe, path, layers, latents, guidance, negative=NEGATIVE, steps=3, **kw) -> np.ndarray:
  """diffusers' PAG pipeline `cls` on `tpipe`'s components (Euler, the folder's config): final latents, NHWC."""
  components = {k: v for k, v in tpipe.components.items() if k not in ("safety_checker", "feature_extractor")}
  extra = {
      "requires_safety_checker": False,
      "safety_checker": None,
      "feature_extractor": None
  } if ("safety_checker" in tpipe.components) else {}
  ref = cls(**components, pag_applied_layers=layers, **extra)
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
  ref.set_progress_bar_config(disable=True)
  with torch.no_grad():
    out = ref(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
              output_type="latent", **({} if latents is None else {
                  "latents": reference.nhwc_to_nchw(latents)
              }), **kw)
  return reference.nchw_to_nhwc(out.images)


def _sd_pag(tpipe, path, layers, latents, guidance, **kw):
  return _reference(diffusers.StableDiffusionPAGPipeline, tpipe, path, layers, latents, guidance, height=HW, width=HW,
                    **kw)


def test_sd_text_to_image_matches_diffusers_and_scales_compile_nothing(sd):
  """Under guidance ([uncond, cond, perturbed]): "mid" at pag_scale 3 and at 1.5 with an adaptive scale that reaches
  0 during the run (one program for both); without guidance ([cond, perturbed]): PAG alone, on two layers named as
  diffusers names them."""
  path, tpipe, pipe = sd
  latents = np.asarray(pipe.noise(0, 2, HW, HW))
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  try:
    pipe.enable_pag("mid")
    reference.check_close(run(pag_scale=3.0), _sd_pag(tpipe, path, "mid", latents, 7.5, pag_scale=3.0),
                          "mid, CFG 7.5, pag_scale 3")
    program = pipe._jitted(True, "latent", "text", True, pag.match_layers(pipe.unet.config, ["mid"]))
    size = program._cache_size()
    # Euler's timesteps here: 667, 334, 1: the scale 1.5 - 0.002 (1000 - t) is 0.834, 0.168, then 0 (clipped).
    adaptive = dict(pag_scale=1.5, pag_adaptive_scale=0.002)
    reference.check_close(run(**adaptive), _sd_pag(tpipe, path, "mid", latents, 7.5, **adaptive), "mid, adaptive scale")
    assert program._cache_size() == size  # the scales are inputs

    layers = ["down_blocks.0", "up_blocks.1.attentions.0"]
    pipe.enable_pag(layers)
    reference.check_close(run(guidance_scale=1.0), _sd_pag(tpipe, path, layers, latents, 1.0),
                          f"{layers}, no CFG (pag_scale 3)")
  finally:
    pipe.disable_pag()


def test_pag_acts_and_off_is_the_plain_pipeline_bit_for_bit(sd):
  """pag_scale 0 is plain guidance exactly (as diffusers, PAG off: the plain program); pag_scale 3 moves the result
  far past the parity tolerance; disable_pag gives the plain outputs again, bit for bit, and refuses pag_scale."""
  _, _, pipe = sd
  latents = np.asarray(pipe.noise(0, 2, HW, HW))
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  plain = run()
  try:
    pipe.enable_pag("mid")
    np.testing.assert_array_equal(run(pag_scale=0.0), plain)
    moved = float(np.abs(run(pag_scale=3.0) - plain).max())
    print(f"pag_scale 3 vs plain CFG: max |diff| {moved:.2f}")
    assert moved > 1000 * 1e-4 * max(1.0, float(np.abs(plain).max()))
  finally:
    pipe.disable_pag()
  np.testing.assert_array_equal(run(), plain)
  with pytest.raises(ValueError, match=r"enable_pag"):
    run(pag_scale=3.0)


def test_img2img_matches_diffusers(sd, monkeypatch):
  """StableDiffusionPAGImg2ImgPipeline at strength 0.6 (3 of 5 Euler steps), given the image latents and noise."""
  from diffusers.pipelines.pag import pipeline_pag_sd_img2img as module

  path, tpipe, pipe = sd
  noise = np.asarray(pipe.noise(4, 2, HW, HW))
  image_latents = np.asarray(pipe.noise(5, 2, HW, HW)) * 0.8
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  try:
    pipe.enable_pag("mid")
    ours = pipe.img2img(PROMPTS, None, strength=0.6, negative_prompts=NEGATIVE, steps=5, sampler="euler",
                        output="latent", noise=noise, image_latents=image_latents, pag_scale=2.5)
  finally:
    pipe.disable_pag()
  ref = _reference(diffusers.StableDiffusionPAGImg2ImgPipeline, tpipe, path, "mid", None, 7.5, steps=5,
                   image=reference.nhwc_to_nchw(image_latents), strength=0.6, pag_scale=2.5)
  reference.check_close(ours, ref, "img2img, mid")


def test_sdxl_text_to_image_matches_diffusers(sdxl):
  """StableDiffusionXLPAGPipeline, two layer names, guidance 5 with guidance_rescale 0.3 (applied after PAG, against
  the conditional rows), no negative prompt (zero unconditional embeddings)."""
  base, tpipe, pipe = sdxl
  latents = np.asarray(pipe.noise(6, 2, HW, HW))
  layers = ["mid", "up_blocks.0.attentions.1"]
  try:
    pipe.enable_pag(layers)
    ours = pipe(PROMPTS, steps=3, guidance_scale=5.0, sampler="euler", latents=latents, output="latent",
                guidance_rescale=0.3, pag_scale=3.0)
  finally:
    pipe.disable_pag()
  ref = _reference(diffusers.StableDiffusionXLPAGPipeline, tpipe, base, layers, latents, 5.0, negative=None, height=HW,
                   width=HW, guidance_rescale=0.3, pag_scale=3.0)
  reference.check_close(ours, ref, "SDXL, mid + up_blocks.0.attentions.1, guidance_rescale 0.3")


def _diffusers_selection(unet, layer_ids) -> list[str] | str:
  """The self-attention layers diffusers' `_set_pag_attn_processor` gives the PAG processor, or its error."""
  from diffusers.pipelines.pag.pag_utils import PAGMixin

  ref = type("PAGUNet", (PAGMixin,), {})()  # what the mixin reads of a pipeline: its unet
  ref.unet = unet
  ref.set_pag_applied_layers(layer_ids)
  before = dict(unet.attn_processors)
  try:
    ref._set_pag_attn_processor(ref.pag_applied_layers, True)
    return sorted(name.removesuffix(".processor") for name in ref.pag_attn_processors)
  except ValueError as e:
    return str(e)
  finally:
    unet.set_attn_processor(before)


@pytest.mark.parametrize(
    "ids",
    [["mid"], ["down"], ["up_blocks.1"], ["down_blocks.1"], ["attn1"], ["blocks.1"], ["up_blocks.1.attentions.(0|1)"],
     ["mid", "up_blocks.0.attentions.1"], ["down.block_1"], ["up.block_1.attentions_0"], ["nowhere"]])
def test_layer_names_select_what_diffusers_selects(sd, sdxl, ids):
  """Both tiny U-Nets: the self-attention layers are diffusers' (names and count), every name selects the layers
  diffusers' `_set_pag_attn_processor` does, and a name that selects none (diffusers' older "down.block_1" too) is
  refused in one line naming where the layers are."""
  for (_, tpipe, pipe) in (sd, sdxl):
    names = [n for n, m in tpipe.unet.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert sorted(pag.self_attention_layers(pipe.unet.config)) == sorted(names)
    want = _diffusers_selection(tpipe.unet, ids)
    if isinstance(want, str):
      assert "Cannot find PAG layer" in want
      with pytest.raises(ValueError, match="Cannot find PAG layer") as e:
        pipe.enable_pag(ids)
      assert "\n" not in str(e.value) and "mid_block.attentions.0" in str(e.value)
      assert pipe.pag_applied_layers is None
    else:
      paths = pag.match_layers(pipe.unet.config, ids)
      assert sorted(paths) == sorted(pag.parameter_path(n) for n in want)
      for path in paths:  # the U-Net's own parameter paths
        params = pipe.unet_params
        for part in path.split("/"):
          assert part in params, f"no parameters at {path}"
          params = params[part]


def test_bad_arguments_are_refused(sd):
  _, _, pipe = sd
  for bad, message in ((["("], "not a valid regular expression"), ([3], "expected strings"), ([], "give a layer")):
    with pytest.raises(ValueError, match=message):
      pipe.enable_pag(bad)
  try:
    pipe.enable_pag(["mid"])
    for kw, message in ((dict(pag_scale=float("nan")), "finite"), (dict(pag_adaptive_scale=1e39), "finite")):
      with pytest.raises(ValueError, match=message):
        pipe(PROMPTS, steps=1, height=HW, width=HW, **kw)
  finally:
    pipe.disable_pag()
  with pytest.raises(ValueError, match="enable_pag"):
    pipe.img2img(PROMPTS, None, image_latents=np.zeros((2, 8, 8, 4), np.float32), pag_adaptive_scale=0.5)


@pytest.mark.parametrize("args, message", [
    (["--pag-layers", "mid"], "--pag-layers needs --pag-scale S"),
    (["--pag-adaptive-scale", "0.1"], "--pag-adaptive-scale needs --pag-scale S"),
    (["--pag-scale", "nan"], "--pag-scale nan: must be a finite number >= 0"),
    (["--pag-scale", "-1"], "--pag-scale -1.0: must be a finite number >= 0"),
    (["--pag-scale", "3", "--pag-adaptive-scale", "inf"], "--pag-adaptive-scale inf: must be a finite"),
    (["--pag-scale", "3", "--pag-layers", "mid", "("], "--pag-layers: pag_applied_layers '(' is not a valid regular"),
    (["--pag-scale", "3", "--guess-mode"], "--pag-scale with --guess-mode is not supported"),
])
def test_sample_pag_flags_exit_2_before_loading(tmp_path, capsys, monkeypatch, args, message):
  from jaxsd import pipeline_xl
  from sample import __main__ as sample_main
  from tests.test_commands import _one_error_line, _sample

  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: pytest.fail("loaded a model"))
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", *args)) == 2
  assert message in _one_error_line(capsys)


def test_sample_pag_reaches_the_pipeline(sd, tmp_path, capsys, monkeypatch):
  """--pag-scale / --pag-layers / --pag-adaptive-scale reach enable_pag and generate; a layer name that matches
  none of the model's self-attention layers exits 2 with diffusers' message, once the model is known (the loaded
  pipeline stands in for the folder's)."""
  from jaxsd import generate, pipeline_xl
  from sample.__main__ import main
  from tests.test_commands import _one_error_line

  path, _, pipe = sd
  seen = {}

  def fake_generate(pipe, prompts, **kw):
    seen.update(layers=pipe.pag_applied_layers, scale=kw["pag_scale"], adaptive=kw["pag_adaptive_scale"])
    raise ValueError("stop here")

  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: pipe)
  monkeypatch.setattr(generate, "generate", fake_generate)
  common = ["--model", path, "--prompt", "a cat", "--out", str(tmp_path / "out"), "--no-progress"]
  try:
    assert main(common + ["--pag-scale", "2.5"]) == 2
    assert seen == dict(layers=("mid",), scale=2.5, adaptive=0.0)
    assert "stop here" in _one_error_line(capsys)
    pipe.disable_pag()
    assert main(common +
                ["--pag-scale", "2", "--pag-layers", "down_blocks.0", "up", "--pag-adaptive-scale", "0.1"]) == 2
    assert seen == dict(layers=("down_blocks.0", "up"), scale=2.0, adaptive=0.1)
    capsys.readouterr()
    pipe.disable_pag()
    assert main(common + ["--pag-scale", "3", "--pag-layers", "down_blocks.1"]) == 2
    assert "Cannot find PAG layer to set attention processor for: 'down_blocks.1'" in _one_error_line(capsys)
    assert pipe.pag_applied_layers is None
  finally:
    pipe.disable_pag()


def test_controlnet_pipelines_keep_pag_and_refuse_guess_mode(sd):
  """with_controlnet keeps PAG on (the perturbed rows get the conditional rows' residuals, as diffusers' PAG
  ControlNet pipelines); guess mode, which those pipelines fail on, is refused before anything is traced."""
  from jaxsd.models.controlnet import ControlNetConfig, ControlNetModel

  _, _, pipe = sd
  cfg = ControlNetConfig(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), block_out_channels=(32, 64),
                         layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                         conditioning_embedding_out_channels=(8, 16))
  try:
    pipe.enable_pag("mid")
    steered = pipe.with_controlnet((ControlNetModel(cfg), {}))  # (no weights: nothing runs)
  finally:
    pipe.disable_pag()
  assert steered.pag_applied_layers == ("mid",)
  control = np.zeros((2, HW, HW, 3), np.float32)
  with pytest.raises(ValueError, match="Perturbed-Attention Guidance with guess_mode is not supported"):
    steered(PROMPTS, control, steps=2, guess_mode=True)
  assert not steered._compiled
