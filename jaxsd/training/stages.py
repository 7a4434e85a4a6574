"""The three training stages as (model, init, loss) bundles the generic loop trains.

1. clip: contrastive image/text CLIP (its text tower becomes the text encoder, the whole model the judge);
2. vae: the KL autoencoder;
3. unet: latent diffusion with the VAE and the text encoder frozen (passed as `frozen`, not trained);
   for an SDXL U-Net with both text encoders and the size conditioning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import pretrained
from jaxsd import tokenizer as tok
from jaxsd.config import DTYPES
from jaxsd.diffusion import SchedulerConfig, alphas_cumprod
from jaxsd.model_folder import split_unet_params  # noqa: F401  (the U-Net stage's params layout)
from jaxsd.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jaxsd.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from jaxsd.training import losses


@dataclasses.dataclass
class Stage:
  """What `train_loop` needs from a stage, plus the modules for export and evaluation."""

  name: str
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable  # (params, batch, rng, frozen) -> (loss, aux)
  frozen: Any = None
  initial_params: Any = None  # pretrained weights to start from (fine-tuning)
  modules: dict = dataclasses.field(default_factory=dict)


def dtype_of(cfg) -> Any:
  if cfg.dtype not in DTYPES:
    raise ValueError(f"config.dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}.")
  return DTYPES[cfg.dtype]


# --- CLIP --------------------------------------------------------------------------------------


def clip_config(cfg) -> CLIPConfig:
  c = cfg.clip
  text = CLIPTextConfig(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                        projection_dim=c.projection_dim, **c.text.to_dict())
  vision = CLIPVisionConfig(num_channels=3, projection_dim=c.projection_dim, **c.vision.to_dict())
  config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim)
  config.validate()
  return config


def clip_stage(cfg) -> Stage:
  model = CLIPModel(clip_config(cfg), dtype=dtype_of(cfg))

  def loss_fn(params, batch, rng, frozen):
    out = model.apply({"params": params}, batch["input_ids"], batch["image"])
    loss = losses.clip_contrastive_loss(out.logits_per_text)
    labels = jnp.arange(out.logits_per_image.shape[0])
    acc = (jnp.argmax(out.logits_per_image, -1) == labels).mean()
    return loss, {"batch_i2t_accuracy": acc, "temperature_inv": jnp.exp(params["logit_scale"])}

  return Stage("clip", lambda rng: pretrained.init_params(model, rng), loss_fn, modules={"clip": model})


def text_encoder_from_clip(clip_model: CLIPModel, clip_params) -> tuple[CLIPTextModel, dict]:
  """The CLIP text tower as a standalone CLIPTextModel (same parameter names under `text_model`)."""
  te = CLIPTextModel(clip_model.config.text_config, dtype=clip_model.dtype)
  return te, {"text_model": clip_params["text_model"]}


# --- VAE ---------------------------------------------------------------------------------------


def vae_config(cfg) -> AutoencoderKLConfig:
  c = cfg.vae
  n = len(c.block_out_channels)
  config = AutoencoderKLConfig(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                               up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(c.block_out_channels),
                               layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
                               norm_num_groups=c.norm_num_groups, sample_size=cfg.data.image_size,
                               scaling_factor=1.0)  # the real factor is measured after training
  config.validate()
  return config


def vae_stage(cfg) -> Stage:
  """The KL autoencoder's stage. With `cfg.vae.foreground_loss_weight` w > 0 and a batch "loss_mask" (the
  dataset's mask), each pixel's reconstruction error weighs 1 + w * mask, normalised per example: the subject's
  edges and corners count for more than the background they share the image with. `cfg.vae.foreground_dilation`
  d grows the mask by d pixels first (a (2d+1)^2 max filter), so the background just outside the subject's edge
  (where a circle must stay round) weighs as much as the subject's own corners."""
  c = cfg.vae
  model = AutoencoderKL(vae_config(cfg), dtype=dtype_of(cfg))
  foreground_weight = float(c.get("foreground_loss_weight", 0.0))
  dilation = int(c.get("foreground_dilation", 0))

  def loss_fn(params, batch, rng, frozen):
    recon, post = model.apply({"params": params}, batch["image"], sample_posterior=True, key=rng)
    pixel_weight = None
    if foreground_weight and "loss_mask" in batch:
      pixel_weight = 1.0 + foreground_weight * dilate(batch["loss_mask"].astype(jnp.float32), dilation)
    return losses.vae_loss(recon, batch["image"], post.kl(), c.kl_weight, c.l1_weight, c.l2_weight, c.edge_weight,
                           pixel_weight=pixel_weight)

  return Stage("vae", lambda rng: pretrained.init_params(model, rng), loss_fn, modules={"vae": model})


