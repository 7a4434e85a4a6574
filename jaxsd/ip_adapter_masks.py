"""IP-Adapter region masks: each adapter's image, or each of one adapter's images, acts only in its part of the
picture (two faces, left and right), as diffusers' `IPAdapterMaskProcessor` and
`cross_attention_kwargs={"ip_adapter_masks": masks}`.

    pipe.load_ip_adapter("IP-Adapter/models", weight_name="ip-adapter-plus-face_sd15.safetensors")
    images = pipe("two girls", ip_adapter_image=[[face1, face2]], ip_adapter_masks=[left, right])

The masks are read as `IPAdapterMaskProcessor().preprocess(masks, height=height, width=width)` does at the call's
size: PIL masks resized with Lanczos, made greyscale, binarised at one half; arrays ((H, W), (n, H, W) or (n, H, W, 1),
uint8 0..255 or floats in [0, 1]) resized with torch's nearest rule and binarised. diffusers' own layout is taken as
it is (already preprocessed): a list with one (1, n, H, W) array (or None) per adapter, or one (adapters, 1, H, W)
array. They are an input of the compiled program (a new mask of the same size compiles nothing); each
cross-attention brings them to its query length (`jaxsd.models.mask_downsample`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsd import conditioning
from jaxsd.ip_adapter_weights import numpy_array
from jaxsd.models.mask_downsample import mask_size


def _is_layout(x) -> bool:
  """Whether `x` is an array in diffusers' preprocessed 4-D layout."""
  return not conditioning._pil(x) and not isinstance(x, (list, tuple)) and np.ndim(x) == 4  # pylint: disable=protected-access


def preprocess(masks, height: int, width: int, name: str = "ip_adapter_masks") -> np.ndarray:
  """One adapter's masks, one per image, as (n, height, width) float32 of 0 and 1 (module docstring), or, for
  diffusers' preprocessed (1, n, H, W), those (n, H, W) as they are."""
  from PIL import Image

  if _is_layout(masks):
    x = numpy_array(masks).astype(np.float32)
    if x.shape[0] != 1 or 0 in x.shape:
      raise ValueError(f"{name} has shape {x.shape}; diffusers' layout is (1, images, height, width) per adapter "
                       "(IPAdapterMaskProcessor's output reshaped), or give masks as PIL images or (H, W) arrays.")
    if not np.isfinite(x).all():
      raise ValueError(f"{name}: not all finite.")
    return x[0]
  items = list(masks) if isinstance(masks, (list, tuple)) else [masks]
  if not items:
    raise ValueError(f"{name}: no mask given.")
  if any(conditioning._pil(m) for m in items):  # pylint: disable=protected-access
    resized = []
    for m in items:
      if not conditioning._pil(m):  # pylint: disable=protected-access
        raise ValueError(f"{name}: give one adapter's masks all as PIL images or all as arrays.")
      if m.mode not in conditioning.MASK_MODES:
        raise ValueError(f"{name}: PIL mode {m.mode!r} cannot be read as a black-and-white mask.")
      m = conditioning.to_rgb(m) if m.mode in conditioning.HIGH_BIT_MODES else m
      resized.append(m.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L"))  # as diffusers
    levels = conditioning.mask_levels(resized, name)
  else:
    levels = [conditioning.mask_levels(numpy_array(m), name) for m in items]
    levels = np.concatenate([x[:, _nearest(x.shape[1], height)][:, :, _nearest(x.shape[2], width)] for x in levels])
  return (levels >= 0.5).astype(np.float32)


def _nearest(in_size: int, out_size: int) -> np.ndarray:
  """torch's `interpolate(mode="nearest")` source indices, in float32 as torch computes them."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def adapter_masks(masks: Any, images: list[int], height: int, width: int) -> Any:
  """The program's `masks` input from a call's `ip_adapter_masks`: (n, H, W) for the one adapter, or a tuple of
  one such (or None) per adapter; None where no adapter has masks. `images`: each adapter's image count.

  One adapter: a mask (PIL image or array) for its one image, a list of one per image, or diffusers' [entry].
  Several: a list with one entry per adapter (None, a mask, a list of one per image, or (1, n, H, W)), or
  diffusers' (adapters, 1, H, W) array. One-line ValueErrors for counts that do not fit."""
  n = len(images)
  if _is_layout(masks):  # diffusers' tensor form: [adapters, 1, H, W], one mask each (its `unsqueeze(1)`)
    entries = [x[None] for x in numpy_array(masks)]
  elif n == 1 and not (isinstance(masks, (list, tuple)) and len(masks) == 1):
    entries = [masks]  # a mask, or a list of one per image
  elif isinstance(masks, (list, tuple)):
    entries = list(masks)
  else:
    raise ValueError(f"ip_adapter_masks: one mask for {n} IP-Adapters: give a list with one entry (a mask, a list of "
                     "one per image, or None) per adapter, as diffusers.")
  if len(entries) != n:
    raise ValueError(f"ip_adapter_masks: {len(entries)} entries for {n} IP-Adapter{'s' * (n > 1)}: give one per "
                     "adapter (a mask, a list of one per image, or None), as diffusers.")
  out = []
  for k, (entry, count) in enumerate(zip(entries, images)):
    name = "ip_adapter_masks" if n == 1 else f"ip_adapter_masks[{k}]"
    if entry is None:
      out.append(None)
      continue
    mask = preprocess(entry, height, width, name)
    if mask.shape[0] != count:
      raise ValueError(f"{name}: {mask.shape[0]} mask{'s' * (mask.shape[0] > 1)} for {count} image"
                       f"{'s' * (count > 1)} of IP-Adapter {k}: give one mask per image.")
    out.append(mask)
  if all(m is None for m in out):
    return None
  return out[0] if n == 1 else tuple(out)


def check_sizes(masks: Any, latent_size: tuple[int, int], levels: list[int]) -> None:
  """A ValueError, before anything compiles, for masks that diffusers' rule cannot bring to the query length of a
  cross-attention at one of `levels` (U-Net blocks: each halves the latents, rounding up, as its stride-2 conv)."""
  for mask in masks if isinstance(masks, tuple) else (masks,):
    if mask is None:
      continue
    for level in levels:
      h, w = latent_size
      for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
      mask_size(mask.shape[1], mask.shape[2], h * w)
