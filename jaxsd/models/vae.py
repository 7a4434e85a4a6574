"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in flax.linen, NHWC.

Images in [-1, 1] -> `encode` -> a diagonal Gaussian over latents (before `scaling_factor`);
latents -> `decode` -> images. Submodules are named as in diffusers' state dict: encoder,
decoder, quant_conv, post_quant_conv.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.attention import Implementation
from jaxsd.config import ConfigBase
from jaxsd.models.activations import ACTIVATIONS
from jaxsd.models.normalization import GroupNorm
from jaxsd.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv
from jaxsd.models.unet_blocks import UNetMidBlock2D

Dtype = Any


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ConfigBase):
  """diffusers' AutoencoderKL config.json: same field names, same defaults."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, int] = 32
  scaling_factor: float = 0.18215  # latents fed to the U-Net are z * scaling_factor
  shift_factor: float | None = None  # SD3 / FLUX VAEs: kept in config.json, not read by SD pipelines (as diffusers)
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True  # diffusers' hint that this VAE overflows in fp16
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsampling_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for Stable Diffusion's VAE)."""
    return 2**(len(self.block_out_channels) - 1)

  def validate(self) -> None:
    self.check_sizes("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                     "norm_num_groups", "sample_size")
    n = len(self.block_out_channels)
    for name, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                              ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
      if len(types) != n:
        raise ValueError(f"AutoencoderKLConfig: {name} has {len(types)} entries for {n} block_out_channels.")
      for i, t in enumerate(types):
        if t != want:
          raise ValueError(f"AutoencoderKLConfig: {name}[{i}]={t!r} is not implemented (only {want!r}).")
    if self.act_fn.lower() not in ACTIVATIONS:
      raise ValueError(f"AutoencoderKLConfig: act_fn={self.act_fn!r} unknown; known: {sorted(ACTIVATIONS)}.")
    for i, c in enumerate(self.block_out_channels):
      if c % self.norm_num_groups:
        raise ValueError(f"AutoencoderKLConfig: block_out_channels[{i}]={c} is not divisible by "
                         f"norm_num_groups={self.norm_num_groups}.")


@flax.struct.dataclass
class DiagonalGaussianDistribution:
  """The encoder's posterior: diffusers' DiagonalGaussianDistribution, kept in fp32."""

  mean: jax.Array
  logvar: jax.Array  # clipped to [-30, 20]

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussianDistribution":
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example, summed over H, W, C."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class DownEncoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_downsample: bool = True
  groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, act_fn=self.act_fn, name=f"resnets_{i}",
                        **kw)(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_upsample: bool = True
  groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, act_fn=self.act_fn, name=f"resnets_{i}",
                        **kw)(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  config: AutoencoderKLConfig
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = cfg.block_out_channels
    x = conv(chans[0], 3, name="conv_in", **kw)(x)
    for i, c in enumerate(chans):
      x = DownEncoderBlock2D(c, cfg.layers_per_block, add_downsample=i < len(chans) - 1, groups=cfg.norm_num_groups,
                             act_fn=cfg.act_fn, name=f"down_blocks_{i}", **kw)(x)
    x = UNetMidBlock2D(resnet_groups=cfg.norm_num_groups, act_fn=cfg.act_fn, add_attention=cfg.mid_block_add_attention,
                       attention_head_dim=chans[-1], attention_implementation=self.attention_implementation,
                       name="mid_block", **kw)(x)
    x = GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
    x = jax.nn.silu(x)  # diffusers hard-codes SiLU here, whatever act_fn says
    return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  config: AutoencoderKLConfig
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = cfg.block_out_channels
    x = conv(chans[-1], 3, name="conv_in", **kw)(z)
    x = UNetMidBlock2D(resnet_groups=cfg.norm_num_groups, act_fn=cfg.act_fn, add_attention=cfg.mid_block_add_attention,
                       attention_head_dim=chans[-1], attention_implementation=self.attention_implementation,
                       name="mid_block", **kw)(x)
    for i, c in enumerate(reversed(chans)):
      x = UpDecoderBlock2D(c, cfg.layers_per_block + 1, add_upsample=i < len(chans) - 1, groups=cfg.norm_num_groups,
                           act_fn=cfg.act_fn, name=f"up_blocks_{i}", **kw)(x)
    x = GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
    x = jax.nn.silu(x)
    return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """`encode(images) -> DiagonalGaussianDistribution`, `decode(latents) -> images`, NHWC.

  `dtype` is the computation dtype (decoded images come out in it); the posterior is fp32.
  Use `vae.apply({"params": p}, x, method=vae.encode)` / `method=vae.decode`.
  """

  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Implementation = "auto"

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, self.attention_implementation, **kw)
    self.decoder = Decoder(cfg, self.attention_implementation, **kw)
    self.quant_conv = conv(2 * cfg.latent_channels, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = (conv(cfg.latent_channels, 1, **kw) if cfg.use_post_quant_conv else None)

  def moments(self, x: jax.Array) -> jax.Array:
    """The posterior's moments (mean and log-variance on channels, unclipped, in `dtype`): what tiles blend."""
    h = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    return h

  def encode(self, x: jax.Array) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution.from_moments(self.moments(x))

  def decode(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array, sample_posterior: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussianDistribution]:
    posterior = self.encode(x)
    if sample_posterior:
      if key is None:
        raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG key.")
      z = posterior.sample(key)
    else:
      z = posterior.mode()
    return self.decode(z), posterior