def untrained_frozen_networks(cfg, rng: jax.Array) -> tuple[AutoencoderKL, Any, CLIPTextModel, Any]:
  """A randomly initialised VAE and text encoder of the configured sizes: what timing the U-Net step
  (`benchmark_steps`) needs before the clip and vae stages have run (the step's cost does not depend on
  their weights)."""
  dtype = dtype_of(cfg)
  vae = AutoencoderKL(vae_config(cfg), dtype=dtype)
  te = CLIPTextModel(clip_config(cfg).text_config, dtype=dtype)
  vae_rng, te_rng = jax.random.split(rng)
  return vae, pretrained.init_params(vae, vae_rng), te, pretrained.init_params(te, te_rng)


# --- U-Net -------------------------------------------------------------------------------------


def unet_config(cfg, vae_cfg: AutoencoderKLConfig, text_cfg: CLIPTextConfig) -> UNet2DConditionConfig:
  c = cfg.unet
  factor = vae_cfg.downsampling_factor
  config = UNet2DConditionConfig(sample_size=cfg.data.image_size // factor, in_channels=vae_cfg.latent_channels,
                                 out_channels=vae_cfg.latent_channels, down_block_types=tuple(c.down_block_types),
                                 up_block_types=tuple(c.up_block_types), block_out_channels=tuple(c.block_out_channels),
                                 layers_per_block=c.layers_per_block, attention_head_dim=c.attention_head_dim,
                                 norm_num_groups=c.norm_num_groups, cross_attention_dim=text_cfg.hidden_size,
                                 addition_embed_type=c.get("addition_embed_type") or None,
                                 addition_embed_type_num_heads=c.get("addition_embed_type_num_heads", 64),
                                 resnet_time_scale_shift=c.get("resnet_time_scale_shift", "default"))
  config.validate()
  return config


def scheduler_config(cfg) -> SchedulerConfig:
  """The noise schedule of a U-Net trained from nothing: SD's betas (or the configured `beta_schedule`, one
  diffusers names), the configured prediction type, and zero terminal SNR with "trailing" sampling spacing
  (Lin et al. 2024) when asked for."""
  zero_snr = bool(cfg.unet.get("rescale_betas_zero_snr", False))
  return SchedulerConfig(prediction_type=cfg.unet.prediction_type, rescale_betas_zero_snr=zero_snr,
                         beta_schedule=cfg.unet.get("beta_schedule",
                                                    "scaled_linear"), timestep_spacing="trailing" if zero_snr else None)


def sdxl_time_ids(original_size: jax.Array, crop_top_left: jax.Array, target_size: tuple[int, int]) -> jax.Array:
  """SDXL's micro-conditioning of a batch, (B, 6): original size (height, width), crop top-left (top, left) and
  target size (height, width), as diffusers' train_text_to_image_sdxl.py `compute_time_ids` lays them out."""
  target = jnp.broadcast_to(jnp.asarray(target_size, jnp.float32), (original_size.shape[0], 2))
  return jnp.concatenate([original_size.astype(jnp.float32), crop_top_left.astype(jnp.float32), target], axis=-1)


