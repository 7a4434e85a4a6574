"""Text-to-image and image-to-image sampling: prompt -> CLIP -> compiled denoising loop -> VAE decode.

The whole generation (text encoding, every denoising step under classifier-free guidance, decoding)
is one jitted program per shape; the loop runs inside `lax.fori_loop` / `lax.scan` on the device.
Schedule arithmetic and latents stay fp32 whatever the networks compute in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import model_folder, pretrained, single_file, tokenizer as tok
from jaxsd.diffusion import samplers, schedules
from jaxsd.models.vae import AutoencoderKLConfig

OUTPUTS = ("np", "pil", "latent")
log = logging.getLogger(__name__)


@dataclasses.dataclass
class StableDiffusion:
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

  @classmethod
  def from_pretrained(cls, path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                      **unet_kwargs) -> "StableDiffusion":
    """Loads a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, ...).

    `variant` (e.g. "fp16") reads each network's `*.fp16.safetensors` (or its shards) where the folder
    has them and the default files elsewhere, as diffusers; weights are cast to `param_dtype` (default
    `dtype`) either way.
    """
    path = os.fspath(path)
    model_folder.check_model_folder(path)
    dirs = {name: os.path.join(path, name) for name in ("unet", "vae", "text_encoder")}
    variants = {name: variant for name in dirs}
    if variant:
      have = {name: model_folder.has_weights(d, variant) for name, d in dirs.items()}
      if not any(have.values()):
        raise FileNotFoundError(f"{path}: no network has weights of variant={variant!r} (files named like "
                                f"{model_folder.add_variant('diffusion_pytorch_model.safetensors', variant)}); "
                                "leave the variant out to load the default files.")
      for name in dirs:
        if not have[name]:
          log.warning("%s has no %s weights; loading its default files.", dirs[name], variant)
          variants[name] = None
    unet, unet_params = pretrained.load_unet(dirs["unet"], dtype, param_dtype, variant=variants["unet"], **unet_kwargs)
    # As diffusers: an fp16 VAE overflows, so configs with force_upcast decode in fp32.
    vae_dtype = dtype
    if dtype == jnp.float16 and AutoencoderKLConfig.from_json(dirs["vae"]).force_upcast:
      vae_dtype = jnp.float32
    vae, vae_params = pretrained.load_vae(dirs["vae"], vae_dtype, variant=variants["vae"])
    te, te_params = pretrained.load_text_encoder(dirs["text_encoder"], dtype, param_dtype,
                                                 variant=variants["text_encoder"])
    scheduler = _scheduler_config(_read_json(model_folder.scheduler_config_file(path)))
    return cls(unet, unet_params, vae, vae_params, te, te_params, tok.load_tokenizer(path), scheduler)

  @classmethod
  def from_single_file(cls, path: str, config: str = "v1", dtype=jnp.float32, param_dtype=None,
                       **unet_kwargs) -> "StableDiffusion":
    """Loads a single `.safetensors` checkpoint in the original CompVis / A1111 layout.

    The file holds weights only. `config` says what they are: "v1" (SD 1.5's network configs and PNDM
    scheduler), "v2" (SD 2.1 at 768 px: v-prediction DDIM, OpenCLIP text encoder, padding with "!"),
    both with the CLIP vocabulary shipped with jaxsd; or a diffusers Stable Diffusion folder whose
    configs, tokenizer and scheduler describe the checkpoint (its own weights are not read).
    """
    config = os.fspath(config)
    if os.path.isdir(config):
      model_folder.check_model_folder(config)
      configs = {name: _read_json(os.path.join(config, name, "config.json")) for name in ("unet", "vae", "text_encoder")}
      configs["scheduler"] = _read_json(model_folder.scheduler_config_file(config))
      tokenizer = tok.load_tokenizer(config)
    else:
      configs = single_file.preset(config)
      tokenizer = tok.load_tokenizer()
      if single_file.PAD_TOKEN[config]:
        tokenizer.pad_token = single_file.PAD_TOKEN[config]
    parts = single_file.split(single_file.read(path), configs)
    where = os.fspath(path)
    unet, unet_params = pretrained.from_state_dict("unet", configs["unet"], parts["unet"], f"{where} (U-Net)", dtype,
                                                   param_dtype, **unet_kwargs)
    vae_dtype = dtype  # as from_pretrained: an fp16 VAE with force_upcast decodes in fp32
    if dtype == jnp.float16 and AutoencoderKLConfig.from_dict(configs["vae"]).force_upcast:
      vae_dtype = jnp.float32
    vae, vae_params = pretrained.from_state_dict("vae", configs["vae"], parts["vae"], f"{where} (VAE)", vae_dtype)
    te, te_params = pretrained.from_state_dict("text_encoder", configs["text_encoder"], parts["text_encoder"],
                                               f"{where} (text encoder)", dtype, param_dtype)
    return cls(unet, unet_params, vae, vae_params, te, te_params, tokenizer, _scheduler_config(configs["scheduler"]))

  # --- pieces, each usable alone -------------------------------------------------------------

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return tok.tokenize(self.tokenizer, list(prompts), max_length=self.text_encoder.config.max_position_embeddings)

  def encode_text(self, te_params, input_ids: jax.Array) -> jax.Array:
    if self.clip_skip is None:  # diffusers' default: the last layer's output, final layer norm included
      return self.text_encoder.apply({"params": te_params}, input_ids).last_hidden_state
    return self.text_encoder.apply({"params": te_params}, input_ids, clip_skip=self.clip_skip, method="encode_prompt")

  def denoiser(self, unet_params, context: jax.Array, guidance_scale: jax.Array, guided: bool):
    """The model function the samplers call: U-Net output under classifier-free guidance, fp32.

    With guidance, `context` holds the unconditional embeddings first, then the prompts' (as diffusers).
    """

    def model_fn(x, t):
      if not guided:
        return self.unet.apply({"params": unet_params}, x, t, context).astype(jnp.float32)
      out = self.unet.apply({"params": unet_params}, jnp.concatenate([x, x]), t, context).astype(jnp.float32)
      uncond, cond = jnp.split(out, 2)
      return uncond + guidance_scale * (cond - uncond)

    return model_fn

  def decode(self, vae_params, latents: jax.Array) -> jax.Array:
    """Latents (fp32, NHWC) -> images in [0, 1], fp32 NHWC."""
    cfg = self.vae.config
    z = latents / cfg.scaling_factor
    if cfg.shift_factor:
      z = z + cfg.shift_factor
    images = self.vae.apply({"params": vae_params}, z.astype(self.vae.dtype), method=self.vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def encode_images(self, vae_params, images: jax.Array, key: jax.Array) -> jax.Array:
    """Images in [0, 1] NHWC -> scaled latents (a sample of the posterior, as diffusers' img2img)."""
    cfg = self.vae.config
    post = self.vae.apply({"params": vae_params}, (images * 2 - 1).astype(self.vae.dtype), method=self.vae.encode)
    z = post.sample(key).astype(jnp.float32)
    if cfg.shift_factor:
      z = z - cfg.shift_factor
    return z * cfg.scaling_factor

  def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = self.vae.config.downsampling_factor
    return (batch, height // f, width // f, self.unet.config.in_channels)

  @property
  def default_size(self) -> int:
    """The image side the U-Net was trained at (its sample_size in latent pixels)."""
    return self.unet.config.sample_size * self.vae.config.downsampling_factor

  @property
  def params(self) -> dict:
    return {"unet": self.unet_params, "vae": self.vae_params, "text_encoder": self.text_encoder_params}

  # --- the compiled program ------------------------------------------------------------------

  def generate_fn(self, sampler: str, steps: int, guided: bool, output: str, strength: float = 1.0):
    """Returns a pure function (params, ids, uncond_ids, noise, guidance_scale, keys[, init_latents]) -> out.

    `noise` is the initial Gaussian noise (B, h, w, c); `keys` (B,) the per-image keys of the
    stochastic samplers (see `image_keys`). For img2img (`strength` < 1) `init_latents`
    are the encoded input images. The function is what `__call__` jits and `python -m sample` pmaps.
    """
    schedule = samplers.make_schedule(self.scheduler_config, sampler, steps, strength=strength)

    def fn(params, ids, uncond_ids, noise, guidance_scale, keys, init_latents=None):
      context = self.encode_text(params["text_encoder"], ids)
      if guided:
        context = jnp.concatenate([self.encode_text(params["text_encoder"], uncond_ids), context])
      if init_latents is None:
        x = samplers.prepare_latents(schedule, noise)
      else:
        x = samplers.noise_latents(schedule, init_latents, noise)
      model_fn = self.denoiser(params["unet"], context, guidance_scale, guided)
      latents = samplers.sample(model_fn, x, schedule, keys)
      if output == "latent":
        return latents
      images = self.decode(params["vae"], latents)
      return jnp.round(images * 255).astype(jnp.uint8)

    return fn

  @functools.cached_property
  def _compiled(self) -> dict:
    return {}

  def _jitted(self, sampler, steps, guided, output, strength):
    key = (sampler, steps, guided, output, float(strength))
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self.generate_fn(sampler, steps, guided, output, strength))
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
    multiple = max(8, self.vae.config.downsampling_factor * self.unet.config.downsampling_factor)
    for name, v in (("height", height), ("width", width)):
      if v <= 0 or v % multiple != 0:
        raise ValueError(f"{name}={v} must be a positive multiple of {multiple} (this model's VAE and U-Net "
                         f"downsample by {multiple} in all).")
    if steps < 1:
      raise ValueError(f"steps={steps}: need at least 1 denoising step.")
    if not np.isfinite(guidance_scale):
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

  @staticmethod
  def image_keys(seed: int, batch: int, offset: int = 0) -> jax.Array:
    """Image i's key: its initial noise is drawn from it, the stochastic samplers' from fold_in(it, 1)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset, offset + batch))

  def __call__(self, prompts, negative_prompts=None, height: int | None = None, width: int | None = None,
               steps: int = 50, guidance_scale: float = 7.5, sampler: str = "pndm", seed: int = 0, latents=None,
               output: str = "np"):
    """Text to image. Returns uint8 NHWC images ("np"), PIL images ("pil") or fp32 NHWC latents ("latent").

    `latents` (B, h, w, c), if given, replace the initial noise drawn from `seed`. `height` and `width`
    default (as in diffusers) to the size of the given `latents`, else to the model's own size
    (`default_size`: the U-Net's sample_size times the VAE's factor, e.g. 512 for SD 1.5, 768 for SD 2.1).
    """
    if latents is not None and (height is None or width is None) and np.ndim(latents) == 4:
      f = self.vae.config.downsampling_factor
      height, width = height or np.shape(latents)[1] * f, width or np.shape(latents)[2] * f
    height, width = height or self.default_size, width or self.default_size
    prompts, negative_prompts = self.check_inputs(prompts, negative_prompts, height, width, steps, sampler, output,
                                                  guidance_scale)
    b = len(prompts)
    if latents is None:
      latents = self.noise(seed, b, height, width)
    else:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.shape != self.latent_shape(b, height, width):
        raise ValueError(f"latents have shape {latents.shape}; expected {self.latent_shape(b, height, width)} "
                         f"for {b} prompts at {height}x{width}.")
    guided = guidance_scale > 1.0
    fn = self._jitted(sampler, steps, guided, "latent" if output == "latent" else "np", 1.0)
    out = fn(self.params, self.tokenize(prompts), self.tokenize(negative_prompts), latents, jnp.float32(guidance_scale),
             self.sampler_keys(seed, b))
    return _finish(out, output)

  def img2img(self, prompts, init_images, strength: float = 0.6, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 7.5, sampler: str = "pndm", seed: int = 0, output: str = "np"):
    """Image to image (SDEdit, Meng et al. 2021): noise the encoded images to `strength`, then denoise.

    `init_images`: uint8 NHWC array, a list of PIL images, or floats in [0, 1].
    """
    images = _as_float_images(init_images)
    if isinstance(prompts, str):
      prompts = [prompts] * images.shape[0]
    height, width = images.shape[1:3]
    prompts, negative_prompts = self.check_inputs(prompts, negative_prompts, height, width, steps, sampler, output,
                                                  guidance_scale)
    if len(prompts) != images.shape[0]:
      raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} init images: give one per image.")
    if not 0.0 < strength <= 1.0:
      raise ValueError(f"strength={strength} must be in (0, 1].")
    key = jax.random.key(seed)
    init_latents = jax.jit(self.encode_images)(self.vae_params, jnp.asarray(images), jax.random.fold_in(key, 1))
    noise = self.noise(seed, len(prompts), height, width)
    guided = guidance_scale > 1.0
    fn = self._jitted(sampler, steps, guided, "latent" if output == "latent" else "np", strength)
    out = fn(self.params, self.tokenize(prompts), self.tokenize(negative_prompts), noise, jnp.float32(guidance_scale),
             self.sampler_keys(seed, len(prompts)), init_latents)
    return _finish(out, output)


def _read_json(file: str) -> dict:
  with open(file) as f:
    return json.load(f)


def _scheduler_config(d: dict) -> schedules.SchedulerConfig:
  """A folder's noise schedule with what StableDiffusionPipeline.__init__ forces on the folder's own scheduler
  class: steps_offset=1 and clip_sample=False (where the class has them: DDIM both, PNDM steps_offset)."""
  d = dict(d)
  own = schedules.DIFFUSERS_DEFAULTS.get(str(d.get("_class_name", "")).removeprefix("Flax"), {})
  for key, value in (("steps_offset", 1), ("clip_sample", False)):
    if key in own:
      d[key] = value
  return schedules.SchedulerConfig.from_dict(d)


def _as_float_images(images) -> np.ndarray:
  if isinstance(images, (list, tuple)):
    images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"init_images must be NHWC RGB (B, H, W, 3); got shape {images.shape}.")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def _finish(out: jax.Array, output: str):
  out = np.asarray(jax.device_get(out))
  if output == "pil":
    from PIL import Image

    return [Image.fromarray(im) for im in out]
  return out


def load(path: str, dtype=jnp.float32, **kwargs) -> StableDiffusion:
  """A diffusers folder, or a training workdir (its exported model with the latest EMA U-Net)."""
  path = os.fspath(path)
  if model_folder.is_workdir(path):
    return load_workdir(path, dtype, **kwargs)
  if os.path.isdir(os.path.join(path, "unet")):
    return StableDiffusion.from_pretrained(path, dtype, **kwargs)
  model_folder.check_model_folder(path)  # raises, saying what is missing
  raise AssertionError("unreachable")


def load_workdir(workdir: str, dtype=jnp.float32, **kwargs) -> StableDiffusion:
  """The exported model of a training workdir, with the newest U-Net checkpoint's EMA weights."""
  path = model_folder.model_dir(workdir)
  model_folder.check_model_folder(path)
  pipe = StableDiffusion.from_pretrained(path, dtype, **kwargs)
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
