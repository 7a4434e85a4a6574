"""Textual inversion as diffusers' users call it beyond one file: lists of embeddings and tokens, state dicts,
a folder with `weight_name`, `unload_textual_inversion` (the pipeline then equal to a fresh one, bit for bit),
SDXL's two encoders, A1111's `.png` embeddings (the "sd-ti-embedding" text chunk), `--embedding` given twice, and
the refusals, which leave the pipeline as it was.
"""

from __future__ import annotations

import base64
import json
import os

import diffusers
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from PIL import Image, PngImagePlugin

import jaxsd
from jaxsd import token_embeddings
from tests import reference
from tests import test_textual_inversion
from tests.test_textual_inversion import HW, NEGATIVE, PROMPTS, STEPS, _latents_match, _rand

sd = test_textual_inversion.sd  # its fixture: the tiny SD folder and the A1111 / diffusers files

FILES = ("a1111_st", "a1111_pt", "diffusers")
TOKENS = ["badhands", None, None]  # diffusers reads A1111's emb_params as the token "emb_params": name it


def _state(pipe, suffix=""):
  """What a pipeline's prompts go through: the tokenizer (as saved), the table, the encoder's config."""
  return (getattr(pipe, "tokenizer" + suffix)._tokenizer.to_str(),
          np.asarray(token_embeddings.table(getattr(pipe, f"text_encoder{suffix}_params"))),
          getattr(pipe, "text_encoder" + suffix).config)


def _assert_same_state(pipe, other, suffix=""):
  (tok, table, config), (tok2, table2, config2) = _state(pipe, suffix), _state(other, suffix)
  assert tok == tok2 and config == config2
  np.testing.assert_array_equal(table, table2)


def _torch_table(encoder):
  return encoder.get_input_embeddings().weight.detach().numpy()


def _their_ids(tpipe, prompts, tokenizer=None):
  tok = tokenizer or tpipe.tokenizer
  return np.asarray(
      tok(tpipe.maybe_convert_prompt(prompts, tok), padding="max_length", max_length=77, truncation=True)["input_ids"])


def _latents(pipe, latents):
  return np.asarray(
      pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=STEPS, guidance_scale=7.5, sampler="euler", latents=latents,
           output="latent"))


def test_list_load_and_unload_match_diffusers_and_a_fresh_pipeline(sd):
  fresh = jaxsd.StableDiffusion.from_pretrained(sd.path)
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  files = [sd.files[k] for k in FILES]
  assert pipe.load_textual_inversion(files, token=TOKENS,
                                     allow_pickle=True) == ["badhands", "grainy-style", "<cat-toy>"]
  tpipe = reference.torch_pipeline(sd.path)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(sd.path, subfolder="scheduler")
  tpipe.load_textual_inversion(files, token=TOKENS)
  _latents_match(pipe, tpipe, PROMPTS, NEGATIVE, 7.5)  # compiles with the grown table
  np.testing.assert_array_equal(token_embeddings.table(pipe.text_encoder_params), _torch_table(tpipe.text_encoder))

  # One multi-vector embedding: jaxsd takes its token, diffusers needs all three ("grainy-style" alone would leave
  # grainy-style_1 and _2 behind).
  assert pipe.unload_textual_inversion("grainy-style") == ["grainy-style"]
  assert "_compiled" not in pipe.__dict__  # the programs of the grown table are not reused
  tpipe.unload_textual_inversion(["grainy-style", "grainy-style_1", "grainy-style_2"])
  assert len(pipe.tokenizer) == len(tpipe.tokenizer) == 49408 + 4
  assert token_embeddings.embedding_tokens(pipe.tokenizer) == {
      "badhands": ["badhands", "badhands_1", "badhands_2"],
      "<cat-toy>": ["<cat-toy>"]
  }
  np.testing.assert_array_equal(token_embeddings.table(pipe.text_encoder_params), _torch_table(tpipe.text_encoder))
  prompts = PROMPTS + NEGATIVE + ["grainy-style, (badhands:1.2)"]
  np.testing.assert_array_equal(pipe.tokenize(prompts), _their_ids(tpipe, prompts))

  # All: the tokenizer, table and encoder of a fresh pipeline, its images bit for bit, diffusers' ids.
  assert pipe.unload_textual_inversion() == ["badhands", "<cat-toy>"]
  tpipe.unload_textual_inversion()
  _assert_same_state(pipe, fresh)
  assert pipe.program_fingerprint() == fresh.program_fingerprint()
  np.testing.assert_array_equal(pipe.tokenize(prompts), _their_ids(tpipe, prompts))
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  np.testing.assert_array_equal(_latents(pipe, latents), _latents(fresh, latents))
  assert pipe.unload_textual_inversion() == []  # nothing left: nothing to do
  assert pipe.load_textual_inversion(sd.files["a1111_pt"], allow_pickle=True) == "grainy-style"  # loads again


