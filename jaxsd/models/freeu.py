"""FreeU (Si et al., 2023, https://arxiv.org/abs/2309.11497) in the U-Net's up blocks, as diffusers'
`utils.torch_utils.apply_freeu` / `fourier_filter`, on NHWC features.

In the first two up blocks (diffusers' resolution_idx 0 and 1: the two lowest resolutions), before each ResNet
concatenates its skip connection, the first half of the backbone's channels is scaled by b and the skip features are
Fourier-filtered: their lowest frequencies (the 2 x 2 centre of the shifted spectrum) scaled by s. The FFT runs in
float32 whatever the U-Net computes in, and its result is cast back, as diffusers does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fourier_filter(x: jax.Array, threshold: int, scale: jax.Array | float) -> jax.Array:
  """diffusers' `fourier_filter` on NHWC `x`: fft2 over (H, W) in float32, fftshift, the box
  [H // 2 - threshold, H // 2 + threshold) x [W // 2 - threshold, W // 2 + threshold) scaled by `scale` (Python's
  slicing, as torch's: for H = 1 the start -1 is row 0), ifftshift, ifft2, the real part in x's dtype."""
  h, w = x.shape[1:3]
  centre = np.zeros((h, w), bool)
  crow, ccol = h // 2, w // 2
  centre[crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = True
  mask = jnp.where(centre, jnp.asarray(scale, jnp.float32), jnp.float32(1.0))[None, :, :, None]
  freq = jnp.fft.fftshift(jnp.fft.fft2(x.astype(jnp.float32), axes=(1, 2)), axes=(1, 2))
  freq = jnp.fft.ifftshift(freq * mask, axes=(1, 2))
  return jnp.fft.ifft2(freq, axes=(1, 2)).real.astype(x.dtype)


def apply_freeu(x: jax.Array, skip: jax.Array, stage: jax.Array) -> tuple[jax.Array, jax.Array]:
  """diffusers' `apply_freeu` for one stage: `stage` = (s, b) of that up block (s1, b1 for the first, s2, b2 for the
  second). Returns (x with its first C // 2 channels times b, computed in float32 and cast back as torch's scalar
  product does, and the skip Fourier-filtered with threshold 1 and scale s)."""
  s, b = stage[0], stage[1]
  half = x.shape[-1] // 2
  x = jnp.concatenate([(x[..., :half].astype(jnp.float32) * b).astype(x.dtype), x[..., half:]], axis=-1)
  return x, fourier_filter(skip, 1, s)


def stage_factors(freeu: jax.Array | None, block: int) -> jax.Array | None:
  """(s, b) of up block `block` from the U-Net's `freeu` input (s1, s2, b1, b2), or None where FreeU does not act
  (blocks 2 and up, as diffusers' resolution_idx > 1, or no input)."""
  if freeu is None or block > 1:
    return None
  freeu = jnp.asarray(freeu, jnp.float32)
  if freeu.shape != (4,):
    raise ValueError(f"freeu has shape {freeu.shape}: give the four factors (s1, s2, b1, b2).")
  return jnp.stack([freeu[block], freeu[2 + block]])
