"""Long prompts and prompt weighting (jaxsd.prompt_syntax), opt-in.

The parser is checked on a table of A1111 examples; the windows and weights against ones built here by
hand from transformers' CLIPTokenizer; the hidden states against transformers' CLIPTextModel run window
by window with A1111's emphasis written out in PyTorch; the whole pipeline against diffusers'
StableDiffusionPipeline given those hidden states as `prompt_embeds`.
"""

from __future__ import annotations

import warnings

import diffusers
import jax
import numpy as np
import pytest
import torch

import jaxsd
from jaxsd import generate, prompt_syntax
from jaxsd import tokenizer as tok
from sample import __main__ as sample_main
from tests import reference

HW = 16
BREAK = object()  # a window boundary in the hand-written pieces below

# (prompt, A1111's parse_prompt_attention). The first six are the examples in A1111's own docstring
# (modules/prompt_parser.py), its output copied; the others were worked out by hand from its algorithm.
PARSE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1),
                                                             ("on", 1.0), (" a ", 1.1),
                                                             ("hill", 0.55), (", sun, ", 1.1),
                                                             ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[small]]", [("small", 1 / 1.1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 0.5 )", [("word", 0.5)]),  # spaces around the number (A1111 >= 1.6)
    ("((a) b:1.5)", [("a", 1.1 * 1.5), (" b", 1.5)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("(word:1.3", [("word:1.3", 1.1)]),  # no ')': the weight is text, the bracket closes at the end
    ("a) b] c", [("a) b] c", 1.0)]),  # closing brackets with none open are text
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # so is a weight with no round bracket open
    ("time: 10:30", [("time: 10:30", 1.0)]),
    (r"\(word:1.3\)", [("(word:1.3)", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),  # an escaped backslash
    ("a BREAK b, BREAKfast", [("a", 1.0), ("BREAK", -1.0), ("b, BREAKfast", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, want", PARSE, ids=[t or "empty" for t, _ in PARSE])
def test_parse_like_a1111(text, want):
  got = prompt_syntax.parse_prompt_attention(text)
  assert [t for t, _ in got] == [t for t, _ in want]
  np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)"])
def test_bad_weight_is_refused(text):
  with pytest.raises(ValueError, match="is not a number"):
    prompt_syntax.parse_prompt_attention(text)


@pytest.mark.parametrize("text", ["(cat:" + "9" * 40 + ")", "((cat:" + "9" * 20 + "):" + "9" * 20 + ") BREAK dog"])
def test_weights_past_float32_are_refused(text):
  """A weight of 40 digits (or nested ones that multiply past 3.4e38) is a finite float in Python; the text
  encoder's float32 made it inf and the image black. (As in A1111, "1e39" and "inf" are not weights but text.)
  Refused without a RuntimeWarning (numpy's overflow casting the weight to float32 printed one above the error)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(ValueError, match="give weights that are finite numbers"):
      prompt_syntax.parse_prompt_attention(text)


# --- windows, built by hand ---------------------------------------------------------------------


def _exactly(tokenizer, n: int) -> str:
  """A prompt of exactly n tokens (start and end not counted)."""
  text = ("a photo of a red circle and a small blue square on the left, highly detailed, " * 20).strip()
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  assert len(ids) > n
  words = text.split()
  while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > n:
    words.pop()
  words += ["cat"] * (n - len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]))
  text = " ".join(words)
  assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n
  return text


def _windows(tokenizer, pieces, k=None):
  """A1111's windows of hand-written (text, weight) pieces (BREAK: a new window): ids and weights (k, 77)."""
  windows, tokens, weights = [], [], []
  for piece in pieces:
    if piece is BREAK:
      windows.append((tokens, weights))
      tokens, weights = [], []
      continue
    for t in tokenizer(piece[0], add_special_tokens=False)["input_ids"]:
      if len(tokens) == 75:
        windows.append((tokens, weights))
        tokens, weights = [], []
      tokens.append(t)
      weights.append(piece[1])
  windows.append((tokens, weights))
  windows += [([], [])] * ((k or len(windows)) - len(windows))
  pad = tokenizer.pad_token_id
  ids = [[49406] + t + [49407] + [pad] * (75 - len(t)) for t, _ in windows]
  ws = [[1.0] + w + [1.0] * (76 - len(w)) for _, w in windows]
  return np.asarray(ids, np.int32), np.asarray(ws, np.float32)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1", "sd2-padding"])
def test_200_tokens_are_three_windows_of_75(pad):
  tokenizer = tok.load_tokenizer()
  tokenizer.pad_token = pad  # SD 2.x pads with "!" (id 0) after the end token of every window
  text = _exactly(tokenizer, 200)
  (ids, weights), (uncond, _) = prompt_syntax.tokenize(tokenizer, [[text], [""]], long_prompts=True)
  want, _ = _windows(tokenizer, [(text, 1.0)])
  assert want.shape == (3, 77) and ids.shape == (1, 3 * 77)
  np.testing.assert_array_equal(ids[0], want.reshape(-1))
  np.testing.assert_array_equal(weights, 1.0)
  np.testing.assert_array_equal(uncond[0], _windows(tokenizer, [("", 1.0)], k=3)[0].reshape(-1))
  # Up to 75 tokens: one window, exactly the default (diffusers') tokens; 150 tokens: two windows.
  for n, k in ((75, 1), (150, 2), (151, 3)):
    short = _exactly(tokenizer, n)
    (ids, _), = prompt_syntax.tokenize(tokenizer, [[short]], long_prompts=True)
    assert ids.shape == (1, k * 77), n
    if k == 1:
      np.testing.assert_array_equal(ids, tok.tokenize(tokenizer, [short]))


# --- hidden states against transformers, the pipeline against diffusers ---------------------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  path = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))
  return path, reference.torch_pipeline(path), jaxsd.StableDiffusion.from_pretrained(path)


def _filler(tokenizer):
  return _exactly(tokenizer, 100)


def _weighted(tokenizer):
  """A weighted prompt with a BREAK (3 windows: 10 tokens | 75 | 25) and its pieces written out by hand."""
  filler = _filler(tokenizer)
  text = r"a (red:1.5) circle, [[small]] (square) on the \(left\) BREAK " + filler
  pieces = [("a ", 1.0), ("red", 1.5), (" circle, ", 1.0), ("small", 1 / 1.21), (" ", 1.0), ("square", 1.1),
            (" on the (left)", 1.0), BREAK, (filler, 1.0)]
  return text, pieces


RUN = dict(height=HW, width=HW, steps=4, sampler="euler", guidance_scale=7.5, output="latent")


def _diffusers(tpipe, latents, **prompts):
  """diffusers' StableDiffusionPipeline with RUN's settings: final latents, NHWC."""
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(tpipe.scheduler.config)
  with torch.no_grad():
    out = tpipe(**prompts, height=HW, width=HW, num_inference_steps=4, guidance_scale=7.5,
                latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  return reference.nchw_to_nhwc(out)


def _text_inputs(pipe, prompts, negatives, **options) -> dict:
  """pipe.text_inputs as one dict: ids, uncond_ids and the other inputs (weights, uncond_weights)."""
  ids, uncond_ids, other = pipe.text_inputs(prompts, negatives, HW, HW, **options)
  return dict(other, ids=ids, uncond_ids=uncond_ids)


def _reference_states(text_encoder, ids, weights):
  """transformers' CLIPTextModel on each window, then A1111's "Original" emphasis window by window."""
  with torch.no_grad():
    z = text_encoder(torch.from_numpy(ids).long()).last_hidden_state.double()
  w = torch.from_numpy(weights).double()
  out = []
  for zi, wi in zip(z, w):
    original = zi.mean()
    zi = zi * wi[:, None]
    out.append(zi * (original / zi.mean()))
  return torch.cat(out).float().numpy()  # (k * 77, D)


def test_long_prompt_states_equal_transformers_per_window(sd):
  path, tpipe, pipe = sd
  text = _exactly(tpipe.tokenizer, 200)
  inputs = _text_inputs(pipe, [text], [""], long_prompts=True)
  assert set(inputs) == {"ids", "uncond_ids"}  # no weights: the unweighted program
  want_ids, want_w = _windows(tpipe.tokenizer, [(text, 1.0)])
  np.testing.assert_array_equal(inputs["ids"], want_ids.reshape(1, -1))
  ours = np.asarray(jax.jit(pipe.encode_text)(pipe.text_encoder_params, inputs["ids"]))[0]
  with torch.no_grad():
    ref = tpipe.text_encoder(torch.from_numpy(want_ids).long()).last_hidden_state.numpy().reshape(3 * 77, -1)
  assert ours.shape == ref.shape == (231, 32)
  assert np.abs(ours - ref).max() < 1e-5, np.abs(ours - ref).max()


def test_weighted_states_equal_a1111_emphasis_on_transformers(sd):
  path, tpipe, pipe = sd
  text, pieces = _weighted(tpipe.tokenizer)
  negative = "(blurry:1.2), [ugly]"
  inputs = _text_inputs(pipe, [text], [negative], long_prompts=True, prompt_weighting=True)
  want_ids, want_w = _windows(tpipe.tokenizer, pieces)
  assert want_ids.shape == (3, 77)
  np.testing.assert_array_equal(inputs["ids"][0], want_ids.reshape(-1))
  np.testing.assert_allclose(inputs["weights"][0], want_w.reshape(-1), rtol=1e-7)
  neg_ids, neg_w = _windows(tpipe.tokenizer, [("blurry", 1.2), (", ", 1.0), ("ugly", 1 / 1.1)], k=3)
  np.testing.assert_array_equal(inputs["uncond_ids"][0], neg_ids.reshape(-1))
  np.testing.assert_allclose(inputs["uncond_weights"][0], neg_w.reshape(-1), rtol=1e-7)
  encode = jax.jit(pipe.encode_text)
  for ids, w, r_ids, r_w in ((inputs["ids"], inputs["weights"], want_ids, want_w),
                             (inputs["uncond_ids"], inputs["uncond_weights"], neg_ids, neg_w)):
    ours = np.asarray(encode(pipe.text_encoder_params, ids, w))[0]
    ref = _reference_states(tpipe.text_encoder, r_ids, r_w)
    assert np.abs(ours - ref).max() < 1e-5, np.abs(ours - ref).max()
    # The weights matter: unweighted states differ by far more than the tolerance.
    assert np.abs(np.asarray(encode(pipe.text_encoder_params, ids))[0] - ref).max() > 1e-3


def test_pipeline_equals_diffusers_given_the_same_states(sd):
  path, tpipe, pipe = sd
  text, pieces = _weighted(tpipe.tokenizer)
  prompts, negative = [text, "a (green:1.3) triangle"], ["(blurry:1.2)", ""]
  latents = np.asarray(pipe.noise(0, 2, HW, HW))
  ours = pipe(prompts, negative, latents=latents, **RUN, long_prompts=True, prompt_weighting=True)
  states = [
      _reference_states(tpipe.text_encoder, *_windows(tpipe.tokenizer, p, k=3))
      for p in (pieces, [("a ", 1.0), ("green", 1.3), (" triangle", 1.0)], [("blurry", 1.2)], [("", 1.0)])
  ]
  ref = _diffusers(tpipe, latents, prompt_embeds=torch.from_numpy(np.stack(states[:2])),
                   negative_prompt_embeds=torch.from_numpy(np.stack(states[2:])))
  assert np.abs(ours - ref).max() < 1e-4 * max(1.0, np.abs(ref).max()), np.abs(ours - ref).max()


def test_default_truncates_with_a_warning_as_diffusers(sd):
  path, tpipe, pipe = sd
  prompts = [_exactly(tpipe.tokenizer, 200), "a red circle"]
  latents = np.asarray(pipe.noise(1, 2, HW, HW))
  with pytest.warns(UserWarning, match="Prompt of 202 tokens truncated to 77"):
    ours = pipe(prompts, latents=latents, **RUN)
  ref = _diffusers(tpipe, latents, prompt=prompts)  # diffusers truncates too
  assert np.abs(ours - ref).max() < 1e-4 * max(1.0, np.abs(ref).max()), np.abs(ours - ref).max()
  # Weighting without long prompts keeps the first window, with a warning that says how to keep it all.
  with pytest.warns(UserWarning, match="truncated to 77.*long_prompts=True"):
    inputs = _text_inputs(pipe, [_weighted(tpipe.tokenizer)[0]], [""], prompt_weighting=True)
  assert inputs["ids"].shape == inputs["weights"].shape == (1, 77)


def test_short_prompts_are_unchanged_by_the_options(sd):
  """Prompts within 75 tokens and without weights give diffusers' tokens, so the default program."""
  path, tpipe, pipe = sd
  prompts, negative = ["a red circle on the left", "a small blue square"], ["", "a green triangle"]
  default = _text_inputs(pipe, prompts, negative)
  for options in ((True, False), (False, True), (True, True)):
    got = _text_inputs(pipe, prompts, negative, long_prompts=options[0], prompt_weighting=options[1])
    assert set(got) == {"ids", "uncond_ids"}
    for name in got:
      np.testing.assert_array_equal(got[name], default[name])


def test_each_window_count_compiles_once(sd):
  path, tpipe, pipe = sd
  kw = dict(RUN, long_prompts=True, prompt_weighting=True)
  pipe(["(a:1.2) " + _exactly(tpipe.tokenizer, 160), "b"], **kw)  # 3 windows
  fn = pipe._jitted(True, "latent", "text", True)
  size = fn._cache_size()
  pipe(["a [b]", "(c) " + _exactly(tpipe.tokenizer, 200)], seed=3, **kw)  # 3 windows again: reused
  assert fn._cache_size() == size
  pipe(["(a:1.2) " + _exactly(tpipe.tokenizer, 320), "b"], **kw)  # 5 windows: one more program
  assert fn._cache_size() == size + 1


def test_generate_and_the_sample_flags(sd, tmp_path, capsys, monkeypatch):
  """jaxsd.generate (what python -m sample runs) gives the pipeline's images of long weighted prompts, and
  --long-prompts / --prompt-weighting reach it; a weight that is not a number exits 2 with one line."""
  path, tpipe, pipe = sd
  prompts = [_weighted(tpipe.tokenizer)[0], "a (green:1.3) triangle"]
  kw = dict(steps=2, sampler="euler", height=HW, width=HW, seed=5, long_prompts=True, prompt_weighting=True)
  got = generate.generate(pipe, prompts, num_images=2, devices=jax.local_devices()[:1], batch_per_device=4,
                          progress=False, **kw)
  want = pipe([p for p in prompts for _ in range(2)], latents=np.asarray(pipe.noise(5, 4, HW, HW)), **kw)
  assert np.abs(got.images.astype(int) - want.astype(int)).max() <= 1
  # The flags, to generate.generate (the call itself is the one above).
  seen = {}
  monkeypatch.setattr(generate, "generate", lambda *a, **k: seen.update(k) or generate_result())
  args = ["--model", path, "--prompt", prompts[0], "--out", str(tmp_path / "out"), "--no-progress"]
  assert sample_main.main(args + ["--long-prompts", "--prompt-weighting"]) == 0
  assert seen["long_prompts"] is True and seen["prompt_weighting"] is True
  assert sample_main.main(args) == 0
  assert seen["long_prompts"] is False and seen["prompt_weighting"] is False
  monkeypatch.undo()
  capsys.readouterr()
  assert sample_main.main(["--model", path, "--prompt", "(red:1.2.3) circle", "--prompt-weighting"]) == 2
  err = capsys.readouterr().err
  assert "is not a number" in err and "Traceback" not in err


def generate_result():
  return generate.GenerateResult(files=[], images=np.zeros((0, HW, HW, 3), np.uint8), compile_seconds=0.0,
                                 sample_seconds=0.0, seconds_per_step=0.0, images_per_second=0.0, devices=1)