def test_state_dicts_arrays_and_weight_name_as_diffusers(sd, tmp_path):
  """diffusers' other forms: state dicts in memory (torch; numpy too in jaxsd), one tensor split over a list of
  tokens, a folder with weight_name."""
  folder = tmp_path / "concept"
  folder.mkdir()
  safetensors.numpy.save_file({"<folder>": _rand((2, 32), 20)}, str(folder / "my_concept.safetensors"))
  a1111 = {"string_to_param": {"*": torch.from_numpy(_rand((2, 32), 21))}, "name": "<a1111-dict>"}
  sources = [{"<torch>": torch.from_numpy(_rand((3, 32), 22))}, a1111, str(folder)]
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  assert pipe.load_textual_inversion(sources,
                                     weight_name="my_concept.safetensors") == ["<torch>", "<a1111-dict>", "<folder>"]
  assert pipe.load_textual_inversion({"<numpy>": _rand((32,), 23)}) == "<numpy>"
  assert pipe.load_textual_inversion(torch.from_numpy(_rand((2, 32), 24)), token=["<p>", "<q>"]) == ["<p>", "<q>"]
  tpipe = reference.torch_pipeline(sd.path)
  tpipe.load_textual_inversion(sources, weight_name="my_concept.safetensors")
  tpipe.load_textual_inversion({"<numpy>": torch.from_numpy(_rand((32,), 23))})
  tpipe.load_textual_inversion(torch.from_numpy(_rand((2, 32), 24)), token=["<p>", "<q>"])
  assert pipe.tokenizer.get_vocab() == tpipe.tokenizer.get_vocab()
  np.testing.assert_array_equal(token_embeddings.table(pipe.text_encoder_params), _torch_table(tpipe.text_encoder))
  assert token_embeddings.embedding_tokens(pipe.tokenizer)["<p>"] == ["<p>"]  # one vector each, not "<p>_1"
  with pytest.raises(FileNotFoundError, match="no other.safetensors in this folder"):
    pipe.load_textual_inversion(str(folder), token="<x>", weight_name="other.safetensors")


def test_refusals_leave_the_pipeline_unchanged(sd, tmp_path):
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  pipe.load_textual_inversion([sd.files["diffusers"], sd.files["a1111_pt"]], allow_pickle=True)
  before = (pipe.tokenizer, pipe.text_encoder, pipe.text_encoder_params)
  wide = str(tmp_path / "sd2.safetensors")
  safetensors.numpy.save_file({"emb_params": _rand((2, 64), 6)}, wide)
  plain_png = str(tmp_path / "preview.png")
  Image.new("RGB", (8, 8)).save(plain_png)
  good = sd.files["a1111_st"]  # would load as "badhands": the bad one after it must take it back out
  cases = [
      (lambda: pipe.load_textual_inversion([good, wide]), ValueError, "64 values, this text encoder's embeddings 32"),
      (lambda: pipe.load_textual_inversion([good, plain_png]), ValueError, "no 'sd-ti-embedding' text chunk"),
      (lambda: pipe.load_textual_inversion([good, str(tmp_path / "missing.safetensors")]), FileNotFoundError,
       "no such file"),
      (lambda: pipe.load_textual_inversion([good, sd.files["diffusers"]]), ValueError, "in the tokenizer already"),
      (lambda: pipe.load_textual_inversion([good, good]), ValueError, "'badhands' is given to 2 embeddings"),
      (lambda: pipe.load_textual_inversion([good, wide], token=["<A>", "<a>"]), ValueError, "given to 2 embeddings"),
      (lambda: pipe.load_textual_inversion([good, wide], token=["<a>"]), ValueError, "2 embeddings and 1 tokens"),
      (lambda: pipe.load_textual_inversion([]), ValueError, "no embeddings given"),
      (lambda: pipe.load_textual_inversion(_rand(
          (3, 32), 7), token=["<p>", "<q>"]), ValueError, "holds 3 vectors and 2 tokens"),
      (lambda: pipe.unload_textual_inversion("badhands"), ValueError, "no embedding 'badhands' is loaded"),
      (lambda: pipe.unload_textual_inversion(["<cat-toy>", "nope"]), ValueError, "no embedding 'nope' is loaded"),
      (lambda: pipe.unload_textual_inversion("grainy-style_1"), ValueError, "one of the 3 tokens of the embedding"),
  ]
  for call, error, message in cases:
    with pytest.raises(error, match=message) as info:
      call()
    assert "\n" not in str(info.value)
    assert (pipe.tokenizer, pipe.text_encoder, pipe.text_encoder_params) == before  # nothing half-done
  assert token_embeddings.embedding_tokens(pipe.tokenizer) == {
      "<cat-toy>": ["<cat-toy>"],
      "grainy-style": ["grainy-style", "grainy-style_1", "grainy-style_2"]
  }
  pipe._loras.fused = pipe.lora_targets  # as after fuse_lora
  try:
    with pytest.raises(ValueError, match="unfuse_lora"):
      pipe.unload_textual_inversion()
  finally:
    pipe._loras.fused = None
  # All of a multi-vector embedding's tokens named, as diffusers users do: removed.
  assert pipe.unload_textual_inversion(["grainy-style", "grainy-style_1", "grainy-style_2"]) == ["grainy-style"]


