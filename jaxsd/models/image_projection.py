"""IP-Adapter image projections (Ye et al., 2023): CLIP image embeddings -> tokens for the U-Net's cross-attention.

diffusers' `ImageProjection` (the plain IP-Adapter: a Linear to `num_tokens` x cross_attention_dim and a LayerNorm),
`IPAdapterPlusImageProjection` (IP-Adapter Plus: a Perceiver resampler whose learned queries attend to the image
encoder's penultimate hidden states), `IPAdapterFullImageProjection` (IP-Adapter Full Face: a GELU feed-forward and
a LayerNorm on each of those hidden states, 257 tokens per image) and `IPAdapterFaceIDImageProjection` (IP-Adapter
FaceID: a GELU feed-forward from a face-recognition embedding to `num_tokens` tokens, and a LayerNorm) under
diffusers' `MultiIPAdapterImageProjection` names, so the U-Net's
parameters read like its state dict: `encoder_hid_proj.image_projection_layers.0.image_embeds.weight` <->
`encoder_hid_proj/image_projection_layers_0/image_embeds/kernel`. The U-Net (`UNet2DConditionModel(...,
image_embeds=...)`) builds it when it is given image embeddings; the attention layers then also attend to its tokens
(`transformer.ImagePrompt`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.normalization import LayerNorm
from jaxsd.models.transformer import Attention

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


@dataclasses.dataclass(frozen=True)
class FullFaceConfig:
  """An `IPAdapterFullImageProjection` (IP-Adapter Full Face): its sizes are its input's and cross_attention_dim."""


@dataclasses.dataclass(frozen=True)
class FaceIDConfig:
  """The sizes of an `IPAdapterFaceIDImageProjection` that diffusers reads off its weights (`projection_config`)."""

  num_tokens: int  # tokens per face embedding (4 in h94's FaceID checkpoints)
  mult: int  # the feed-forward's inner width over its input's (1024 / 512 = 2 in FaceID SD 1.5)


# The static description of one adapter's projection: None (plain), or one of these.
ProjectionConfig = ResamplerConfig | FullFaceConfig | FaceIDConfig | None


def takes_hidden_states(config: ProjectionConfig) -> bool:
  """Whether the projection reads the image encoder's hidden states (B, [n,] L, D): Plus and Full Face; the plain
  projection and FaceID's read one vector per image (B, [n,] D)."""
  return isinstance(config, (ResamplerConfig, FullFaceConfig))


def projection_config(projection: Any, hidden_states: bool | None = None) -> ProjectionConfig:
  """The config of the projection whose parameters (or shapes) `projection` holds, None for a plain one. A
  feed-forward projection is Full Face's where it reads hidden states (`hidden_states`, the input's rank: it tells
  the two apart where the sizes cannot, e.g. a FaceID projection to one token with mult 1), else FaceID's; without
  `hidden_states`, Full Face's where its sizes fit (inner and output widths those of its input and its norm)."""
  if "latents" in projection:
    _, queries, hidden = projection["latents"].shape
    depth = sum(1 for k in projection if k.startswith("layers_"))
    return ResamplerConfig(hidden, queries, projection["layers_0"]["attn"]["to_q"]["kernel"].shape[1] // 64, depth)
  if "ff" not in projection:
    return None
  fan_in, inner = projection["ff"]["net_0"]["proj"]["kernel"].shape
  out, width = projection["ff"]["net_2"]["kernel"].shape[1], projection["norm"]["scale"].shape[0]
  if hidden_states is None:
    hidden_states = out == width and inner == fan_in
  return FullFaceConfig() if hidden_states else FaceIDConfig(out // width, inner // fan_in)


class _FeedForward(nn.Module):
  """diffusers' FeedForward(activation_fn="gelu"): net_0 (Linear to mult x the input's width, exact GELU), net_2
  (Linear to `features`, default the input's width)."""

  mult: int
  features: int | None = None
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = _Linear(x.shape[-1] * self.mult, name="net_0", **kw)(x)
    return nn.Dense(self.features or x.shape[-1], name="net_2", **kw)(jax.nn.gelu(hidden, approximate=False))


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


class IPAdapterFullImageProjection(nn.Module):
  """diffusers' `IPAdapterFullImageProjection` (IP-Adapter Full Face): (N, L, D) image-encoder hidden states -> (N,
  L, cross_attention_dim) tokens, each through `ff` (FeedForward(D, cross_attention_dim, mult=1), exact GELU) and
  `norm` (LayerNorm)."""

  cross_attention_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _FeedForward(1, self.cross_attention_dim, use_bias=True, name="ff", **kw)(x.astype(self.dtype))
    return LayerNorm(name="norm", **kw)(x)


class IPAdapterFaceIDImageProjection(nn.Module):
  """diffusers' `IPAdapterFaceIDImageProjection` (IP-Adapter FaceID): (N, D) face-recognition embeddings (insightface's
  normed_embedding, D = 512) -> (N, num_tokens, cross_attention_dim): `ff` (FeedForward(D, num_tokens x
  cross_attention_dim, mult), exact GELU), reshaped to tokens, `norm` (LayerNorm)."""

  config: FaceIDConfig
  cross_attention_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _FeedForward(cfg.mult, cfg.num_tokens * self.cross_attention_dim, use_bias=True, name="ff",
                     **kw)(x.astype(self.dtype))
    x = x.reshape(x.shape[0], cfg.num_tokens, self.cross_attention_dim)
    return LayerNorm(name="norm", **kw)(x)


class IPAdapterImageProjections(nn.Module):
  """diffusers' `MultiIPAdapterImageProjection` (the U-Net's `encoder_hid_proj`): one projection per adapter,
  `image_projection_layers_<k>`.

  Plain (`resampler` None): (B, D) or (B, n, D) pooled image embeddings (n images per row, diffusers' layout);
  FaceID (a `FaceIDConfig`): (B, [n,] D) face embeddings; Plus (a `ResamplerConfig`) and Full Face (a
  `FullFaceConfig`): (B, L, D) or (B, n, L, D) hidden states. -> (B, n * tokens, C): each image's tokens in turn (as
  diffusers' attention processor reads them). Several adapters: a tuple of such inputs and `resampler` a tuple of
  one entry per adapter -> a tuple of tokens.
  """

  cross_attention_dim: int
  resampler: ProjectionConfig | tuple = None  # each adapter's projection (`projection_config`)
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
      per_image = 2 if takes_hidden_states(resampler) else 1  # the axes of one image's input
      if embeds.ndim == 1 + per_image:
        embeds = embeds[:, None]
      if embeds.ndim != 2 + per_image:
        what = "(batch, [images,] tokens, dim) hidden" if per_image == 2 else "(batch, [images,] dim) pooled"
        raise ValueError(f"image_embeds must be {what} image embeddings; got shape {embeds.shape}.")
      b, n = embeds.shape[:2]
      flat = embeds.reshape((b * n,) + embeds.shape[2:])
      if resampler is None:
        tokens = ImageProjection(self.cross_attention_dim, **kw)(flat)
      elif isinstance(resampler, FullFaceConfig):
        tokens = IPAdapterFullImageProjection(self.cross_attention_dim, **kw)(flat)
      elif isinstance(resampler, FaceIDConfig):
        tokens = IPAdapterFaceIDImageProjection(resampler, self.cross_attention_dim, **kw)(flat)
      else:
        tokens = IPAdapterPlusImageProjection(resampler, self.cross_attention_dim, **kw)(flat)
      out.append(tokens.reshape(b, n * tokens.shape[1], tokens.shape[2]))
    return tuple(out) if several else out[0]
