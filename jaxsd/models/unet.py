"""The Stable Diffusion U-Net (diffusers `UNet2DConditionModel`) in flax.linen, NHWC.

Covers SD 1.x / 2.x and their inpainting variants and SDXL (base and refiner): CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn (or UNetMidBlock2D, or none), UpBlock2D, CrossAttnUpBlock2D, with
transformer depths per block or per layer; the addition embeddings "text" and SDXL's "text_time" (pooled
text embedding + Fourier-embedded size/crop/aesthetic "time ids", passed as `text_embeds=` and `time_ids=`,
diffusers' `added_cond_kwargs`); LCM-distilled U-Nets' guidance embedding (`time_cond_proj_dim`, passed as
`timestep_cond=`); an IP-Adapter's image prompt (`image_embeds=`, diffusers' `added_cond_kwargs["image_embeds"]`
with its `encoder_hid_proj`, and `to_k_ip_0` / `to_v_ip_0` in every cross-attention). Features that need other
inputs or weights (class embeddings, GLIGEN, ...) are refused by `UNet2DConditionConfig.validate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.attention import Implementation
from jaxsd.config import ConfigBase
from jaxsd.models.activations import ACTIVATIONS, get_activation
from jaxsd.models.embeddings import TextTimeEmbedding, Timesteps, TimestepEmbedding
from jaxsd.models.freeu import stage_factors
from jaxsd.models.image_projection import IPAdapterImageProjections, ProjectionConfig
from jaxsd.models.normalization import GroupNorm
from jaxsd.models.resnet import conv
from jaxsd.models.transformer import ImagePrompt, PerturbedSelfAttention
from jaxsd.models.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2D,
                                      UNetMidBlock2DCrossAttn, UpBlock2D)

Dtype = Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
ADDITION_EMBEDS = ("text", "text_time")


def _per_block(value, n: int) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(ConfigBase):
  """diffusers' UNet2DConditionModel config.json: same field names, same defaults."""

  sample_size: int | tuple[int, int] | None = None
  in_channels: int = 4  # 9 for inpainting: latents + mask + masked-image latents
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  reverse_transformer_layers_per_block: Any = None
  encoder_hid_dim: int | None = None
  encoder_hid_dim_type: str | None = None
  # Historically misnamed: SD configs put the number of heads here (see `heads`).
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False  # SD 2.x: Dense proj_in/proj_out instead of 1x1 convs
  class_embed_type: str | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  num_class_embeds: int | None = None
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  resnet_skip_time_act: bool = False  # only read by block types we do not implement
  resnet_out_scale_factor: float = 1.0  # ditto
  time_embedding_type: str = "positional"
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  time_cond_proj_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  projection_class_embeddings_input_dim: int | None = None
  attention_type: str = "default"
  class_embeddings_concat: bool = False
  mid_block_only_cross_attention: bool | None = None  # only read by UNetMidBlock2DSimpleCrossAttn
  cross_attention_norm: str | None = None  # only read by the Simple* cross-attention blocks
  addition_embed_type_num_heads: int = 64

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def downsampling_factor(self) -> int:
    """Input pixels per pixel of the lowest resolution: sides must be multiples of it."""
    return 2**(self.num_blocks - 1)

  @property
  def heads(self) -> tuple[int, ...]:
    """Attention heads per down block: diffusers' `num_attention_heads or attention_head_dim`."""
    return _per_block(self.num_attention_heads or self.attention_head_dim, self.num_blocks)

  @property
  def context_dim(self) -> int:
    """The width of the encoder hidden states (text embeddings) the cross-attentions take: cross_attention_dim,
    given per block or once (per-block values must agree: one context feeds every block)."""
    dims = _per_block(self.cross_attention_dim, self.num_blocks)
    return dims[0]

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def transformer_layers(self) -> tuple[tuple, tuple]:
    """(down, up) transformer depths per block, each an int or one int per layer, as diffusers reads
    transformer_layers_per_block and reverse_transformer_layers_per_block (the mid block takes down[-1])."""
    down = _per_block(self.transformer_layers_per_block, self.num_blocks)
    up = self.reverse_transformer_layers_per_block
    return down, (tuple(reversed(down)) if up is None else _per_block(up, self.num_blocks))

  def _validate_transformer_layers(self) -> None:
    n = self.num_blocks
    down, up = self.transformer_layers()
    nested = any(isinstance(v, (tuple, list)) for v in down)
    if nested and self.reverse_transformer_layers_per_block is None:
      raise ValueError("UNet2DConditionConfig: per-layer transformer_layers_per_block (nested lists) needs "
                       "reverse_transformer_layers_per_block for the up blocks (as diffusers).")
    if self.reverse_transformer_layers_per_block is not None and not nested:
      raise ValueError("UNet2DConditionConfig: reverse_transformer_layers_per_block is only read with per-layer "
                       "(nested) transformer_layers_per_block; remove it or nest the other.")
    layers = _per_block(self.layers_per_block, n)
    for name, values, extra in (("transformer_layers_per_block", down, 0), ("reverse_transformer_layers_per_block", up,
                                                                            1)):
      if len(values) != n:
        raise ValueError(f"UNet2DConditionConfig: {name} has {len(values)} entries for {n} blocks.")
      for i, v in enumerate(values):
        want = layers[i if extra == 0 else n - 1 - i] + extra
        if isinstance(v, (tuple, list)) and len(v) < want:
          raise ValueError(f"UNet2DConditionConfig: {name}[{i}] has {len(v)} depths for {want} layers.")

  def validate(self) -> None:
    self.check_sizes("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                     "norm_num_groups", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
                     "addition_time_embed_dim", "projection_class_embeddings_input_dim", "time_embedding_dim",
                     "conv_in_kernel", "conv_out_kernel", "addition_embed_type_num_heads", "time_cond_proj_dim")
    n = self.num_blocks
    unsupported = {
        "class_embed_type": self.class_embed_type,
        "num_class_embeds": self.num_class_embeds,
        "addition_embed_type": None if self.addition_embed_type in ADDITION_EMBEDS else self.addition_embed_type,
        "encoder_hid_dim": self.encoder_hid_dim,
        "encoder_hid_dim_type": self.encoder_hid_dim_type,
    }
    for name, value in unsupported.items():
      if value is not None:
        raise ValueError(f"UNet2DConditionConfig: {name}={value!r} is not implemented; only SD 1.x / 2.x and SDXL "
                         "U-Nets are (no class embeddings as in unCLIP, ...; of the addition "
                         f"embeddings only {ADDITION_EMBEDS}).")
    if self.addition_embed_type == "text_time":
      for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if not isinstance(getattr(self, name), int):
          raise ValueError(f"UNet2DConditionConfig: addition_embed_type='text_time' needs {name} (an integer), "
                           f"got {getattr(self, name)!r}.")
    if len(set(_per_block(self.cross_attention_dim, self.num_blocks))) > 1:
      raise ValueError(f"UNet2DConditionConfig: cross_attention_dim={list(self.cross_attention_dim)} differs between "
                       "blocks; one text-embedding width feeds every block, so give one value.")
    if self.addition_embed_type == "text" and not isinstance(self.cross_attention_dim, int):
      raise ValueError("UNet2DConditionConfig: addition_embed_type='text' needs one cross_attention_dim.")
    if self.addition_embed_type == "text" and self.cross_attention_dim % self.addition_embed_type_num_heads:
      raise ValueError(f"UNet2DConditionConfig: cross_attention_dim={self.cross_attention_dim} is not divisible "
                       f"by addition_embed_type_num_heads={self.addition_embed_type_num_heads}.")
    if self.resnet_time_scale_shift not in ("default", "scale_shift"):
      raise ValueError(f"UNet2DConditionConfig: resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not "
                       "implemented; use 'default' or 'scale_shift'.")
    fixed = {
        "time_embedding_type": (self.time_embedding_type, "positional"),
        "attention_type": (self.attention_type, "default"),
        "dual_cross_attention": (self.dual_cross_attention, False),
        "dropout": (self.dropout, 0.0)
    }
    for name, (value, want) in fixed.items():
      if value != want:
        raise ValueError(f"UNet2DConditionConfig: {name}={value!r} is not implemented (only {want!r}).")
    if self.norm_num_groups is None:
      raise ValueError("UNet2DConditionConfig: norm_num_groups=None is not implemented.")
    for name in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
      value = getattr(self, name)
      if value is not None and value.lower() not in ACTIVATIONS:
        raise ValueError(f"UNet2DConditionConfig: {name}={value!r} unknown; known: {sorted(ACTIVATIONS)}.")
    for i, t in enumerate(self.down_block_types):
      if t not in DOWN_BLOCKS:
        raise ValueError(f"UNet2DConditionConfig: down_block_types[{i}]={t!r} not implemented; use {DOWN_BLOCKS}.")
    for i, t in enumerate(self.up_block_types):
      if t not in UP_BLOCKS:
        raise ValueError(f"UNet2DConditionConfig: up_block_types[{i}]={t!r} not implemented; use {UP_BLOCKS}.")
    if self.mid_block_type not in MID_BLOCKS:
      raise ValueError(f"UNet2DConditionConfig: mid_block_type={self.mid_block_type!r} not implemented; "
                       f"use one of {MID_BLOCKS}.")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNet2DConditionConfig: {len(self.down_block_types)} down and {len(self.up_block_types)} "
                       f"up block types for {n} block_out_channels; all three must have the same length.")
    per_block = ("only_cross_attention", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                 "num_attention_heads")
    for name in per_block:
      value = getattr(self, name)
      if isinstance(value, (tuple, list)) and len(value) != n:
        raise ValueError(f"UNet2DConditionConfig: {name} has {len(value)} entries for {n} blocks.")
    self._validate_transformer_layers()
    for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
      if c % self.norm_num_groups:
        raise ValueError(f"UNet2DConditionConfig: block_out_channels[{i}]={c} is not divisible by "
                         f"norm_num_groups={self.norm_num_groups}.")
      has_attention = ("CrossAttn" in self.down_block_types[i] or "CrossAttn" in self.up_block_types[n - 1 - i] or
                       (i == n - 1 and self.mid_block_type == "UNetMidBlock2DCrossAttn"))
      if has_attention and c % h:
        raise ValueError(f"UNet2DConditionConfig: block_out_channels[{i}]={c} is not divisible by {h} heads.")


