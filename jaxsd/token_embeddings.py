"""Token embeddings: the rows of a text encoder's token-embedding table that textual inversion (Gal et al.
2022) learns, in jaxsd's own format and in the files users have.

jaxsd learns the embedding of a word the tokenizer already has as one token (a word the text encoder never
learned, such as a colour the training captions lacked, or a rare token like "sks") and writes it under that
word, as diffusers' `learned_embeds.safetensors` (one tensor (1, hidden) per word). Applying it (`load`,
`apply`) replaces the word's row of the table: the table keeps its shape, so a pipeline's compiled programs stay
as they are. diffusers adds a new token instead and refuses one its tokenizer has, so load the file there under
another name and prompt with that name:

    pipe.load_textual_inversion("learned_embeds.safetensors", token="<teal>")  # "a <teal> circle"

Embeddings from elsewhere (`read_embedding`, `add_tokens`, `expand`) add new tokens as diffusers'
`load_textual_inversion` does: n vectors become the tokens "tok", "tok_1", ..., "tok_{n-1}", the table grows
by n rows, and a prompt's "tok" is spelt out as all n before tokenizing (diffusers' `maybe_convert_prompt`).
Files read: diffusers' learned_embeds ({token: (hidden,) or (n, hidden)}), A1111's `.pt` (`string_to_param`
{"*": (n, hidden)} and `name`), `.safetensors` (`emb_params` (n, hidden)) and `.png` (the `.pt`'s dict as JSON in
the text chunk "sd-ti-embedding"), SDXL's (`clip_l` (n, 768) and `clip_g` (n, 1280), one per text encoder).
`remove_tokens` undoes `add_tokens`, as diffusers' `unload_textual_inversion`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxsd import model_folder
from jaxsd.files import written_whole

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
  return with_table(text_params, emb)


def with_table(text_params: Any, emb: Any) -> Any:
  """`text_params` with `emb` as its token-embedding table (the rest of the tree shared, not copied)."""
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
  with written_whole(path) as tmp:
    save_file({w: np.asarray(r, np.float32).reshape(1, -1) for w, r in rows.items()}, tmp, metadata={"format": "pt"})
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
      raise ValueError(f"{path}: {w!r} has {t.shape[0]} vectors; load_token_embeddings replaces one row per word: "
                       "load it with load_textual_inversion (new tokens), as diffusers does.")
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


# --- embeddings as users have them: new tokens, as diffusers' load_textual_inversion ---------------------------

SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's files: vectors for text_encoder (CLIP ViT-L) and text_encoder_2 (bigG)
_FOLDER_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")  # diffusers' names, in its order
_PICKLED = (".pt", ".bin", ".pth", ".ckpt")
PNG_KEY = "sd-ti-embedding"  # A1111's PNG text chunk: base64 of the .pt's dict as JSON (tensors: {"TORCHTENSOR": ...})


def read_embedding(source, token: str | None = None, allow_pickle: bool = False,
                   weight_name: str | None = None) -> tuple[str, dict]:
  """(token, vectors) of a textual-inversion embedding; `vectors` is {None: (n, hidden)} for one text encoder
  or {"clip_l": (n, 768), "clip_g": (n, 1280)} for SDXL's two, float32.

  `source`: a file (`.safetensors`; A1111's `.png`; a pickled `.pt` / `.bin` with `allow_pickle`, read with
  `torch.load(weights_only=True)`), a folder holding `weight_name` (default: `learned_embeds.safetensors`, else
  `.bin`), a state dict (numpy or torch arrays), or one array (n, hidden) (then `token` is needed). The token is
  `token`, else the file's: diffusers' key, A1111's `name`, else the file name without its extension (A1111's name
  for an embedding).
  """
  where, stem = "the embedding", None
  if isinstance(source, (str, os.PathLike)):
    where = os.fspath(source)
    if os.path.isdir(where):
      found = [f for f in ([weight_name] if weight_name else _FOLDER_FILES) if os.path.isfile(os.path.join(where, f))]
      if not found:
        raise FileNotFoundError(f"{where}: no {weight_name or ' or '.join(_FOLDER_FILES)} in this folder; give the "
                                "embedding file (or its name as weight_name).")
      where = os.path.join(where, found[0])
    else:
      stem = os.path.splitext(os.path.basename(where))[0]
    source = _read_file(where, allow_pickle)
  name = None
  if not isinstance(source, Mapping):
    vectors = {None: source}
  elif "string_to_param" in source:  # A1111's .pt: {"string_to_param": {"*": (n, hidden)}, "name": ...}
    params = source["string_to_param"]
    if not isinstance(params, Mapping) or len(params) != 1:
      raise ValueError(f"{where}: string_to_param must hold one tensor (A1111's '*'), it holds "
                       f"{len(params) if isinstance(params, Mapping) else type(params).__name__}.")
    vectors = {None: next(iter(params.values()))}
    name = source.get("name") if isinstance(source.get("name"), str) else None
  elif any(k in source for k in SDXL_KEYS):
    vectors = {k: source[k] for k in SDXL_KEYS if k in source}
  elif len(source) == 1:  # diffusers' {token: vectors}, or A1111's safetensors {"emb_params": vectors}
    key, value = next(iter(source.items()))
    vectors, name = {None: value}, (None if key == "emb_params" else key)
  else:
    raise ValueError(f"{where}: not a textual-inversion embedding (keys {', '.join(sorted(map(str, source)))[:200]}); "
                     "expected one tensor, A1111's string_to_param / emb_params, or SDXL's clip_l and clip_g.")
  token = token or name or stem
  if not token:
    raise ValueError(f"{where} names no token: pass token='<name>' (the word to use in prompts).")
  return token, {k: _vectors(v, f"{where} ({k or token})") for k, v in vectors.items()}


def _read_file(path: str, allow_pickle: bool) -> Mapping:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; give a textual-inversion embedding (.safetensors, .pt, .bin).")
  if path.lower().endswith(".safetensors"):
    return dict(model_folder.SafetensorsDict([path]))
  if path.lower().endswith(".png"):
    return _read_png(path)
  if not path.lower().endswith(_PICKLED):
    raise ValueError(f"{path}: an embedding must be a .safetensors file or A1111's .png (or, with allow_pickle, a "
                     f"pickled {' / '.join(_PICKLED)}).")
  if not allow_pickle:
    raise ValueError(f"{path} is pickled: unpickling can run arbitrary code, so it is off by default; convert it to "
                     ".safetensors, or if you trust its source pass allow_pickle=True (--allow-pickle).")
  import torch

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError (a class weights_only refuses), RuntimeError, EOFError
    raise ValueError(f"{path} is not a readable PyTorch embedding ({' '.join(str(e).split())[:200]}); replace it "
                     "with a safetensors file.") from None


def _read_png(path: str) -> Mapping:
  """A1111's embedding image (modules/textual_inversion/image_embedding.py): JSON, base64-encoded, in the text chunk
  "sd-ti-embedding", tensors written as {"TORCHTENSOR": nested lists}; no pickle. The copy A1111 also hides in the
  pixels' low bits (`extract_image_data_embed`) is not read."""
  from PIL import Image

  try:
    with Image.open(path) as image:
      text = dict(getattr(image, "text", None) or {})
  except Exception as e:  # PIL's UnidentifiedImageError, a truncated file, a decompression bomb
    raise ValueError(f"{path}: not a readable PNG image ({' '.join(str(e).split())[:200]}).") from None
  if PNG_KEY not in text:
    raise ValueError(f"{path}: no {PNG_KEY!r} text chunk, so no embedding jaxsd can read (one hidden in the image's "
                     "pixels is not decoded, nor is a preview image an embedding): use the embedding's .safetensors "
                     "or .pt file, e.g. the one A1111 saved beside it in its embeddings folder.")
  try:
    data = json.loads(base64.b64decode(text[PNG_KEY], validate=True),
                      object_hook=lambda d: np.asarray(d["TORCHTENSOR"], np.float32) if "TORCHTENSOR" in d else d)
  except (binascii.Error, ValueError, TypeError) as e:
    raise ValueError(f"{path}: its {PNG_KEY!r} text chunk is not A1111's base64 JSON ({str(e)[:200]}); use the "
                     "embedding's .safetensors or .pt file.") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: its {PNG_KEY!r} text chunk holds a JSON {type(data).__name__}, not an embedding.")
  return data