def _a1111_png(path, data, image=None):
  """An embedding image as A1111's train_embedding saves it (modules/textual_inversion/image_embedding.py
  `embedding_to_b64`, EmbeddingEncoder): the .pt's dict as JSON, tensors as {"TORCHTENSOR": nested lists},
  base64 in the PNG text chunk "sd-ti-embedding"."""

  class EmbeddingEncoder(json.JSONEncoder):

    def default(self, obj):
      if isinstance(obj, torch.Tensor):
        return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
      return json.JSONEncoder.default(self, obj)

  info = PngImagePlugin.PngInfo()
  info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data, cls=EmbeddingEncoder).encode()))
  (image or Image.new("RGB", (64, 64), (90, 120, 200))).save(path, "PNG", pnginfo=info)


def test_a1111_png_embedding(sd, tmp_path):
  vectors = torch.from_numpy(_rand((3, 32), 30))
  data = {
      "string_to_token": {
          "*": 265
      },
      "string_to_param": {
          "*": torch.nn.Parameter(vectors)
      },
      "name": "pngstyle",
      "step": 500,
      "sd_checkpoint": "0123abcd",
      "sd_checkpoint_name": "v1-5",
  }
  path = str(tmp_path / "pngstyle-500.png")
  _a1111_png(path, data)
  pt = str(tmp_path / "pngstyle.pt")
  torch.save(data, pt)
  pipe = jaxsd.StableDiffusion.from_pretrained(sd.path)
  assert pipe.load_textual_inversion(path) == "pngstyle"  # A1111's `name`, not the file's
  start = pipe.tokenizer.convert_tokens_to_ids("pngstyle")
  np.testing.assert_array_equal(token_embeddings.table(pipe.text_encoder_params)[start:start + 3], vectors.numpy())
  tpipe = reference.torch_pipeline(sd.path)  # diffusers reads no PNG: the same embedding as the .pt
  tpipe.load_textual_inversion(pt)
  np.testing.assert_array_equal(token_embeddings.table(pipe.text_encoder_params), _torch_table(tpipe.text_encoder))
  np.testing.assert_array_equal(pipe.tokenize(["a cat, pngstyle"]), _their_ids(tpipe, ["a cat, pngstyle"]))

  garbled = str(tmp_path / "garbled.png")
  info = PngImagePlugin.PngInfo()
  info.add_text("sd-ti-embedding", "not base64!")
  Image.new("RGB", (8, 8)).save(garbled, pnginfo=info)
  not_png = str(tmp_path / "fake.png")
  with open(not_png, "wb") as f:
    f.write(b"\x80not an image")
  for bad, message in ((garbled, "not A1111's base64 JSON"), (not_png, "not a readable PNG image")):
    with pytest.raises(ValueError, match=message):
      pipe.load_textual_inversion(bad, token="<bad>")


