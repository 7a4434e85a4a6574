"""Images and masks that condition generation (img2img, inpainting): reading, checking, converting.

As diffusers: images are RGB (PIL images of another colour mode are converted with `convert("RGB")`,
as `diffusers.utils.load_image` does; an alpha channel is dropped), masks are greyscale
(`convert("L")`, white = repaint) binarised at one half, and the mask reaches the latents by
nearest-neighbour downsampling. Unlike diffusers, 16-bit, 32-bit integer and float grey images (depth maps
written by MiDaS / Depth Anything tools, float TIFFs) are first scaled to 8 bits (`to_rgb`): PIL's convert clips
them at 255, which turns a 16-bit depth map nearly white.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# PIL modes read: colours in 0..255, and grey of more bits or floats (scaled to 8 bits by `to_rgb`). CMYK, YCbCr,
# LAB, HSV images are refused rather than guessed at.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1") + HIGH_BIT_MODES
MASK_MODES = ("L", "1", "LA", "RGB", "RGBA", "P") + HIGH_BIT_MODES


def to_rgb(image):
  """The PIL image as RGB. PIL's convert clips 16/32-bit grey at 255 (a 16-bit scan or depth map comes out nearly
  white), so: mode I;16* (16-bit) is divided by 257; mode I (32-bit integers) too when its maximum exceeds 255, as
  16-bit data (values above 65535 clip), else kept; mode F (floats) is taken as 0..1 and multiplied by 255 when its
  maximum is at most 1, else clipped to 0..255. Then rounded to 8-bit grey. Other modes: `convert("RGB")`."""
  from PIL import Image

  if image.mode == "RGB":
    return image
  if image.mode in HIGH_BIT_MODES:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
      values = values / 257
    elif image.mode == "F" and values.max(initial=0) <= 1:
      values = values * 255
    image = Image.fromarray(np.clip(np.round(np.nan_to_num(values)), 0, 255).astype(np.uint8))  # mode L
  return image.convert("RGB")


def _pil(x) -> bool:
  return hasattr(x, "convert") and hasattr(x, "mode")


def _stack(items: Any, name: str, mode: str, modes: tuple, problem: str, how: str, what: str) -> np.ndarray:
  """A PIL image or a list of PIL images / arrays -> one stacked array, each PIL image checked against
  `modes` and converted to `mode`; anything else -> np.asarray as given."""
  if _pil(items):
    items = [items]
  if not isinstance(items, (list, tuple)):
    return np.asarray(items)
  arrays = []
  for item in items:
    if _pil(item):
      if item.mode not in modes:
        raise ValueError(f"{name}: PIL mode {item.mode!r} {problem}; give one of {modes} ({how}).")
      item = to_rgb(item).convert(mode) if item.mode in HIGH_BIT_MODES else item.convert(mode)
    arrays.append(np.asarray(item))
  shapes = {a.shape for a in arrays}
  if len(shapes) > 1:
    raise ValueError(f"{name} have different sizes {sorted(shapes)}: give {what} of one size.")
  return np.stack(arrays)


def as_images(images: Any, name: str = "images") -> np.ndarray:
  """PIL image(s), uint8 or float-in-[0, 1] arrays (H, W, 3) or (B, H, W, 3) -> float32 (B, H, W, 3) in [0, 1]."""
  images = _stack(images, name, "RGB", IMAGE_MODES, "is not an 8-bit colour image",
                  "converted to RGB as diffusers' load_image does", "images")
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} must be RGB, NHWC (B, H, W, 3) or PIL images; got an array of shape {images.shape}.")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if images.dtype.kind in "biu":  # 16-bit pixels, or 0..255 held as int64: no scale to read them by
    raise ValueError(f"{name}: an array of {images.dtype}; give uint8 (0..255) or floats in [0, 1].")
  return _unit_range(images.astype(np.float32), name, "uint8 (0..255) or floats in [0, 1]")


def mask_levels(masks: Any, name: str = "mask_images") -> np.ndarray:
  """PIL image(s) or arrays (H, W), (B, H, W) or (B, H, W, 1), uint8 or float in [0, 1] -> float32 (B, H, W)
  grey levels in [0, 1] (white = repaint), not yet binarised: what diffusers' crop and overlay read."""
  masks = _stack(masks, name, "L", MASK_MODES, "cannot be read as a black-and-white mask",
                 "converted to greyscale L; white = repaint", "masks")
  if masks.ndim == 2:
    masks = masks[None]
  if masks.ndim == 4 and masks.shape[-1] == 1:
    masks = masks[..., 0]
  if masks.ndim != 3:
    raise ValueError(f"{name} must be single-channel, (B, H, W) or (B, H, W, 1) or PIL images; got an array of "
                     f"shape {masks.shape}.")
  if masks.dtype == np.uint8:
    return masks.astype(np.float32) / 255.0
  return _unit_range(masks.astype(np.float32), name, "uint8 (0..255), or booleans or numbers in [0, 1]")


