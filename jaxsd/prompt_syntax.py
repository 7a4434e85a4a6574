"""Prompts past CLIP's 77 tokens and `(word:1.3)` weights, as AUTOMATIC1111's web UI reads them (opt-in).

Without either option a prompt is tokenized as diffusers does (`tokenizer.tokenize`: 77 tokens, longer
prompts truncated with a warning). The two options of `StableDiffusion.__call__` / `img2img` / `inpaint`
and `generate.generate` (`python -m sample --long-prompts --prompt-weighting`):

* `long_prompts`: a prompt's tokens are cut into windows of 75 (the encoder's length minus the start and
  end tokens), each window is wrapped as start, window, end, padding (77 tokens), the text encoder encodes
  every window on its own and the hidden states are concatenated along the sequence (77 x k positions;
  the U-Net's cross-attention takes any length). The prompts and negative prompts of a call are all
  padded with empty windows (start, end, padding) to the same count k, as A1111 pads the unconditional
  embedding. A prompt of at most 75 tokens gives exactly the default tokens. A1111's "comma backtrack"
  (moving a clause that straddles a window boundary into the next window) is not done.
* `prompt_weighting`: A1111's attention syntax, parsed as its `prompt_parser.parse_prompt_attention`:
  `(text)` multiplies the weight by 1.1, `[text]` by 1/1.1, `(text:1.3)` by 1.3, nested brackets multiply,
  unclosed brackets count as closed at the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters and
  `BREAK` ends the current window (with `long_prompts`). Each span of equal weight is tokenized on its own
  (A1111 does so too), and the weights then scale the hidden states by A1111's "Original" emphasis:
  `z' = z * w; z' *= mean(z) / mean(z')`. The means are taken per prompt and per 77-token window (A1111
  takes them over the window of every prompt in its batch, the same for a batch of one; here an image does
  not depend on its batch-mates). Without `long_prompts`, weighted prompts are truncated to one window
  with a warning. Prompts whose weights are all 1 encode exactly as unweighted ones.

SDXL (`StableDiffusionXL`, the same options) follows A1111's SDXL (sd_hijack_clip.py, sd_models_xl.py): both text
encoders take the same windows (`tokenize_each`: each tokenizer with its own start, end and padding, "!" for
SDXL's second, all padded to one window count), each encodes every window on its own (the penultimate layer, as
SDXL), the emphasis weighs each encoder's states on their own, per window, and the features are concatenated (768
+ 1280). The pooled embedding (`text_embeds`) is the second encoder's projection of the first window, unweighted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
import warnings

import jax.numpy as jnp
import numpy as np

from jaxsd.config import finite32

ROUND = 1.1  # (text)
SQUARE = 1 / 1.1  # [text]
BREAK = ("BREAK", -1.0)  # the piece `parse_prompt_attention` gives for a BREAK keyword

# A1111's token grammar (its re_attention): escapes, a lone backslash, brackets, ':1.3)' (a weight that
# closes a round bracket), plain text, and a ':' that is not a weight.
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def options(long_prompts: bool, prompt_weighting: bool) -> dict:
  """A pipeline's `text_inputs` options: only those asked for (a pipeline without them then says so)."""
  return {k: True for k, v in (("long_prompts", long_prompts), ("prompt_weighting", prompt_weighting)) if v}


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
  """(text, weight) spans of a prompt in A1111's attention syntax; runs of equal weight are merged.

  `BREAK` (a word on its own) gives the piece `BREAK` = ("BREAK", -1.0). For example
  `"an (important) word"` gives `[("an ", 1.0), ("important", 1.1), (" word", 1.0)]`.
  """
  res: list[list] = []  # [text, weight], mutable: a closing bracket multiplies what it encloses
  round_open: list[int] = []
  square_open: list[int] = []

  def multiply(start: int, factor: float) -> None:
    for piece in res[start:]:
      piece[1] *= factor

  for m in _TOKENS.finditer(text):
    token, weight = m.group(0), m.group(1)
    if token.startswith("\\"):
      res.append([token[1:], 1.0])
    elif token == "(":
      round_open.append(len(res))
    elif token == "[":
      square_open.append(len(res))
    elif weight is not None and round_open:
      try:
        factor = float(weight)
      except ValueError:
        raise ValueError(f"prompt weight {weight!r} in {text!r} is not a number: write (words:1.3).") from None
      multiply(round_open.pop(), factor)
    elif token == ")" and round_open:
      multiply(round_open.pop(), ROUND)
    elif token == "]" and square_open:
      multiply(square_open.pop(), SQUARE)
    else:
      for i, part in enumerate(_BREAK.split(token)):
        if i:
          res.append(list(BREAK))
        res.append([part, 1.0])
  for start in round_open:
    multiply(start, ROUND)
  for start in square_open:
    multiply(start, SQUARE)
  if not res:
    res = [["", 1.0]]
  for t, w in res:  # inf, nan, or past float32's range once multiplied (1e39): no image can come of it
    if (t, w) != BREAK and not finite32(w):
      raise ValueError(f"prompt weight of {t!r} in {text!r} is {w}: give weights that are finite numbers "
                       "(1.3, 0.8; nested brackets multiply).")
  merged = [res[0]]
  for piece in res[1:]:
    if piece[1] == merged[-1][1]:
      merged[-1][0] += piece[0]
    else:
      merged.append(piece)
  return [(t, w) for t, w in merged]


