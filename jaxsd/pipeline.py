"""Text-to-image, image-to-image and inpainting: prompt -> CLIP -> compiled denoising loop -> VAE decode.

The whole generation (text encoding, every denoising step under classifier-free guidance, decoding)
is one jitted program per shape; the loop runs inside `lax.fori_loop` / `lax.scan` on the device.
Schedule arithmetic and latents stay fp32 whatever the networks compute in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import (freeu, hub, ip_adapter, model_folder, pag, pipeline_adapters, pipeline_folders, pipeline_image_tasks,
                   prompt_syntax, vae_tiling)
from jaxsd import tokenizer as tok
from jaxsd.config import finite32
from jaxsd.diffusion import samplers, schedules
from jaxsd.models.embeddings import guidance_scale_embedding

OUTPUTS = ("np", "pil", "latent")
TASKS = pipeline_image_tasks.TASKS
# model_index.json classes for which diffusers' AutoPipelineForImage2Image builds LatentConsistencyModelImg2ImgPipeline.
LCM_PIPELINES = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
# The sampler that follows each diffusers scheduler class: the default sampler of a folder.
SAMPLER_OF = samplers.SAMPLER_OF
log = logging.getLogger(__name__)


@dataclasses.dataclass
class StableDiffusion(pipeline_image_tasks.ImageTasksMixin, pipeline_folders.FoldersMixin,
                      pipeline_adapters.AdaptersMixin, ip_adapter.IPAdapterMixin, freeu.FreeUMixin, pag.PAGMixin,
                      vae_tiling.VAETilingMixin):
  """A Stable Diffusion model: the three networks, their parameters, tokenizer and noise schedule."""

  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_encoder_params: Any
  tokenizer: Any
  scheduler_config: schedules.SchedulerConfig
  clip_skip: int | None = None  # use hidden_states[-(clip_skip + 1)] (+ final layer norm), as diffusers
  # The folder's scheduler class (model_index.json's, else scheduler_config.json's): its sampler is the default.
  scheduler_class_name: str | None = None
  # The folder's pipeline class (model_index.json's `_class_name`): which diffusers img2img pipeline jaxsd follows.
  pipeline_class_name: str | None = None
  # The diffusers folder `from_pretrained` read, where `load_ip_adapter` finds its image_encoder/ and
  # feature_extractor/ (diffusers' pipeline loads those with the rest).
  source_folder: str | None = None
  # Whether `instruct_pix2pix` follows a diffusers pipeline here (StableDiffusion(XL)InstructPix2PixPipeline): SD
  # and SDXL; the ControlNets' and T2I-Adapters' subclasses say False.
  INSTRUCT_PIX2PIX: ClassVar[bool] = True
  # Whether `instruct_pix2pix` takes a loaded IP-Adapter: diffusers' SD InstructPix2Pix pipeline does (IPAdapterMixin),
  # its SDXL one does not.
  PIX2PIX_IP_ADAPTER: ClassVar[bool] = True

  def with_controlnet(self, controlnets, dtype=None, param_dtype=None, allow_pickle: bool = False):
    """This model steered by ControlNets (`jaxsd.pipeline_controlnet.StableDiffusionControlNet`).

    `controlnets`: a diffusers ControlNet folder, a (module, params) pair from `jaxsd.load_controlnet`, or a
    list of them (MultiControlNet: their residuals are summed). The networks and parameters of this pipeline
    are shared, not copied; the ControlNets compute in `dtype` (default: the U-Net's). `allow_pickle`: as
    for `from_pretrained`, for ControlNet folders with only `.bin` weights.
    """
    from jaxsd import pipeline_controlnet  # it extends this class

    return pipeline_controlnet.StableDiffusionControlNet.from_pipeline(self, controlnets, dtype, param_dtype,
                                                                       allow_pickle)

  # --- pieces, each usable alone -------------------------------------------------------------

  @property
  def text_length(self) -> int:
    """Tokens per prompt (window): the tokenizer's model_max_length, to which diffusers pads and truncates, where
    the text encoder has positions for it; else the encoder's positions (e.g. a tokenizer saved without one)."""
    n = self.text_encoder.config.max_position_embeddings
    m = getattr(self.tokenizer, "model_max_length", None)
    return m if isinstance(m, int) and 0 < m <= n else n

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Token ids (B, 77) as diffusers' (multi-vector textual-inversion tokens spelt out: `maybe_convert_prompt`)."""
    return tok.tokenize(self.tokenizer, self.maybe_convert_prompt(list(prompts)), max_length=self.text_length)

  def encode_text(self, te_params, input_ids: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Hidden states (B, L, D) of token ids (B, L). Ids longer than the encoder's positions (77) are windows
    of that length (`jaxsd.prompt_syntax`), encoded one by one and concatenated; `weights` (B, L) scale the
    states by A1111's emphasis, per window."""
    n = self.text_length
    b, length = input_ids.shape
    if length > n and length % n:
      raise ValueError(f"input_ids of {length} tokens: more than {n} must be whole windows of {n} "
                       "(see jaxsd.prompt_syntax.tokenize).")
    if length > n:
      input_ids = input_ids.reshape(-1, n)
    if self.clip_skip is None:  # diffusers' default: the last layer's output, final layer norm included
      hidden = self.text_encoder.apply({"params": te_params}, input_ids).last_hidden_state
    else:
      hidden = self.text_encoder.apply({"params": te_params}, input_ids, clip_skip=self.clip_skip,
                                       method="encode_prompt")
    if weights is not None:
      hidden = prompt_syntax.emphasize(hidden, weights.reshape(input_ids.shape))
    return hidden.reshape(b, length, hidden.shape[-1])

  def text_inputs(self, prompts: list[str], negative_prompts: list[str] | None, height: int, width: int, *,
                  long_prompts: bool = False, prompt_weighting: bool = False,
                  image_to_image: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, unconditional ids, other text inputs of the program) for a batch; no negative prompts: "".

    The dict is empty here unless prompts are weighted (`weights`, `uncond_weights`); SDXL adds its size
    conditioning, which differs for img2img and inpainting (`image_to_image`; the same for every task here).
    Every entry has the batch as axis 0. Without `long_prompts` and `prompt_weighting` the
    tokens are diffusers' (77 per prompt, longer prompts truncated with a warning); with them, (B, 77 k)
    windows and A1111's weights (`jaxsd.prompt_syntax`).
    """
    del height, width, image_to_image
    negative_prompts = negative_prompts or [""] * len(prompts)
    if not (long_prompts or prompt_weighting):
      return self.tokenize(prompts), self.tokenize(negative_prompts), {}
    (ids, weights), (uncond_ids, uncond_weights) = prompt_syntax.tokenize(
        self.tokenizer, [self.maybe_convert_prompt(list(p)) for p in (prompts, negative_prompts)],
        length=self.text_length, long_prompts=long_prompts, weighting=prompt_weighting)
    if (weights != 1).any() or (uncond_weights != 1).any():  # all 1: the unweighted program, exactly
      return ids, uncond_ids, {"weights": weights, "uncond_weights": uncond_weights}
    return ids, uncond_ids, {}

  def encode_prompts(self, params, ids: jax.Array, uncond_ids: jax.Array, guided: bool, weights=None,
                     uncond_weights=None):
    """The U-Net's text conditioning; with guidance the unconditional half first, then the prompts' (as
    diffusers). Here the context array; subclasses may return any pytree that `apply_unet` reads."""
    context = self.encode_text(params["text_encoder"], ids, weights)
    if guided:
      context = jnp.concatenate([self.encode_text(params["text_encoder"], uncond_ids, uncond_weights), context])
    return context

  def apply_unet(self, unet_params, x: jax.Array, t: jax.Array, cond, i: jax.Array | None = None,
                 x_extra: jax.Array | None = None, **unet_kwargs) -> jax.Array:
    """The U-Net at model call `i` of the sampler (subclasses condition on it, e.g. ControlNets acting on a
    window of the calls); `x_extra`: channels concatenated to the latents (a 9-channel inpainting U-Net's mask
    and masked-image latents), which only the U-Net sees; `unet_kwargs` go to the U-Net (`timestep_cond`)."""
    return self.unet.apply({"params": unet_params}, with_extra(x, x_extra), t, cond, **unet_kwargs)

  @property
  def guidance_embedded(self) -> bool:
    """Whether the U-Net takes the guidance scale as an input (LCM-distilled U-Nets, `time_cond_proj_dim`): then,
    as in diffusers' pipelines, there is no classifier-free guidance (one U-Net call per step, negative prompts
    unused) and the scale reaches the U-Net as `embeddings.guidance_scale_embedding(guidance_scale - 1)`."""
    return self.unet.config.time_cond_proj_dim is not None

  @property
  def lcm_img2img(self) -> bool:
    """Whether img2img follows diffusers' LatentConsistencyModelImg2ImgPipeline, which its
    AutoPipelineForImage2Image builds for a LatentConsistencyModel(Img2Img)Pipeline folder (SimianLuo/
    LCM_Dreamshaper_v7): with the `lcm` sampler, strength picks the LCM timesteps and all steps run
    (`samplers.make_schedule`'s lcm_strength_in_schedule). Other folders (an LCMScheduler or LCM-LoRA on SD)
    follow StableDiffusionImg2ImgPipeline, which cuts the schedule; so does inpainting (diffusers has no LCM one)."""
    return str(self.pipeline_class_name or "").removeprefix("Flax") in LCM_PIPELINES

  def sampling_schedule(self, sampler: str, steps: int, strength: float = 1.0, task: str = "text",
                        **kwargs) -> samplers.Schedule:
    """`samplers.make_schedule` as the diffusers pipeline of `task` for this folder builds it (`lcm_img2img`);
    `kwargs` go to make_schedule (denoising_start / denoising_end, eta)."""
    in_schedule = task == "img2img" and self.lcm_img2img and samplers.ALIASES.get(sampler, sampler) == "lcm"
    return samplers.make_schedule(self.scheduler_config, sampler, steps, strength=strength,
                                  lcm_strength_in_schedule=in_schedule, **kwargs)

  def guided(self, guidance_scale: float, image_guidance_scale: float | None = None) -> bool:
    """Whether sampling at `guidance_scale` runs classifier-free guidance (two U-Net halves per call; InstructPix2Pix,
    given its `image_guidance_scale`: three, when that is at least 1, as diffusers)."""
    if image_guidance_scale is not None and image_guidance_scale < 1.0:
      return False
    return guidance_scale > 1.0 and not self.guidance_embedded

  def denoiser(self, unet_params, cond, guidance_scale: jax.Array, guided: bool,
               guidance_rescale: jax.Array | None = None, x_extra: jax.Array | None = None,
               unet_inputs: dict | None = None, pag_scales: dict | None = None, pag_layers: tuple[str, ...] = (),
               image_guidance_scale: jax.Array | None = None):
    """The model function the samplers call, (x, t[, call index i]) -> U-Net output under classifier-free
    guidance, fp32.

    `cond` is what `encode_prompts` returns (for SD the context, unconditional half first with guidance).
    `guidance_rescale` (Lin et al. (2023) sec. 3.4, diffusers' `rescale_noise_cfg`) mixes in the guided
    output rescaled to the conditional output's standard deviation, per image. `x_extra`: channels the
    U-Net takes after the latents (see `apply_unet`), one per image. `unet_inputs`: other U-Net keyword arguments
    (an IP-Adapter's image embeddings and scale, `ip_adapter_weights.unet_inputs`), with the guided batch's rows.
    `pag_layers` (static): Perturbed-Attention Guidance's layers (`jaxsd.pag`): the U-Net then runs one more copy of
    the conditional rows, perturbed in those layers (`cond` and `unet_inputs` have its rows, last), and
    `pag_scales` weighs the difference. `image_guidance_scale` (guided InstructPix2Pix, `x_extra` the image's
    latents): three copies as diffusers' StableDiffusionInstructPix2PixPipeline, (text, image), (no text, image) and
    (no text, no image: zeros), `cond` in that row order, combined as uncond + guidance_scale * (text - image) +
    image_guidance_scale * (image - uncond).
    """

    kw = dict(unet_inputs or {})
    if self.guidance_embedded:
      kw["timestep_cond"] = guidance_scale_embedding(guidance_scale - 1, self.unet.config.time_cond_proj_dim)

    def model_fn(x, t, i=None):
      if image_guidance_scale is not None:  # InstructPix2Pix: (text, image), (image), (neither)
        extra = jnp.concatenate([x_extra, x_extra, jnp.zeros_like(x_extra)])
        out = self.apply_unet(unet_params, jnp.concatenate([x] * 3), t, cond, i, extra, **kw).astype(jnp.float32)
        text, image, uncond = jnp.split(out, 3)
        guided_out = uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)
      elif not guided and not pag_layers:
        return self.apply_unet(unet_params, x, t, cond, i, x_extra, **kw).astype(jnp.float32)
      else:
        copies = (2 if guided else 1) + (1 if pag_layers else 0)  # [uncond,] cond[, perturbed cond]
        extra = None if x_extra is None else jnp.concatenate([x_extra] * copies)
        perturbed = dict(pag_layers=pag_layers, pag_rows=x.shape[0]) if pag_layers else {}
        out = self.apply_unet(unet_params, jnp.concatenate([x] * copies), t, cond, i, extra, **kw,
                              **perturbed).astype(jnp.float32)
        parts = jnp.split(out, copies)
        uncond, text = parts[:2] if guided else (None, parts[0])
        guided_out = uncond + guidance_scale * (text - uncond) if guided else text
        if pag_layers:  # as diffusers' `_apply_perturbed_attention_guidance`
          guided_out = guided_out + pag.scale_at(pag_scales, t) * (text - parts[-1])
      if guidance_rescale is None:
        return guided_out
      axes = tuple(range(1, out.ndim))
      ratio = jnp.std(text, axis=axes, ddof=1, keepdims=True) / jnp.std(guided_out, axis=axes, ddof=1, keepdims=True)
      rescaled = guidance_rescale * guided_out * ratio + (1 - guidance_rescale) * guided_out
      return jnp.where(guidance_rescale > 0, rescaled, guided_out)  # 0: off, exactly (as diffusers skips it)

    return model_fn

  def decode(self, vae_params, latents: jax.Array) -> jax.Array:
    """Latents (fp32, NHWC) -> images in [0, 1], fp32 NHWC (tiled / sliced as `enable_vae_tiling` / `_slicing`
    set)."""
    z = self.unscale_latents(latents)
    images = self.vae_decode(vae_params, z.astype(self.vae.dtype))
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def encode_images(self, vae_params, images: jax.Array, key: jax.Array) -> jax.Array:
    """Images in [0, 1] NHWC -> scaled latents (a sample of the posterior, as diffusers' img2img).

    `key` is one key for the batch, or a [B] batch of keys, one per image (see `posterior_keys`).
    """
    post = self.vae_encode(vae_params, (images * 2 - 1).astype(self.vae.dtype))  # (tiled / sliced as set)
    if key.ndim == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2):  # a key per image
      z = post.mean + post.std * jax.vmap(lambda k: jax.random.normal(k, post.mean.shape[1:], post.mean.dtype))(key)
    else:
      z = post.sample(key)
    return self.scale_latents(z.astype(jnp.float32))

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """The VAE's latents -> the U-Net's: z * scaling_factor, as diffusers' SD pipelines and training scripts (a
    config's shift_factor, which SD3 / FLUX pipelines subtract first, is not read by them either)."""
    return z * self.vae.config.scaling_factor

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    """The inverse of `scale_latents`."""
    return latents / self.vae.config.scaling_factor

  def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of the latents (and of the initial noise): the VAE's latent channels."""
    f = self.vae.config.downsampling_factor
    return (batch, height // f, width // f, self.vae.config.latent_channels)

  def check_parts(self, where: str) -> None:
    """Raises a ValueError naming `where` when the networks cannot work together (parts of different models)."""
    u, width, lc = self.unet.config, self.text_encoder.config.hidden_size, self.vae.config.latent_channels
    if u.addition_embed_type != "text_time" and u.context_dim != width:
      raise ValueError(f"{where}: the U-Net's cross_attention_dim={u.context_dim} but the text encoder's "
                       f"hidden_size={width}: the parts are of different models (e.g. SD 1.x and SD 2.x).")
    if u.out_channels != lc:
      raise ValueError(f"{where}: the U-Net predicts {u.out_channels} channels but the VAE's latents have {lc}: the "
                       "parts are of different models.")

  @property
  def default_sampler(self) -> str:
    """The sampler of the folder's scheduler class (`folder_sampler`; PNDM's for a folder that names none, as SD 1.x's
    folders)."""
    return folder_sampler(self.scheduler_class_name or "PNDMScheduler", self.scheduler_config, "dpmpp_2m")

  @property
  def default_hw(self) -> tuple[int, int]:
    """(height, width) the U-Net was trained at: its sample_size (one side, or [height, width] as diffusers
    also takes) in latent pixels times the VAE's factor."""
    size = self.unet.config.sample_size
    if size is None:
      raise ValueError("the U-Net's config.json has no sample_size, so there is no default image size: give the "
                       "height and width (--height / --width).")
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    f = self.vae.config.downsampling_factor
    return int(h) * f, int(w) * f

  @property
  def default_size(self) -> int:
    """The image side the U-Net was trained at (the height of `default_hw` for a U-Net trained on rectangles)."""
    return self.default_hw[0]

  def size_or_default(self, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) with a missing one taken from `default_hw`."""
    if height and width:
      return height, width
    h, w = self.default_hw
    return height or h, width or w

  @property
  def params(self) -> dict:
    """What the compiled program takes: the U-Net and text encoder with the active LoRA adapters merged in (and a
    loaded IP-Adapter's parameters added to the U-Net's)."""
    return self._with_ip_adapter({
        "unet": self.unet_params,
        "vae": self.vae_params,
        "text_encoder": self.text_encoder_params,
        **self._loras.apply(self.lora_targets)
    })

  # --- the compiled program ------------------------------------------------------------------

  def program(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              pag_layers: tuple[str, ...] = ()):
    """Returns the pure function that one generation runs, with the schedule as an argument:

        fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, image_latents=None, mask=None,
           masked_image_latents=None, guidance_rescale=None, add_noise=None, ip_adapter=None, freeu=None, **text)
           -> uint8 images or latents

    `noise` is the initial Gaussian noise (B, h, w, c), unscaled; `keys` (B,) the per-image keys of
    the stochastic samplers (see `image_keys`). img2img (`task="img2img"`) starts from
    `image_latents` noised to the schedule's first timestep. Inpainting (`task="inpaint"`) takes the
    latent-size `mask` (B, h, w, 1; 1 = repaint) and starts from noise (`from_noise`, strength 1 in
    diffusers) or like img2img; a 9-channel U-Net also sees the mask and `masked_image_latents`, a
    4-channel one gets the known region of `image_latents` re-noised after every step. Where the (boolean)
    argument `add_noise` is false, img2img starts from `image_latents` as they are (latents already noised to
    the schedule's first level: SDXL's base -> refiner hand-off, diffusers' `denoising_start`), in the same
    program. `text` holds the other text inputs of `text_inputs` (e.g. the weights of weighted prompts; `ids` are
    (B, 77 k) for k windows of long prompts, each k compiles once), passed on to `encode_prompts`. `ip_adapter`: a
    loaded IP-Adapter's image embeddings and scale (`IPAdapterMixin.ip_adapter_inputs`), which the U-Net gets.
    `freeu`: FreeU's factors (s1, s2, b1, b2), a (4,) array (`FreeUMixin.freeu_inputs`), which the U-Net gets.
    With `pag_layers` (Perturbed-Attention Guidance's self-attention layers, static: `PAGMixin.pag_cond`) the
    program takes `pag_scales` ({"scale", "adaptive_scale"}, fp32 scalars; `jaxsd.pag`).
    """
    if output not in ("np", "latent"):
      raise ValueError(f"output={output!r}: the program returns 'np' (uint8) or 'latent'.")
    from_noise = task in ("text", "pix2pix") if from_noise is None else from_noise
    concat = task == "inpaint" and self.inpainting_unet

    def fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, image_latents=None, mask=None,
           masked_image_latents=None, guidance_rescale=None, add_noise=None, control=None, ip_adapter=None, freeu=None,
           pag_scales=None, image_guidance_scale=None, **text):
      text_cond = self.encode_prompts(params, ids, uncond_ids, guided, **text)
      if task == "pix2pix" and guided:  # (no text, text) -> (text, no text, no text), diffusers' rows
        if image_guidance_scale is None:
          raise ValueError("a guided pix2pix program takes image_guidance_scale.")
        text_cond = jax.tree.map(pipeline_image_tasks.pix2pix_rows, text_cond)
      if pag_layers:  # the conditional rows once more, for the perturbed copy (`jaxsd.pag`)
        if pag_scales is None:
          raise ValueError("a program with pag_layers takes pag_scales (PAGMixin.pag_cond).")
        text_cond = pag.with_perturbed_rows(text_cond, guided)
      cond = self.unet_conditioning(params, text_cond, control)
      if from_noise:
        x = samplers.prepare_latents(schedule, noise)
      else:
        x = samplers.noise_latents(schedule, image_latents, noise)
        if add_noise is not None:
          x = jnp.where(add_noise, x, image_latents.astype(jnp.float32))
      x_extra = None
      if concat:
        x_extra = jnp.concatenate([mask, masked_image_latents], axis=-1).astype(jnp.float32)
      elif task == "pix2pix":  # the image's latents (the VAE posterior's mode, unscaled), as diffusers
        x_extra = self.pix2pix_image_latents(image_latents.astype(jnp.float32))

      def blend(i, x):  # diffusers' latent blend: the known region, noised to the next call's level
        known = samplers.noise_latents(schedule, image_latents, noise, i + 1)
        return (1 - mask) * known + mask * x

      after_step = blend if task == "inpaint" and not concat else None
      unet_inputs = None if ip_adapter is None else self.ip_adapter_unet_inputs(ip_adapter, guided, params["unet"])
      if freeu is not None:  # (no FreeU: today's program, exactly)
        unet_inputs = dict(unet_inputs or {}, freeu=freeu)
      if task == "pix2pix" and guided and unet_inputs and "image_embeds" in unet_inputs:  # an IP-Adapter's rows too
        unet_inputs = dict(unet_inputs, image_embeds=jax.tree.map(pipeline_image_tasks.pix2pix_rows,
                                                                  unet_inputs["image_embeds"]))
      if pag_layers and unet_inputs and "image_embeds" in unet_inputs:  # an IP-Adapter's rows too
        unet_inputs = dict(unet_inputs, image_embeds=pag.with_perturbed_rows(unet_inputs["image_embeds"], guided))
      model_fn = self.denoiser(params["unet"], cond, guidance_scale, guided, guidance_rescale, x_extra, unet_inputs,
                               pag_scales, pag_layers, image_guidance_scale if guided else None)
      latents = samplers.sample(model_fn, x, schedule, keys, after_step=after_step, indexed=True)
      if output == "latent":
        return latents
      images = self.decode(params["vae"], latents)
      return jnp.round(images * 255).astype(jnp.uint8)

    return fn

  def unet_conditioning(self, params, text_cond, control=None):
    """What `apply_unet` reads besides the latents, from the encoded prompts (and, in subclasses, the program's
    `control` argument: a ControlNet pipeline's images and scales)."""
    if control is not None:
      raise ValueError("control inputs need a pipeline with ControlNets (`with_controlnet`).")
    return text_cond

  def generate_fn(self, sampler: str, steps: int, guided: bool, output: str, strength: float = 1.0, task: str = "text",
                  eta: float = 0.0, pag_layers: tuple[str, ...] = ()):
    """`program` with the schedule of (sampler, steps, strength, eta) fixed: what `python -m sample` pmaps.

    fn(params, ids, uncond_ids, noise, guidance_scale, keys, image_latents=None, mask=None,
    masked_image_latents=None, **text); for img2img and inpainting pass the conditioning as `program` says,
    and the third result of `text_inputs` as `text` (with `pag_layers`, PAG's `pag_scales` too).
    """
    schedule = self.sampling_schedule(sampler, steps, strength, task, eta=eta)
    prog = self.program(guided, output, task, from_noise=task in ("text", "pix2pix") or
                        (task == "inpaint" and strength == 1.0), pag_layers=pag_layers)

    def fn(params, ids, uncond_ids, noise, guidance_scale, keys, image_latents=None, mask=None,
           masked_image_latents=None, **text):
      return prog(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, image_latents, mask,
                  masked_image_latents, **text)

    return fn

  @functools.cached_property
  def _compiled(self) -> dict:
    return {}

  def _jitted(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              pag_layers: tuple[str, ...] = ()):
    """One jitted program per (guidance on/off, output, task[, PAG's layers][, VAE tiling / slicing]): jax.jit
    itself keys on the schedule's sampler and length and on the shapes, so a strength or step count of the same
    length reuses it."""
    key = (guided, output, task, from_noise) + ((pag_layers,) if pag_layers else ()) + self.vae_key()
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self.program(guided, output, task, from_noise, pag_layers))
    return self._compiled[key]

  def program_fingerprint(self) -> str:
    """What a traced program holds besides its arguments: the networks' configs and dtypes, the noise schedule and
    clip_skip. A program saved by `jaxsd.aot` runs only for a pipeline of the same fingerprint (one traced from
    another schedule, e.g. an epsilon model's for a v-prediction one of the same shapes, or before
    `scheduler_config.replace(...)`, gave other images silently)."""
    text = repr((type(self).__name__, self.unet, self.vae, self.text_encoder, self.scheduler_config, self.clip_skip) +
                self.vae_key())  # (VAE tiling / slicing: only when on, so plain programs keep their fingerprint)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  @functools.cached_property
  def exported_programs(self) -> dict:
    """Programs saved ahead of time, by `exported_key`: `jaxsd.aot.load_programs` fills it."""
    return {}

  def _encoder(self, mode: bool = False):
    """`encode_images` jitted (per VAE tiling / slicing setting); `mode`: `encode_image_modes` (InstructPix2Pix's)."""
    key = ("encode_mode" if mode else "encode",) + self.vae_key()
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self.encode_image_modes if mode else self.encode_images)
    return self._compiled[key]

  # --- user entry points -----------------------------------------------------------------------

  def check_inputs(self, prompts, negative_prompts, height, width, steps, sampler, output,
                   guidance_scale: float = 1.0) -> tuple[list, list]:
    """Raises a ValueError that says what to change; returns (prompts, negative prompts) as lists."""
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
      raise ValueError("no prompts given: pass at least one prompt.")
    # As diffusers: a multiple of the VAE's factor (8 for SD). Latents that the U-Net's levels do not halve evenly
    # (SD 1.5 at 520 px: 65 -> 33 -> 17 -> 9) are upsampled to each skip connection's size, as diffusers does.
    multiple = max(8, self.vae.config.downsampling_factor)
    for name, v in (("height", height), ("width", width)):
      if v <= 0 or v % multiple != 0:
        raise ValueError(f"{name}={v} must be a positive multiple of {multiple} (this model's VAE downsamples by "
                         f"{self.vae.config.downsampling_factor}).")
    if steps < 1:
      raise ValueError(f"steps={steps}: need at least 1 denoising step.")
    if not finite32(guidance_scale):  # (1e39 is inf in fp32)
      raise ValueError(f"guidance_scale={guidance_scale}: must be a finite number (<= 1 turns guidance off).")
    samplers.make_schedule(self.scheduler_config, sampler, steps)  # raises for unknown samplers, listing valid ones
    if output not in OUTPUTS:
      raise ValueError(f"output={output!r}: choose one of {', '.join(OUTPUTS)}.")
    if negative_prompts is None:
      negative_prompts = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
      negative_prompts = [negative_prompts] * len(prompts)
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != len(prompts):
      raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts: give one per prompt.")
    return prompts, negative_prompts

  def noise(self, seed: int, batch: int, height: int, width: int, offset: int = 0) -> jax.Array:
    """Initial noise; image i uses key fold_in(key(seed), offset + i), so a batch split across
    devices or calls gives the same images as one big batch."""
    shape = self.latent_shape(1, height, width)[1:]
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(self.image_keys(seed, batch, offset))

  @classmethod
  def sampler_keys(cls, seed: int, batch: int, offset: int = 0) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(cls.image_keys(seed, batch, offset))

  @classmethod
  def posterior_keys(cls, seed: int, batch: int, offset: int = 0) -> jax.Array:
    """Keys of the VAE posterior samples of img2img's and inpainting's images (fold_in(image key, 2))."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 2))(cls.image_keys(seed, batch, offset))

  @staticmethod
  def image_keys(seed: int, batch: int, offset: int = 0) -> jax.Array:
    """Image i's key: its initial noise is drawn from it, the stochastic samplers' from fold_in(it, 1),
    the posterior sample of its init image from fold_in(it, 2). Seeds are 64-bit, as torch's: the low 32 bits
    make the key, and the high ones, when there are any, are folded in (seeds below 2**32 as before)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
      raise ValueError(f"seed={seed!r}: use a whole number in [0, 2**64).")
    seed = int(seed)
    base = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
      base = jax.random.fold_in(base, seed >> 32)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset, offset + batch))

  def _given_noise(self, noise, name: str, b: int, height: int, width: int, seed: int) -> jax.Array:
    if noise is None:
      return self.noise(seed, b, height, width)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != self.latent_shape(b, height, width):
      raise ValueError(f"{name} have shape {noise.shape}; expected {self.latent_shape(b, height, width)} "
                       f"for {b} prompts at {height}x{width}.")
    return noise

  def _run(self, task, from_noise, prompts, negative_prompts, steps, sampler, strength, guidance_scale, seed, noise,
           output, *, text_options: dict | None = None, guidance_rescale: float = 0.0, denoising_start=None,
           denoising_end=None, program_options: dict | None = None, eta: float = 0.0,
           image_guidance_scale: float | None = None, **cond):
    """One generation. `negative_prompts` None means none were given (see `text_inputs`); `text_options` go
    to `text_inputs`; `denoising_start` / `denoising_end` and `eta` go to `samplers.make_schedule`,
    and with `denoising_start` img2img starts from the given latents without adding noise; `program_options`
    go to `_jitted` (a subclass's static program settings); `image_guidance_scale`: InstructPix2Pix's (task
    "pix2pix"); `cond` to the program."""
    schedule = self.sampling_schedule(sampler, steps, strength, task, denoising_start=denoising_start,
                                      denoising_end=denoising_end, eta=eta)
    guided = self.guided(guidance_scale, image_guidance_scale)
    if task == "pix2pix" and guided:
      cond["image_guidance_scale"] = jnp.float32(image_guidance_scale)
    f = self.vae.config.downsampling_factor
    size = (noise.shape[1] * f, noise.shape[2] * f)  # (masks are read at the picture's size)
    cond = self.ip_adapter_cond(cond, len(prompts), guided, size)  # (unchanged without an IP-Adapter)
    cond = dict(cond, **self.freeu_inputs())  # an argument, so other values compile nothing (none when off)
    cond, pag_options = self.pag_cond(cond)  # PAG's scales an argument, its layers the program's (none when off)
    ids, uncond_ids, text = self.text_inputs(prompts, negative_prompts, noise.shape[1] * f, noise.shape[2] * f,
                                             **(text_options or {}))
    if guided:  # an argument, so one program serves every value (0: off)
      text["guidance_rescale"] = jnp.float32(guidance_rescale)
    if task == "img2img":  # an argument: SDXL's refiner runs img2img and the hand-off in one program
      text["add_noise"] = jnp.asarray(denoising_start is None)
    kind = "latent" if output == "latent" else "np"
    exported = None
    if (self.exported_programs and task == "text" and not cond and not program_options and denoising_end is None and
        eta == 0 and set(text) <= {"guidance_rescale"}):  # (programs are saved with eta 0)
      exported = self.exported_programs.get(
          exported_key(sampler, steps, guided, kind, ids.shape, uncond_ids.shape, noise.shape,
                       self.program_fingerprint()))
    gs, keys = jnp.float32(guidance_scale), self.sampler_keys(seed, len(prompts))
    if exported is not None:  # saved by jaxsd.aot: no tracing
      out = exported.call(self.params, ids, uncond_ids, noise, gs, jax.random.key_data(keys),
                          text.get("guidance_rescale", jnp.float32(0.0)))
    else:
      fn = self._jitted(guided, kind, task, from_noise, **(program_options or {}), **pag_options)
      out = fn(self.params, schedule, ids, uncond_ids, noise, gs, keys, **cond, **text)
    return pipeline_image_tasks.finish(out, output)

  def __call__(self, prompts, negative_prompts=None, height: int | None = None, width: int | None = None,
               steps: int = 50, guidance_scale: float = 7.5, sampler: str | None = None, seed: int = 0, latents=None,
               output: str = "np", long_prompts: bool = False, prompt_weighting: bool = False, eta: float = 0.0,
               ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
               pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Text to image. Returns uint8 NHWC images ("np"), PIL images ("pil") or fp32 NHWC latents ("latent").

    `latents` (B, h, w, c), if given, replace the initial noise drawn from `seed`. `height` and `width`
    default (as in diffusers) to the size of the given `latents`, else to the model's own size
    (`default_size`: the U-Net's sample_size times the VAE's factor, e.g. 512 for SD 1.5, 768 for SD 2.1).
    `long_prompts` encodes prompts past 77 tokens in 75-token windows instead of truncating them, and
    `prompt_weighting` reads A1111's `(word:1.3)` / `(word)` / `[word]` weights (`jaxsd.prompt_syntax`);
    both off by default, as diffusers (img2img and inpaint take them too). `eta` is diffusers' pipelines' (and
    img2img's and inpaint's): ddim's weight of fresh noise at each step (0: deterministic DDIM, 1: DDPM-like) and
    tcd's gamma; other samplers refuse eta != 0 (`samplers.make_schedule`). The noise is drawn from the image's
    sampler key, as the stochastic samplers'.

    With an IP-Adapter loaded (`load_ip_adapter`) a call needs `ip_adapter_image` (a PIL image or uint8 / [0, 1]
    array for every prompt, a list of one per prompt, or diffusers' [[image, ...]]: all of them in every prompt) or
    `ip_adapter_image_embeds` (diffusers' layout: a list with one (2, n, D) array under guidance, the unconditional
    row first, (1, n, D) without; or one row per prompt); img2img and inpaint take them too
    (`IPAdapterMixin.ip_adapter_inputs`). `ip_adapter_masks` (diffusers' `cross_attention_kwargs={"ip_adapter_masks":
    masks}`) keeps each adapter's image, or each of one adapter's images, to its region of the picture
    (`jaxsd.ip_adapter_masks`).

    With Perturbed-Attention Guidance on (`enable_pag`), `pag_scale` (default 3.0; <= 0: off) and
    `pag_adaptive_scale` (default 0.0) are diffusers' PAG pipelines' (`jaxsd.pag`); img2img and inpaint take them
    too. Without `enable_pag` they are refused.
    """
    return self._text_to_image(prompts, negative_prompts, height, width, steps, guidance_scale, sampler, seed, latents,
                               output, text_options=prompt_syntax.options(long_prompts, prompt_weighting), eta=eta,
                               **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                               **pag.call_options(pag_scale, pag_adaptive_scale))

  def _text_to_image(self, prompts, negative_prompts, height, width, steps, guidance_scale, sampler, seed, latents,
                     output, **run_options):
    self.check_task("text")
    sampler = sampler or self.default_sampler
    if latents is not None and (height is None or width is None) and np.ndim(latents) == 4:
      f = self.vae.config.downsampling_factor
      height, width = height or np.shape(latents)[1] * f, width or np.shape(latents)[2] * f
    height, width = self.size_or_default(height, width)
    given = negative_prompts
    prompts, negative_prompts = self.check_inputs(prompts, negative_prompts, height, width, steps, sampler, output,
                                                  guidance_scale)
    latents = self._given_noise(latents, "latents", len(prompts), height, width, seed)
    return self._run("text", True, prompts, None if given is None else negative_prompts, steps, sampler, 1.0,
                     guidance_scale, seed, latents, output, **run_options)


def folder_sampler(scheduler_class: str, scheduler_config: schedules.SchedulerConfig, fallback: str) -> str:
  """The sampler that follows a folder's scheduler class, as diffusers runs a folder's own scheduler: `fallback` for
  a class with no sampler here (e.g. IPNDMScheduler: DPM-Solver++ 2M, diffusers'
  DPMSolverMultistepScheduler.from_config swap, for SD; Euler for SDXL's folders); the EDM form for an EDM model;
  dpmpp_2m_sde for a DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" (A1111's "DPM++ 2M SDE")."""
  name = SAMPLER_OF.get(scheduler_class.removeprefix("Flax"), fallback)  # (EDM: edm_dpmpp_2m)
  if name == "dpmpp_2m" and dict(scheduler_config.unimplemented).get("algorithm_type") == "sde-dpmsolver++":
    return "dpmpp_2m_sde"
  return name


def exported_key(sampler: str, steps: int, guided: bool, output: str, ids_shape, uncond_ids_shape, noise_shape,
                 fingerprint: str) -> tuple:
  """What a program saved by `jaxsd.aot` is found by: the settings and input shapes it was exported for, and the
  `program_fingerprint` of the pipeline it was traced from."""
  return (sampler, int(steps), bool(guided), output, tuple(ids_shape), tuple(uncond_ids_shape), tuple(noise_shape),
          fingerprint)


def with_extra(x: jax.Array, x_extra: jax.Array | None) -> jax.Array:
  """The U-Net's input: the latents, and a 9-channel inpainting U-Net's mask and masked-image latents after them."""
  return x if x_extra is None else jnp.concatenate([x, x_extra.astype(x.dtype)], axis=-1)


def load(path: str, dtype=jnp.float32, **kwargs) -> StableDiffusion:
  """A diffusers folder (or Hub id), or a training workdir (its exported model with the latest EMA U-Net)."""
  path = hub.resolve(path, variant=kwargs.get("variant"), allow_pickle=kwargs.get("allow_pickle", False))
  if model_folder.is_workdir(path):
    return load_workdir(path, dtype, **kwargs)
  if any(os.path.isdir(os.path.join(path, stage, "checkpoints")) for stage in ("clip", "vae", "unet")):
    raise FileNotFoundError(f"{path} is a training workdir with no exported model yet ({model_folder.model_dir(path)} "
                            "is written as the U-Net stage starts): train until then, or pass a model folder.")
  if os.path.isdir(os.path.join(path, "unet")):
    return StableDiffusion.from_pretrained(path, dtype, **kwargs)
  model_folder.check_model_folder(path)  # raises, saying what is missing
  raise AssertionError("unreachable")


def load_workdir(workdir: str, dtype=jnp.float32, pipeline_class=None, **kwargs) -> StableDiffusion:
  """The exported model of a training workdir, with the newest U-Net checkpoint's EMA weights, as a
  `pipeline_class` (default StableDiffusion; pipeline_xl passes StableDiffusionXL for SDXL fine-tunes)."""
  path = model_folder.model_dir(workdir)
  model_folder.check_model_folder(path)
  pipe = (pipeline_class or StableDiffusion).from_pretrained(path, dtype, **kwargs)
  latest = model_folder.latest_unet_checkpoint(workdir)
  if latest and latest[0] > model_folder.exported_step(os.path.join(path, "unet")):
    step, state_dir = latest
    try:
      params, text, ema = model_folder.read_unet_checkpoint(state_dir)
      want = jax.tree.structure(pipe.unet_params)
      if jax.tree.structure(params) != want or (text is not None and jax.tree.structure(text) != jax.tree.structure(
          pipe.text_encoder_params)):
        raise ValueError("the checkpoint's U-Net does not match the exported config")
      pipe.unet_params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), params, pipe.unet_params)
      if text is not None:
        pipe.text_encoder_params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), text,
                                                pipe.text_encoder_params)
      log.info("U-Net from %s (step %d, %s).", state_dir, step, "EMA" if ema else "raw")
    except Exception as e:  # pylint: disable=broad-except
      log.warning("Could not use the U-Net checkpoint at %s (%s); using the exported U-Net.", state_dir, e)
  return pipe
