"""Long prompts and prompt weighting for SDXL (jaxsd.prompt_syntax through StableDiffusionXL), opt-in.

The reference is AUTOMATIC1111's SDXL conditioning (modules/sd_hijack_clip.py, sd_models_xl.py) written out
with transformers' CLIPTextModel / CLIPTextModelWithProjection on the tiny SDXL components: each encoder
encodes every 75-token window on its own (penultimate hidden states), "Original" emphasis per encoder and
window, the windows concatenated along the sequence, the encoders along the features, and the pooled
embedding the second encoder's projection of the first window, unweighted. The windows are built by hand
(tests/test_prompt_syntax.py's helpers) with each encoder's tokenizer (the second pads with "!").
"""

from __future__ import annotations

import os
import types

import diffusers
import jax
import numpy as np
import pytest
import torch

import jaxsd
from jaxsd import prompt_syntax
from sample import __main__ as sample_main
from tests import reference
from tests.test_prompt_syntax import _exactly, _weighted, _windows

HW = 16  # the tiny SDXL's VAE halves once: 8x8 latents


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
  base, refiner, c = reference.make_tiny_sdxl_folders(str(tmp_path_factory.mktemp("sdxl")))
  return types.SimpleNamespace(base_path=base, refiner_path=refiner, c=c,
                               base=jaxsd.StableDiffusionXL.from_pretrained(base),
                               refiner=jaxsd.StableDiffusionXL.from_pretrained(refiner))


def _a1111(encoders, windows):
  """A1111's SDXL conditioning of one prompt: `windows` per encoder (ids, weights), each (k, 77). Returns
  (context (k * 77, D1 + D2), pooled (P,)) as float32 numpy."""
  zs = []
  for model, (ids, weights) in zip(encoders, windows):
    with torch.no_grad():
      out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    z = out.hidden_states[-2].double()  # SDXL's penultimate layer, no final layer norm
    w = torch.from_numpy(weights).double()
    per_window = []
    for zi, wi in zip(z, w):  # emphasis ("Original") per encoder and window
      original = zi.mean()
      zi = zi * wi[:, None]
      per_window.append(zi * (original / zi.mean()))
    zs.append(torch.cat(per_window))
  pooled = out.text_embeds[0]  # the last encoder's (text_encoder_2's) projection of the first window
  return torch.cat(zs, dim=-1).float().numpy(), pooled.float().numpy()


def _encoders(xl, refiner=False):
  c = xl.c
  return [c["text_encoder_2"]] if refiner else [c["text_encoder"], c["text_encoder_2"]]


def _tokenizers(xl, refiner=False):
  c = xl.c
  return [c["tokenizer_2"]] if refiner else [c["tokenizer"], c["tokenizer_2"]]


def _close(ours, ref, tol=1e-5):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  diff, bound = float(np.abs(ours - ref).max()), tol * max(1.0, float(np.abs(ref).max()))
  assert diff < bound, f"max |diff| {diff} >= {bound}"


def _encode(pipe, ids, weights=None):
  """(context, pooled) of one row of (B, encoders, L) ids, as the program encodes them."""
  fn = jax.jit(lambda p, i, w: pipe.encode_prompt(p, i, pipe.clip_skip, weights=w))
  context, pooled = fn(pipe.params, ids, weights)
  return np.asarray(context), np.asarray(pooled)


