"""Blocks shared by the U-Net and the VAE, written to match diffusers' PyTorch modules.

Inputs are NHWC. Submodule and parameter names mirror the diffusers state dict
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`), so weights
convert by renaming and transposing. Every module takes a computation `dtype` and a separate
`param_dtype`; group and layer normalisation always compute their statistics in fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models import cpu_conv, mask_downsample
from jaxsd.models.attention import Implementation, dot_product_attention

Dtype = Any


def _mish(x: jax.Array) -> jax.Array:
  return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' ACT2CLS; its "gelu" is the exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": _mish,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name.lower()]
  except KeyError:
    raise ValueError(f"activation {name!r} is not implemented; known: {sorted(ACTIVATIONS)}") from None


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the channel (last) axis; statistics in fp32, output in `dtype`.

  Channels are grouped contiguously, as in PyTorch. The variance is the two-pass one (not
  E[x^2] - E[x]^2), which keeps fp32 parity with torch on activations with a large mean.
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, jnp.dtype(self.dtype))


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """x as fp32 (B, positions, groups, channels per group)."""
  return x.astype(jnp.float32).reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)


def _group_stats(x: jax.Array, num_groups: int, epsilon: float):
  """`_grouped(x)`, its groups' mean and 1 / std (two-pass variance)."""
  xg = _grouped(x, num_groups)
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  return xg, mean, jax.lax.rsqrt(var + epsilon)


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype):
  xg, mean, rstd = _group_stats(x, num_groups, epsilon)
  y = ((xg - mean) * rstd).reshape(x.shape)
  y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, num_groups: int, epsilon: float, dtype):
  """`GroupNorm`'s function. Its gradient is written out (the usual normalisation backward, dx = rstd * (dxhat -
  mean(dxhat) - xhat * mean(dxhat * xhat)) per group), from two sums per channel over the positions: autodiff's
  of the two-pass variance kept (x - mean) and ran more reductions. With the SiLU after it, forward + backward at
  b2 x 32 x 32 x 128: 1.22 ms against autodiff's 1.83 (docs/benchmarks.md); gradients agree to 2e-7 relative."""
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype)[0]


def _group_norm_bwd(num_groups, epsilon, dtype, res, gy):
  x, mean, rstd, scale = res
  c = x.shape[-1]
  xg, gyg = _grouped(x, num_groups), _grouped(gy, num_groups)
  xhat = (xg - mean) * rstd
  s1 = jnp.sum(gyg, axis=1)  # (B, groups, channels per group): sums over the positions
  s2 = jnp.sum(gyg * xhat, axis=1)
  sc = scale.astype(jnp.float32).reshape(s1.shape[1:])
  n = xg.shape[1] * xg.shape[3]
  mean_dxhat = (jnp.sum(s1 * sc, axis=-1) / n)[:, None, :, None]
  mean_dxhat_xhat = (jnp.sum(s2 * sc, axis=-1) / n)[:, None, :, None]
  dx = rstd * (gyg * sc - mean_dxhat - xhat * mean_dxhat_xhat)
  dscale, dbias = jnp.sum(s2, axis=0).reshape(c), jnp.sum(s1, axis=0).reshape(c)
  return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis; statistics in fp32, output in `dtype`."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None, name: str | None = None,
         dtype: Dtype, param_dtype: Dtype, zero_init: bool = False) -> nn.Conv:
  """An nn.Conv with PyTorch's symmetric explicit padding (default: 'same' for odd kernels); on the
  CPU, small convolutions and their gradients run as matmuls (`cpu_conv`). `zero_init`: kernel and bias
  start at 0 (a ControlNet's zero convolutions)."""
  p = (kernel - 1) // 2 if padding is None else padding
  init = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros) if zero_init else {}
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), name=name, dtype=dtype,
                 param_dtype=param_dtype, conv_general_dilated=cpu_conv.conv_general_dilated, **init)


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


@jax.custom_vjp
def geglu(x: jax.Array) -> jax.Array:
  """hidden * gelu(gate) (exact erf GELU) of x = [hidden, gate], the halves of the last axis.

  Its gradient is written out: the forward keeps only `x` (the projection's output, in memory anyway), and the
  backward computes [dhidden, dgate] as one array from `x` and the output gradient (XLA:CPU still runs it as a
  few loops: the erf term both halves use is written once). Autodiff's forward kept GELU's erf and exp terms,
  each its own pass over a (T, 4 x dim) array (XLA:CPU fuses no multiple outputs): the feed-forward's forward +
  backward at 2048 x 128 took 13.1 ms against autodiff's 19.4 (docs/benchmarks.md). Gradients agree with
  autodiff's to 2.5e-7 relative; the forward is the same expression.
  """
  hidden, gate = jnp.split(x, 2, axis=-1)
  return hidden * jax.nn.gelu(gate, approximate=False)


def _geglu_fwd(x):
  return geglu(x), x


def _geglu_bwd(x, g):
  hidden, gate = (a.astype(jnp.float32) for a in jnp.split(x, 2, axis=-1))
  g = g.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(gate * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * gate * gate) * (1.0 / math.sqrt(2.0 * math.pi))
  dhidden = g * gate * cdf  # = g * gelu(gate)
  dgate = g * hidden * (cdf + gate * pdf)  # GELU'(gate) = cdf + gate * pdf
  return (jnp.concatenate([dhidden, dgate], axis=-1).astype(x.dtype),)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class GEGLU(nn.Module):
  """proj to 2*dim_out, split into (hidden, gate), hidden * gelu(gate) (exact erf GELU; `geglu`)."""

  dim_out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    return geglu(x)


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
