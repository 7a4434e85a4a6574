"""ControlNet training (Zhang et al. 2023), as diffusers' train_controlnet.py: a ControlNet initialised from the
U-Net's encoder (`ControlNetModel.from_unet`: conv_in, time_embedding, down_blocks and mid_block copied, a fresh
conditioning embedding, zero convolutions at 0) learns the diffusion loss of the frozen U-Net fed its residuals;
VAE, text encoder and U-Net travel in `frozen` (neither differentiated nor in the optimizer state).

The conditioning image comes from the training image itself (`CONDITIONS`): "shape_mask", for the shapes
dataset, is the shape's silhouette, white on black: the pixels far from grey, since the backgrounds are
grey-ish (chroma at most 36 of 255) and every shape colour is saturated (chroma at least 120).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsd import pretrained
from jaxsd import tokenizer as tok
from jaxsd.diffusion import SchedulerConfig, alphas_cumprod
from jaxsd.models.controlnet import ControlNetConfig, ControlNetModel
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.training import losses
from jaxsd.training.stages import Stage, diffusion_loss_options

CONDITIONS = ("shape_mask",)
ENCODER = ("conv_in", "time_embedding", "add_embedding", "down_blocks_", "mid_block")  # what from_unet copies
EMBEDDING_WIDTHS = (16, 32, 96, 256)  # diffusers' default conditioning_embedding_out_channels
_CHROMA = 80 / 255  # between the backgrounds' 36 and the shape colours' 120, on the [0, 1] scale


def check_settings(c) -> None:
  """ValueError for values of the config section `controlnet` that cannot work (before any model is loaded)."""
  if c.conditioning not in CONDITIONS:
    raise ValueError(f"conditioning={c.conditioning!r}: choose one of {', '.join(CONDITIONS)} (derived from "
                     "each training image).")


def shape_mask(images: jax.Array) -> jax.Array:
  """Images in [-1, 1] (B, H, W, 3) -> the shapes' silhouettes, RGB in [0, 1] (white shape, black ground)."""
  x = (images.astype(jnp.float32) + 1) / 2
  mask = (jnp.max(x, axis=-1, keepdims=True) - jnp.min(x, axis=-1, keepdims=True)) > _CHROMA
  return jnp.broadcast_to(mask, x.shape).astype(jnp.float32)


def embedding_widths(vae_factor: int, widths=()) -> tuple[int, ...]:
  """The conditioning embedding's widths: as given, or diffusers' (16, 32, 96, 256) cut to the VAE's factor
  (one stride-2 convolution per halving)."""
  levels = vae_factor.bit_length()  # factor 2**(levels - 1)
  if widths:
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
      raise ValueError(f"conditioning_embedding_out_channels={tuple(widths)}: the widths must be whole numbers >= 1.")
    if len(widths) != levels:  # else the condition (image-sized) and the latents disagree in the first step
      raise ValueError(f"conditioning_embedding_out_channels={tuple(widths)} downsamples the condition by "
                       f"{2**(len(widths) - 1)}, but the VAE downsamples by {vae_factor}: give {levels} widths "
                       "(one stride-2 convolution per halving), or () for diffusers' default.")
    return tuple(widths)
  if levels > len(EMBEDDING_WIDTHS):
    raise ValueError(f"a VAE that downsamples by {vae_factor} needs conditioning_embedding_out_channels with "
                     f"{levels} widths; set them.")
  return EMBEDDING_WIDTHS[:levels]


def controlnet_from_unet(unet: UNet2DConditionModel, unet_params: Any, widths: tuple[int, ...],
                         rng: jax.Array) -> tuple[ControlNetModel, Any]:
  """diffusers' `ControlNetModel.from_unet(unet)`: the U-Net's config and encoder weights, a fresh
  conditioning embedding and zero convolutions at 0."""
  cfg = ControlNetConfig.from_unet(unet.config, conditioning_embedding_out_channels=widths)
  model = ControlNetModel(cfg, dtype=unet.dtype, param_dtype=unet.param_dtype,
                          gradient_checkpointing=unet.gradient_checkpointing)
  params = traverse_util.flatten_dict(pretrained.init_params(model, rng))
  source = traverse_util.flatten_dict(unet_params)
  for path in params:
    if path[0].startswith(ENCODER):
      params[path] = jnp.asarray(source[path], params[path].dtype)
  return model, traverse_util.unflatten_dict(params)


def controlnet_stage(cfg, *, controlnet: ControlNetModel, controlnet_params, unet: UNet2DConditionModel, unet_params,
                     vae, vae_params, text_encoder, text_params, scheduler: SchedulerConfig, tokenizer) -> Stage:
  """The ControlNet learns the frozen U-Net's diffusion loss on (image, caption, condition of the image)."""
  c = cfg.unet
  ac = jnp.asarray(alphas_cumprod(scheduler))
  empty_ids = jnp.asarray(tok.tokenize(tokenizer, [""], max_length=text_encoder.config.max_position_embeddings))
  scale = vae.config.scaling_factor  # shift_factor (SD3 / FLUX VAEs) is not SD's: diffusers' scripts ignore it
  condition = {"shape_mask": shape_mask}[cfg.controlnet.conditioning]

  def loss_fn(params, batch, rng, frozen):
    k_post, k_drop, k_noise = jax.random.split(rng, 3)
    post = vae.apply({"params": frozen["vae"]}, batch["image"], method=vae.encode)
    latents = jax.lax.stop_gradient(post.sample(k_post).astype(jnp.float32) * scale)
    ids = losses.drop_captions(k_drop, batch["input_ids"], empty_ids, c.caption_dropout)
    context = jax.lax.stop_gradient(text_encoder.apply({"params": frozen["text"]}, ids).last_hidden_state)
    cond = condition(batch["image"])

    def unet_fn(x, t, ctx):
      x = x.astype(unet.dtype)
      down, mid = controlnet.apply({"params": params}, x, t, ctx, cond)
      return unet.apply({"params": frozen["unet"]}, x, t, ctx, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)

    return losses.diffusion_loss(unet_fn, ac, latents, context, k_noise, prediction_type=scheduler.prediction_type,
                                 **diffusion_loss_options(c))

  return Stage("controlnet", lambda rng: pretrained.init_params(controlnet, rng), loss_fn, frozen={
      "vae": vae_params,
      "text": text_params,
      "unet": unet_params
  }, initial_params=controlnet_params, modules={
      "controlnet": controlnet,
      "unet": unet,
      "vae": vae,
      "text_encoder": text_encoder
  })
