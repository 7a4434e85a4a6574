"""T2I-Adapter (Mou et al. 2023; diffusers `T2IAdapter`) in flax.linen, NHWC.

A small convolutional network that turns a conditioning image (edges, depth, sketch, ...) into one feature map per
U-Net level; the U-Net adds them inside its encoder (`UNet2DConditionModel(down_intrablock_additional_residuals=)`).
Three layouts, as diffusers' `adapter_type`: "full_adapter" (SD 1.x / 2.x: pixel unshuffle, conv_in, one block per
level, each after the first halving the size), "full_adapter_xl" (SDXL: one halving, after the second block) and
"light_adapter" (bottlenecked blocks, one more than `channels`). Parameter paths mirror diffusers' state dict
(`adapter.body.1.resnets.0.block1.weight` -> `adapter/body_1/resnets_0/block1/kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.config import ConfigBase
from jaxsd.models.resnet import conv

Dtype = Any

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig(ConfigBase):
  """diffusers' T2IAdapter config.json: same field names, same defaults."""

  in_channels: int = 3  # 1 for the grey-image adapters (sketch, depth of some releases)
  channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one feature map per entry (light: one more)
  num_res_blocks: int = 2
  downscale_factor: int = 8  # the pixel unshuffle's: SD's VAE factor (SDXL adapters: 16, one level lower)
  adapter_type: str = "full_adapter"

  @property
  def total_downscale_factor(self) -> int:
    """Image pixels per pixel of the smallest feature map (diffusers' `total_downscale_factor`)."""
    halvings = {"full_adapter": len(self.channels) - 1, "full_adapter_xl": 1, "light_adapter": len(self.channels)}
    return self.downscale_factor * 2**halvings[self.adapter_type]

  def feature_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
    """(h, w, channels) of each feature map for an image of height x width pixels (halvings round up, as the
    U-Net's strided convolutions)."""
    h, w = height // self.downscale_factor, width // self.downscale_factor
    channels = self.channels + ((self.channels[-1],) if self.adapter_type == "light_adapter" else ())
    out = []
    for i, c in enumerate(channels):
      if (i == 2) if self.adapter_type == "full_adapter_xl" else i > 0:
        h, w = (h + 1) // 2, (w + 1) // 2
      out.append((h, w, c))
    return out

  def validate(self) -> None:
    if self.adapter_type not in ADAPTER_TYPES:
      raise ValueError(f"T2IAdapterConfig: adapter_type={self.adapter_type!r} unknown; use one of {ADAPTER_TYPES}.")
    self.check_sizes("in_channels", "channels", "num_res_blocks", "downscale_factor")
    if self.adapter_type == "light_adapter" and min(self.channels) < 4:
      raise ValueError(f"T2IAdapterConfig: light_adapter channels={list(self.channels)}: its blocks work at a "
                       "quarter of each width, so each must be at least 4.")
    if self.adapter_type == "full_adapter_xl" and any(a != b for a, b in zip(self.channels[2:], self.channels[3:])):
      raise ValueError(f"T2IAdapterConfig: full_adapter_xl channels={list(self.channels)}: from the third on they "
                       "must be equal (its later blocks have no input convolution, as diffusers').")


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
  """torch's PixelUnshuffle in NHWC: (B, H, W, C) -> (B, H/r, W/r, C r r), channel c r r + i r + j from the pixel at
  offset (i, j) of each r x r cell."""
  b, h, w, c = x.shape
  if h % r or w % r:
    raise ValueError(f"the adapter's image is {w}x{h} pixels (WxH); its pixel unshuffle needs sides that are "
                     f"multiples of {r}.")
  x = x.reshape(b, h // r, r, w // r, r, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
  """torch's AvgPool2d(2, 2, ceil_mode=True): 2x2 means, a last odd row / column averaged over what it has."""
  h, w = x.shape[1:3]
  ph, pw = h % 2, w % 2
  window = lambda a: jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # noqa: E731
  sums = window(jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))))
  if not (ph or pw):
    return sums / 4
  counts = window(jnp.pad(jnp.ones((1, h, w, 1), x.dtype), ((0, 0), (0, ph), (0, pw), (0, 0))))
  return sums / counts


class AdapterResnetBlock(nn.Module):
  """x + block2(relu(block1(x))): block1 3x3, block2 1x1 (the light adapter's: 3x3)."""

  channels: int
  second_kernel: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.relu(conv(self.channels, 3, name="block1", **kw)(x))
    return conv(self.channels, self.second_kernel, name="block2", **kw)(h) + x


class AdapterBlock(nn.Module):
  """[2x2 mean pool,] [1x1 in_conv where the width changes,] num_res_blocks ResNet blocks."""

  out_channels: int
  num_res_blocks: int
  down: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.down:
      x = avg_pool_ceil(x)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="in_conv", **kw)(x)
    for j in range(self.num_res_blocks):
      x = AdapterResnetBlock(self.out_channels, name=f"resnets_{j}", **kw)(x)
    return x


class LightAdapterBlock(nn.Module):
  """[2x2 mean pool,] in_conv to a quarter of the width, ResNet blocks (3x3, 3x3), out_conv back."""

  out_channels: int
  num_res_blocks: int
  down: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mid = self.out_channels // 4
    if self.down:
      x = avg_pool_ceil(x)
    x = conv(mid, 1, name="in_conv", **kw)(x)
    for j in range(self.num_res_blocks):
      x = AdapterResnetBlock(mid, second_kernel=3, name=f"resnets_{j}", **kw)(x)
    return conv(self.out_channels, 1, name="out_conv", **kw)(x)


class _Adapter(nn.Module):
  """diffusers' FullAdapter, FullAdapterXL or LightAdapter (the `adapter` submodule of T2IAdapter)."""

  config: T2IAdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = pixel_unshuffle(x, cfg.downscale_factor)
    c = cfg.channels
    if cfg.adapter_type == "light_adapter":
      blocks = [LightAdapterBlock(c[0], cfg.num_res_blocks, name="body_0", **kw)]
      blocks += [
          LightAdapterBlock(c[i + 1], cfg.num_res_blocks, True, name=f"body_{i + 1}", **kw) for i in range(len(c) - 1)
      ]
      blocks.append(LightAdapterBlock(c[-1], cfg.num_res_blocks, True, name=f"body_{len(c)}", **kw))
    else:
      x = conv(c[0], 3, name="conv_in", **kw)(x)
      xl = cfg.adapter_type == "full_adapter_xl"
      # full: every block after the first halves the size; XL: only the third (features at 1, 1, 1/2, 1/2).
      blocks = [
          AdapterBlock(c[i], cfg.num_res_blocks, down=(i == 2) if xl else i > 0, name=f"body_{i}", **kw)
          for i in range(len(c))
      ]
    features = []
    for block in blocks:
      x = block(x)
      features.append(x)
    return features


class T2IAdapter(nn.Module):
  """`__call__(image) -> [feature map per level]`, NHWC, as diffusers' T2IAdapter.forward.

  `image` (B, H, W, in_channels), the conditioning image in [0, 1] (not normalised), H and W multiples of
  `config.downscale_factor`. The features are what the U-Net takes as `down_intrablock_additional_residuals`
  (scaled by the pipeline's adapter_conditioning_scale).
  """

  config: T2IAdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> list[jax.Array]:
    if image.ndim != 4 or image.shape[-1] != self.config.in_channels:
      raise ValueError(f"the adapter's image has shape {image.shape}; this adapter takes (B, H, W, "
                       f"{self.config.in_channels}).")
    return _Adapter(self.config, self.dtype, self.param_dtype, name="adapter")(image.astype(self.dtype))
