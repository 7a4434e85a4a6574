"""Convolutions, diffusers' ResnetBlock2D and its down- and upsampling, NHWC.

Submodule and parameter names mirror the diffusers state dict (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`), so weights convert by renaming and transposing; every module takes a
computation `dtype` and a separate `param_dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models import cpu_conv
from jaxsd.models.activations import get_activation
from jaxsd.models.normalization import GroupNorm

Dtype = Any


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None, name: str | None = None,
         dtype: Dtype, param_dtype: Dtype, zero_init: bool = False) -> nn.Conv:
  """An nn.Conv with PyTorch's symmetric explicit padding (default: 'same' for odd kernels); on the
  CPU, small convolutions and their gradients run as matmuls (`cpu_conv`). `zero_init`: kernel and bias
  start at 0 (a ControlNet's zero convolutions)."""
  p = (kernel - 1) // 2 if padding is None else padding
  init = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros) if zero_init else {}
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), name=name, dtype=dtype,
                 param_dtype=param_dtype, conv_general_dilated=cpu_conv.conv_general_dilated, **init)


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D; `temb=None` (the VAE) has no time_emb_proj.

  time_embedding_norm: "default" adds the projected embedding before norm2; "scale_shift" (diffusers' name; ADM's
  AdaGN, Dhariwal & Nichol 2021) projects it to 2 x out_channels and applies norm2(h) * (1 + scale) + shift.
  """

  out_channels: int
  groups: int = 32
  groups_out: int | None = None
  eps: float = 1e-6
  act_fn: str = "silu"
  output_scale_factor: float = 1.0
  use_in_shortcut: bool | None = None
  time_embedding_norm: str = "default"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = get_activation(self.act_fn)
    h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
    h = conv(self.out_channels, 3, name="conv1", **kw)(act(h))
    scale_shift = self.time_embedding_norm == "scale_shift"
    if temb is not None:
      temb = nn.Dense(self.out_channels * (2 if scale_shift else 1), name="time_emb_proj", **kw)(act(temb))
      temb = temb[:, None, None, :]
      if not scale_shift:
        h = h + temb
    h = GroupNorm(self.groups_out or self.groups, self.eps, name="norm2", **kw)(h)
    if temb is not None and scale_shift:
      scale, shift = jnp.split(temb, 2, axis=-1)
      h = h * (1 + scale) + shift
    h = conv(self.out_channels, 3, name="conv2", **kw)(act(h))
    shortcut = x.shape[-1] != self.out_channels if self.use_in_shortcut is None else self.use_in_shortcut
    if shortcut:
      x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. padding=0 (the VAE) first pads right and bottom by one, as diffusers does."""

  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.out_channels, 3, stride=2, padding=self.padding, name="conv", dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


def _nearest_indices(in_size: int, out_size: int) -> jax.Array:
  # torch's "nearest" (not "nearest-exact"): src = floor(dst * in / out).
  scale = in_size / out_size
  return jnp.asarray([min(int(math.floor(i * scale)), in_size - 1) for i in range(out_size)], dtype=jnp.int32)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
  """F.interpolate(mode="nearest") on NHWC: x2, or to `output_size` (H, W)."""
  if output_size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  h, w = output_size
  x = jnp.take(x, _nearest_indices(x.shape[1], h), axis=1)
  return jnp.take(x, _nearest_indices(x.shape[2], w), axis=2)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 (or to `output_size`) followed by a 3x3 conv."""

  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    x = upsample_nearest(x, output_size)
    return conv(self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
