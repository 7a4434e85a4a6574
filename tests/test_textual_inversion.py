"""Textual-inversion embeddings as users have them (`pipe.load_textual_inversion`): parity with diffusers'
`load_textual_inversion` on a tiny random SD (an A1111 safetensors `emb_params` and `.pt` `string_to_param` with
three vectors, a diffusers single-vector file) and SDXL (`clip_l` / `clip_g`, diffusers' two calls), the
multi-vector tokens spelt out as diffusers' `maybe_convert_prompt` (weighted prompts too), and the refusals.
"""

from __future__ import annotations

import os
import types

import diffusers
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import jaxsd
from jaxsd import token_embeddings
from tests import reference

HW, STEPS = 16, 3
# Lowercase tokens: diffusers compares `tokenizer.tokenize`'s lowercased pieces with the added tokens' spelling,
# so with transformers 5 it spells out only lowercase multi-vector tokens (test_mixed_case_token_is_spelt_out).
PROMPTS = ["a <cat-toy> in grainy-style", "a photo of a dog, grainy-style"]
NEGATIVE = ["badhands, blurry", "badhands"]


def _rand(shape, seed):
  return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


def _latents_match(pipe, tpipe, prompts, negative, guidance):
  """Final latents of jaxsd and diffusers (Euler, the same noise) within the pipeline parity tests' tolerance:
  1e-4 of the latents' scale."""
  latents = np.asarray(pipe.noise(0, len(prompts), HW, HW))
  ours = np.asarray(
      pipe(prompts, negative, height=HW, width=HW, steps=STEPS, guidance_scale=guidance, sampler="euler",
           latents=latents, output="latent"))
  with torch.no_grad():
    out = tpipe(prompts, negative_prompt=negative, height=HW, width=HW, num_inference_steps=STEPS,
                guidance_scale=guidance, latents=reference.nhwc_to_nchw(latents), output_type="latent")
  ref = reference.nchw_to_nhwc(out.images)
  diff = float(np.abs(ours - ref).max())
  print(f"max |ours - diffusers| = {diff:.2e} (latents up to {np.abs(ref).max():.2f})")
  assert diff < 1e-4 * max(1.0, float(np.abs(ref).max())), f"max |diff| {diff}"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("ti")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  files = {
      "a1111_st": str(root / "badhands.safetensors"),  # A1111 safetensors: the token is the file's name
      "a1111_pt": str(root / "grainy.pt"),  # A1111 .pt: the token is its `name`
      "diffusers": str(root / "learned_embeds.safetensors"),
  }
  safetensors.numpy.save_file({"emb_params": _rand((3, 32), 1)}, files["a1111_st"])
  torch.save(
      {
          "string_to_token": {
              "*": 265
          },
          "string_to_param": {
              "*": torch.nn.Parameter(torch.from_numpy(_rand((3, 32), 2)))
          },
          "name": "grainy-style",
          "step": 500,
          "sd_checkpoint": "0123abcd",
          "sd_checkpoint_name": "v1-5",
      }, files["a1111_pt"])
  safetensors.numpy.save_file({"<cat-toy>": _rand((32,), 3)}, files["diffusers"])
  return types.SimpleNamespace(path=path, files=files)


def _diffusers_sd(sd):
  tpipe = reference.torch_pipeline(sd.path)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(sd.path, subfolder="scheduler")
  tpipe.load_textual_inversion(sd.files["a1111_st"], token="badhands")  # diffusers reads emb_params as a token
  tpipe.load_textual_inversion(sd.files["a1111_pt"])
  tpipe.load_textual_inversion(sd.files["diffusers"])
  return tpipe


def _jaxsd_sd(sd):
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  assert pipe.load_textual_inversion(sd.files["a1111_st"]) == "badhands"
  assert pipe.load_textual_inversion(sd.files["a1111_pt"], allow_pickle=True) == "grainy-style"
  assert pipe.load_textual_inversion(sd.files["diffusers"]) == "<cat-toy>"
  return pipe


def test_sd_latents_match_diffusers(sd):
  pipe, tpipe = _jaxsd_sd(sd), _diffusers_sd(sd)
  assert len(pipe.tokenizer) == len(tpipe.tokenizer) == 49408 + 7
  assert pipe.text_encoder.config.vocab_size == tpipe.text_encoder.get_input_embeddings().weight.shape[0]
  _latents_match(pipe, tpipe, PROMPTS, NEGATIVE, 7.5)