def sdxl_encode(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel, text_params: dict, ids: jax.Array,
                ids_2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(prompt embeddings, pooled) as diffusers' SDXL training encodes captions: both encoders' penultimate
  hidden states concatenated, and the second encoder's projected pooled output (its `text_embeds`)."""
  out = text_encoder.apply({"params": text_params["text_encoder"]}, ids)
  out_2 = text_encoder_2.apply({"params": text_params["text_encoder_2"]}, ids_2)
  return jnp.concatenate([out.hidden_states[-2], out_2.hidden_states[-2]], axis=-1), out_2.text_embeds


def diffusion_loss_options(c) -> dict:
  """`losses.diffusion_loss`'s keyword arguments from a config's `unet` section (the U-Net, LoRA and ControlNet
  stages train on the same loss, so they read the same keys)."""
  return dict(min_snr_gamma=c.min_snr_gamma or None, timestep_sampling=c.get("timestep_sampling", "uniform"),
              logit_mean=c.get("timestep_logit_mean", 0.0), logit_std=c.get("timestep_logit_std", 1.0),
              noise_offset=c.get("noise_offset", 0.0), input_perturbation=c.get("input_perturbation", 0.0),
              timestep_uniform_fraction=c.get("timestep_uniform_fraction", 0.0))


def unet_stage(cfg, *, unet: UNet2DConditionModel, vae: AutoencoderKL, vae_params, text_encoder: CLIPTextModel,
               text_params, scheduler: SchedulerConfig, tokenizer, initial_params=None, prior_loss_weight: float = 1.0,
               text_gradient: bool = False, text_encoder_2=None, text_params_2=None, tokenizer_2=None) -> Stage:
  """Latent diffusion: VAE posterior sample * scaling_factor -> noised at a random t -> U-Net.

  With `cfg.unet.train_text_encoder` the text encoder is trained with the U-Net on the diffusion loss
  (Rombach et al. 2022 trained their text transformer jointly): the params are then
  {"unet": ..., "text_encoder": ...}, starting from `text_params`; otherwise the text encoder is frozen
  and the params are the U-Net's alone. A batch with "prior" (DreamBooth's class examples, jaxsd.training.dreambooth)
  is trained on the prior-preservation loss with `prior_loss_weight`. `text_gradient` lets gradients through the
  captions' encodings with the text encoder's params in `frozen` (text-encoder LoRA merges its adapter there).

  With `text_encoder_2` (SDXL; both encoders frozen) the U-Net also sees the pooled caption and the time ids
  of each image (`sdxl_encode`, `sdxl_time_ids` from the batch's "original_size" and "crop_top_left", the
  target size being `cfg.data.image_size`); caption dropout empties both encoders' captions of a row.

  With `cfg.unet.foreground_loss_weight` w > 0 and a batch "loss_mask" (the dataset's mask, `data.mask_key`),
  each latent pixel's squared error weighs 1 + w * (the mask's mean over its pixels), normalised per example
  (`losses.diffusion_loss`'s `pixel_weight`): the idea of kohya-ss' masked loss (unmasked pixels weigh 0) and
  OneTrainer's masked training (an unmasked weight below 1), with the background still learnt.
  """
  c = cfg.unet
  foreground_weight = float(c.get("foreground_loss_weight", 0.0))
  ac = jnp.asarray(alphas_cumprod(scheduler))
  empty_ids = jnp.asarray(tok.tokenize(tokenizer, [""], max_length=text_encoder.config.max_position_embeddings))
  scale = vae.config.scaling_factor  # shift_factor (SD3 / FLUX VAEs) is not SD's: diffusers' scripts ignore it
  joint = bool(c.get("train_text_encoder", False))
  sdxl = text_encoder_2 is not None
  if sdxl:
    if joint:
      raise ValueError("SDXL fine-tuning keeps both text encoders frozen: set config.unet.train_text_encoder=False.")
    empty_ids_2 = jnp.asarray(tok.tokenize(tokenizer_2, [""], max_length=text_encoder_2.config.max_position_embeddings))
    text_params = {"text_encoder": text_params, "text_encoder_2": text_params_2}
    target_size = (cfg.data.image_size, cfg.data.image_size)

  def condition(text, batch, k_drop) -> dict:
    """The U-Net's conditioning of a batch: {"context"} (SD), with "text_embeds" and "time_ids" (SDXL)."""
    if "moments" in batch:  # a batch of the latent cache (latent_cache.py): the same draws as below
      if not sdxl:
        empty = text_encoder.apply({"params": text}, empty_ids).last_hidden_state
        return {"context": losses.drop_captions(k_drop, batch["context"], empty, c.caption_dropout)}
      empty, empty_pooled = sdxl_encode(text_encoder, text_encoder_2, text, empty_ids, empty_ids_2)
      return {
          "context": losses.drop_captions(k_drop, batch["context"], empty, c.caption_dropout),
          "text_embeds": losses.drop_captions(k_drop, batch["text_embeds"], empty_pooled, c.caption_dropout),
          "time_ids": batch["time_ids"]
      }
    ids = losses.drop_captions(k_drop, batch["input_ids"], empty_ids, c.caption_dropout)
    if not sdxl:
      return {"context": text_encoder.apply({"params": text}, ids).last_hidden_state}
    ids_2 = losses.drop_captions(k_drop, batch["input_ids_2"], empty_ids_2, c.caption_dropout)
    context, pooled = sdxl_encode(text_encoder, text_encoder_2, text, ids, ids_2)
    return {
        "context": context,
        "text_embeds": pooled,
        "time_ids": sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target_size)
    }

  def loss_fn(params, batch, rng, frozen):
    k_post, k_drop, k_noise = jax.random.split(rng, 3)
    unet_params, text = (params["unet"], params["text_encoder"]) if joint else (params, frozen["text"])
    if "moments" in batch:
      post = DiagonalGaussianDistribution.from_moments(batch["moments"])
    else:
      post = vae.apply({"params": frozen["vae"]}, batch["image"], method=vae.encode)
    cond = condition(text, batch, k_drop)
    latents = jax.lax.stop_gradient(post.sample(k_post).astype(jnp.float32) * scale)
    if not (joint or text_gradient):
      cond = jax.lax.stop_gradient(cond)

    def unet_fn(x, t, cond):
      extra = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
      return unet.apply({"params": unet_params}, x.astype(unet.dtype), t, cond["context"], **extra)

    pixel_weight = None
    if foreground_weight and "loss_mask" in batch:
      pixel_weight = 1.0 + foreground_weight * latent_mask(batch["loss_mask"], latents.shape[1:3])
    return losses.diffusion_loss(unet_fn, ac, latents, cond, k_noise, prediction_type=scheduler.prediction_type,
                                 prior_mask=batch.get("prior"), prior_loss_weight=prior_loss_weight,
                                 pixel_weight=pixel_weight, **diffusion_loss_options(c))

  if joint:
    init = lambda rng: {"unet": pretrained.init_params(unet, rng), "text_encoder": text_params}  # noqa: E731
    frozen = {"vae": vae_params}
    if initial_params is not None:
      initial_params = {"unet": initial_params, "text_encoder": text_params}
  else:
    init = lambda rng: pretrained.init_params(unet, rng)  # noqa: E731
    frozen = {"vae": vae_params, "text": text_params}
  modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
  if sdxl:
    modules["text_encoder_2"] = text_encoder_2
  return Stage("unet", init, loss_fn, frozen=frozen, initial_params=initial_params, modules=modules)


