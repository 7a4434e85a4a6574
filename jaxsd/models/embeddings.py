"""Timestep, guidance-scale and text-pooling embeddings, written to match diffusers' `embeddings` modules."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.activations import get_activation
from jaxsd.models.attention import dot_product_attention
from jaxsd.models.normalization import LayerNorm

Dtype = Any


class Timesteps(nn.Module):
  """Sinusoidal timestep features (diffusers `get_timestep_embedding`), always fp32. No parameters."""

  num_channels: int
  flip_sin_to_cos: bool = True
  downscale_freq_shift: float = 0.0
  max_period: int = 10000

  def __call__(self, timesteps: jax.Array) -> jax.Array:
    half = self.num_channels // 2
    exponent = -math.log(self.max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - self.downscale_freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if self.flip_sin_to_cos else [sin, cos], axis=-1)
    if self.num_channels % 2:
      emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_scale_embedding(w: jax.Array, embedding_dim: int) -> jax.Array:
  """[B] guidance scales -> [B, embedding_dim] fp32 sinusoids of 1000 w, as diffusers'
  `get_guidance_scale_embedding` (sin first, then cos): the `timestep_cond` of guidance-distilled U-Nets
  (Latent Consistency Models, Luo et al. 2023), which take w = guidance_scale - 1."""
  w = jnp.reshape(jnp.asarray(w, jnp.float32), (-1,)) * 1000.0
  half = embedding_dim // 2
  step = jnp.log(jnp.float32(10000.0)) / (half - 1)  # float32 throughout, as diffusers
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
  args = w[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, embedding_dim % 2)))


class TimestepEmbedding(nn.Module):
  """(+ cond_proj(condition)) -> linear_1 -> act -> linear_2 (-> optional post activation).

  cond_proj_dim: the width of an extra condition projected (no bias) and added to the input, as diffusers'
  `cond_proj` (the guidance embedding of LCM-distilled U-Nets, `time_cond_proj_dim`); no condition adds 0.
  """

  time_embed_dim: int
  act_fn: str = "silu"
  post_act_fn: str | None = None
  cond_proj_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    if self.cond_proj_dim is not None:
      if condition is None:  # (the parameter exists either way)
        condition = jnp.zeros((x.shape[0], self.cond_proj_dim), x.dtype)
      elif condition.shape[-1] != self.cond_proj_dim:
        raise ValueError(f"timestep_cond has {condition.shape[-1]} features; this U-Net's time_cond_proj_dim is "
                         f"{self.cond_proj_dim}.")
      x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="cond_proj")(
          condition.astype(self.dtype))
    elif condition is not None:
      raise ValueError("timestep_cond is given but this U-Net has no time_cond_proj_dim (it is not "
                       "guidance-distilled): drop it.")
    x = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
    x = get_activation(self.act_fn)(x)
    x = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)
    if self.post_act_fn is not None:
      x = get_activation(self.post_act_fn)(x)
    return x


class AttentionPooling(nn.Module):
  """diffusers `AttentionPooling` (from DeepFloyd IF): the mean token plus a learned position embedding
  attends over itself and the tokens; returns that one pooled vector, (B, L, D) -> (B, D)."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, d = x.shape
    hd = d // self.num_heads
    pos = self.param("positional_embedding", nn.initializers.normal(d**-0.5), (1, d), self.param_dtype)
    cls = jnp.mean(x, axis=1, keepdims=True) + pos.astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, hd)  # noqa: E731
    q = heads(nn.Dense(d, name="q_proj", **kw)(cls))
    k = heads(nn.Dense(d, name="k_proj", **kw)(x))
    v = heads(nn.Dense(d, name="v_proj", **kw)(x))
    return dot_product_attention(q, k, v).reshape(b, d)


class TextTimeEmbedding(nn.Module):
  """diffusers `TextTimeEmbedding` (`addition_embed_type="text"`): LayerNorm, attention pooling of the
  text encoder's hidden states, a projection to the time-embedding width, LayerNorm."""

  time_embed_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = LayerNorm(name="norm1", **kw)(hidden_states)
    x = AttentionPooling(self.num_heads, name="pool", **kw)(x)
    x = nn.Dense(self.time_embed_dim, name="proj", **kw)(x)
    return LayerNorm(name="norm2", **kw)(x)