class UNet2DConditionModel(nn.Module):
  """`__call__(sample, timesteps, encoder_hidden_states) -> noise prediction`, all NHWC / (B, L, D).

  SDXL U-Nets (addition_embed_type="text_time") also take `text_embeds` (B, D), the pooled projected
  prompt, and `time_ids` (B, k): original size, crop top-left and target size (base) or aesthetic score
  (refiner), each Fourier-embedded with addition_time_embed_dim channels.

  Attributes:
    config: the diffusers config.
    dtype: computation dtype (the output is in it too); parameters are kept in `param_dtype`.
    attention_implementation: "auto" (Pallas on a TPU, cuDNN where it applies), "xla", "cudnn" or "pallas".
    gradient_checkpointing: rematerialise each down / mid / up block in the backward pass.
  """

  config: UNet2DConditionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Implementation = "auto"
  gradient_checkpointing: bool = False

  def _block(self, cls):
    return nn.remat(cls) if self.gradient_checkpointing else cls

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float, encoder_hidden_states: jax.Array,
               text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
               down_block_additional_residuals: tuple[jax.Array, ...] | None = None,
               mid_block_additional_residual: jax.Array | None = None, timestep_cond: jax.Array | None = None,
               image_embeds: jax.Array | None = None, ip_adapter_scale: jax.Array | float = 1.0,
               image_projection: ProjectionConfig = None, freeu: jax.Array | None = None,
               pag_layers: frozenset[str] | tuple[str, ...] = (), pag_rows: int = 0,
               down_intrablock_additional_residuals: tuple[jax.Array, ...] | None = None,
               ip_adapter_masks: jax.Array | tuple | None = None) -> jax.Array:
    """`timestep_cond` (B, time_cond_proj_dim): the guidance-scale embedding of an LCM-distilled U-Net
    (`embeddings.guidance_scale_embedding(guidance_scale - 1, time_cond_proj_dim)`), added to the timestep
    features through `time_embedding.cond_proj`; U-Nets without time_cond_proj_dim refuse it.
    `down_block_additional_residuals` (one per skip connection, conv_in's first) and
    `mid_block_additional_residual` are a ControlNet's outputs, added to the skips and to the mid block's
    output as diffusers does; give both or neither. `image_embeds` (B, D) or (B, n, D): an IP-Adapter's pooled
    CLIP image embeddings, projected to tokens by `encoder_hid_proj` (`image_projection.IPAdapterImageProjections`)
    that every cross-attention also attends to, weighted by `ip_adapter_scale` (one number, or a dict of one per
    attention: `jaxsd.block_scales`); the parameters of both exist only
    when it is given (without it the U-Net is the plain one). `image_projection` (`image_projection.projection_config` of its
    parameters) names the other projections: IP-Adapter Plus (a Resampler) and Full Face take the image encoder's
    penultimate hidden states, (B, L, D) or (B, n, L, D), FaceID face embeddings (B, [n,] 512); several adapters: tuples of `image_embeds`,
    `image_projection` and `ip_adapter_scale`, one entry each. `ip_adapter_masks`: None, or region masks (n, H, W),
    one per image of the adapter (diffusers' `ip_adapter_masks`; `transformer.ImagePrompt.masks`), a tuple of one such or
    None per adapter with several. `freeu` (4,): FreeU's factors (s1, s2, b1, b2),
    applied in
    the first two up blocks as diffusers' `enable_freeu` (`jaxsd.models.freeu`; every value acts, where diffusers'
    blocks skip FreeU when a factor is 0); None: the plain U-Net. `pag_layers` (static): the self-attentions that
    Perturbed-Attention Guidance perturbs, as parameter paths ("mid_block/attentions_0/transformer_blocks_0/attn1");
    in them the last `pag_rows` rows of the batch get the identity attention (`transformer.PerturbedSelfAttention`).
    `down_intrablock_additional_residuals`: a T2I-Adapter's feature maps (`jaxsd.models.t2i_adapter`), taken in
    order where diffusers adds them: inside each CrossAttnDownBlock2D after its last ResNet / attention pair, after
    each DownBlock2D (its last skip too), and the next one to the mid block's output when its shape is that
    output's (SDXL adapters); None: the plain U-Net."""
    cfg = self.config
    n = cfg.num_blocks
    kw, common, attn, heads, layers, only_cross = _block_settings(self, cfg)
    _, up_tlayers = cfg.transformer_layers()
    if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
      raise ValueError("ControlNet residuals: pass both down_block_additional_residuals and "
                       "mid_block_additional_residual, or neither.")

    x = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    emb = embed_time(self, cfg, timesteps, x.shape[0], context, text_embeds, time_ids, timestep_cond)
    if image_embeds is not None:  # (after embed_time: the "text" addition embedding pools the text alone)
      rows = [e.shape[0] for e in (image_embeds if isinstance(image_embeds, (tuple, list)) else (image_embeds,))]
      if any(r != x.shape[0] for r in rows):
        raise ValueError(f"image_embeds has batch {rows[0] if len(rows) == 1 else rows}, the sample {x.shape[0]}: give "
                         "one row of image embeddings per sample.")
      tokens = IPAdapterImageProjections(cfg.context_dim, image_projection, name="encoder_hid_proj", **kw)(image_embeds)
      context = ImagePrompt(context, tokens, jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), ip_adapter_scale),
                            ip_adapter_masks)
    if pag_layers:
      if not 0 < pag_rows < x.shape[0]:
        raise ValueError(f"pag_rows={pag_rows}: the perturbed rows must be some of the batch's {x.shape[0]}.")
      context = PerturbedSelfAttention(context, frozenset(pag_layers), pag_rows)
    x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(x)
    x, skips = encode(self, cfg, x, emb, context, down_intrablock_additional_residuals)

    if down_block_additional_residuals is not None:
      if len(down_block_additional_residuals) != len(skips):
        raise ValueError(f"{len(down_block_additional_residuals)} down_block_additional_residuals for the U-Net's "
                         f"{len(skips)} skip connections: the ControlNet does not match this U-Net.")
      skips = tuple(s + r.astype(self.dtype) for s, r in zip(skips, down_block_additional_residuals))
      x = x + mid_block_additional_residual.astype(self.dtype)

    # Inputs whose size is not a multiple of 2**(n-1) need each upsampler to hit its skip's size.
    up_factor = 2**(n - 1)
    forward_size = any(d % up_factor for d in sample.shape[1:3])
    for i, block_type in enumerate(cfg.up_block_types):
      r = n - 1 - i  # the matching down block
      final = i == n - 1
      num = layers[r] + 1
      states, skips = skips[-num:], skips[:-num]
      size = tuple(skips[-1].shape[1:3]) if (forward_size and not final) else None
      out = cfg.block_out_channels[r]
      if block_type == "CrossAttnUpBlock2D":
        block = self._block(CrossAttnUpBlock2D)(out, num, heads[r], up_tlayers[i], add_upsample=not final,
                                                upsample_size=size, only_cross_attention=only_cross[r],
                                                name=f"up_blocks_{i}", **attn, **common)
      else:
        block = self._block(UpBlock2D)(out, num, add_upsample=not final, upsample_size=size, name=f"up_blocks_{i}",
                                       **common)
      stage = stage_factors(freeu, i)
      x = block(x, states, emb, context) if stage is None else block(x, states, emb, context, stage)

    x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
    x = get_activation(cfg.act_fn)(x)
    return conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)