def dilate(mask: jax.Array, pixels: int) -> jax.Array:
  """A mask (B, H, W, 1) grown by `pixels`: the maximum over each (2 * pixels + 1)^2 window (0: as is)."""
  if pixels <= 0:
    return mask
  k = 2 * pixels + 1
  return jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1), "SAME")


def latent_mask(mask: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
  """A pixel mask (B, H, W, 1) in [0, 1] as the latents' grid sees it: the mean over each latent pixel's
  patch of pixels (H / h x W / w; a mask already at the latents' size is returned as is)."""
  b, height, width, _ = mask.shape
  h, w = latent_hw
  if (height, width) == (h, w):
    return mask.astype(jnp.float32)
  if height % h or width % w:
    raise ValueError(f"a {height}x{width} mask does not pool onto {h}x{w} latents")
  m = mask.astype(jnp.float32).reshape(b, h, height // h, w, width // w, 1)
  return m.mean(axis=(2, 4))


def cache_encoder(vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel | None = None,
                  target_size: tuple[int, int] | None = None) -> Callable:
  """`(vae_params, text_params, batch) -> {field: array}`: what the latent cache stores of a batch
  {"image", "input_ids"}: the posterior's "moments" as `encode` gives them and the text encoder's last hidden
  states ("context"). With `text_encoder_2` (SDXL; `text_params` then {"text_encoder", "text_encoder_2"} and
  the batch with "input_ids_2", "original_size", "crop_top_left"): `sdxl_encode`'s context and pooled
  "text_embeds", and the "time_ids" for `target_size`, as the uncached SDXL stage computes them."""

  def encode(vae_params, text_params, batch):
    post = vae.apply({"params": vae_params}, batch["image"], method=vae.encode)
    out = {"moments": jnp.concatenate([post.mean, post.logvar], axis=-1).astype(jnp.float32)}
    if "loss_mask" in batch:  # stored on the latents' grid
      out["loss_mask"] = latent_mask(batch["loss_mask"], post.mean.shape[1:3])
    if text_encoder_2 is None:
      out["context"] = text_encoder.apply({"params": text_params}, batch["input_ids"]).last_hidden_state
    else:
      out["context"], out["text_embeds"] = sdxl_encode(text_encoder, text_encoder_2, text_params, batch["input_ids"],
                                                       batch["input_ids_2"])
      out["time_ids"] = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target_size)
    return {k: v.astype(jnp.float32) for k, v in out.items()}

  return encode


def measure_scaling_factor(vae: AutoencoderKL, vae_params, images: np.ndarray, key: jax.Array) -> float:
  """1 / std of posterior samples over a sample of training images (how SD's 0.18215 was chosen)."""
  post = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(vae_params, jnp.asarray(images))
  z = post.sample(key)
  return float(1.0 / jnp.std(z.astype(jnp.float32)))
