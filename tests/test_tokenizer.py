"""Tests for jaxsd.tokenizer: ids match CLIP's own BPE, padding, truncation, round trip."""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import json
import unicodedata

import numpy as np
import pytest
import regex
from transformers import CLIPTokenizer

from jaxsd import tokenizer as tok_lib

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
CAPTIONS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 4k, trending on ArtStation!!!",
    "3 dogs and 12 cats; 2024-01-31 at 10:45pm",
    "UPPERCASE MiXeD cAsE words",
    "it's the dog's bone -- they're sure we'll go, I'd say",
    "   multiple   spaces\tand\nnewlines  ",
    "café crème brûlée, naïve façade",
    "Ünïcödé Straße in Zürich",
    "日本の猫と東京タワー",
    "emoji 🐱🚀 and symbols ©®™ ±√∞",
    "x=3.14, y=-2e10 (approx.) #hashtag @user https://example.com/a?b=c",
    "tom &amp; jerry",  # html entity: CLIP unescapes, see _reference_ids
    "",
]


# An independent reimplementation of openai/CLIP clip/simple_tokenizer.py.
def _bytes_to_unicode():
  bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def _reference_tables():
  with gzip.open(tok_lib.BPE_PATH) as f:
    merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  merges = [tuple(m.split()) for m in merges]
  vocab = list(_bytes_to_unicode().values())
  vocab = vocab + [v + "</w>" for v in vocab]
  vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  return {v: i for i, v in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


def _bpe(token, ranks):
  word = tuple(token[:-1]) + (token[-1] + "</w>",)
  while len(word) > 1:
    pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
    bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if bigram not in ranks:
      break
    first, second = bigram
    new, i = [], 0
    while i < len(word):
      try:
        j = word.index(first, i)
      except ValueError:
        new.extend(word[i:])
        break
      new.extend(word[i:j])
      i = j
      if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
        new.append(first + second)
        i += 2
      else:
        new.append(word[i])
        i += 1
    word = tuple(new)
  return word


def _reference_ids(text):
  encoder, ranks = _reference_tables()
  byte_encoder = _bytes_to_unicode()
  # CLIP: ftfy.fix_text (NFC among other fixes) + html.unescape twice, whitespace
  # collapse, lower case. The transformers tokenizer does not unescape HTML, so
  # the test feeds it the unescaped text (see test_matches_reference_bpe).
  text = unicodedata.normalize("NFC", html.unescape(html.unescape(text))).strip()
  text = regex.sub(r"\s+", " ", text).strip().lower()
  pat = regex.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
      r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
  ids = [encoder["<|startoftext|>"]]
  for token in regex.findall(pat, text):
    token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
    ids.extend(encoder[t] for t in _bpe(token, ranks))
  return ids + [encoder["<|endoftext|>"]]


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.load_tokenizer()


def test_shipped_vocabulary_is_clips():
  with open(tok_lib.BPE_PATH, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
  vocab, merges = tok_lib.clip_vocab_and_merges()
  assert len(vocab) == 49408 and len(merges) == 48894
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["i</w>"] == 256 + 72


def test_cat(tokenizer):
  assert tokenizer.model_max_length == 77
  ids = tok_lib.tokenize(tokenizer, "a photo of a cat")
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  np.testing.assert_array_equal(ids[0, :7], CAT)
  np.testing.assert_array_equal(ids[0, 7:], 49407)  # pad id is the end token


def test_batch_and_max_length(tokenizer):
  ids = tok_lib.tokenize(tokenizer, ["a photo of a cat", "a cat"], max_length=9)
  assert ids.shape == (2, 9)
  np.testing.assert_array_equal(ids[1], [49406, 320, 2368] + [49407] * 6)


def test_truncation_warns_and_keeps_end_token(tokenizer):
  long_prompt = "a photo of a cat " * 30
  with pytest.warns(UserWarning, match="truncated to 77.*a photo of a cat"):
    ids = tok_lib.tokenize(tokenizer, [long_prompt, "a cat"])
  full = _reference_ids(long_prompt)
  assert len(full) > 77
  np.testing.assert_array_equal(ids[0], full[:76] + [49407])
  np.testing.assert_array_equal(ids[1, :3], [49406, 320, 2368])


def test_exact_fit_does_not_warn(tokenizer, recwarn):
  text = " ".join(["cat"] * 75)  # 75 tokens + start + end = 77
  ids = tok_lib.tokenize(tokenizer, text)
  assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
  assert ids[0, 0] == 49406 and ids[0, 76] == 49407 and (ids[0, 1:76] == 2368).all()


def test_bad_input(tokenizer):
  with pytest.raises(TypeError, match="decode bytes"):
    tok_lib.tokenize(tokenizer, [b"a cat"])
  assert tok_lib.tokenize(tokenizer, []).shape == (0, 77)


def test_matches_reference_bpe(tokenizer):
  for caption in CAPTIONS:
    want = _reference_ids(caption)
    got = tok_lib.tokenize(tokenizer, html.unescape(caption))[0]
    n = len(want)
    assert n <= 77, caption
    np.testing.assert_array_equal(got[:n], want, err_msg=caption)
    np.testing.assert_array_equal(got[n:], 49407, err_msg=caption)


def test_save_pretrained_round_trip(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path / "tokenizer")
  reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
  # A diffusers-style model folder and the tokenizer folder itself both load.
  for loaded in (reloaded, tok_lib.load_tokenizer(tmp_path), tok_lib.load_tokenizer(tmp_path / "tokenizer")):
    assert loaded.model_max_length == 77
    np.testing.assert_array_equal(tok_lib.tokenize(loaded, CAPTIONS), tok_lib.tokenize(tokenizer, CAPTIONS))


def test_save_tokenizer_writes_vocab_files(tokenizer, tmp_path):
  tok_lib.save_tokenizer(tokenizer, tmp_path)
  with open(tmp_path / "vocab.json", encoding="utf-8") as f:
    assert json.load(f) == tok_lib.clip_vocab_and_merges()[0]
  with open(tmp_path / "merges.txt", encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("#version") and len(lines) == 1 + 48894
  assert lines[1] == "i n"
  # The diffusers layout (vocab.json + merges.txt only) loads the same tokenizer.
  (tmp_path / "tokenizer.json").unlink()
  loaded = tok_lib.load_tokenizer(tmp_path)
  assert loaded.model_max_length == 77
  np.testing.assert_array_equal(tok_lib.tokenize(loaded, CAPTIONS), tok_lib.tokenize(tokenizer, CAPTIONS))


def test_missing_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok_lib.load_tokenizer(tmp_path / "nope")
  (tmp_path / "unet").mkdir()
  with pytest.raises(FileNotFoundError, match="No tokenizer.*unet"):
    tok_lib.load_tokenizer(tmp_path)


def _special(content: str) -> dict:
  return {
      "__type": "AddedToken",
      "content": content,
      "lstrip": False,
      "normalized": True,
      "rstrip": False,
      "single_word": False
  }


def _sd2_tokenizer_folder(tokenizer, path) -> str:
  """stabilityai/stable-diffusion-2-1's tokenizer/ as shipped: vocab.json, merges.txt and configs that pad with "!"."""
  path.mkdir()
  tokenizer.backend_tokenizer.model.save(str(path))  # vocab.json, merges.txt (the same vocabulary as SD 1.x)
  special = {
      "bos_token": _special("<|startoftext|>"),
      "eos_token": _special("<|endoftext|>"),
      "pad_token": "!",
      "unk_token": _special("<|endoftext|>")
  }
  (path / "special_tokens_map.json").write_text(json.dumps(special))
  (path / "tokenizer_config.json").write_text(
      json.dumps(
          dict(special, add_prefix_space=False, do_lower_case=True, errors="replace", model_max_length=77,
               name_or_path="openai/clip-vit-large-patch14", special_tokens_map_file="./special_tokens_map.json",
               tokenizer_class="CLIPTokenizer")))
  return str(path)


def test_sd2_folder_pads_with_exclamation_marks_as_transformers(tokenizer, tmp_path):
  folder = _sd2_tokenizer_folder(tokenizer, tmp_path / "tokenizer")
  ours = tok_lib.load_tokenizer(str(tmp_path))  # a model folder: its tokenizer/
  assert ours.pad_token == "!" and ours.pad_token_id == 0
  theirs = CLIPTokenizer.from_pretrained(folder)
  long = " ".join(["a red circle and a blue square"] * 12)  # > 77 tokens: truncated, end token kept
  texts = CAPTIONS + ["!!! wow !!!", long]
  # What diffusers' StableDiffusionPipeline gives the text encoder.
  want = theirs(texts, padding="max_length", max_length=theirs.model_max_length, truncation=True)["input_ids"]
  with pytest.warns(UserWarning, match="truncated"):
    got = tok_lib.tokenize(ours, texts)
  np.testing.assert_array_equal(got, np.asarray(want, np.int32))
  assert got[0, 7] == 0 and got[-1, -1] == 49407  # padded with "!" (id 0); the truncated row ends with the end token
