"""The U-Net's down, mid and up blocks (diffusers' `unet_2d_blocks`); `UNetMidBlock2D` is the VAE's mid block too."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.attention import Implementation
from jaxsd.models.freeu import apply_freeu
from jaxsd.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxsd.models.transformer import Attention, Transformer2DModel

Dtype = Any


def _per_layer(value, i: int) -> int:
  """Transformer depth of attention i of a block: one int for the block, or one per layer (SDXL variants)."""
  return value[i] if isinstance(value, (tuple, list)) else value


def _resnet(block: nn.Module, i: int) -> ResnetBlock2D:
  """A down or up block's ResNet `resnets_{i}`, from the block's settings (created inside its `__call__`)."""
  return ResnetBlock2D(block.out_channels, groups=block.groups, eps=block.eps, act_fn=block.act_fn, name=f"resnets_{i}",
                       time_embedding_norm=block.resnet_time_scale_shift, dtype=block.dtype,
                       param_dtype=block.param_dtype)


def _transformer(block: nn.Module, i: int) -> Transformer2DModel:
  """A cross-attention down or up block's transformer `attentions_{i}`, from the block's settings."""
  return Transformer2DModel(block.heads, block.out_channels // block.heads,
                            num_layers=_per_layer(block.transformer_layers, i), norm_num_groups=block.groups,
                            use_linear_projection=block.use_linear_projection,
                            only_cross_attention=block.only_cross_attention, upcast_attention=block.upcast_attention,
                            attention_implementation=block.attention_implementation, name=f"attentions_{i}",
                            dtype=block.dtype, param_dtype=block.param_dtype)


class UNetMidBlock2D(nn.Module):
  """resnets_0, then (attentions_i, resnets_{i+1}) pairs; the VAE's mid block (one-head attention).

  With `add_attention=False` and `num_layers=0` it is the U-Net's "UNetMidBlock2D" (one ResNet).
  """

  num_layers: int = 1
  resnet_groups: int = 32
  resnet_eps: float = 1e-6
  act_fn: str = "silu"
  output_scale_factor: float = 1.0
  add_attention: bool = True
  attention_head_dim: int | None = None
  resnet_time_scale_shift: str = "default"
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    resnet = dict(groups=self.resnet_groups, eps=self.resnet_eps, act_fn=self.act_fn,
                  output_scale_factor=self.output_scale_factor, time_embedding_norm=self.resnet_time_scale_shift, **kw)
    x = ResnetBlock2D(c, name="resnets_0", **resnet)(x, temb)
    head_dim = self.attention_head_dim or c
    for i in range(self.num_layers):
      if self.add_attention:
        x = Attention(heads=c // head_dim, dim_head=head_dim, bias=True, norm_num_groups=self.resnet_groups,
                      eps=self.resnet_eps, residual_connection=True, rescale_output_factor=self.output_scale_factor,
                      attention_implementation=self.attention_implementation, name=f"attentions_{i}", **kw)(x)
      x = ResnetBlock2D(c, name=f"resnets_{i + 1}", **resnet)(x, temb)
    return x


class CrossAttnDownBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: int | tuple[int, ...] = 1  # one depth for the block, or one per layer
  add_downsample: bool = True
  downsample_padding: int = 1
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, additional_residuals=None):
    """`additional_residuals`: a T2I-Adapter's features, added after the last ResNet / attention pair."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    states = ()
    for i in range(self.num_layers):
      x = _resnet(self, i)(x, temb)
      x = _transformer(self, i)(x, context)
      if i == self.num_layers - 1 and additional_residuals is not None:
        x = x + additional_residuals.astype(x.dtype)
      states += (x,)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
      states += (x,)
    return x, states


class DownBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_downsample: bool = True
  downsample_padding: int = 1
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    states = ()
    for i in range(self.num_layers):
      x = _resnet(self, i)(x, temb)
      states += (x,)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
      states += (x,)
    return x, states


class UNetMidBlock2DCrossAttn(nn.Module):
  heads: int
  transformer_layers: int | tuple[int, ...] = 1
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  output_scale_factor: float = 1.0
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    resnet = dict(groups=self.groups, eps=self.eps, act_fn=self.act_fn, output_scale_factor=self.output_scale_factor,
                  time_embedding_norm=self.resnet_time_scale_shift, **kw)
    x = ResnetBlock2D(c, name="resnets_0", **resnet)(x, temb)
    attention = Transformer2DModel(self.heads, c // self.heads, num_layers=_per_layer(self.transformer_layers, 0),
                                   norm_num_groups=self.groups, use_linear_projection=self.use_linear_projection,
                                   upcast_attention=self.upcast_attention,
                                   attention_implementation=self.attention_implementation, name="attentions_0", **kw)
    x = attention(x, context)
    return ResnetBlock2D(c, name="resnets_1", **resnet)(x, temb)


class CrossAttnUpBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: int | tuple[int, ...] = 1
  add_upsample: bool = True
  upsample_size: tuple[int, int] | None = None  # static: set when the input is not a multiple of 2**n
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context, freeu=None):
    """`freeu`: this block's FreeU factors (s, b) (`jaxsd.models.freeu`), or None."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = _with_skip(x, skips[-1 - i], freeu)
      x = _resnet(self, i)(x, temb)
      x = _transformer(self, i)(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, self.upsample_size)
    return x


class UpBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_upsample: bool = True
  upsample_size: tuple[int, int] | None = None
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "silu"
  resnet_time_scale_shift: str = "default"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context=None, freeu=None):
    """`freeu`: this block's FreeU factors (s, b) (`jaxsd.models.freeu`), or None."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = _with_skip(x, skips[-1 - i], freeu)
      x = _resnet(self, i)(x, temb)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, self.upsample_size)
    return x


def _with_skip(x: jax.Array, skip: jax.Array, freeu: jax.Array | None) -> jax.Array:
  """An up block's ResNet input: x and the skip features, concatenated on channels (after FreeU's scaling and
  filtering, when the block has factors)."""
  if freeu is not None:
    x, skip = apply_freeu(x, skip, freeu)
  return jnp.concatenate([x, skip], axis=-1)
