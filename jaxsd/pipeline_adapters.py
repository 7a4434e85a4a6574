"""LoRA adapters and textual-inversion embeddings on a loaded pipeline, as diffusers' LoRA / textual-inversion mixins.

The base parameters stay as loaded; before a call the active adapters are merged into a copy of the
kernels they touch (a small program of its own, cached per adapters and weights; `jaxsd.lora`), and
that is what the sampling program gets: adapters, weights or none never recompile it.
"""

from __future__ import annotations

import functools
import logging
import os

from jaxsd import lora, token_embeddings

log = logging.getLogger(__name__)


class AdaptersMixin:
  """`load_lora`, `set_adapters`, `fuse_lora`, ..., `load_textual_inversion` and `load_token_embeddings` for a
  pipeline whose networks' parameters are its `<network>_params` attributes (`lora.NETWORKS`) and which has a
  `tokenizer` (SDXL: and `tokenizer_2`)."""

  @functools.cached_property
  def _loras(self) -> lora.AdapterSet:
    return lora.AdapterSet()

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

  def load_textual_inversion(self, source, token: str | None = None, *, allow_pickle: bool = False) -> str:
    """Loads a textual-inversion embedding as diffusers' `load_textual_inversion`: n vectors become n new tokens
    ("tok", "tok_1", ..., "tok_{n-1}") of the tokenizer and n new rows of the text encoder's token-embedding
    table, and "tok" in prompts and negative prompts stands for all n (also with long_prompts /
    prompt_weighting: "(tok:1.2)" weights all n). Programs compiled before are dropped (the table grew).

    Args:
      source: a file: diffusers' learned_embeds.safetensors / .bin ({token: (hidden,) or (n, hidden)}), A1111's
        `.pt` (`string_to_param`, `name`) or `.safetensors` (`emb_params`), SDXL's (`clip_l` and `clip_g`, for
        the two text encoders: the only kind an SDXL pipeline takes, and one an SD 1.x / 2.x pipeline refuses);
        a folder holding learned_embeds.safetensors; a state dict; or one array (n, hidden) with `token`.
      token: the word for prompts (default: the file's: diffusers' key, A1111's `name`, else the file's name
        without its extension, as A1111 names it). It must be new to the tokenizer, as in diffusers.
      allow_pickle: read pickled `.pt` / `.bin` files (with `torch.load(weights_only=True)`); off by default,
        since unpickling can run code.

    Returns the token.
    """
    self._loras.check_unfused("load_textual_inversion")
    token, vectors = token_embeddings.read_embedding(source, token, allow_pickle)
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the embedding"
    sdxl = getattr(self, "text_encoder_2", None) is not None
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
      if key not in vectors:
        raise ValueError(f"{where}: no {key} vectors for text_encoder{suffix}; an SDXL embedding has clip_l and "
                         "clip_g.")
      params, tokenizer = getattr(self, f"text_encoder{suffix}_params"), getattr(self, "tokenizer" + suffix)
      tokenizer, emb, _ = token_embeddings.add_tokens(tokenizer, token_embeddings.table(params), token, vectors[key],
                                                      f"{where} ({key or token})")
      new[suffix] = (encoder.clone(config=encoder.config.replace(vocab_size=emb.shape[0])),
                     token_embeddings.with_table(params, emb), tokenizer)
    for suffix, (encoder, params, tokenizer) in new.items():  # all checked: nothing half-loaded on an error
      setattr(self, "text_encoder" + suffix, encoder)
      setattr(self, f"text_encoder{suffix}_params", params)
      setattr(self, "tokenizer" + suffix, tokenizer)
    self.__dict__.pop("_compiled", None)
    self.__dict__.pop("exported_programs", None)  # jaxsd.aot's programs take the old table's shape
    return token

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
  def lora_adapters(self) -> dict[str, float | None]:
    """Every loaded adapter's name -> its weight if active, else None."""
    return {n: self._loras.weights.get(n) for n in self._loras.adapters}

  def set_adapters(self, names, weights=None) -> None:
    """Makes exactly `names` (one or a list) active, at `weights` (one number or one per name; default 1),
    as diffusers' set_adapters. The others stay loaded, inactive; `set_adapters([])` turns LoRA off."""
    self._loras.set(names, weights)

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
