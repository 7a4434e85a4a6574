"""Token embeddings learned for words of the tokenizer's vocabulary (textual inversion, Gal et al. 2022), in the
file format of diffusers' textual inversion: `learned_embeds.safetensors`, one tensor (1, hidden) per word.

jaxsd learns the embedding of a word the tokenizer already has as one token (a word the text encoder never
learned, such as a colour the training captions lacked, or a rare token like "sks") and writes it under that
word. Applying it replaces the word's row of the text encoder's token-embedding table: the table keeps its
shape, so a pipeline's compiled programs stay as they are. diffusers adds a new token instead and refuses
one its tokenizer has, so load the file there under another name and prompt with that name:

    pipe.load_textual_inversion("learned_embeds.safetensors", token="<teal>")  # "a <teal> circle"

Files with several vectors per word (diffusers' --num_vectors > 1) are refused: they need new tokens.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

WEIGHT_NAME = "learned_embeds.safetensors"  # diffusers' train_textual_inversion.py
_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


def token_ids(tokenizer, words: str | list[str]) -> dict[str, int]:
  """{word: its token id} for words that are one token each; ValueError naming a word that is not."""
  words = [w.strip() for w in words.split(",")] if isinstance(words, str) else list(words)
  out = {}
  for w in [w for w in words if w]:
    ids = tokenizer(w, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
      pieces = tokenizer.convert_ids_to_tokens(ids)
      raise ValueError(f"{w!r} is {len(ids)} tokens for this tokenizer ({', '.join(pieces)}): give words that are "
                       "one token each (e.g. a plain lowercase word such as 'teal', or a rare token such as 'sks').")
    same = [v for v, i in out.items() if i == ids[0] and v != w]
    if same:  # the tokenizer lowercases: "sks" and "SKS" are one row of the table, which cannot take two vectors
      raise ValueError(f"{same[0]!r} and {w!r} are the same token for this tokenizer; give each word once.")
    out[w] = int(ids[0])
  return out


def table(text_params: Any) -> Any:
  """The text encoder's token-embedding table (vocab, hidden)."""
  node = text_params
  for k in _TABLE:
    node = node[k]
  return node


def set_rows(text_params: Any, ids: Mapping[str, int], rows: Mapping[str, Any]) -> Any:
  """`text_params` with the table's row of each word replaced by `rows[word]` (hidden,); differentiable in
  `rows`, the rest of the tree shared, not copied."""
  emb = table(text_params)
  for w, i in ids.items():
    emb = emb.at[i].set(jnp.asarray(rows[w], emb.dtype).reshape(emb.shape[1:]))
  out = dict(text_params)
  node = out
  for k in _TABLE[:-1]:
    node[k] = dict(node[k])
    node = node[k]
  node[_TABLE[-1]] = emb
  return out


def save(rows: Mapping[str, Any], path: str) -> str:
  """Writes {word: (1, hidden) float32} as safetensors, to `path` or `path/learned_embeds.safetensors`."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  save_file({
      w: np.asarray(r, np.float32).reshape(1, -1) for w, r in rows.items()
  }, path + ".tmp", metadata={"format": "pt"})
  os.replace(path + ".tmp", path)
  return path


def load(path: str) -> dict[str, np.ndarray]:
  """{word: (hidden,) float32} from a file `save` wrote (or a folder holding learned_embeds.safetensors)."""
  from safetensors.numpy import load_file

  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  out = {}
  for w, t in load_file(path).items():
    if t.ndim == 2 and t.shape[0] != 1:
      raise ValueError(f"{path}: {w!r} has {t.shape[0]} vectors; only one vector per word is supported (more need "
                       "new tokens, which jaxsd does not add).")
    out[w] = np.asarray(t, np.float32).reshape(-1)
  return out


def apply(text_params: Any, tokenizer, rows: Mapping[str, Any]) -> Any:
  """`text_params` with the learned rows in place of their words' (the file's words must be single tokens of
  `tokenizer`, and the vectors as wide as the table)."""
  ids = token_ids(tokenizer, list(rows))
  width = table(text_params).shape[1]
  for w, r in rows.items():
    if np.size(r) != width:
      raise ValueError(f"the embedding of {w!r} has {np.size(r)} values, this text encoder's table {width}.")
  return set_rows(text_params, ids, rows)