def test_expanded_ids_match_maybe_convert_prompt(sd):
  pipe, tpipe = _jaxsd_sd(sd), _diffusers_sd(sd)
  tok = tpipe.tokenizer

  def theirs(prompts):
    return tok(tpipe.maybe_convert_prompt(prompts, tok), padding="max_length", max_length=77,
               truncation=True)["input_ids"]

  ids, uncond_ids, _ = pipe.text_inputs(PROMPTS, NEGATIVE, HW, HW)
  np.testing.assert_array_equal(ids, theirs(PROMPTS))
  np.testing.assert_array_equal(uncond_ids, theirs(NEGATIVE))
  assert (ids == tok.convert_tokens_to_ids("grainy-style_2")).sum() == 2  # three vectors: three tokens each time
  # Weighted and long prompts: each span of equal weight is tokenized on its own, so "(grainy-style:1.3)"
  # weighs all three of its tokens and the ids are those of the unweighted prompt.
  weighted = ["a <cat-toy> in (grainy-style:1.3)", "a photo of a dog, grainy-style"]
  for kw in (dict(prompt_weighting=True), dict(prompt_weighting=True, long_prompts=True)):
    ids, uncond_ids, text = pipe.text_inputs(weighted, ["(badhands:1.2), blurry", "badhands"], HW, HW, **kw)
    np.testing.assert_array_equal(ids, theirs(PROMPTS))
    np.testing.assert_array_equal(uncond_ids, theirs(NEGATIVE))
    first = tok.convert_tokens_to_ids("grainy-style")
    row = list(ids[0])
    np.testing.assert_allclose(text["weights"][0, row.index(first):row.index(first) + 3], 1.3)
    np.testing.assert_allclose(text["uncond_weights"][0, 1:4], 1.2)
    np.testing.assert_allclose(text["uncond_weights"][0, 4:], 1.0)


def test_mixed_case_token_is_spelt_out(sd, tmp_path):
  """A1111's names are often mixed case ("EasyNegative", 8+ vectors): the tokenizer matches an added token
  whatever the case, and so does the spelling out (diffusers compares the lowercased pieces and leaves it
  one token)."""
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  file = str(tmp_path / "EasyNegative.safetensors")
  safetensors.numpy.save_file({"emb_params": _rand((8, 32), 4)}, file)
  assert pipe.load_textual_inversion(file) == "EasyNegative"
  spelt = " ".join(["EasyNegative"] + [f"EasyNegative_{i}" for i in range(1, 8)])
  assert pipe.maybe_convert_prompt(["EasyNegative, (easynegative:1.2)"]) == [f"{spelt}, ({spelt}:1.2)"]
  start = pipe.tokenizer.convert_tokens_to_ids("EasyNegative")
  ids = pipe.text_inputs(["a cat"], ["easyNEGATIVE"], HW, HW)[1]
  np.testing.assert_array_equal(ids[0, :10], [49406, *range(start, start + 8), 49407])
  pipe.save_pretrained(str(tmp_path / "saved"))  # the added tokens and the grown table travel with the folder
  again = jaxsd.StableDiffusion.from_pretrained(str(tmp_path / "saved"))
  np.testing.assert_array_equal(again.text_inputs(["a cat"], ["easyNEGATIVE"], HW, HW)[1], ids)


def test_load_token_embeddings_unchanged(sd, tmp_path):
  """jaxsd's own training output still replaces the rows of one-token words, the table keeping its shape."""
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  row = _rand((32,), 5)
  token_embeddings.save({"teal": row}, str(tmp_path))
  assert pipe.load_token_embeddings(str(tmp_path)) == ["teal"]
  table = token_embeddings.table(pipe.text_encoder_params)
  assert table.shape == (49408, 32) and len(pipe.tokenizer) == 49408
  np.testing.assert_allclose(table[pipe.tokenizer.convert_tokens_to_ids("teal</w>")], row)


