"""Tiled and sliced VAE encoding and decoding, with diffusers 0.42.1's arithmetic (AutoencoderKL's `enable_tiling`,
`enable_slicing`).

Tiling: images (or latents) larger than one tile are cut into square tiles that overlap by a quarter: the VAE's
`sample_size` pixels on a side, `sample_size / downsampling_factor` latent pixels (diffusers' `tile_sample_min_size`,
`tile_latent_min_size`, `tile_overlap_factor`). Each tile is encoded / decoded alone, then each is blended linearly
with its upper and left neighbours over the overlap (diffusers' `blend_v` / `blend_h`: in place, so with neighbours
already blended), cropped to its share and the crops concatenated. The result is not the untiled one (no tile sees
the others) but diffusers' tiled one. Tiles of one shape go through the network under `lax.map`, one after another:
the program holds one network per tile shape (a few: full tiles and those cut by the bottom and right edges), and
the peak memory is about one tile's activations plus the output.

Slicing: the batch one image at a time under `lax.map` (diffusers' loop over `x.split(1)`): the same images, up to
float rounding, with the peak memory of one image's encode / decode instead of the batch's.

Every choice is static (shapes and flags, at trace time); both off, `encode` / `decode` are the plain module calls.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution

OVERLAP_FACTOR = 0.25  # diffusers' tile_overlap_factor


@dataclasses.dataclass(frozen=True)
class TileSizes:
  """The tile sides of a VAE, as diffusers' AutoencoderKL sets them in its constructor."""

  sample: int  # tile_sample_min_size: image pixels
  latent: int  # tile_latent_min_size: latent pixels
  overlap_factor: float = OVERLAP_FACTOR

  @classmethod
  def of(cls, config: AutoencoderKLConfig) -> "TileSizes":
    """A [height, width] sample_size tiles by its first side, as diffusers' tile_latent_min_size (its
    tile_sample_min_size keeps the list, and its tiled passes then raise a TypeError)."""
    size = config.sample_size[0] if isinstance(config.sample_size, (list, tuple)) else config.sample_size
    return cls(sample=int(size), latent=int(size / config.downsampling_factor))

  def encode_grid(self) -> tuple[int, int, int, int]:
    """(tile side, stride, blend extent, kept side) of tiled encoding, in input / output pixels (diffusers'
    `_tiled_encode`: overlap_size, blend_extent, row_limit)."""
    blend = int(self.latent * self.overlap_factor)
    return self.sample, int(self.sample * (1 - self.overlap_factor)), blend, self.latent - blend

  def decode_grid(self) -> tuple[int, int, int, int]:
    """The same for tiled decoding (diffusers' `tiled_decode`)."""
    blend = int(self.sample * self.overlap_factor)
    return self.latent, int(self.latent * (1 - self.overlap_factor)), blend, self.sample - blend