def _unit_range(x: np.ndarray, name: str, what: str) -> np.ndarray:
  """`x`, or a ValueError when it is not in [0, 1]: floats of 0..255 (np.asarray(image).astype(float)) were read
  as images 255 times too bright, and masks' grey levels binarised at 0.5 / 255."""
  if x.size and not (np.isfinite(x).all() and x.min() >= -1e-3 and x.max() <= 1 + 1e-3):
    raise ValueError(f"{name}: values from {x.min():g} to {x.max():g}; give {what}.")
  return x


def as_masks(masks: Any, name: str = "mask_images") -> np.ndarray:
  """`mask_levels` -> float32 (B, H, W, 1) of 0 (keep) and 1 (repaint), as diffusers' mask processor
  binarises (>= 0.5 is 1)."""
  return (mask_levels(masks, name) >= 0.5).astype(np.float32)[..., None]


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Floats in [0, 1] -> uint8 (exact for what came in as uint8)."""
  return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def masked_images(images, masks):
  """Images in [0, 1] with the repainted region grey: 0.5 here is 0 in the VAE's [-1, 1], diffusers'
  `image * (mask < 0.5)`. Works on numpy and jax arrays alike (masks of 0 and 1)."""
  return images * (1 - masks) + 0.5 * masks


def latent_mask(masks: np.ndarray, factor: int) -> np.ndarray:
  """(B, H, W, 1) mask -> (B, H / factor, W / factor, 1): torch's `interpolate(mode="nearest")` to the
  latent size keeps the pixel at (factor * i, factor * j)."""
  return masks[:, ::factor, ::factor]


def load_image(path: str, name: str = "image") -> Any:
  """An RGB PIL image from `path`, checked as `as_images` checks (one-line ValueError otherwise)."""
  im = _open(path, name)
  as_images(im, f"{name} {path}")
  return to_rgb(im)


def load_mask(path: str, name: str = "mask") -> Any:
  """A greyscale PIL mask from `path` (white = repaint), checked as `as_masks` checks."""
  m = _open(path, name)
  as_masks(m, f"{name} {path}")
  return to_rgb(m).convert("L") if m.mode in HIGH_BIT_MODES else m.convert("L")


def _open(path: str, flag: str):
  """The image at `path`, turned upright by its EXIF orientation tag (camera JPEGs), as diffusers' `load_image`."""
  from PIL import Image, ImageOps, UnidentifiedImageError

  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag} {path}: no such file.")
  try:
    im = Image.open(path)
    im.load()
    im = ImageOps.exif_transpose(im)
  except Image.DecompressionBombError as e:  # not an OSError: a photo past PIL's pixel limit (~179 MP)
    raise ValueError(f"{flag} {path}: too large to read ({e}); resize it to the size to generate at.") from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"{flag} {path}: not an image PIL can read ({e}).") from e
  return im
