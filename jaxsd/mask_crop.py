"""Inpainting around the mask only (diffusers' `padding_mask_crop`): crop, inpaint the crop, paste it back.

As diffusers' StableDiffusionInpaintPipeline with `padding_mask_crop=pad` (its VaeImageProcessor's
get_crop_region, resize_mode "fill" and apply_overlay): the box around the mask's non-black pixels is
padded by `pad` pixels, grown to the output's aspect ratio and kept inside the image; image and mask are
cropped to it and resized (Lanczos) to the working size, filling any leftover margin by stretching the
edge rows or columns; the model inpaints that; its output is resized back (centre-cropped to the box's
aspect) and laid under the original image, which shows through where the mask is black (its grey
levels are the original's opacity). Host-side PIL work: the compiled program only ever sees the
working size, whatever the box.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from jaxsd import conditioning


def check_padding(padding_mask_crop) -> int:
  """The padding in pixels, or a ValueError saying what to give."""
  if isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, numbers.Integral):
    raise ValueError(f"padding_mask_crop={padding_mask_crop!r}: give a whole number of pixels >= 0 (the margin "
                     "kept around the mask), or None to inpaint the whole image.")
  if padding_mask_crop < 0:
    raise ValueError(f"padding_mask_crop={padding_mask_crop}: the margin around the mask must be >= 0 pixels.")
  return int(padding_mask_crop)


def crop_region(mask: np.ndarray, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
  """(x1, y1, x2, y2): the box of the mask's (H, W) non-zero pixels, padded by `pad`, grown to the aspect
  ratio width / height and kept inside the mask, as diffusers' `VaeImageProcessor.get_crop_region`."""
  h, w = mask.shape
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if not rows.size:
    raise ValueError("padding_mask_crop: a mask is all black (nothing to repaint), so there is no region to "
                     "crop to; give a mask with white where to repaint, or no padding_mask_crop.")
  x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
  x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
  ratio = width / height
  if (x2 - x1) / (y2 - y1) > ratio:
    y1, y2 = _grow(y1, y2, (x2 - x1) / ratio, h)
  else:
    x1, x2 = _grow(x1, x2, (y2 - y1) * ratio, w)
  return x1, y1, x2, y2


def _grow(a: int, b: int, desired: float, size: int) -> tuple[int, int]:
  """[a, b) widened about its centre to `desired` (truncated), then shifted back inside [0, size)."""
  diff = int(desired - (b - a))
  a, b = a - diff // 2, b + diff - diff // 2
  if b >= size:
    a, b = a - (b - size), size
  if a < 0:
    a, b = 0, b - a
  return a, min(b, size)


def resize_and_fill(image, width: int, height: int):
  """A PIL image resized (Lanczos) to fit in width x height keeping its aspect, centred, the margins filled
  by stretching its first and last rows (columns): diffusers' `resize_mode="fill"`. Returns RGB."""
  from PIL import Image

  ratio, src_ratio = width / height, image.width / image.height
  src_w = width if ratio < src_ratio else image.width * height // image.height
  src_h = height if ratio >= src_ratio else image.height * width // image.width
  resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
  out = Image.new("RGB", (width, height))
  out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
  if ratio < src_ratio:
    fill = height // 2 - src_h // 2
    if fill > 0:
      out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
      out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
  elif ratio > src_ratio:
    fill = width // 2 - src_w // 2
    if fill > 0:
      out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
      out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
  return out


def resize_and_crop(image, width: int, height: int):
  """A PIL image resized (Lanczos) to cover width x height keeping its aspect, centred, the excess cut:
  diffusers' `resize_mode="crop"`. Returns RGB."""
  from PIL import Image

  ratio, src_ratio = width / height, image.width / image.height
  src_w = width if ratio > src_ratio else image.width * height // image.height
  src_h = height if ratio <= src_ratio else image.height * width // image.width
  resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
  out = Image.new("RGB", (width, height))
  out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
  return out


@dataclasses.dataclass
class Crops:
  """The crops the model inpaints and what pasting them back needs."""
  images: np.ndarray  # float32 (B, height, width, 3) in [0, 1]
  masks: np.ndarray  # float32 (B, height, width, 1) of 0 and 1
  originals: np.ndarray  # uint8 (B, H, W, 3)
  levels: np.ndarray  # uint8 (B, H, W): the masks' grey levels, the originals' transparency when pasting
  boxes: list  # per image (x1, y1, x2, y2)


def crop(images: np.ndarray, levels: np.ndarray, width: int, height: int, pad: int) -> Crops:
  """Images (B, H, W, 3) in [0, 1] and mask grey levels (B, H, W) in [0, 1] -> each cropped around its
  mask and resized to width x height (image and mask alike, the mask then binarised at one half)."""
  from PIL import Image

  originals, levels = conditioning.to_uint8(images), conditioning.to_uint8(levels)
  boxes, crops, masks = [], [], []
  for image, mask in zip(originals, levels):
    box = crop_region(mask, width, height, pad)
    boxes.append(box)
    crops.append(np.asarray(resize_and_fill(Image.fromarray(image).crop(box), width, height)))
    masks.append(np.asarray(resize_and_fill(Image.fromarray(mask, "L").crop(box), width, height).convert("L")))
  return Crops(
      np.stack(crops).astype(np.float32) / 255.0, conditioning.as_masks(np.stack(masks)), originals, levels, boxes)


def crop_like(images: np.ndarray, crops: Crops) -> np.ndarray:
  """Other uint8 images (N, H, W, 3) of the originals' size (a ControlNet's conditioning images) cut to each crop's
  box and resized as the originals were: (len(boxes), height, width, 3) uint8; one image serves every box."""
  from PIL import Image

  height, width = crops.images.shape[1:3]
  return np.stack([
      np.asarray(resize_and_fill(Image.fromarray(images[min(i,
                                                            len(images) - 1)]).crop(box), width, height))
      for i, box in enumerate(crops.boxes)
  ])


def paste(outputs: np.ndarray, crops: Crops) -> np.ndarray:
  """The inpainted crops (B, height, width, 3) uint8 put back into the originals (B of them, or one for all)
  -> (B, H, W, 3) uint8, as diffusers' `VaeImageProcessor.apply_overlay`: the output resized into its box,
  the original over it with opacity 1 - mask (untouched wherever the mask is black, and outside the box)."""
  from PIL import Image, ImageOps

  out = []
  one = len(crops.boxes) == 1  # one image and mask for every output (python -m sample)
  for i, generated in enumerate(outputs):
    original, mask, (x1, y1, x2, y2) = (x[0 if one else i] for x in (crops.originals, crops.levels, crops.boxes))
    h, w = original.shape[:2]
    known = Image.new("RGBa", (w, h))
    known.paste(
        Image.fromarray(original).convert("RGBA").convert("RGBa"), mask=ImageOps.invert(Image.fromarray(mask, "L")))
    base = Image.new("RGBA", (w, h))
    base.paste(resize_and_crop(Image.fromarray(generated), x2 - x1, y2 - y1), (x1, y1))
    base = base.convert("RGB").convert("RGBA")
    base.alpha_composite(known.convert("RGBA"))
    out.append(np.asarray(base.convert("RGB")))
  return np.stack(out)
