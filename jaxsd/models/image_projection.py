"""IP-Adapter image projections (Ye et al., 2023): CLIP image embeddings -> tokens for the U-Net's cross-attention.

diffusers' `ImageProjection` (the plain IP-Adapter: a Linear to `num_tokens` x cross_attention_dim and a LayerNorm)
and `IPAdapterPlusImageProjection` (IP-Adapter Plus: a Perceiver resampler whose learned queries attend to the image
encoder's penultimate hidden states) under diffusers' `MultiIPAdapterImageProjection` names, so the U-Net's
parameters read like its state dict: `encoder_hid_proj.image_projection_layers.0.image_embeds.weight` <->
`encoder_hid_proj/image_projection_layers_0/image_embeds/kernel`. The U-Net (`UNet2DConditionModel(...,
image_embeds=...)`) builds it when it is given image embeddings; the attention layers then also attend to its tokens
(`layers.ImagePrompt`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.layers import Attention, LayerNorm

Dtype = Any

# diffusers builds the plain IP-Adapter's projection with 4 tokens, whatever the file (loaders/unet.py).
NUM_TOKENS = 4


class ImageProjection(nn.Module):
  """(N, D) image embeddings -> (N, num_tokens, cross_attention_dim) tokens: `image_embeds` Linear, LayerNorm."""

  cross_attention_dim: int
  num_tokens: int = NUM_TOKENS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeds: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.num_tokens * self.cross_attention_dim, name="image_embeds", **kw)(image_embeds.astype(self.dtype))
    x = x.reshape(x.shape[0], self.num_tokens, self.cross_attention_dim)
    return LayerNorm(name="norm", **kw)(x)


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
  """The sizes of an `IPAdapterPlusImageProjection`, which diffusers reads off its weights (`resampler_config`)."""

  hidden_dims: int  # the queries' width (`latents`: (1, num_queries, hidden_dims))
  num_queries: int  # tokens per image
  heads: int  # of dim_head each
  depth: int = 4
  dim_head: int = 64
  ffn_ratio: int = 4


def resampler_config(projection: Any) -> ResamplerConfig | None:
  """The config of the Resampler whose parameters (or shapes) `projection` holds, None for a plain projection."""
  if "latents" not in projection:
    return None
  _, queries, hidden = projection["latents"].shape
  depth = sum(1 for k in projection if k.startswith("layers_"))
  return ResamplerConfig(hidden, queries, projection["layers_0"]["attn"]["to_q"]["kernel"].shape[1] // 64, depth)


class _FeedForward(nn.Module):
  """diffusers' FeedForward(activation_fn="gelu", bias=False): net_0 (Linear + exact GELU), net_2 (Linear)."""

  mult: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = _Linear(x.shape[-1] * self.mult, name="net_0", **kw)(x)
    return nn.Dense(x.shape[-1], name="net_2", **kw)(jax.nn.gelu(hidden, approximate=False))


class _Linear(nn.Module):
  """A Linear one level down, named `proj` (diffusers' GELU activation module: `net.0.proj`)."""

  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="proj")(x)


class _ResamplerBlock(nn.Module):
  """diffusers' IPAdapterPlusImageProjectionBlock: the queries attend to [image tokens; queries], then a GELU
  feed-forward, each residual."""

  config: ResamplerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = latents
    context = LayerNorm(name="ln0", **kw)(x)
    latents = LayerNorm(name="ln1", **kw)(latents)
    context = jnp.concatenate([context, latents], axis=-2)
    latents = Attention(cfg.heads, cfg.dim_head, out_bias=False, name="attn", **kw)(latents, context) + residual
    h = LayerNorm(name="ff_0", **kw)(latents)
    return _FeedForward(cfg.ffn_ratio, name="ff_1", **kw)(h) + latents


class IPAdapterPlusImageProjection(nn.Module):
  """diffusers' `IPAdapterPlusImageProjection` (IP-Adapter Plus' Resampler): (N, L, D) image-encoder hidden states ->
  (N, num_queries, output_dims) tokens."""

  config: ResamplerConfig
  output_dims: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    latents = self.param("latents", nn.initializers.normal(cfg.hidden_dims**-0.5),
                         (1, cfg.num_queries, cfg.hidden_dims), self.param_dtype)
    latents = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape[1:])
    x = nn.Dense(cfg.hidden_dims, name="proj_in", **kw)(x.astype(self.dtype))
    for i in range(cfg.depth):
      latents = _ResamplerBlock(cfg, name=f"layers_{i}", **kw)(x, latents)
    latents = nn.Dense(self.output_dims, name="proj_out", **kw)(latents)
    return LayerNorm(name="norm_out", **kw)(latents)


class IPAdapterImageProjections(nn.Module):
  """diffusers' `MultiIPAdapterImageProjection` (the U-Net's `encoder_hid_proj`): one projection per adapter,
  `image_projection_layers_<k>`.

  Plain (`resampler` None): (B, D) or (B, n, D) pooled image embeddings (n images per row, diffusers' layout);
  Plus: (B, L, D) or (B, n, L, D) hidden states. -> (B, n * tokens, C): each image's tokens in turn (as diffusers'
  attention processor reads them). Several adapters: a tuple of such inputs and `resampler` a tuple of one entry per
  adapter -> a tuple of tokens.
  """

  cross_attention_dim: int
  resampler: ResamplerConfig | None | tuple = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeds: jax.Array | tuple) -> jax.Array | tuple:
    several = isinstance(image_embeds, (tuple, list))
    inputs = tuple(image_embeds) if several else (image_embeds,)
    resamplers = self.resampler if isinstance(self.resampler, tuple) else (self.resampler,) * len(inputs)
    if len(resamplers) != len(inputs):
      raise ValueError(f"{len(inputs)} image embeddings for {len(resamplers)} IP-Adapter projections.")
    out = []
    for k, (embeds, resampler) in enumerate(zip(inputs, resamplers)):
      kw = dict(name=f"image_projection_layers_{k}", dtype=self.dtype, param_dtype=self.param_dtype)
      per_image = 1 if resampler is None else 2  # the axes of one image's input
      if embeds.ndim == 1 + per_image:
        embeds = embeds[:, None]
      if embeds.ndim != 2 + per_image:
        what = "(batch, [images,] dim) pooled" if resampler is None else "(batch, [images,] tokens, dim) hidden"
        raise ValueError(f"image_embeds must be {what} CLIP image embeddings; got shape {embeds.shape}.")
      b, n = embeds.shape[:2]
      flat = embeds.reshape((b * n,) + embeds.shape[2:])
      if resampler is None:
        tokens = ImageProjection(self.cross_attention_dim, **kw)(flat)
      else:
        tokens = IPAdapterPlusImageProjection(resampler, self.cross_attention_dim, **kw)(flat)
      out.append(tokens.reshape(b, n * tokens.shape[1], tokens.shape[2]))
    return tuple(out) if several else out[0]
