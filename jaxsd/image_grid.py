"""Image grids: many samples tiled into one picture (the sample command's grid.png, training's sheets)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def contact_sheet(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """Tiles uint8 NHWC images into one image, row by row."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  sheet = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, columns)
    sheet[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
  return sheet


def save_png(image: np.ndarray, path: str) -> None:
  """Writes a uint8 HWC image to `path` as a PNG whole or not at all (a temporary file, then `os.replace`): a run
  killed while writing leaves the file before or after, never a cut-short PNG."""
  Image.fromarray(image).save(path + ".tmp", format="PNG")
  os.replace(path + ".tmp", path)