def test_short_unweighted_prompts_are_the_default_program(xl):
  """Within 75 tokens and without weights: exactly the default (diffusers') ids with each tokenizer's own
  padding, second prompts included, and no weights, so the same program and the same embeddings."""
  pipe = xl.base
  prompts, negative = ["a red circle on the left", "a small blue square"], ["", "a green triangle"]
  kw = dict(prompts_2=["a photo", "a drawing"])
  default = pipe.text_inputs(prompts, negative, HW, HW, **kw)
  assert (default[0][:, 1] == 0).any() and not (default[0][:, 0] == 0).any()  # "!" pads the second only
  for long_prompts, weighting in ((True, False), (False, True), (True, True)):
    got = pipe.text_inputs(prompts, negative, HW, HW, long_prompts=long_prompts, prompt_weighting=weighting, **kw)
    assert set(got[2]) == set(default[2])  # no weights: the default program
    for a, b in zip(got[:2] + tuple(got[2].values()), default[:2] + tuple(default[2].values())):
      np.testing.assert_array_equal(a, b)
  # With weights (1.1 on "green") the ids are still the default ones.
  got = pipe.text_inputs(prompts, ["", "a (green) triangle"], HW, HW, prompt_weighting=True, **kw)
  np.testing.assert_array_equal(got[1], default[1])
  assert set(got[2]) == set(default[2]) | {"weights", "uncond_weights"}
  # So the embeddings are the default's, bit for bit (no negative prompts: zero unconditional embeddings).
  ids, uncond, text = pipe.text_inputs(prompts, None, HW, HW)
  want = pipe.encode_prompts(pipe.params, ids, uncond, True, **text)
  ids, uncond, text = pipe.text_inputs(prompts, None, HW, HW, long_prompts=True, prompt_weighting=True)
  got = pipe.encode_prompts(pipe.params, ids, uncond, True, **text)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_long_prompt_is_windows_of_both_encoders_as_a1111(xl):
  """160 tokens: 3 windows (231 positions) for each encoder, the empty negative prompt padded to 3 windows;
  states and pooled embedding as A1111's SDXL (pooled: the first window's)."""
  pipe = xl.base
  text = _exactly(xl.c["tokenizer"], 160)
  ids, uncond, other = pipe.text_inputs([text], [""], HW, HW, long_prompts=True)
  assert ids.shape == uncond.shape == (1, 2, 231) and "weights" not in other
  windows = [_windows(t, [(text, 1.0)]) for t in _tokenizers(xl)]
  for e, (want_ids, _) in enumerate(windows):
    np.testing.assert_array_equal(ids[0, e], want_ids.reshape(-1))
    np.testing.assert_array_equal(uncond[0, e], _windows(_tokenizers(xl)[e], [("", 1.0)], k=3)[0].reshape(-1))
  context, pooled = _encode(pipe, ids)
  want_context, want_pooled = _a1111(_encoders(xl), windows)
  assert context.shape == (1, 231, 64) and pooled.shape == (1, 32)
  _close(context[0], want_context)
  _close(pooled[0], want_pooled)


def test_weighted_prompt_equals_a1111_emphasis_per_encoder(xl):
  """A weighted prompt with a BREAK (10 | 75 | 25 tokens) and a weighted negative prompt: each encoder's states
  weighted on their own, per window; the pooled embedding the first window's, as unweighted."""
  pipe = xl.base
  text, pieces = _weighted(xl.c["tokenizer"])
  negative = "(blurry:1.2), [ugly]"
  neg_pieces = [("blurry", 1.2), (", ", 1.0), ("ugly", 1 / 1.1)]
  ids, uncond, other = pipe.text_inputs([text], [negative], HW, HW, long_prompts=True, prompt_weighting=True)
  assert ids.shape == other["weights"].shape == other["uncond_weights"].shape == (1, 2, 231)
  for row, w, p, k in ((ids, other["weights"], pieces, None), (uncond, other["uncond_weights"], neg_pieces, 3)):
    windows = [_windows(t, p, k) for t in _tokenizers(xl)]
    for e, (want_ids, want_w) in enumerate(windows):
      np.testing.assert_array_equal(row[0, e], want_ids.reshape(-1))
      np.testing.assert_allclose(w[0, e], want_w.reshape(-1), rtol=1e-7)
    context, pooled = _encode(pipe, row, w)
    want_context, want_pooled = _a1111(_encoders(xl), windows)
    _close(context[0], want_context)
    _close(pooled[0], want_pooled)
    unweighted = _encode(pipe, row)
    assert np.abs(unweighted[0][0] - want_context).max() > 1e-3  # the weights matter
    _close(pooled, unweighted[1], tol=1e-6)  # the pooled embedding does not weigh
  # The program's conditioning: the negative half first, as encoded above.
  cond = pipe.encode_prompts(pipe.params, ids, uncond, True, **other)
  assert cond["context"].shape == (2, 231, 64) and cond["text_embeds"].shape == (2, 32)
  _close(cond["context"][1], _a1111(_encoders(xl), [_windows(t, pieces) for t in _tokenizers(xl)])[0])


