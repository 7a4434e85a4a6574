"""img2img, inpainting and InstructPix2Pix on a `jaxsd.pipeline.StableDiffusion` (SDXL's and, but for InstructPix2Pix,
the ControlNet pipelines' too): which of them a model's U-Net can do, checking the images, masks and latents each
takes, encoding them, and inpainting a crop around the mask; the run itself is the pipeline's (`StableDiffusion._run`,
the compiled program's task "img2img", "inpaint" or "pix2pix").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import conditioning, ip_adapter, mask_crop, pag, prompt_syntax

# How the initial latents are made and what the U-Net sees: text-to-image starts from noise; img2img
# from the image's latents noised to the first timestep; inpainting from either (noise at strength 1,
# as diffusers) with the mask and masked image concatenated (9-channel U-Nets) or the known region
# re-noised after every step (4-channel U-Nets, diffusers' latent blend); InstructPix2Pix ("pix2pix") from
# noise, with the image's latents concatenated (8-channel U-Nets).
TASKS = ("text", "img2img", "inpaint", "pix2pix")


def check_image_guidance_scale(value: float) -> None:
  """InstructPix2Pix's image guidance: any finite number (below 1: no guidance, as diffusers)."""
  if not np.isfinite(value):
    raise ValueError(f"image_guidance_scale={value}: use a finite number (diffusers' default 1.5).")


def pix2pix_rows(a: jax.Array) -> jax.Array:
  """A guided input's rows (unconditional half, conditional half) as a guided InstructPix2Pix program's three copies
  want them, diffusers' order: (conditional, unconditional, unconditional)."""
  half = a.shape[0] // 2
  return jnp.concatenate([a[half:], a[:half], a[:half]])


def finish(out: jax.Array, output: str):
  """A program's images as the call returns them: uint8 NHWC numpy ("np"), or a list of PIL images ("pil")."""
  out = np.asarray(jax.device_get(out))
  if output == "pil":
    from PIL import Image

    return [Image.fromarray(im) for im in out]
  return out