# --- the encoder half, shared with the ControlNet (jaxsd.models.controlnet) ----------------------
# Called from a module's compact __call__: the submodules they create are that module's
# (time_embedding, add_embedding, down_blocks_i, mid_block), named as diffusers' state dicts.


def _block_settings(module: nn.Module, cfg: UNet2DConditionConfig):
  """What the down, mid and up blocks are built with: (dtype kwargs, ResNet kwargs, attention kwargs, heads,
  layers and only-cross-attention per block)."""
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
                resnet_time_scale_shift=cfg.resnet_time_scale_shift, **kw)
  attn = dict(use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
              attention_implementation=module.attention_implementation)
  n = cfg.num_blocks
  return kw, common, attn, cfg.heads, _per_block(cfg.layers_per_block, n), _per_block(cfg.only_cross_attention, n)


def embed_time(module: nn.Module, cfg: UNet2DConditionConfig, timesteps, batch: int, context: jax.Array,
               text_embeds: jax.Array | None, time_ids: jax.Array | None,
               timestep_cond: jax.Array | None = None) -> jax.Array:
  """The embedding every ResNet block adds: fp32 sinusoids of the timesteps (of any dtype), the MLP in the
  module's dtype (with the projected `timestep_cond` of LCM-distilled U-Nets), plus the addition embedding
  ("text": the pooled prompt; "text_time": SDXL's)."""
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
  t_emb = Timesteps(cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)(t).astype(module.dtype)
  cond_dim = getattr(cfg, "time_cond_proj_dim", None)  # (ControlNet configs have none)
  if timestep_cond is not None:
    timestep_cond = jnp.broadcast_to(timestep_cond, (batch,) + timestep_cond.shape[1:])
  emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, cfg.timestep_post_act, cond_dim, name="time_embedding",
                          **kw)(t_emb, timestep_cond)
  if cfg.addition_embed_type == "text":  # the pooled prompt, added to the time embedding of every block
    emb = emb + TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads, name="add_embedding", **
                                  kw)(context)
  elif cfg.addition_embed_type == "text_time":
    emb = emb + _text_time_embedding(module, cfg, text_embeds, time_ids, batch)
  if cfg.addition_embed_type != "text_time" and (text_embeds is not None or time_ids is not None):
    raise ValueError(f"text_embeds / time_ids are inputs of SDXL U-Nets (addition_embed_type='text_time'); this "
                     f"one has addition_embed_type={cfg.addition_embed_type!r}: drop them.")
  if cfg.time_embedding_act_fn is not None:
    emb = get_activation(cfg.time_embedding_act_fn)(emb)
  return emb


