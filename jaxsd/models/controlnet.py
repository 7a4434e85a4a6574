"""ControlNet (Zhang et al. 2023; diffusers `ControlNetModel`) in flax.linen, NHWC.

A copy of the U-Net's encoder (conv_in, time_embedding, down_blocks, mid_block: the same modules as
`jaxsd.models.unet`, built by its `embed_time` / `encode`) whose input also gets the conditioning image
through a small convolutional embedding (`controlnet_cond_embedding`), and whose skips and mid-block
output leave through 1x1 zero convolutions (`controlnet_down_blocks_i`, `controlnet_mid_block`): the
residuals the U-Net adds (`down_block_additional_residuals`, `mid_block_additional_residual`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.config import ConfigBase
from jaxsd.models.attention import Implementation
from jaxsd.models.resnet import conv
from jaxsd.models.unet import UNet2DConditionConfig, embed_time, encode

Dtype = Any

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(ConfigBase):
  """diffusers' ControlNetModel config.json: same field names, same defaults."""

  in_channels: int = 4
  conditioning_channels: int = 3
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  encoder_hid_dim: int | None = None
  encoder_hid_dim_type: str | None = None
  attention_head_dim: int | tuple[int, ...] = 8  # the number of heads, as in the U-Net's config
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  class_embed_type: str | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  num_class_embeds: int | None = None
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  projection_class_embeddings_input_dim: int | None = None
  controlnet_conditioning_channel_order: str = "rgb"
  # Four convolutions with stride 2 between levels: 512 px conditions -> 64 latent pixels (SD's VAE factor 8).
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False  # "shuffle" ControlNets: residuals averaged over the image
  addition_embed_type_num_heads: int = 64

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def num_residuals(self) -> int:
    """Down-block residuals: conv_in's, one per ResNet layer, one per downsampler."""
    return 1 + self.num_blocks * self.layers_per_block + self.num_blocks - 1

  @property
  def conditioning_factor(self) -> int:
    """Conditioning-image pixels per latent pixel: the embedding's stride-2 convolutions."""
    return 2**(len(self.conditioning_embedding_out_channels) - 1)

  def unet_config(self) -> UNet2DConditionConfig:
    """The U-Net config whose encoder this ControlNet copies (its up blocks are never built)."""
    shared = {f.name for f in dataclasses.fields(UNet2DConditionConfig)}
    fields = {k: v for k, v in self.to_dict().items() if k in shared}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return UNet2DConditionConfig(**fields, up_block_types=("UpBlock2D",) * self.num_blocks)

  @classmethod
  def from_unet(cls, unet: UNet2DConditionConfig, conditioning_embedding_out_channels=(16, 32, 96, 256),
                conditioning_channels: int = 3, controlnet_conditioning_channel_order: str = "rgb") -> ControlNetConfig:
    """As diffusers' `ControlNetModel.from_unet`: the U-Net's encoder settings, a new conditioning embedding.
    Unlike diffusers (0.42), addition_embed_type_num_heads is copied too: diffusers leaves it at 64, whatever
    the heads of the U-Net's "text" addition embedding whose weights it copies."""
    shared = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in dataclasses.asdict(unet).items() if k in shared}
    cfg = cls(**fields, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
              conditioning_channels=conditioning_channels,
              controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    if self.mid_block_type is None:
      raise ValueError("ControlNetConfig: mid_block_type=None is not a ControlNet (diffusers refuses it too); use "
                       "UNetMidBlock2DCrossAttn or UNetMidBlock2D.")
    if not isinstance(self.layers_per_block, int):
      raise ValueError(f"ControlNetConfig: layers_per_block={self.layers_per_block!r} must be one integer (as in "
                       "diffusers' ControlNetModel).")
    if any(isinstance(v, (tuple, list)) for v in _as_tuple(self.transformer_layers_per_block)):
      raise ValueError("ControlNetConfig: per-layer (nested) transformer_layers_per_block is not implemented; give "
                       "one depth per block.")
    if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
      raise ValueError(f"ControlNetConfig: controlnet_conditioning_channel_order="
                       f"{self.controlnet_conditioning_channel_order!r}; use one of {CHANNEL_ORDERS}.")
    self.check_sizes("conditioning_channels", "conditioning_embedding_out_channels")
    try:
      self.unet_config().validate()
    except ValueError as e:
      raise ValueError(str(e).replace("UNet2DConditionConfig", "ControlNetConfig")) from None


def _as_tuple(v) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


class ControlNetConditioningEmbedding(nn.Module):
  """conv_in, then pairs of (3x3, 3x3 stride 2) convolutions, each followed by SiLU; conv_out starts at 0."""

  conditioning_embedding_channels: int
  block_out_channels: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.silu(conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x))
    for i, (c_in, c_out) in enumerate(zip(self.block_out_channels[:-1], self.block_out_channels[1:])):
      x = nn.silu(conv(c_in, 3, name=f"blocks_{2 * i}", **kw)(x))
      x = nn.silu(conv(c_out, 3, stride=2, padding=1, name=f"blocks_{2 * i + 1}", **kw)(x))
    return conv(self.conditioning_embedding_channels, 3, name="conv_out", zero_init=True, **kw)(x)