def test_sd_refusals(sd, tmp_path):
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  pipe.load_textual_inversion(sd.files["diffusers"])
  before = (len(pipe.tokenizer), pipe.text_encoder, pipe.text_encoder_params)
  wide = str(tmp_path / "sd2.safetensors")
  safetensors.numpy.save_file({"emb_params": _rand((2, 64), 6)}, wide)
  xl = str(tmp_path / "xl.safetensors")
  safetensors.numpy.save_file({"clip_l": _rand((2, 32), 7), "clip_g": _rand((2, 32), 8)}, xl)
  cases = [
      (lambda: pipe.load_textual_inversion(sd.files["diffusers"]), "in the tokenizer already"),
      (lambda: pipe.load_textual_inversion(sd.files["a1111_st"], token="<CAT-TOY>"), "in the tokenizer already"),
      (lambda: pipe.load_textual_inversion(sd.files["a1111_st"], token="photo</w>"), "in the tokenizer already"),
      (lambda: pipe.load_textual_inversion(sd.files["a1111_st"], token="<cat-toy>_1"), "one more vector"),
      (lambda: pipe.load_textual_inversion(wide), "64 values, this text encoder's embeddings 32"),
      (lambda: pipe.load_textual_inversion(sd.files["a1111_pt"]), "allow_pickle=True"),
      (lambda: pipe.load_textual_inversion(xl), "SDXL embedding"),
      (lambda: pipe.load_textual_inversion(_rand((2, 32), 9)), "pass token="),
      (lambda: pipe.load_textual_inversion({
          "a": _rand((2, 32), 9),
          "b": _rand((2, 32), 9)
      }), "not a textual"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  assert (len(pipe.tokenizer), pipe.text_encoder, pipe.text_encoder_params) == before  # nothing half-loaded
  pipe._loras.fused = pipe.lora_targets  # as after fuse_lora
  try:
    with pytest.raises(ValueError, match="unfuse_lora"):
      pipe.load_textual_inversion(sd.files["a1111_st"])
  finally:
    pipe._loras.fused = None
  assert pipe.load_textual_inversion(_rand((2, 32), 9), token="<arr>") == "<arr>"


def test_sdxl_latents_match_diffusers_two_calls(tmp_path):
  base, refiner_path, _ = reference.make_tiny_sdxl_folders(tmp_path / "sdxl")
  file = str(tmp_path / "unaestheticxl.safetensors")
  state = {"clip_l": _rand((2, 32), 10), "clip_g": _rand((2, 32), 11)}
  safetensors.numpy.save_file(state, file)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base)
  safetensors.numpy.save_file({"emb_params": _rand((2, 32), 12)}, str(tmp_path / "sd.safetensors"))
  with pytest.raises(ValueError, match="SDXL embedding"):  # an SD 1.x / 2.x file: for which encoder?
    pipe.load_textual_inversion(str(tmp_path / "sd.safetensors"))
  assert pipe.load_textual_inversion(file) == "unaestheticxl"
  refiner = jaxsd.StableDiffusionXL.from_pretrained(refiner_path)  # no first text encoder: clip_g only
  assert refiner.load_textual_inversion(file) == "unaestheticxl"
  start = refiner.tokenizer_2.convert_tokens_to_ids("unaestheticxl")
  np.testing.assert_array_equal(refiner.tokenize(["unaestheticxl"])[0, 0, :4], [49406, start, start + 1, 49407])
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
  tpipe.set_progress_bar_config(disable=True)
  loaded = safetensors.torch.load_file(file)
  tpipe.load_textual_inversion(loaded["clip_g"], token="unaestheticxl", text_encoder=tpipe.text_encoder_2,
                               tokenizer=tpipe.tokenizer_2)
  tpipe.load_textual_inversion(loaded["clip_l"], token="unaestheticxl", text_encoder=tpipe.text_encoder,
                               tokenizer=tpipe.tokenizer)
  prompts, negative = ["a red circle, unaestheticxl", "a small blue square"], ["unaestheticxl", "unaestheticxl, dark"]
  _latents_match(pipe, tpipe, prompts, negative, 5.0)


def test_sample_embedding_flag(sd):
  from sample.__main__ import parse_embeddings

  assert parse_embeddings([sd.files["a1111_st"], sd.files["a1111_st"] + ":<neg>"]) == [(sd.files["a1111_st"], None),
                                                                                       (sd.files["a1111_st"], "<neg>")]
  with pytest.raises(FileNotFoundError, match="--embedding"):
    parse_embeddings([os.path.join(os.path.dirname(sd.path), "missing.pt")])


def test_sample_embedding_named_as_a_word_says_how_to_rename_it(sd, tmp_path, capsys):
  """A1111 names the token after the file, and files named as a word ("style.pt") collide with the vocabulary: the
  command's one-line error named only the API's token= argument, not the flag's FILE:TOKEN form."""
  from sample.__main__ import main

  path = str(tmp_path / "photo.safetensors")
  safetensors.numpy.save_file({"emb_params": _rand((2, 32), 4)}, path)
  code = main(["--model", sd.path, "--prompt", "a photo", "--embedding", path, "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2 and "'photo' is in the tokenizer already" in err and "--embedding FILE:<another-name>" in err