def _weights(extent: int, ndim: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
  """diffusers' blend weights (1 - y / extent, y / extent), each computed in float64 and rounded once to fp32 (as
  torch multiplies an fp32 tensor by a Python float), shaped to broadcast along `axis`."""
  shape = [1] * ndim
  shape[axis] = extent
  down = np.array([1 - y / extent for y in range(extent)], np.float32).reshape(shape)
  up = np.array([y / extent for y in range(extent)], np.float32).reshape(shape)
  return down, up


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """`b` with its first `extent` rows (axis 1) or columns (axis 2) faded in from `a`'s last ones."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent == 0:
    return b
  down, up = _weights(extent, b.ndim, axis)
  head = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis).astype(jnp.float32) * down
  head = head + jax.lax.slice_in_dim(b, 0, extent, axis=axis).astype(jnp.float32) * up
  return jnp.concatenate([head.astype(b.dtype), jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis)


def blend_v(a: jax.Array, b: jax.Array, extent: int) -> jax.Array:
  """diffusers' `blend_v` (NHWC): the tile above, `a`, fades into the top of `b`."""
  return _blend(a, b, extent, 1)


def blend_h(a: jax.Array, b: jax.Array, extent: int) -> jax.Array:
  """diffusers' `blend_h` (NHWC): the tile on the left, `a`, fades into the left of `b`."""
  return _blend(a, b, extent, 2)


def _map_tiles(fn: Callable, tiles: dict) -> dict:
  """{key: fn(tile)}, the tiles of each shape stacked and run one after another under `lax.map`."""
  groups: dict[tuple, list] = {}
  for key, tile in tiles.items():
    groups.setdefault(tile.shape, []).append(key)
  out = {}
  for keys in groups.values():
    if len(keys) == 1:
      out[keys[0]] = fn(tiles[keys[0]])
      continue
    results = jax.lax.map(fn, jnp.stack([tiles[k] for k in keys]))
    out.update({k: results[n] for n, k in enumerate(keys)})
  return out


def tiled(fn: Callable, x: jax.Array, grid: tuple[int, int, int, int]) -> jax.Array:
  """diffusers' tiled loop over NHWC `x`: `fn` on the tiles of side `grid[0]` that start every `grid[1]` pixels,
  each blended with its upper and left (already blended) neighbours over `grid[2]` output pixels, cropped to
  `grid[3]` and concatenated."""
  tile, stride, extent, keep = grid
  if stride <= 0:
    raise ValueError(f"VAE tiling: tiles of {tile} pixels are too small to overlap (stride {stride}).")
  h, w = x.shape[1:3]
  starts_h, starts_w = range(0, h, stride), range(0, w, stride)
  outs = _map_tiles(fn, {
      (i, j): x[:, a:a + tile, b:b + tile] for i, a in enumerate(starts_h) for j, b in enumerate(starts_w)
  })
  rows = [[outs[i, j] for j in range(len(starts_w))] for i in range(len(starts_h))]
  result_rows = []
  for i, row in enumerate(rows):
    kept = []
    for j, t in enumerate(row):
      if i > 0:
        t = blend_v(rows[i - 1][j], t, extent)
      if j > 0:
        t = blend_h(row[j - 1], t, extent)
      row[j] = t  # diffusers blends in place: the next tiles blend with this one as blended
      kept.append(t[:, :keep, :keep])
    result_rows.append(jnp.concatenate(kept, axis=2))
  return jnp.concatenate(result_rows, axis=1)


def sliced(fn: Callable, x: jax.Array) -> jax.Array:
  """`fn` on each image of the batch alone, one after another (`lax.map`); a batch of one as it is (as
  diffusers, which slices batches of more than one)."""
  if x.shape[0] <= 1:
    return fn(x)
  return jax.lax.map(lambda xi: fn(xi[None])[0], x)


def _apply(plain: Callable, x: jax.Array, limit: int, grid, tiling: bool, slicing: bool) -> jax.Array:
  """`plain` over `x`, in tiles of `grid` when tiling and a side exceeds `limit` (only past one tile, as diffusers),
  one image at a time when slicing."""

  def one(t):
    if tiling and max(t.shape[1:3]) > limit:
      return tiled(plain, t, grid)
    return plain(t)

  return sliced(one, x) if slicing else one(x)


def moments(vae: AutoencoderKL, params, x: jax.Array, *, tiling: bool = False, slicing: bool = False) -> jax.Array:
  """The posterior's moments of images `x` (NHWC, in [-1, 1]), tiled and / or sliced as diffusers' `encode`."""
  sizes = TileSizes.of(vae.config)
  plain = lambda t: vae.apply({"params": params}, t, method=vae.moments)
  return _apply(plain, x, sizes.sample, sizes.encode_grid(), tiling, slicing)  # diffusers' `_encode`


def encode(vae: AutoencoderKL, params, x: jax.Array, *, tiling: bool = False,
           slicing: bool = False) -> DiagonalGaussianDistribution:
  """`vae.encode` of images `x` (NHWC, in [-1, 1]), tiled and / or sliced as diffusers' `encode`."""
  if not (tiling or slicing):
    return vae.apply({"params": params}, x, method=vae.encode)
  return DiagonalGaussianDistribution.from_moments(moments(vae, params, x, tiling=tiling, slicing=slicing))


def decode(vae: AutoencoderKL, params, z: jax.Array, *, tiling: bool = False, slicing: bool = False) -> jax.Array:
  """`vae.decode` of latents `z` (NHWC, unscaled), tiled and / or sliced as diffusers' `decode`."""
  sizes = TileSizes.of(vae.config)
  plain = lambda t: vae.apply({"params": params}, t, method=vae.decode)
  return _apply(plain, z, sizes.latent, sizes.decode_grid(), tiling, slicing)  # diffusers' `_decode`
