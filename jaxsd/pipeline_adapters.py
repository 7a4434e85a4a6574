"""LoRA adapters and textual-inversion embeddings on a loaded pipeline, as diffusers' LoRA / textual-inversion mixins.

The base parameters stay as loaded; before a call the active adapters are merged into a copy of the
kernels they touch (a small program of its own, cached per adapters and weights; `jaxsd.lora`), and
that is what the sampling program gets: adapters, weights or none never recompile it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping

from jaxsd import block_scales, lora, lora_merge, token_embeddings

log = logging.getLogger(__name__)


class AdaptersMixin:
  """`load_lora`, `set_adapters`, `fuse_lora`, ..., `load_textual_inversion` and `load_token_embeddings` for a
  pipeline whose networks' parameters are its `<network>_params` attributes (`lora.NETWORKS`) and which has a
  `tokenizer` (SDXL: and `tokenizer_2`)."""

  @functools.cached_property
  def _loras(self) -> lora_merge.AdapterSet:
    return lora_merge.AdapterSet()

  @property
  def lora_targets(self) -> dict:
    """The networks adapters can change, by name ("unet", "text_encoder"; SDXL adds "text_encoder_2"), with their
    parameters as loaded (no adapter merged in); a network the model lacks (a refiner's text_encoder) is left out."""
    return {n: getattr(self, n + "_params") for n in lora.NETWORKS if getattr(self, n, None) is not None}

  def load_token_embeddings(self, source) -> list[str]:
    """Token embeddings learned by jaxsd's textual inversion (`lora.token_embeddings` in training; a
    `learned_embeds.safetensors` file or its folder, {word: (1, hidden)}) in place of their words' rows of the
    text encoder's token-embedding table, so prompts with those words use them. The words must be one token each
    of this pipeline's tokenizer; the table keeps its shape, so nothing recompiles. Returns the words.
    SD 1.x/2.x only (see `jaxsd.token_embeddings`)."""
    self._loras.check_unfused("load_token_embeddings")
    if getattr(self, "text_encoder_2", None) is not None:
      raise ValueError("load_token_embeddings: SDXL has two text encoders and jaxsd learns embeddings for one; "
                       "not supported for SDXL.")
    rows = token_embeddings.load(source)
    self.text_encoder_params = token_embeddings.apply(self.text_encoder_params, self.tokenizer, rows)
    return sorted(rows)

  def load_textual_inversion(self, source, token: str | list[str | None] | None = None, *,
                             weight_name: str | None = None, allow_pickle: bool = False) -> str | list[str]:
    """Loads textual-inversion embeddings as diffusers' `load_textual_inversion`: n vectors become n new tokens
    ("tok", "tok_1", ..., "tok_{n-1}") of the tokenizer and n new rows of the text encoder's token-embedding
    table, and "tok" in prompts and negative prompts stands for all n (also with long_prompts /
    prompt_weighting: "(tok:1.2)" weights all n). Programs compiled before are dropped (the table grew).
    `unload_textual_inversion` removes them again.

    Args:
      source: a file: diffusers' learned_embeds.safetensors / .bin ({token: (hidden,) or (n, hidden)}), A1111's
        `.pt` (`string_to_param`, `name`), `.safetensors` (`emb_params`) or `.png` (its "sd-ti-embedding" text
        chunk), SDXL's (`clip_l` and `clip_g`, for the two text encoders: the only kind an SDXL pipeline takes,
        and one an SD 1.x / 2.x pipeline refuses); a folder holding `weight_name` (default
        learned_embeds.safetensors); a state dict (numpy or torch arrays); one array (n, hidden) with `token`
        (with a list of n tokens: one vector each, as diffusers); or a list of these, loaded together.
      token: the word for prompts, or a list of one (or None) per source (default: the file's: diffusers' key,
        A1111's `name`, else the file's name without its extension, as A1111 names it). Each must be new to the
        tokenizer, and those of one call differ, as in diffusers.
      weight_name: the embedding's file name in a folder `source`.
      allow_pickle: read pickled `.pt` / `.bin` files (with `torch.load(weights_only=True)`); off by default,
        since unpickling can run code.

    Returns the token, or the list of tokens for a list `source`. Nothing is loaded when any embedding is refused.
    """
    self._loras.check_unfused("load_textual_inversion")
    many = isinstance(source, (list, tuple))
    sources, tokens = list(source) if many else [source], list(token) if isinstance(token, (list, tuple)) else [token]
    if tokens == [None]:
      tokens *= len(sources)
    elif len(sources) == 1 and len(tokens) > 1 and not isinstance(sources[0], (str, os.PathLike, Mapping)):
      rows = token_embeddings.read_embedding(sources[0], tokens[0])[1][None]  # diffusers: one vector per token
      if len(rows) != len(tokens):
        raise ValueError(f"the array holds {len(rows)} vectors and {len(tokens)} tokens were given: give one token "
                         "per vector.")
      sources, many = list(rows), True
    if not sources:
      raise ValueError("load_textual_inversion: no embeddings given (an empty list).")
    if len(sources) != len(tokens):
      raise ValueError(f"{len(sources)} embeddings and {len(tokens)} tokens: give one token (or None: the file's "
                       "own) per embedding, as diffusers' load_textual_inversion.")
    read = []
    for i, (src, tok) in enumerate(zip(sources, tokens)):
      where = os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"embedding {i + 1}"
      where = where if many or isinstance(src, (str, os.PathLike)) else "the embedding"
      read.append((where, *token_embeddings.read_embedding(src, tok, allow_pickle, weight_name)))
    names = [t.lower() for _, t, _ in read]  # added tokens match whatever the case
    twice = sorted({t for _, t, _ in read if names.count(t.lower()) > 1})
    if twice:
      raise ValueError(f"the token {twice[0]!r} is given to {names.count(twice[0].lower())} embeddings of one call: "
                       "give each its own token (token=[...], --embedding FILE:<name> on the command line).")
    sdxl = getattr(self, "text_encoder_2", None) is not None
    for where, _, vectors in read:
      if sdxl != (None not in vectors):
        raise ValueError(f"{where}: an SDXL embedding (clip_l and clip_g vectors) is for an SDXL pipeline, an SD 1.x "
                         "/ 2.x one (one set of vectors) for an SD 1.x / 2.x pipeline; this pipeline is "
                         f"{'SDXL' if sdxl else 'SD 1.x / 2.x'}: use an embedding made for its model.")
    slots = ((("clip_l", ""), ("clip_g", "_2")) if sdxl else ((None, ""),))
    new = {}
    for key, suffix in slots:
      encoder = getattr(self, "text_encoder" + suffix)
      if encoder is None:  # a refiner: no first text encoder, its clip_l vectors have nowhere to go
        continue
      params, tokenizer = getattr(self, f"text_encoder{suffix}_params"), getattr(self, "tokenizer" + suffix)
      emb = token_embeddings.table(params)
      for where, tok, vectors in read:
        if key not in vectors:
          raise ValueError(f"{where}: no {key} vectors for text_encoder{suffix}; an SDXL embedding has clip_l and "
                           "clip_g.")
        tokenizer, emb, _ = token_embeddings.add_tokens(tokenizer, emb, tok, vectors[key], f"{where} ({key or tok})")
      new[suffix] = (encoder.clone(config=encoder.config.replace(vocab_size=emb.shape[0])),
                     token_embeddings.with_table(params, emb), tokenizer)
    self._set_text_encoders(new)  # all checked: nothing half-loaded on an error
    return [t for _, t, _ in read] if many else read[0][1]

  def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> list[str]:
    """Removes textual-inversion embeddings, as diffusers' `unload_textual_inversion`: their tokens leave the
    tokenizer(s) and their rows the token-embedding table(s) (SDXL: both text encoders'), the tokens loaded after
    them move down, and removing all gives back the tokenizers and tables of before. Programs compiled before are
    dropped (the table shrank).

    Args:
      tokens: None for all embeddings (every token added to the tokenizers, also those of a folder saved with
        embeddings); else a token or a list of them, as `load_textual_inversion` returned them: "tok" removes all
        of a multi-vector embedding's tokens "tok", "tok_1", ... (diffusers removes only the tokens named, and
        its leftover "tok_1" then refuses loading "tok" again). One that is not loaded is refused.

    Returns the embeddings' tokens removed.
    """
    self._loras.check_unfused("unload_textual_inversion")
    names = None if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
    new, removed, found = {}, {}, set()
    for suffix in ("", "_2"):
      encoder = getattr(self, "text_encoder" + suffix, None)
      if encoder is None:
        continue
      tokenizer, params = getattr(self, "tokenizer" + suffix), getattr(self, f"text_encoder{suffix}_params")
      groups = token_embeddings.embedding_tokens(tokenizer)
      gone = {}
      for name in (groups if names is None else names):
        part = next((h for h, g in groups.items() if name in g[1:]), None)
        if name in groups:
          gone[name] = groups[name]
        elif part is not None and part not in names:
          raise ValueError(f"unload_textual_inversion: {name!r} is one of the {len(groups[part])} tokens of the "
                           f"embedding {part!r}; give {part!r} (which removes them all).")
        elif part is None:
          continue
        found.add(name)
      if gone:
        tokenizer, emb = token_embeddings.remove_tokens(tokenizer, token_embeddings.table(params),
                                                        [t for g in gone.values() for t in g])
        new[suffix] = (encoder.clone(config=encoder.config.replace(vocab_size=emb.shape[0])),
                       token_embeddings.with_table(params, emb), tokenizer)
        removed.update(dict.fromkeys(gone))
    missing = [n for n in names or () if n not in found]
    if missing:
      loaded = sorted({
          h for s in ("", "_2") if getattr(self, "tokenizer" + s, None) is not None
          for h in token_embeddings.embedding_tokens(getattr(self, "tokenizer" + s))
      })
      raise ValueError(f"unload_textual_inversion: no embedding {missing[0]!r} is loaded (loaded: "
                       f"{', '.join(map(repr, loaded)) or 'none'}).")
    if new:
      self._set_text_encoders(new)
    return list(removed)

  def _set_text_encoders(self, new: dict) -> None:
    for suffix, (encoder, params, tokenizer) in new.items():
      setattr(self, "text_encoder" + suffix, encoder)
      setattr(self, f"text_encoder{suffix}_params", params)
      setattr(self, "tokenizer" + suffix, tokenizer)
    self.__dict__.pop("_compiled", None)
    self.__dict__.pop("exported_programs", None)  # jaxsd.aot's programs take the old table's shape

  def maybe_convert_prompt(self, prompts: list[str], tokenizer=None) -> list[str]:
    """The prompts with each multi-vector token of `tokenizer` (default: `self.tokenizer`) spelt out as its
    tokens, as diffusers' `maybe_convert_prompt` (see `load_textual_inversion`)."""
    return token_embeddings.expand(self.tokenizer if tokenizer is None else tokenizer, prompts)

  def load_lora(self, source, scale: float = 1.0, name: str | None = None, strict: bool = True) -> str:
    """Loads a LoRA adapter for the U-Net and/or text encoder(s) and makes it active at weight `scale`.

    Args:
      source: a `.safetensors` file, a folder holding `pytorch_lora_weights.safetensors`, or a state dict,
        in diffusers / PEFT or kohya (A1111, ComfyUI) naming (see `jaxsd.lora`); for SDXL with
        `text_encoder_2.` / `lora_te2_` keys for the second text encoder.
      scale: the adapter's weight (diffusers' adapter weight: 1 as trained, 0 off).
      name: the adapter's name (default `default_<i>`, as diffusers).
      strict: keys that map to no layer (or to a network this model lacks, such as a refiner's text_encoder)
        are an error; with False they are ignored and logged.

    Returns the adapter's name. Adapters loaded before stay active at their own weights (see `set_adapters`).
    """
    self._loras.check_unfused("load_lora")
    adapter = lora.load(source, self.lora_targets, strict)
    name = self._loras.add(adapter, scale, name)
    if adapter.ignored:
      log.warning("LoRA %r: %d keys map to no layer and were ignored: %s", name, len(adapter.ignored),
                  ", ".join(adapter.ignored))
    return name

  @property
  def lora_adapters(self) -> dict[str, float | dict | None]:
    """Every loaded adapter's name -> its weight if active (a number, or per network: `block_scales.lora_weight`),
    else None."""
    return {n: self._loras.weights.get(n) for n in self._loras.adapters}

  def set_adapters(self, names, weights=None) -> None:
    """Makes exactly `names` (one or a list) active, at `weights` (one for all, or a list of one per name; default
    1), as diffusers' set_adapters. The others stay loaded, inactive; `set_adapters([])` turns LoRA off.

    A weight is a number, or per network and per block as diffusers takes it: {"unet": 0.8 or {"down": ..., "mid":
    ..., "up": {"block_1": [0.0, 1.0, 0.5]}}, "text_encoder": 0.5} (networks left out: 1; U-Net blocks left out: 1;
    a layer's weight is its block's attention's with its index, diffusers' rule: `block_scales.lora_layer_weight`).
    Weights are arguments of the merge: new ones compile nothing."""
    networks, config = tuple(self.lora_targets), self.unet.config
    self._loras.set(names, weights, lambda n, w: block_scales.lora_weight(n, w, networks, config))

  def delete_adapters(self, names) -> None:
    self._loras.delete(names)

  def unload_lora(self) -> None:
    """Forgets every adapter. Fused adapters stay in the weights (as diffusers' unload_lora_weights after
    fuse_lora): unfuse_lora() first to get the original weights back."""
    self._loras.clear()

  def fuse_lora(self) -> None:
    """Folds the active adapters, at their weights, into the U-Net and text-encoder(s) parameters: no merge
    before each call. `unfuse_lora` gives back the original parameters (kept, so bit-exact)."""
    self._loras.check_unfused("fuse_lora")
    if not self._loras.weights:
      raise ValueError("fuse_lora: no active LoRA adapter; load_lora (or set_adapters) first.")
    targets = self.lora_targets
    merged = self._loras.apply(targets)
    self._loras.fused = targets
    for n, p in merged.items():
      setattr(self, n + "_params", p)

  def unfuse_lora(self) -> None:
    """Restores the parameters from before `fuse_lora` (nothing to do if nothing is fused)."""
    if self._loras.fused is not None:
      for n, p in self._loras.fused.items():
        setattr(self, n + "_params", p)
      self._loras.fused = None