def chunk(tokenizer, text: str, window: int, weighting: bool) -> list[tuple[list[int], list[float]]]:
  """A prompt's windows of at most `window` tokens (start and end tokens not included), with each token's
  weight (all 1 without `weighting`; then the text is tokenized whole and BREAK is a word)."""
  pieces = parse_prompt_attention(text) if weighting else [(text, 1.0)]
  spans = [t for t, w in pieces if (t, w) != BREAK]
  encoded = iter(
      tokenizer(spans, add_special_tokens=False, padding=False, truncation=False, verbose=False
               )["input_ids"] if spans else [])
  chunks, tokens, weights = [], [], []
  for piece in pieces:
    if piece == BREAK:
      chunks.append((tokens, weights))
      tokens, weights = [], []
      continue
    for t in next(encoded):
      if len(tokens) == window:
        chunks.append((tokens, weights))
        tokens, weights = [], []
      tokens.append(t)
      weights.append(piece[1])
  if tokens or not chunks:
    chunks.append((tokens, weights))
  return chunks


def tokenize(tokenizer, groups: Sequence[Sequence[str]], *, length: int = 77, long_prompts: bool = False,
             weighting: bool = False, min_chunks: int = 1, warn: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
  """Token ids and weights of each group of prompts (e.g. prompts and negative prompts), padded to one
  number of windows k (at least `min_chunks`) across all groups.

  Returns, per group, ids (B, k * length) int32 (each window: start, tokens, end, padding) and weights
  (B, k * length) float32 (1 at the start, end and padding). Without `long_prompts` k is 1 and longer
  prompts keep their first window, with a warning if `warn`.
  """
  return tokenize_each([tokenizer], [groups], length=length, long_prompts=long_prompts, weighting=weighting,
                       min_chunks=min_chunks, warn=warn)[0]


def tokenize_each(tokenizers: Sequence, groups_each: Sequence[Sequence[Sequence[str]]], *, length: int = 77,
                  long_prompts: bool = False, weighting: bool = False, min_chunks: int = 1,
                  warn: bool = True) -> list[list[tuple[np.ndarray, np.ndarray]]]:
  """`tokenize` for several text encoders at once (SDXL's two): `groups_each[i]` by `tokenizers[i]`, with its
  own start, end and padding tokens, and every group of every tokenizer padded to one window count k, so that
  the encoders' windows line up. Returns `tokenize`'s result per tokenizer; only the first warns of truncation."""
  if length < 3:
    raise ValueError(f"length={length}: a window needs room for the start and end tokens and one more.")
  chunked = [
      _chunk_groups(tokenizer, groups, length, long_prompts, weighting, warn and i == 0)
      for i, (tokenizer, groups) in enumerate(zip(tokenizers, groups_each, strict=True))
  ]
  k = max([min_chunks] + [len(c) for groups in chunked for rows in groups for c in rows])
  return [[_pad(tokenizer, rows, k, length) for rows in groups] for tokenizer, groups in zip(tokenizers, chunked)]


def _chunk_groups(tokenizer, groups, length: int, long_prompts: bool, weighting: bool, warn: bool) -> list:
  """Per group, per prompt, its `chunk`s (the first only without `long_prompts`, with a warning if `warn`)."""
  chunked = []
  for group in groups:
    rows = []
    for text in group:
      if not isinstance(text, str):
        raise TypeError(f"prompts must be strings; got {type(text).__name__}: {text!r} (decode bytes first).")
      chunks = chunk(tokenizer, text, length - 2, weighting)
      if not long_prompts and len(chunks) > 1:
        if warn:
          dropped = tokenizer.decode([t for tokens, _ in chunks[1:] for t in tokens])
          n = sum(len(tokens) for tokens, _ in chunks) + 2
          warnings.warn(
              f"Prompt of {n} tokens truncated to {length}: {text!r} (dropped: {dropped!r}; "
              "long_prompts=True encodes all of it).", UserWarning, stacklevel=5)
        chunks = chunks[:1]
      rows.append(chunks)
    chunked.append(rows)
  return chunked


def _pad(tokenizer, rows, k: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """ids and weights (B, k * length) of one group's chunks, each window start, tokens, end, the tokenizer's padding."""
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  ids = np.full((len(rows), k, length), pad, np.int32)
  ids[:, :, 0] = tokenizer.bos_token_id
  ids[:, :, 1] = eos  # an empty window, where the prompt has no more
  weights = np.ones((len(rows), k, length), np.float32)
  for r, chunks in enumerate(rows):
    for c, (tokens, w) in enumerate(chunks):
      n = len(tokens)
      ids[r, c, 1:n + 1] = tokens
      ids[r, c, n + 1] = eos
      weights[r, c, 1:n + 1] = w
  return ids.reshape(len(rows), k * length), weights.reshape(len(rows), k * length)


def emphasize(hidden: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """A1111's "Original" emphasis of one window each: `hidden` (N, length, D) times `weights` (N, length),
  rescaled so that each window's mean is unchanged. Computed in fp32, returned in `hidden`'s dtype."""
  z = hidden.astype(jnp.float32)
  original = z.mean(axis=(1, 2), keepdims=True)
  z = z * weights.astype(jnp.float32)[:, :, None]
  return (z * (original / z.mean(axis=(1, 2), keepdims=True))).astype(hidden.dtype)