class ImageTasksMixin:
  """`img2img`, `inpaint` and `instruct_pix2pix` (as diffusers' StableDiffusionImg2ImgPipeline,
  StableDiffusionInpaintPipeline and StableDiffusionInstructPix2PixPipeline) for `jaxsd.pipeline.StableDiffusion`,
  whose `_run`, `check_inputs` and `sampling_schedule` they use, and which task a model's U-Net can do
  (`check_task`)."""

  @property
  def inpainting_unet(self) -> bool:
    """A 9-channel U-Net (latents + mask + masked-image latents), such as runwayml's SD 1.5 inpainting."""
    return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

  @property
  def pix2pix_unet(self) -> bool:
    """An 8-channel U-Net (latents + the image's latents), such as timbrooks/instruct-pix2pix: it edits an image as
    an instruction says (`instruct_pix2pix`)."""
    return self.unet.config.in_channels == 2 * self.vae.config.latent_channels

  def pix2pix_image_latents(self, modes: jax.Array) -> jax.Array:
    """What an InstructPix2Pix U-Net sees of the image: the VAE posterior's mode, unscaled, as diffusers' pipelines
    (SDXL's scale it for a CosXL Edit folder)."""
    return modes

  def check_task(self, task: str) -> None:
    """Raises a ValueError if this model's U-Net cannot do `task` (one of TASKS), saying what to call instead."""
    c, lc = self.unet.config.in_channels, self.vae.config.latent_channels
    if task not in TASKS:
      raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}.")
    if task == "inpaint":
      if c not in (lc, 2 * lc + 1):
        raise ValueError(f"this U-Net takes {c} input channels; inpainting needs {lc} (latent blend) or "
                         f"{2 * lc + 1} (an inpainting U-Net: latents + mask + masked-image latents).")
    elif task == "pix2pix":
      if not self.INSTRUCT_PIX2PIX:
        raise ValueError(f"InstructPix2Pix is implemented for SD and SDXL pipelines (diffusers' "
                         f"StableDiffusion(XL)InstructPix2PixPipeline), not on a {type(self).__name__}.")
      if not self.pix2pix_unet:
        raise ValueError(f"this U-Net takes {c} input channels; InstructPix2Pix needs {2 * lc} (latents + the image's "
                         "latents, e.g. timbrooks/instruct-pix2pix): edit with img2img (StableDiffusion.img2img) "
                         "instead.")
    elif self.pix2pix_unet:
      raise ValueError(f"this is an InstructPix2Pix U-Net ({c} input channels: latents + the image's latents); it only "
                       "edits an image as the prompt instructs: give the image (StableDiffusion.instruct_pix2pix; "
                       "--init-image on the command line).")
    elif self.inpainting_unet:
      raise ValueError(f"this is an inpainting U-Net ({c} input channels: latents + mask + masked-image latents); "
                       "it only inpaints: give an image and a mask (StableDiffusion.inpaint; --init-image and --mask "
                       "on the command line).")
    elif c != lc:
      raise ValueError(f"this U-Net takes {c} input channels but the VAE's latents have {lc}: it is not a "
                       f"{'text' if task == 'text' else 'image'}-to-image model.")

  def _image_inputs(self, prompts, negative_prompts, images, image_latents, steps, sampler, strength, output,
                    guidance_scale, task, eta: float = 0.0):
    """Checks what img2img and inpaint share; returns (prompts, negatives, float images or None, height, width)."""
    f = self.vae.config.downsampling_factor
    if images is None and image_latents is None:
      raise ValueError("no init images: pass images (or their latents).")
    images = None if images is None else conditioning.as_images(images, "init images")
    if images is not None:
      height, width = images.shape[1:3]
      n = images.shape[0]
    else:
      height, width = np.shape(image_latents)[1] * f, np.shape(image_latents)[2] * f
      n = np.shape(image_latents)[0]
    if isinstance(prompts, str):
      prompts = [prompts] * n
    prompts, negative_prompts = self.check_inputs(prompts, negative_prompts, height, width, steps, sampler, output,
                                                  guidance_scale)
    if len(prompts) != n:
      raise ValueError(f"{len(prompts)} prompts for {n} init images: give one per image.")
    self.sampling_schedule(sampler, steps, strength, task, eta=eta)  # raises for a bad strength or eta
    return prompts, negative_prompts, images, height, width

  def _image_latents(self, images, image_latents, seed, name="image_latents", mode: bool = False):
    """The given latents checked against the images, or the images encoded: a posterior sample from
    `posterior_keys(seed, B)`, scaled; with `mode`, the posterior's mode, unscaled (InstructPix2Pix's)."""
    b, h, w = images.shape[:3] if images is not None else np.shape(image_latents)[:3]
    if image_latents is None and mode:
      return self._encoder(mode=True)(self.vae_params, jnp.asarray(images))
    if image_latents is None:
      return self._encoder()(self.vae_params, jnp.asarray(images), self.posterior_keys(seed, b))
    image_latents = jnp.asarray(image_latents, jnp.float32)
    if images is not None and image_latents.shape != self.latent_shape(b, h, w):
      raise ValueError(f"{name} have shape {image_latents.shape}; expected {self.latent_shape(b, h, w)} for "
                       f"{b} images of {h}x{w}.")
    return image_latents

  def img2img(self, prompts, init_images, strength: float = 0.8, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 7.5, sampler: str | None = None, seed: int = 0, output: str = "np", noise=None,
              image_latents=None, long_prompts: bool = False, prompt_weighting: bool = False, eta: float = 0.0,
              ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
              pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Image to image (SDEdit, Meng et al. 2021): noise the encoded images to `strength`, then denoise.

    As diffusers' StableDiffusionImg2ImgPipeline: the last min(int(steps * strength), steps) steps of
    the schedule run, from the images' latents noised to the first of them. On an LCM folder (`lcm_img2img`)
    with the `lcm` sampler, as LatentConsistencyModelImg2ImgPipeline: all `steps` run, on LCM timesteps below
    strength * T (int(original_inference_steps * strength) must be at least `steps`).

    Args:
      prompts: a prompt, or one per image.
      init_images: uint8 NHWC array, PIL image(s), or floats in [0, 1]; may be None if `image_latents` are given.
      strength: in (0, 1]; how much of the schedule runs (1: all of it, the image barely matters).
      noise: the initial noise (B, h, w, c), unscaled N(0, 1); default: drawn from `seed` as text-to-image's.
      image_latents: the images' scaled latents (B, h, w, c); default: a posterior sample of the VAE
        encoder, from `posterior_keys(seed, B)`.
      long_prompts, prompt_weighting, eta, ip_adapter_image, ip_adapter_image_embeds, pag_scale, pag_adaptive_scale:
        as text-to-image's (`__call__`).
    """
    return self._image_to_image(prompts, init_images, strength, negative_prompts, steps, guidance_scale, sampler, seed,
                                output, noise, image_latents,
                                text_options=prompt_syntax.options(long_prompts, prompt_weighting), eta=eta,
                                **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                                **pag.call_options(pag_scale, pag_adaptive_scale))

  def _image_to_image(self, prompts, init_images, strength, negative_prompts, steps, guidance_scale, sampler, seed,
                      output, noise, image_latents, **run_options):
    self.check_task("img2img")
    sampler = sampler or self.default_sampler
    given = negative_prompts
    prompts, negative_prompts, images, height, width = self._image_inputs(prompts, negative_prompts, init_images,
                                                                          image_latents, steps, sampler, strength,
                                                                          output, guidance_scale, "img2img",
                                                                          run_options.get("eta", 0.0))
    b = len(prompts)
    image_latents = self._image_latents(images, image_latents, seed)
    noise = self._given_noise(noise, "noise", b, height, width, seed)
    if image_latents.shape != noise.shape:
      raise ValueError(f"image_latents have shape {image_latents.shape}; expected {noise.shape}.")
    return self._run("img2img", False, prompts, None if given is None else negative_prompts, steps, sampler, strength,
                     guidance_scale, seed, noise, output, image_latents=image_latents, **run_options)

  def instruct_pix2pix(self, prompts, images, negative_prompts=None, steps: int = 100, guidance_scale: float = 7.5,
                       image_guidance_scale: float = 1.5, sampler: str | None = None, seed: int = 0, output: str = "np",
                       latents=None, image_latents=None, long_prompts: bool = False, prompt_weighting: bool = False,
                       eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None):
    """Edits each image as its prompt instructs ("make it snowy"), as diffusers' StableDiffusionInstructPix2PixPipeline
    (Brooks et al. 2023), with an 8-channel U-Net (`pix2pix_unet`, e.g. timbrooks/instruct-pix2pix).

    The U-Net sees the latents and the image's latents (the VAE posterior's mode, unscaled, as diffusers); sampling
    starts from noise and the whole schedule runs. Guided when guidance_scale > 1 and image_guidance_scale >= 1 (as
    diffusers): three U-Net copies per call, the output uncond + guidance_scale * (text - image) +
    image_guidance_scale * (image - uncond), where "image" drops the prompt and "uncond" the image's latents as well
    (zeros). The output is the images' size (multiples of 8).

    Args:
      prompts: an instruction, or one per image.
      images: uint8 NHWC array, PIL image(s), or floats in [0, 1]; may be None if `image_latents` are given.
      image_guidance_scale: how closely to keep to the image (diffusers' default 1.5; below 1: no guidance).
      latents: the initial noise (B, h, w, c), unscaled N(0, 1); default: drawn from `seed`.
      image_latents: the images' latents (B, h, w, c), unscaled (diffusers takes a 4-channel `image` as them);
        default: the VAE posterior's mode of `images`.
      long_prompts, prompt_weighting, eta: as text-to-image's (`__call__`).
      ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks: a loaded IP-Adapter's, as text-to-image's: the
        image's embeddings in the text copy, the unconditional ones (zeros; Plus: a zero image's) in the other two, as
        diffusers' pipeline (`ip_adapter_image_embeds` in jaxsd's layout, the unconditional row first).
    """
    return self._instruct_pix2pix(
        prompts, images, negative_prompts, steps, guidance_scale, image_guidance_scale, sampler, seed, output, latents,
        image_latents, text_options=prompt_syntax.options(long_prompts, prompt_weighting), eta=eta,
        **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks))

  def _instruct_pix2pix(self, prompts, images, negative_prompts, steps, guidance_scale, image_guidance_scale, sampler,
                        seed, output, latents, image_latents, **run_options):
    self.check_task("pix2pix")
    self.check_pix2pix_extras()
    check_image_guidance_scale(image_guidance_scale)
    sampler = sampler or self.default_sampler
    given = negative_prompts
    prompts, negative_prompts, images, height, width = self._image_inputs(prompts, negative_prompts, images,
                                                                          image_latents, steps, sampler, 1.0, output,
                                                                          guidance_scale, "pix2pix",
                                                                          run_options.get("eta", 0.0))
    b = len(prompts)
    image_latents = self._image_latents(images, image_latents, seed, mode=True)
    noise = self._given_noise(latents, "latents", b, height, width, seed)
    if image_latents.shape != noise.shape:  # (given without images: their channels, as img2img)
      raise ValueError(f"image_latents have shape {image_latents.shape}; expected {noise.shape}.")
    return self._run("pix2pix", True, prompts, None if given is None else negative_prompts, steps, sampler, 1.0,
                     guidance_scale, seed, noise, output, image_guidance_scale=image_guidance_scale,
                     image_latents=image_latents, **run_options)

  def check_pix2pix_extras(self) -> None:
    """What `instruct_pix2pix` (and `generate` with an InstructPix2Pix model) refuses of this pipeline's settings, as
    no diffusers InstructPix2Pix pipeline takes it: Perturbed-Attention Guidance; an IP-Adapter on SDXL's."""
    if self.pag_applied_layers is not None:
      raise ValueError("instruct_pix2pix does not take Perturbed-Attention Guidance (no diffusers InstructPix2Pix "
                       "pipeline does): disable_pag() first.")
    if self.ip_adapters and not self.PIX2PIX_IP_ADAPTER:
      raise ValueError(f"{type(self).__name__}.instruct_pix2pix does not take a loaded IP-Adapter (diffusers' "
                       "pipeline of this kind does not): unload_ip_adapter() first.")

  def encode_image_modes(self, vae_params, images: jax.Array) -> jax.Array:
    """Images in [0, 1] NHWC -> the VAE posterior's mode, unscaled: InstructPix2Pix's image latents (diffusers'
    `retrieve_latents(..., sample_mode="argmax")`)."""
    post = self.vae_encode(vae_params, (images * 2 - 1).astype(self.vae.dtype))
    return post.mean.astype(jnp.float32)

  def inpaint(self, prompts, images, mask_images, strength: float = 1.0, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 7.5, sampler: str | None = None, seed: int = 0, output: str = "np", latents=None,
              masked_image_latents=None, image_latents=None, long_prompts: bool = False, prompt_weighting: bool = False,
              padding_mask_crop: int | None = None, height: int | None = None, width: int | None = None,
              eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
              pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Repaints the white part of each mask, as diffusers' StableDiffusionInpaintPipeline.

    The U-Net's in_channels decides the method: a 9-channel inpainting U-Net sees the latents, the
    mask (downsampled to the latents) and the masked image's latents; a 4-channel U-Net denoises as
    text-to-image while the known region is replaced, after every step, by the image's latents
    noised to the level of the next step (diffusers' latent blend).

    Args:
      prompts: a prompt, or one per image.
      images: uint8 NHWC array, PIL image(s), or floats in [0, 1].
      mask_images: the masks, white (>= 0.5) = repaint: PIL image(s) or (B, H, W[, 1]) arrays, the images' size.
      strength: in (0, 1]; 1 starts from pure noise, below 1 from the image noised as img2img's.
      latents: the initial noise (B, h, w, c), unscaled N(0, 1); default: drawn from `seed`. Unlike
        diffusers, where given latents replace the noised image even at strength < 1, they are the noise
        in both cases.
      masked_image_latents: the masked images' scaled latents, for 9-channel U-Nets only; default:
        the images with the repainted region grey (0 in [-1, 1]), encoded.
      image_latents: the images' scaled latents (needed at strength < 1 and by 4-channel U-Nets);
        default: encoded, a posterior sample from `posterior_keys(seed, B)`.
      padding_mask_crop: inpaint only a box around each mask, this many pixels wider, grown to the aspect
        of height x width, then paste the result back over the image (`jaxsd.mask_crop`, as diffusers):
        the model works on the box resized to height x width, whatever the box (one compiled program);
        images and masks are handled as 8-bit, as diffusers' PIL path; `latents` and the other latents
        given are then the crops'. Not with output="latent".
      height, width: with padding_mask_crop, the size the crop is inpainted at (default: the model's
        own size, as diffusers); without it the output is the images' size and these may only repeat it.
      long_prompts, prompt_weighting, eta, ip_adapter_image, ip_adapter_image_embeds, pag_scale, pag_adaptive_scale:
        as text-to-image's (`__call__`).
    """
    return self._inpaint(prompts, images, mask_images, strength, negative_prompts, steps, guidance_scale, sampler, seed,
                         output, latents, masked_image_latents, image_latents,
                         prompt_syntax.options(long_prompts,
                                               prompt_weighting), padding_mask_crop, height, width, eta=eta,
                         **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                         **pag.call_options(pag_scale, pag_adaptive_scale))

  def _inpaint(self, prompts, images, mask_images, strength, negative_prompts, steps, guidance_scale, sampler, seed,
               output, latents, masked_image_latents, image_latents, text_options, padding_mask_crop, height, width,
               **run_options):
    self.check_task("inpaint")
    sampler = sampler or self.default_sampler
    if padding_mask_crop is not None:
      return self._inpaint_crop(prompts, images, mask_images, padding_mask_crop, height, width, output,
                                strength=strength, negative_prompts=negative_prompts, steps=steps,
                                guidance_scale=guidance_scale, sampler=sampler, seed=seed, latents=latents,
                                masked_image_latents=masked_image_latents, image_latents=image_latents,
                                text_options=text_options, **run_options)
    asked, given = {"height": height, "width": width}, negative_prompts
    prompts, negative_prompts, images, height, width = self._image_inputs(prompts, negative_prompts, images,
                                                                          image_latents, steps, sampler, strength,
                                                                          output, guidance_scale, "inpaint",
                                                                          run_options.get("eta", 0.0))
    if images is None:
      raise ValueError("inpaint needs the images themselves (for the masked image and the output size).")
    for name, v, have in (("height", asked["height"], height), ("width", asked["width"], width)):
      if v is not None and v != have:
        raise ValueError(f"{name}={v} but the images' {name} is {have}: without padding_mask_crop the output is "
                         f"the images' size; resize them, or drop {name}.")
    b = len(prompts)
    masks = conditioning.as_masks(mask_images)
    if masks.shape[0] == 1 and b > 1:
      masks = np.repeat(masks, b, axis=0)
    if masks.shape[:3] != images.shape[:3]:
      raise ValueError(f"mask_images have size {masks.shape[1:3]} (batch {masks.shape[0]}); the images "
                       f"{images.shape[1:3]} (batch {b}): give one mask per image, of the image's size.")
    noise = self._given_noise(latents, "latents", b, height, width, seed)
    from_noise = strength == 1.0
    cond = {"mask": jnp.asarray(conditioning.latent_mask(masks, self.vae.config.downsampling_factor))}
    if self.inpainting_unet:
      if masked_image_latents is None:
        masked = conditioning.masked_images(images, masks)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(self.posterior_keys(seed, b))
        masked_image_latents = self._encoder()(self.vae_params, jnp.asarray(masked), keys)
      cond["masked_image_latents"] = self._image_latents(images, masked_image_latents, seed, "masked_image_latents")
    elif masked_image_latents is not None:
      raise ValueError(f"masked_image_latents are inputs of 9-channel inpainting U-Nets; this U-Net has "
                       f"{self.unet.config.in_channels} channels and inpaints by latent blending: drop them.")
    if not from_noise or not self.inpainting_unet:
      cond["image_latents"] = self._image_latents(images, image_latents, seed)
    return self._run("inpaint", from_noise, prompts, None if given is None else negative_prompts, steps, sampler,
                     strength, guidance_scale, seed, noise, output, text_options=text_options, **cond, **run_options)

  def _crop_run_options(self, kwargs: dict, crops: mask_crop.Crops) -> dict:
    """`_inpaint`'s other arguments under padding_mask_crop, with what a subclass crops like the images (a
    ControlNet pipeline's control images)."""
    return kwargs

  def _inpaint_crop(self, prompts, images, mask_images, padding_mask_crop, height, width, output, **kwargs):
    """`inpaint` with padding_mask_crop: the crops inpainted at height x width, pasted back (`jaxsd.mask_crop`)."""
    pad = mask_crop.check_padding(padding_mask_crop)
    if output not in ("np", "pil"):
      raise ValueError(f"output={output!r} with padding_mask_crop: the result is the image with the crop pasted "
                       "back; choose 'np' or 'pil' (or drop padding_mask_crop for the crop's latents).")
    if images is None:
      raise ValueError("inpaint needs the images themselves (for the masked image and the output size).")
    images = conditioning.as_images(images, "images")
    levels = conditioning.mask_levels(mask_images)
    if levels.shape[0] == 1:
      levels = np.repeat(levels, images.shape[0], axis=0)
    if levels.shape != images.shape[:3]:
      raise ValueError(f"mask_images have size {levels.shape[1:3]} (batch {levels.shape[0]}); the images "
                       f"{images.shape[1:3]} (batch {images.shape[0]}): give one mask per image, of the image's size.")
    height, width = self.size_or_default(height, width)
    self.check_inputs(["x"], None, height, width, kwargs["steps"], kwargs["sampler"], "np")  # before cropping
    crops = mask_crop.crop(images, levels, width, height, pad)
    kwargs = self._crop_run_options(kwargs, crops)
    out = self._inpaint(prompts, crops.images, crops.masks, output="np", padding_mask_crop=None, height=None,
                        width=None, **kwargs)
    return finish(mask_crop.paste(out, crops), output)