def test_weights_change_the_states_only_where_weighted(xl):
  """One weighted word in the first window: the other windows are untouched, and in the first each encoder's
  states are the unweighted ones times the window's mean-restoring factor, times the weight at the word."""
  pipe = xl.base
  filler = _exactly(xl.c["tokenizer"], 100)
  plain, weighted = (f"a {w} circle BREAK {filler}" for w in ("red", "(red:1.5)"))
  p_ids, _, p_other = pipe.text_inputs([plain], None, HW, HW, long_prompts=True, prompt_weighting=True)
  ids, _, other = pipe.text_inputs([weighted], None, HW, HW, long_prompts=True, prompt_weighting=True)
  np.testing.assert_array_equal(ids, p_ids)
  assert "weights" not in p_other and ids.shape == (1, 2, 3 * 77)
  (plain_context, plain_pooled), (context, pooled) = _encode(pipe, p_ids), _encode(pipe, ids, other["weights"])
  _close(pooled, plain_pooled, tol=1e-6)
  _close(context[0, 77:], plain_context[0, 77:], tol=1e-6)  # windows 2 and 3 (the first moves by > 1e-4)
  red = 2  # start, "a", "red"
  for features in (slice(0, 32), slice(32, 64)):  # each encoder's own factor
    ratio = context[0, :77, features] / plain_context[0, :77, features]
    factor = np.median(ratio[[0, 1, 3, 4]])
    np.testing.assert_allclose(ratio[[0, 1, 3, 4, 10]], factor, rtol=1e-4)
    np.testing.assert_allclose(ratio[red], 1.5 * factor, rtol=1e-4)
    assert abs(factor - 1) > 1e-4


def test_refiner_second_encoder_only(xl):
  """The refiner (text_encoder_2 only): its windows, states and pooled embedding as A1111's, 32 features."""
  pipe = xl.refiner
  text, pieces = _weighted(xl.c["tokenizer_2"])
  ids, uncond, other = pipe.text_inputs([text], None, HW, HW, long_prompts=True, prompt_weighting=True,
                                        image_to_image=True)
  assert ids.shape == uncond.shape == (1, 1, 231) and not other["zero_uncond"].any()
  windows = [_windows(xl.c["tokenizer_2"], pieces)]
  np.testing.assert_array_equal(ids[0, 0], windows[0][0].reshape(-1))
  context, pooled = _encode(pipe, ids, other["weights"])
  want_context, want_pooled = _a1111(_encoders(xl, refiner=True), windows)
  assert context.shape == (1, 231, 32)
  _close(context[0], want_context)
  _close(pooled[0], want_pooled)


def test_zero_unconditional_embeddings_take_the_long_shape(xl):
  """No negative prompt on the base (force_zeros_for_empty_prompt): zeros as long as the prompts' windows."""
  pipe = xl.base
  ids, uncond, other = pipe.text_inputs(["(a:1.2) " + _exactly(xl.c["tokenizer"], 160)], None, HW, HW,
                                        long_prompts=True, prompt_weighting=True)
  cond = pipe.encode_prompts(pipe.params, ids, uncond, True, **other)
  assert cond["context"].shape == (2, 231, 64)
  assert not np.asarray(cond["context"][0]).any() and not np.asarray(cond["text_embeds"][0]).any()
  assert np.asarray(cond["context"][1]).any()