def _vectors(value, where: str) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no NumPy type)
    value = value.detach().float().cpu().numpy()
  v = np.asarray(value, np.float32)
  if v.ndim == 1:
    v = v[None]
  if v.ndim != 2 or not v.size:
    raise ValueError(f"{where}: vectors of shape {v.shape}; an embedding is (hidden,) or (n_vectors, hidden).")
  return v


def add_tokens(tokenizer, emb: Any, token: str, vectors: np.ndarray, where: str = "") -> tuple[Any, Any, list[str]]:
  """(a copy of `tokenizer` with new tokens for `vectors` (n, hidden), the token-embedding table `emb` grown to
  hold their rows, the tokens), as diffusers' load_textual_inversion: "token", "token_1", ..., "token_{n-1}",
  ids from len(tokenizer) on, the table len(tokenizer) + n rows. Neither argument is changed."""
  where = where or token
  vocab = tokenizer.get_vocab()
  taken = {t.lower() for t in tokenizer.added_tokens_encoder}  # added tokens match whatever the case
  if token in vocab or token.lower() in taken or f"{token}_1" in vocab:
    raise ValueError(f"{where}: the token {token!r} is in the tokenizer already (a word of its vocabulary, or an "
                     "embedding loaded before: unload_textual_inversion removes it); pass token='<another-name>' "
                     "(--embedding FILE:<another-name> on the command line).")
  stem = re.fullmatch(r"(.+)_\d+", token)
  if stem and stem.group(1) in tokenizer.added_tokens_encoder:
    raise ValueError(f"{where}: the token {token!r} would read as one more vector of {stem.group(1)!r} in prompts; "
                     "pass token='<another-name>' (--embedding FILE:<another-name> on the command line).")
  width = emb.shape[1]
  if vectors.shape[1] != width:
    raise ValueError(f"{where}: its vectors have {vectors.shape[1]} values, this text encoder's embeddings {width}: "
                     "the embedding was made for another model (768: SD 1.x, 1024: SD 2.x, clip_l + clip_g: SDXL).")
  n, start = len(vectors), len(tokenizer)
  tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
  tokenizer = copy.deepcopy(tokenizer)  # a pipeline sharing the old one keeps its table and tokens
  tokenizer.add_tokens(tokens)
  ids = tokenizer.convert_tokens_to_ids(tokens)
  if ids != list(range(start, start + n)):
    raise ValueError(f"{where}: the tokenizer gave {tokens} the ids {ids}, not {start}..{start + n - 1}.")
  kept = emb[:start]
  if kept.shape[0] < start:  # a table smaller than the tokenizer: rows no token reaches
    kept = jnp.concatenate([kept, jnp.zeros((start - kept.shape[0], width), emb.dtype)])
  return tokenizer, jnp.concatenate([kept, jnp.asarray(vectors, emb.dtype)]), tokens


