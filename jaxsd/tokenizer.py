"""The CLIP tokenizer: from a model folder, or from the vocabulary shipped with jaxsd.

The shipped vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT, see
`assets/LICENSE-CLIP-VOCAB`); `vocab.json` and `merges.txt` are derived from it in
memory at load time (~0.2 s), the same way CLIP's `simple_tokenizer.py` does, so
loading needs no network and writes nothing. `save_tokenizer` writes them out as
files, with the tokenizer.json that transformers 5 saves.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
import warnings

import numpy as np
from transformers import CLIPTokenizer

MAX_LENGTH = 77  # CLIP's text context length
BPE_PATH = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the BPE file, as in CLIP
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable characters."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges(bpe_path: str = BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP's vocabulary (49408 tokens) and BPE merges (48894), derived from the BPE file."""
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  byte_chars = list(bytes_to_unicode().values())
  tokens = byte_chars + [c + "</w>" for c in byte_chars]
  tokens += ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def load_tokenizer(model_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
  """Loads the CLIP tokenizer.

  Args:
    model_dir: a diffusers model folder (its `tokenizer/` subfolder is used), a
      folder that holds the tokenizer files themselves, or None for the vocabulary
      shipped with jaxsd (that of SD 1.x; SD 2.x folders ship their own).

  Returns:
    A transformers `CLIPTokenizer` with `model_max_length` 77.
  """
  if model_dir is None:
    vocab, merges = clip_vocab_and_merges()
    # transformers 5: `vocab=`/`merges=`; `vocab_file=` would be silently ignored.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"Tokenizer folder {model_dir!r} does not exist (only local folders are "
                            "supported; pass model_dir=None for the shipped CLIP vocabulary).")
  folder = os.path.join(model_dir, "tokenizer")
  if not os.path.isdir(folder):
    folder = model_dir
  if not any(os.path.exists(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"No tokenizer in {model_dir!r}: expected a 'tokenizer/' subfolder or one of "
                            f"{_TOKENIZER_FILES}; found {sorted(os.listdir(model_dir))}.")
  try:
    tokenizer = CLIPTokenizer.from_pretrained(folder)
  except ValueError as e:  # a broken tokenizer.json / tokenizer_config.json: transformers does not name the file
    raise ValueError(f"the tokenizer in {folder} cannot be read ({e}); fix or replace its files.") from None
  if tokenizer.model_max_length > 10_000:  # unset in the folder's config: HF's 1e30
    tokenizer.model_max_length = MAX_LENGTH
  return tokenizer


def save_tokenizer(tokenizer: CLIPTokenizer, directory: str | os.PathLike) -> None:
  """Writes a tokenizer folder that transformers 4 and 5 (and diffusers) all load.

  transformers 5's `save_pretrained` writes only tokenizer.json and
  tokenizer_config.json; the slow tokenizer of transformers 4 (what diffusers
  pipelines use there) also needs vocab.json and merges.txt, written here too.
  """
  directory = os.fspath(directory)
  tokenizer.save_pretrained(directory)
  tokenizer.backend_tokenizer.model.save(directory)  # vocab.json, merges.txt


def tokenize(tokenizer: CLIPTokenizer, texts: str | Sequence[str], max_length: int = MAX_LENGTH, *,
             warn: bool = True) -> np.ndarray:
  """Token ids, int32 (batch, max_length): start, text, end, then padding.

  Texts longer than `max_length` tokens keep their first `max_length - 1` tokens
  and the end token (as the reference pipelines do); with `warn`, each truncated
  prompt is named in a `UserWarning`.
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  bad = [t for t in texts if not isinstance(t, str)]
  if bad:
    raise TypeError(f"tokenize() takes strings; got {type(bad[0]).__name__}: {bad[0]!r}"
                    " (decode bytes first).")
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2 (start and end tokens), got {max_length}.")
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  ids = np.full((len(texts), max_length), pad, np.int32)
  if not texts:
    return ids
  encoded = tokenizer(texts, padding=False, truncation=False, verbose=False)["input_ids"]
  for row, (text, seq) in enumerate(zip(texts, encoded)):
    if len(seq) > max_length:
      if warn:
        dropped = tokenizer.decode(seq[max_length - 1:-1])
        warnings.warn(f"Prompt of {len(seq)} tokens truncated to {max_length}: {text!r} "
                      f"(dropped: {dropped!r}).", UserWarning, stacklevel=2)
      seq = seq[:max_length - 1] + [eos]
    ids[row, :len(seq)] = seq
  return ids
