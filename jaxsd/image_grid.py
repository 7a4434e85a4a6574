"""Image grids: many samples tiled into one picture (the sample command's grid.png, training's sheets)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from jaxsd.files import written_whole


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
  with written_whole(path) as tmp:
    Image.fromarray(image).save(tmp, format="PNG")
