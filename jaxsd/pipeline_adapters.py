"""LoRA adapters and learned token embeddings on a loaded pipeline, as diffusers' LoRA / textual-inversion mixins.

The base parameters stay as loaded; before a call the active adapters are merged into a copy of the
kernels they touch (a small program of its own, cached per adapters and weights; `jaxsd.lora`), and
that is what the sampling program gets: adapters, weights or none never recompile it.
"""

from __future__ import annotations

import functools
import logging

from jaxsd import lora, token_embeddings

log = logging.getLogger(__name__)


class AdaptersMixin:
  """`load_lora`, `set_adapters`, `fuse_lora`, ... and `load_token_embeddings` for a pipeline whose networks'
  parameters are its `<network>_params` attributes (`lora.NETWORKS`) and which has a `tokenizer`."""

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
