"""diffusers' `Attention` (self, cross and the VAE's spatial attention), its feed-forward, BasicTransformerBlock and
Transformer2DModel, on (B, L, C) / NHWC; and the cross-attention contexts that carry an IP-Adapter's image tokens
or Perturbed-Attention Guidance down the U-Net's blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models import mask_downsample
from jaxsd.models.activations import GEGLU
from jaxsd.models.attention import Implementation, dot_product_attention
from jaxsd.models.normalization import GroupNorm, LayerNorm
from jaxsd.models.resnet import conv

Dtype = Any


@flax.struct.dataclass
class ImagePrompt:
  """The cross-attention context with an IP-Adapter's image tokens (Ye et al., 2023), passed down the U-Net's blocks
  in place of the text embeddings: each cross-attention adds `scale` x its attention over the image tokens
  (diffusers' IPAdapterAttnProcessor2_0)."""

  text: jax.Array  # (B, L, D): the encoder hidden states
  tokens: Any  # (B, N, D): the projected image tokens; several adapters: a tuple of them, one per adapter
  # (): the adapter's weight (an input, so a new scale compiles nothing); or per-block weights (InstantStyle), one ()
  # per attention: {"down_blocks_1/attentions_0": ..., "mid_block/attentions_0": ...} (`jaxsd.block_scales`);
  # several adapters: a tuple of one such per adapter
  scale: Any
  # None, or the region masks (diffusers' `ip_adapter_masks`): (n, H, W), one per image of the adapter, each image's
  # attention then weighted by its mask brought to the query length (`mask_downsample`); several adapters: a tuple
  # of one such (or None) per adapter
  masks: Any = None


@flax.struct.dataclass
class PerturbedSelfAttention:
  """The cross-attention context (text embeddings or an `ImagePrompt`) passed down the U-Net's blocks with
  Perturbed-Attention Guidance (Ahn et al., 2024): in the transformer blocks of `layers` the self-attention of the
  last `rows` rows of the batch (the perturbed copy of the conditional rows) is the identity map, to_out(to_v(x))
  with no softmax, as diffusers' PAG(CFG)IdentitySelfAttnProcessor2_0. Both are static (part of the program)."""

  context: Any
  layers: frozenset = flax.struct.field(pytree_node=False)  # attn1 paths: "mid_block/attentions_0/.../attn1"
  rows: int = flax.struct.field(pytree_node=False)


class Attention(nn.Module):
  """diffusers `Attention` (AttnProcessor2_0): to_q/to_k/to_v, scaled dot-product, to_out_0.

  Used as transformer self/cross attention on (B, L, C) and as the VAE's spatial attention on
  NHWC input (with `norm_num_groups` set: its group_norm, plus `residual_connection`).

  `upcast_attention` (SD 2.x): q.k^T is already accumulated and softmaxed in fp32 by every path of
  `dot_product_attention` (XLA: fp32 `preferred_element_type`; cuDNN, Pallas: fp32 accumulators), so
  no cast is made here; casting q and k to fp32 would only rule out the cuDNN kernel.

  `image_prompt` (cross-attention only): an IP-Adapter's image tokens, attended to with the same queries through
  `to_k_ip_0` / `to_v_ip_0` (diffusers' processor's `to_k_ip.0` / `to_v_ip.0`) and added, scaled, before to_out;
  an adapter with region masks (`ImagePrompt.masks`) attends to each image's tokens alone and weights that by the
  image's mask (diffusers' `ip_adapter_masks`).
  `perturbed` (static): the last this many rows of the batch skip the softmax: their attention output is the values
  (Perturbed-Attention Guidance's identity self-attention, `PerturbedSelfAttention`).
  """

  heads: int
  dim_head: int
  bias: bool = False
  out_bias: bool = True
  upcast_attention: bool = False
  norm_num_groups: int | None = None
  eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, image_prompt: ImagePrompt | None = None,
               perturbed: int = 0) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    spatial_shape = x.shape if x.ndim == 4 else None
    if spatial_shape is not None:
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.norm_num_groups is not None:
      x = GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(x)
    context = x if context is None else context
    inner = self.heads * self.dim_head
    q = nn.Dense(inner, use_bias=self.bias, name="to_q", **kw)(x)
    k = nn.Dense(inner, use_bias=self.bias, name="to_k", **kw)(context)
    v = nn.Dense(inner, use_bias=self.bias, name="to_v", **kw)(context)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    if perturbed:  # PAG: the last rows' output is their values (diffusers applies to_out to both parts alike)
      n = x.shape[0] - perturbed
      out = dot_product_attention(split(q[:n]), split(k[:n]), split(v[:n]),
                                  implementation=self.attention_implementation)
      out = jnp.concatenate([out.reshape(n, out.shape[1], inner), v[n:]])
    else:
      out = dot_product_attention(split(q), split(k), split(v), implementation=self.attention_implementation)
    out = out.reshape(out.shape[0], out.shape[1], inner)
    if image_prompt is not None:  # each adapter's tokens through its own keys and values, in order
      tokens, scales, masks = image_prompt.tokens, image_prompt.scale, image_prompt.masks
      if not isinstance(tokens, tuple):  # one adapter
        tokens, scales, masks = (tokens,), (scales,), (masks,)
      for i, (t, scale, mask) in enumerate(zip(tokens, scales, masks or (None,) * len(tokens))):
        k = nn.Dense(inner, use_bias=False, name=f"to_k_ip_{i}", **kw)(t)
        v = nn.Dense(inner, use_bias=False, name=f"to_v_ip_{i}", **kw)(t)
        if mask is None:  # all the images' tokens in one attention
          ip = dot_product_attention(split(q), split(k), split(v), implementation=self.attention_implementation)
          out = out + scale.astype(out.dtype) * ip.reshape(out.shape)
          continue
        # as diffusers with masks: each image's tokens in an attention of their own, weighted by its mask
        weights = mask_downsample.downsample(mask, q.shape[1]).astype(out.dtype)
        per = t.shape[1] // mask.shape[0]
        for j in range(mask.shape[0]):
          part = slice(j * per, (j + 1) * per)
          ip = dot_product_attention(split(q), split(k[:, part]), split(v[:, part]),
                                     implementation=self.attention_implementation).reshape(out.shape)
          s = scale[j] if scale.ndim else scale  # one per image (diffusers' [[s1, s2]]), or one for all
          out = out + s.astype(out.dtype) * (ip * weights[j][None, :, None])
    out = nn.Dense(residual.shape[-1], use_bias=self.out_bias, name="to_out_0", **kw)(out)
    if spatial_shape is not None:
      out = out.reshape(spatial_shape)
    if self.residual_connection:
      out = out + residual
    return out / self.rescale_output_factor


