"""diffusers' `IPAdapterMaskProcessor.downsample`: an IP-Adapter's region masks brought to one attention's query
length, inside the compiled program (each attention level has its own length; the sizes are static).

diffusers takes the mask's aspect ratio r = W / H and the query length q, and makes the mask h x w with
h = int(sqrt(q / r)), plus 1 when h does not divide q, and w = q // h (not the attention's own grid where the mask's
aspect differs from the picture's); it resizes with torch's bicubic interpolation (`F.interpolate(mode="bicubic")`:
align_corners False, A = -0.75, edge pixels repeated, no antialiasing), flattens, and pads with zeros or cuts to q,
with a warning, where h x w is not q.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

A = np.float32(-0.75)  # torch's bicubic coefficient


def mask_size(height: int, width: int, num_queries: int) -> tuple[int, int]:
  """diffusers' (mask_h, mask_w) for a `height` x `width` mask and `num_queries` queries; a ValueError where its
  rule has no answer (a mask far wider or taller than the picture: a zero side)."""
  ratio = width / height
  mask_h = int(math.sqrt(num_queries / ratio))
  if mask_h == 0 or num_queries // (mask_h + int(num_queries % mask_h != 0)) == 0:
    raise ValueError(f"ip_adapter_masks: a {height}x{width} mask cannot be brought to an attention of {num_queries} "
                     "positions (its aspect ratio is far from the picture's): give masks of the picture's shape.")
  mask_h += int(num_queries % mask_h != 0)
  return mask_h, num_queries // mask_h


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, weights), each (out_size, 4): torch's CPU `upsample_bicubic2d` (align_corners False), in float32 as
  torch computes them."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - index.astype(np.float32), 0, 1).astype(np.float32)
  near = lambda x: ((A + 2) * x - (A + 3)) * x * x + 1  # noqa: E731  |x| <= 1
  far = lambda x: ((A * x - 5 * A) * x + 8 * A) * x - 4 * A  # noqa: E731  1 < |x| < 2
  one = np.float32(1)
  weights = np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=1).astype(np.float32)
  indices = np.clip(index[:, None] - 1 + np.arange(4), 0, in_size - 1)
  return indices, weights


def downsample(masks: jax.Array, num_queries: int) -> jax.Array:
  """(n, H, W) masks -> (n, num_queries) float32, one weight per query position (row-major), as diffusers'
  `IPAdapterMaskProcessor.downsample` (module docstring); the sums in torch's order (width taps, then height)."""
  n, height, width = masks.shape
  mask_h, mask_w = mask_size(height, width, num_queries)
  rows, row_weights = _cubic_taps(height, mask_h)
  cols, col_weights = _cubic_taps(width, mask_w)
  m = masks.astype(jnp.float32)
  across = sum(m[:, :, cols[:, j]] * col_weights[:, j] for j in range(4))  # (n, H, mask_w)
  out = sum(across[:, rows[:, j], :] * row_weights[:, j, None] for j in range(4)).reshape(n, -1)
  if mask_h * mask_w != num_queries:
    warnings.warn(
        "The aspect ratio of the mask does not match the aspect ratio of the output image. Please update your masks "
        "or adjust the output size for optimal performance.", UserWarning)
    out = out[:, :num_queries] if mask_h * mask_w > num_queries else jnp.pad(out,
                                                                             ((0, 0), (0, num_queries - out.shape[1])))
  return out