def encode(module: nn.Module, cfg: UNet2DConditionConfig, x: jax.Array, emb: jax.Array, context: jax.Array,
           intrablock: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Down blocks and mid block from conv_in's output: (mid block output, skips: conv_in's output first).
  `intrablock`: a T2I-Adapter's features, consumed in order as diffusers' `down_intrablock_additional_residuals`."""
  n = cfg.num_blocks
  kw, common, attn, heads, layers, only_cross = _block_settings(module, cfg)
  tlayers, _ = cfg.transformer_layers()
  wrap = nn.remat if module.gradient_checkpointing else (lambda cls: cls)
  residuals = list(intrablock or ())

  skips = (x,)
  for i, block_type in enumerate(cfg.down_block_types):
    final = i == n - 1
    out = cfg.block_out_channels[i]
    if block_type == "CrossAttnDownBlock2D":
      block = wrap(CrossAttnDownBlock2D)(out, layers[i], heads[i], tlayers[i], add_downsample=not final,
                                         downsample_padding=cfg.downsample_padding, only_cross_attention=only_cross[i],
                                         name=f"down_blocks_{i}", **attn, **common)
      x, states = block(x, emb, context, *([residuals.pop(0)] if residuals else []))
    else:
      block = wrap(DownBlock2D)(out, layers[i], add_downsample=not final, downsample_padding=cfg.downsample_padding,
                                name=f"down_blocks_{i}", **common)
      x, states = block(x, emb, context)
      if residuals:  # diffusers adds in place (`sample += ...`): the block's last skip, the same tensor, gets it too
        x = x + residuals.pop(0).astype(x.dtype)
        states = states[:-1] + (x,)
    skips += states

  if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
    x = wrap(UNetMidBlock2DCrossAttn)(heads[-1], tlayers[-1], output_scale_factor=cfg.mid_block_scale_factor,
                                      name="mid_block", **attn, **common)(x, emb, context)
  elif cfg.mid_block_type == "UNetMidBlock2D":
    x = wrap(UNetMidBlock2D)(num_layers=0, resnet_groups=cfg.norm_num_groups, resnet_eps=cfg.norm_eps,
                             act_fn=cfg.act_fn, output_scale_factor=cfg.mid_block_scale_factor, add_attention=False,
                             resnet_time_scale_shift=cfg.resnet_time_scale_shift, name="mid_block", **kw)(x, emb)
  if cfg.mid_block_type is not None and residuals and residuals[0].shape == x.shape:  # SDXL adapters' last map
    x = x + residuals.pop(0).astype(x.dtype)
  return x, skips


def _text_time_embedding(module: nn.Module, cfg: UNet2DConditionConfig, text_embeds, time_ids, batch: int) -> jax.Array:
  """SDXL's added embedding: [text_embeds, Fourier features of each time id] -> add_embedding (MLP)."""
  if text_embeds is None or time_ids is None:
    raise ValueError("this U-Net has addition_embed_type='text_time' (SDXL): pass text_embeds= (the pooled, "
                     "projected prompt) and time_ids= (sizes and crop, or the aesthetic score).")
  text_embeds = jnp.broadcast_to(text_embeds, (batch,) + text_embeds.shape[1:])
  time_ids = jnp.broadcast_to(time_ids, (batch,) + time_ids.shape[1:])
  want = cfg.projection_class_embeddings_input_dim
  got = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
  if got != want:
    raise ValueError(f"text_embeds ({text_embeds.shape[-1]}) and {time_ids.shape[-1]} time ids x "
                     f"addition_time_embed_dim ({cfg.addition_time_embed_dim}) give {got} features; the U-Net's "
                     f"projection_class_embeddings_input_dim is {want}: check the text encoder's projection_dim "
                     "and the time ids (6 for a base model, 5 with an aesthetic score for a refiner).")
  time_embeds = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)(time_ids.reshape(-1))
  add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(batch, -1)], axis=-1)
  return TimestepEmbedding(cfg.time_embed_dim, "silu", name="add_embedding", dtype=module.dtype,
                           param_dtype=module.param_dtype)(add.astype(module.dtype))