class FeedForward(nn.Module):
  """net_0 (GEGLU to mult*dim) -> net_2 (back to dim); net_1 is diffusers' dropout slot."""

  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
    return nn.Dense(self.dim, name="net_2", **kw)(x)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual. `context` is the text
  embeddings, or an `ImagePrompt` (they and an IP-Adapter's image tokens, which the cross-attention also reads)."""

  dim: int
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  upcast_attention: bool = False
  norm_eps: float = 1e-5
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | ImagePrompt | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, dim_head=self.dim_head, upcast_attention=self.upcast_attention,
                attention_implementation=self.attention_implementation, **kw)
    image_prompt, perturbed = None, 0
    if isinstance(context, PerturbedSelfAttention):  # PAG: this block's self-attention, if it is one of the layers
      perturbed = context.rows if "/".join(self.path[-3:] + ("attn1",)) in context.layers else 0
      context = context.context
    if isinstance(context, ImagePrompt):  # as diffusers: only attn2 (the cross-attention) reads the image tokens
      context, image_prompt = context.text, context
      here = "/".join(self.path[-3:-1])  # per-block scales: this block's attention's
      pick = lambda s: s[here] if isinstance(s, Mapping) else s  # noqa: E731
      scale = image_prompt.scale
      image_prompt = image_prompt.replace(scale=tuple(map(pick, scale)) if isinstance(scale, tuple) else pick(scale))
    h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
    x = x + Attention(name="attn1", **attn)(h, context if self.only_cross_attention else None, perturbed=perturbed)
    h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
    x = x + Attention(name="attn2", **attn)(h, context, image_prompt)
    h = LayerNorm(self.norm_eps, name="norm3", **kw)(x)
    return x + FeedForward(self.dim, name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in (1x1 conv, or Dense with `use_linear_projection`), blocks, proj_out, residual."""

  heads: int
  dim_head: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  attention_implementation: Implementation = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, c = x.shape
    inner = self.heads * self.dim_head
    residual = x
    h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)  # eps fixed at 1e-6 in diffusers
    if self.use_linear_projection:
      h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(b, height * width, c))
    else:
      h = conv(inner, 1, name="proj_in", **kw)(h).reshape(b, height * width, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(inner, self.heads, self.dim_head, only_cross_attention=self.only_cross_attention,
                                upcast_attention=self.upcast_attention,
                                attention_implementation=self.attention_implementation, name=f"transformer_blocks_{i}",
                                **kw)(h, context)
    if self.use_linear_projection:
      h = nn.Dense(c, name="proj_out", **kw)(h).reshape(b, height, width, c)
    else:
      h = conv(c, 1, name="proj_out", **kw)(h.reshape(b, height, width, inner))
    return h + residual
