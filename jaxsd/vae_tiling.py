"""VAE tiling and slicing on the pipelines, as diffusers' `pipe.enable_vae_tiling()` / `enable_vae_slicing()`.

    pipe.enable_vae_tiling()    # decode (and encode, for img2img / inpaint) in overlapping tiles, blended
    pipe.enable_vae_slicing()   # decode / encode one image of the batch at a time
    images = pipe(prompts, height=2048, width=2048)
    pipe.disable_vae_tiling(); pipe.disable_vae_slicing()   # the plain programs again, bit for bit

diffusers 0.42 spells these `pipe.vae.enable_tiling()` / `pipe.vae.enable_slicing()` (older releases had the
pipeline methods named here); the arithmetic is its AutoencoderKL's (`jaxsd.models.vae_tiling`): tiles of the VAE's
`sample_size` (512 pixels / 64 latent pixels for SD 1.x, 1024 / 128 for SDXL) overlapping by a quarter, each blended
into its neighbours linearly, and only for images larger than one tile (smaller ones decode as without tiling, bit
for bit). Tiled images are not the untiled ones (each tile sees only itself) but diffusers' tiled ones.

Both are static choices of the compiled programs (their cache keys and `program_fingerprint`): turning one on
traces the programs once more, turning it off gives back the old ones. In JAX the tiles of one shape, and the sliced
images, run one after another under `lax.map`: the decode's peak memory is about one tile's (one image's)
activations, as in PyTorch, and the program holds one VAE network per tile shape.
"""

from __future__ import annotations

import jax

from jaxsd.models import vae_tiling


class VAETilingMixin:
  """`enable_vae_tiling` / `enable_vae_slicing` and their `disable_` for a `jaxsd.pipeline.StableDiffusion` (SDXL
  and the ControlNet pipelines too): every later decode and encode (text-to-image, img2img, inpaint, `python -m
  sample`) follows them."""

  @property
  def vae_tiling(self) -> bool:
    """Whether `enable_vae_tiling` is on."""
    return bool(self.__dict__.get("_vae_tiling"))

  @property
  def vae_slicing(self) -> bool:
    """Whether `enable_vae_slicing` is on."""
    return bool(self.__dict__.get("_vae_slicing"))

  def enable_vae_tiling(self) -> None:
    """Decodes and encodes images larger than the VAE's `sample_size` in overlapping tiles blended together
    (diffusers' `vae.enable_tiling()`): memory bounded by a tile's, for large images (SDXL at 2048 px, upscales)."""
    self.__dict__["_vae_tiling"] = True

  def disable_vae_tiling(self) -> None:
    """Turns tiling off: the plain programs and images again."""
    self.__dict__.pop("_vae_tiling", None)

  def enable_vae_slicing(self) -> None:
    """Decodes and encodes the batch one image at a time (diffusers' `vae.enable_slicing()`): the same images up
    to float rounding, with one image's decode memory instead of the batch's."""
    self.__dict__["_vae_slicing"] = True

  def disable_vae_slicing(self) -> None:
    """Turns slicing off: the plain programs again."""
    self.__dict__.pop("_vae_slicing", None)

  def vae_options(self) -> dict:
    """{"tiling": ..., "slicing": ...} as `jaxsd.models.vae_tiling.encode` / `decode` take them."""
    return dict(tiling=self.vae_tiling, slicing=self.vae_slicing)

  def vae_key(self) -> tuple:
    """What the programs' cache keys and `program_fingerprint` add: () with both off (the plain programs' keys)."""
    if not (self.vae_tiling or self.vae_slicing):
      return ()
    return (("vae", self.vae_tiling, self.vae_slicing),)

  def vae_decode(self, vae_params, z: jax.Array) -> jax.Array:
    """The VAE's images of unscaled latents `z`, tiled / sliced as set (the plain `vae.decode` with both off)."""
    return vae_tiling.decode(self.vae, vae_params, z, **self.vae_options())

  def vae_encode(self, vae_params, x: jax.Array):
    """The VAE's posterior of images `x` in [-1, 1], tiled / sliced as set (the plain `vae.encode` with both off)."""
    return vae_tiling.encode(self.vae, vae_params, x, **self.vae_options())