class ControlNetModel(nn.Module):
  """`__call__(sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
  guess_mode=False) -> (down-block residuals, mid-block residual)`, NHWC, as diffusers' forward.

  `controlnet_cond` is the conditioning image (B, H, W, conditioning_channels) in [0, 1] (not
  normalised), H and W the latents' times `config.conditioning_factor`. `conditioning_scale` (may be a
  traced scalar) multiplies every residual; in guess mode (unless `global_pool_conditions`) the residuals
  are scaled by 10**linspace(-1, 0) from the first skip to the mid block, times conditioning_scale.
  SDXL ControlNets (addition_embed_type="text_time") also take `text_embeds` and `time_ids`.
  """

  config: ControlNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Implementation = "auto"
  gradient_checkpointing: bool = False

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float, encoder_hidden_states: jax.Array,
               controlnet_cond: jax.Array, conditioning_scale: jax.Array | float = 1.0, guess_mode: bool = False,
               text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None) -> tuple[tuple[jax.Array, ...], jax.Array]:
    cfg = self.config
    ucfg = cfg.unet_config()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    want = (sample.shape[1] * cfg.conditioning_factor, sample.shape[2] * cfg.conditioning_factor)
    if controlnet_cond.shape[1:3] != want or controlnet_cond.shape[-1] != cfg.conditioning_channels:
      raise ValueError(f"controlnet_cond has shape {controlnet_cond.shape}; this ControlNet wants (B, {want[0]}, "
                       f"{want[1]}, {cfg.conditioning_channels}) for latents of {sample.shape[1]}x{sample.shape[2]} "
                       f"(its conditioning embedding downsamples by {cfg.conditioning_factor}).")
    if cfg.controlnet_conditioning_channel_order == "bgr":
      controlnet_cond = jnp.flip(controlnet_cond, axis=-1)

    x = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    emb = embed_time(self, ucfg, timesteps, x.shape[0], context, text_embeds, time_ids)
    x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
    x = x + ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                            name="controlnet_cond_embedding", **kw)(controlnet_cond.astype(self.dtype))
    x, skips = encode(self, ucfg, x, emb, context)

    down = tuple(
        conv(s.shape[-1], 1, name=f"controlnet_down_blocks_{i}", zero_init=True, **kw)(s) for i, s in enumerate(skips))
    mid = conv(x.shape[-1], 1, name="controlnet_mid_block", zero_init=True, **kw)(x)

    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if guess_mode and not cfg.global_pool_conditions:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * scale  # 0.1 to 1.0
    else:
      scales = jnp.broadcast_to(scale, (len(down) + 1,))
    down = tuple((d * scales[i]).astype(self.dtype) for i, d in enumerate(down))
    mid = (mid * scales[-1]).astype(self.dtype)
    if cfg.global_pool_conditions:
      down = tuple(jnp.mean(d, axis=(1, 2), keepdims=True) for d in down)
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return down, mid