def embedding_tokens(tokenizer) -> dict[str, list[str]]:
  """The tokens textual inversion added to `tokenizer` (not special, ids past its vocabulary), by embedding:
  {"tok": ["tok", "tok_1", ..., "tok_{n-1}"]}; a "tok_i" with no "tok" before it counts as an embedding of its own."""
  added = {t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special and i >= tokenizer.vocab_size}
  out = {}
  for t in sorted(added, key=tokenizer.convert_tokens_to_ids):
    stem = re.fullmatch(r"(.+)_\d+", t)
    if stem and t in out.get(stem.group(1), ()):
      continue
    out[t] = [t]
    while f"{t}_{len(out[t])}" in added:
      out[t].append(f"{t}_{len(out[t])}")
  return out


def remove_tokens(tokenizer, emb: Any, tokens: list[str]) -> tuple[Any, Any]:
  """(a copy of `tokenizer` without the added `tokens`, the token-embedding table `emb` without their rows), as
  diffusers' unload_textual_inversion: the added tokens after them move down to fill the gaps, with their rows, so
  that removing all gives back the tokenizer and table from before they were added. Neither argument is changed."""
  tokens = set(tokens)
  ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in tokens)
  base = tokenizer.vocab_size
  if any(i < base for i in ids) or not tokens <= set(tokenizer.added_tokens_encoder):
    raise ValueError(
        f"{sorted(tokens)}: only tokens added to the tokenizer (by load_textual_inversion) can be removed.")
  state = json.loads(tokenizer._tokenizer.to_str())  # transformers 5's tokenizers are Rust ones: edit, then reload
  kept = []
  for entry in state["added_tokens"]:
    if entry["content"] in tokens:
      continue
    if entry["id"] >= base:
      entry["id"] -= sum(i < entry["id"] for i in ids)
    kept.append(entry)
  state["added_tokens"] = kept
  out = copy.deepcopy(tokenizer)
  out._tokenizer = type(tokenizer._tokenizer).from_str(json.dumps(state))  # (the `tokenizers` library's class)
  return out, jnp.delete(emb, np.asarray(ids), axis=0, assume_unique_indices=True)


def expand(tokenizer, prompts: list[str]) -> list[str]:
  """Each multi-vector token of the prompts spelt out as its n tokens ("tok" -> "tok tok_1 tok_2"), as diffusers'
  maybe_convert_prompt; matched as the tokenizer matches added tokens (anywhere, whatever the case, the longest
  first), so that "EasyNegative" expands where the tokenizer lowercases what diffusers compares."""
  added = tokenizer.added_tokens_encoder
  heads = {t for t in added if f"{t}_1" in added}
  if not heads:
    return list(prompts)
  names = {t.lower(): t for t in added}
  pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)), re.IGNORECASE)

  def spell(m):
    t = names.get(m.group(0).lower())
    if t not in heads:
      return m.group(0)
    n = next(i for i in range(1, len(added) + 1) if f"{t}_{i}" not in added)
    return " ".join([t] + [f"{t}_{i}" for i in range(1, n)])

  return [pattern.sub(spell, p) if isinstance(p, str) else p for p in prompts]  # tokenize names a non-string