def test_text_to_image_equals_diffusers_given_the_a1111_embeddings(xl):
  """The whole call (long weighted prompts and negative prompts) against diffusers' StableDiffusionXLPipeline
  given the reference's prompt embeddings and pooled embeddings: the program conditions on what A1111 computes."""
  pipe, c = xl.base, xl.c
  text, pieces = _weighted(c["tokenizer"])
  prompts, negative = [text, "a (green:1.3) triangle"], ["(blurry:1.2)", ""]
  all_pieces = [pieces, [("a ", 1.0), ("green", 1.3), (" triangle", 1.0)], [("blurry", 1.2)], [("", 1.0)]]
  latents = np.asarray(pipe.noise(0, 2, HW, HW))
  ours = pipe(prompts, negative, latents=latents, steps=3, output="latent", long_prompts=True, prompt_weighting=True)
  embeds = [_a1111(_encoders(xl), [_windows(t, p, k=3) for t in _tokenizers(xl)]) for p in all_pieces]
  context, pooled = (torch.from_numpy(np.stack([e[i] for e in embeds])) for i in (0, 1))
  tpipe = diffusers.StableDiffusionXLPipeline(
      vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
      tokenizer_2=c["tokenizer_2"], unet=c["unet"],
      scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(xl.base_path, subfolder="scheduler"),
      force_zeros_for_empty_prompt=True, add_watermarker=False)
  tpipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = tpipe(prompt_embeds=context[:2], pooled_prompt_embeds=pooled[:2], negative_prompt_embeds=context[2:],
                negative_pooled_prompt_embeds=pooled[2:], height=HW, width=HW, num_inference_steps=3,
                guidance_scale=5.0, latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  _close(ours, reference.nchw_to_nhwc(ref), tol=1e-4)
  # Other weights and words of the same window count: the same program, the weights an input.
  size = pipe._jitted(True, "latent", "text", True)._cache_size()
  pipe(["[a] " + _exactly(c["tokenizer"], 160), "(b:0.7)"], ["c", "(d)"], latents=latents, steps=3, output="latent",
       long_prompts=True, prompt_weighting=True)
  assert pipe._jitted(True, "latent", "text", True)._cache_size() == size


def test_img2img_inpaint_refiner_and_controlnet_take_the_options(xl, tmp_path):
  """Every SDXL entry point runs long weighted prompts: finite latents of the right shape."""
  from tests.test_pipeline_controlnet import _controlnet

  prompt = ["a (red:1.3) circle, [blue] square BREAK " + _exactly(xl.c["tokenizer"], 100)]
  kw = dict(steps=2, output="latent", long_prompts=True, prompt_weighting=True)
  image = np.random.default_rng(0).integers(0, 256, (1, HW, HW, 3), dtype=np.uint8)
  mask = np.zeros((1, HW, HW), np.uint8)
  mask[:, 4:12, 4:12] = 255
  net = str(tmp_path / "controlnet")
  _controlnet(xl.c["unet"], 20).save_pretrained(net)
  outs = {
      "img2img": xl.base.img2img(prompt, image, strength=0.5, negative_prompts=["(ugly:1.2)"], **kw),
      "inpaint": xl.base.inpaint(prompt, image, mask, **kw),
      "refiner": xl.refiner.img2img(prompt, image, strength=0.5, **kw),
      "controlnet": xl.base.with_controlnet(net)(prompt, image, height=HW, width=HW, **kw),
  }
  for name, out in outs.items():
    assert out.shape == (1, 8, 8, 4) and np.isfinite(out).all(), name


def test_textual_inversion_tokens_are_spelt_out_before_the_windows(xl, tmp_path):
  """A two-vector SDXL embedding (clip_l and clip_g) in a weighted prompt: both tokenizers spell it out, and
  both of its tokens take the weight of the bracket around its name."""
  import safetensors.numpy

  file = str(tmp_path / "unaestheticxl.safetensors")
  rng = np.random.default_rng(0)
  safetensors.numpy.save_file({k: rng.normal(size=(2, 32)).astype(np.float32) for k in ("clip_l", "clip_g")}, file)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(xl.base_path)
  assert pipe.load_textual_inversion(file) == "unaestheticxl"
  prompt = "a cat, (unaestheticxl:1.3) " + _exactly(xl.c["tokenizer"], 100)
  ids, _, other = pipe.text_inputs([prompt], None, HW, HW, long_prompts=True, prompt_weighting=True)
  assert ids.shape == (1, 2, 2 * 77)
  for e, tokenizer in enumerate((pipe.tokenizer, pipe.tokenizer_2)):
    start = tokenizer.convert_tokens_to_ids("unaestheticxl")
    at = list(ids[0, e]).index(start)
    np.testing.assert_array_equal(ids[0, e, at:at + 2], [start, start + 1])
    np.testing.assert_allclose(other["weights"][0, e, at:at + 2], 1.3, rtol=1e-7)
    np.testing.assert_allclose(other["weights"][0, e, at + 2:], 1.0)
  context, _ = _encode(pipe, ids, other["weights"])
  assert context.shape == (1, 154, 64) and np.isfinite(context).all()


def test_the_command_writes_an_image_with_both_flags(xl, tmp_path, capsys):
  """`python -m sample --long-prompts --prompt-weighting` on the SDXL folder (2 steps)."""
  prompt = "a (red:1.3) circle BREAK " + _exactly(xl.c["tokenizer"], 90)
  out = str(tmp_path / "out")
  argv = [
      "--model", xl.base_path, "--prompt", prompt, "--negative-prompt", "[blurry]", "--steps", "2", "--out", out,
      "--no-progress", "--long-prompts", "--prompt-weighting"
  ]
  assert sample_main.main(argv) == 0, capsys.readouterr().err
  assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 2  # the image and the grid
  assert "wrote 1 images" in capsys.readouterr().err


def test_tokenize_each_pads_every_tokenizer_to_one_window_count(xl):
  """One tokenizer's prompts longer than the other's (second prompts): both padded to the longest's windows."""
  t1, t2 = _tokenizers(xl)
  (a,), (b,) = prompt_syntax.tokenize_each([t1, t2], [[["a cat"]], [[_exactly(t2, 160)]]], long_prompts=True)
  assert a[0].shape == b[0].shape == (1, 231)
  np.testing.assert_array_equal(a[0][0, 77:], _windows(t1, [("", 1.0)], k=2)[0].reshape(-1))