def test_sdxl_lists_and_unload_both_encoders(tmp_path):
  base, refiner_path, _ = reference.make_tiny_sdxl_folders(tmp_path / "sdxl")
  files, states = [], []
  for i, name in enumerate(("unaestheticxl", "<xl-style>")):
    states.append({"clip_l": _rand((2 + i, 32), 40 + i), "clip_g": _rand((2 + i, 32), 50 + i)})
    files.append(str(tmp_path / f"{name}.safetensors"))
    safetensors.numpy.save_file(states[-1], files[-1])
  fresh = jaxsd.StableDiffusionXL.from_pretrained(base)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base)
  assert pipe.load_textual_inversion(files) == ["unaestheticxl", "<xl-style>"]
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)  # diffusers: a call per file and encoder
  for file, token in zip(files, ["unaestheticxl", "<xl-style>"]):
    loaded = safetensors.torch.load_file(file)
    tpipe.load_textual_inversion(loaded["clip_l"], token=token, text_encoder=tpipe.text_encoder,
                                 tokenizer=tpipe.tokenizer)
    tpipe.load_textual_inversion(loaded["clip_g"], token=token, text_encoder=tpipe.text_encoder_2,
                                 tokenizer=tpipe.tokenizer_2)
  prompts = ["a red circle, unaestheticxl", "<xl-style> square, unaestheticxl"]
  for suffix, encoder, tok in (("", tpipe.text_encoder, tpipe.tokenizer), ("_2", tpipe.text_encoder_2,
                                                                           tpipe.tokenizer_2)):
    np.testing.assert_array_equal(token_embeddings.table(getattr(pipe, f"text_encoder{suffix}_params")),
                                  _torch_table(encoder))
  np.testing.assert_array_equal(pipe.tokenize(prompts)[:, 1], _their_ids(tpipe, prompts,
                                                                         tpipe.tokenizer_2))  # (prompts, encoders, 77)

  assert pipe.unload_textual_inversion("unaestheticxl") == ["unaestheticxl"]
  for encoder, tok in ((tpipe.text_encoder, tpipe.tokenizer), (tpipe.text_encoder_2, tpipe.tokenizer_2)):
    tpipe.unload_textual_inversion(["unaestheticxl", "unaestheticxl_1"], text_encoder=encoder, tokenizer=tok)
  for suffix, encoder in (("", tpipe.text_encoder), ("_2", tpipe.text_encoder_2)):
    np.testing.assert_array_equal(token_embeddings.table(getattr(pipe, f"text_encoder{suffix}_params")),
                                  _torch_table(encoder))
    assert len(getattr(pipe, "tokenizer" + suffix)) == 49408 + 3
  np.testing.assert_array_equal(pipe.tokenize(prompts)[:, 0], _their_ids(tpipe, prompts))
  assert pipe.unload_textual_inversion() == ["<xl-style>"]
  for suffix in ("", "_2"):
    _assert_same_state(pipe, fresh, suffix)
  assert pipe.program_fingerprint() == fresh.program_fingerprint()

  refiner, fresh_refiner = (jaxsd.StableDiffusionXL.from_pretrained(refiner_path) for _ in range(2))
  assert refiner.load_textual_inversion(files[::-1]) == ["<xl-style>", "unaestheticxl"]  # clip_g only
  assert refiner.unload_textual_inversion(["<xl-style>", "unaestheticxl"]) == ["<xl-style>", "unaestheticxl"]
  _assert_same_state(refiner, fresh_refiner, "_2")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_sample_two_embeddings_in_one_run(sd, tmp_path, capsys, monkeypatch, kind):
  from jaxsd import generate
  from sample.__main__ import main

  if kind == "sd":
    model, files = sd.path, [sd.files["a1111_st"], sd.files["diffusers"]]
  else:
    model = reference.make_tiny_sdxl_folders(tmp_path / "sdxl")[0]
    files = [str(tmp_path / "xl_a.safetensors"), str(tmp_path / "xl_b.safetensors")]
    for i, file in enumerate(files):
      safetensors.numpy.save_file({"clip_l": _rand((2, 32), 60 + i), "clip_g": _rand((3, 32), 70 + i)}, file)
  seen = []
  real = generate.generate

  def spy(pipe, *args, **kw):
    seen.append(pipe)
    return real(pipe, *args, **kw)

  monkeypatch.setattr(generate, "generate", spy)
  common = [
      "--model", model, "--prompt", "a cat, <one>", "--steps", "1", "--height", "16", "--width", "16", "--no-progress"
  ]
  assert main(common + ["--embedding", f"{files[0]}:<one>", "--embedding", files[1], "--out", str(tmp_path / "o")]) == 0
  assert os.listdir(tmp_path / "o")
  second = os.path.splitext(os.path.basename(files[1]))[0] if kind == "sdxl" else "<cat-toy>"
  for suffix in ([""] if kind == "sd" else ["", "_2"]):
    assert {"<one>", second} <= set(token_embeddings.embedding_tokens(getattr(seen[0], "tokenizer" + suffix)))
  # The same token twice: refused in one line, before anything is compiled.
  code = main(common +
              ["--embedding", f"{files[0]}:<one>", "--embedding", f"{files[1]}:<one>", "--out",
               str(tmp_path / "o2")])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2 and "'<one>' is given to 2 embeddings" in err and len(seen) == 1
