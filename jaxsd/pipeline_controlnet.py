"""Generation steered by ControlNets: text-to-image, img2img and inpainting (diffusers'
StableDiffusionControlNet(Img2Img|Inpaint)Pipeline and MultiControlNet, StableDiffusionXLControlNet(Img2Img)Pipeline
for SDXL), through the programs of `StableDiffusion` with the ControlNets' residuals added in `apply_unet`.

    pipe = jaxsd.StableDiffusion.from_pretrained("sd").with_controlnet(["canny", "depth"])
    images = pipe(prompts, control_images=[edges, depths], controlnet_conditioning_scale=[1.0, 0.5])
    edited = pipe.img2img(prompts, photos, control_images=[edges, depths], strength=0.8)

A folder saved by diffusers' StableDiffusion(XL)ControlNet*Pipeline (its base model's folders, controlnet/ and, for
several, controlnet_1/, ...) loads with its ControlNets through `StableDiffusionControlNet.from_pretrained` (or
`jaxsd.pipeline_xl.load`, which tells the kinds apart); `save_pretrained` writes such a folder.

At every model call each ControlNet sees the latents, the timestep, the prompt and its conditioning image
(RGB in [0, 1], not normalised, duplicated for classifier-free guidance); the U-Net adds the sum of their
residuals, each scaled by its conditioning scale while the call lies inside its [control_guidance_start,
control_guidance_end) fraction of the run, else 0. In guess mode the residuals grow from 0.1x (first skip)
to 1x (mid block) and, under guidance, only the conditional half gets them. The scales, start and end
fractions are arguments of the compiled program (changing them compiles nothing); guess mode is part of
the program.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import conditioning, hub, ip_adapter, mask_crop, model_folder, pag, pipeline_xl, pretrained, prompt_syntax
from jaxsd.config import finite32
from jaxsd.diffusion import samplers
from jaxsd.models.controlnet import ControlNetModel
from jaxsd.pipeline import StableDiffusion, with_extra
from jaxsd.pipeline_xl import StableDiffusionXL


def load_controlnets(controlnets, dtype, param_dtype=None, allow_pickle: bool = False) -> tuple[tuple, tuple]:
  """(modules, params) of one ControlNet or a list: each a diffusers ControlNet folder or a (module, params) pair."""
  items = [controlnets] if isinstance(controlnets, (str, os.PathLike)) or _is_pair(controlnets) else list(controlnets)
  if not items:
    raise ValueError("with_controlnet: no ControlNet given; pass a ControlNet folder or a list of them.")
  modules, params = [], []
  for item in items:
    if _is_pair(item):
      module, p = item
    else:
      module, p = pretrained.load_controlnet(os.fspath(item), dtype, param_dtype, allow_pickle=allow_pickle)
    modules.append(module)
    params.append(p)
  return tuple(modules), tuple(params)


def _is_pair(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], ControlNetModel)


def check_fits(pipe: StableDiffusion, controlnet: ControlNetModel, i: int) -> None:
  """Raises a ValueError if ControlNet i cannot steer this pipeline's U-Net and VAE."""
  c, u = controlnet.config, pipe.unet.config
  if (c.addition_embed_type == "text_time") != (u.addition_embed_type == "text_time"):
    model, net = ("an SDXL", "an SD 1.x / 2.x") if u.addition_embed_type == "text_time" else ("an SD 1.x / 2.x",
                                                                                              "an SDXL")
    raise ValueError(f"ControlNet {i} is {net} ControlNet; this is {model} model: give a ControlNet trained for it.")
  mine = (c.block_out_channels, c.layers_per_block, c.cross_attention_dim)
  theirs = (u.block_out_channels, u.layers_per_block, u.cross_attention_dim)
  if mine != theirs:
    raise ValueError(f"ControlNet {i} (block_out_channels, layers_per_block, cross_attention_dim) = "
                     f"{mine} does not match the U-Net's {theirs}: it was trained for another model.")
  if c.in_channels != pipe.vae.config.latent_channels:  # it sees the latents, not an inpainting U-Net's 9 channels
    raise ValueError(f"ControlNet {i} takes {c.in_channels} input channels, the VAE's latents have "
                     f"{pipe.vae.config.latent_channels}: it was trained for another model.")
  if c.conditioning_channels != 3:
    raise ValueError(f"ControlNet {i} takes {c.conditioning_channels}-channel conditions; the pipeline gives RGB "
                     "control images (3 channels): call the ControlNet module directly.")
  if c.conditioning_factor != pipe.vae.config.downsampling_factor:
    raise ValueError(f"ControlNet {i} downsamples its conditioning image by {c.conditioning_factor}, the VAE "
                     f"by {pipe.vae.config.downsampling_factor}: they must agree.")


@dataclasses.dataclass
class StableDiffusionControlNet(StableDiffusion):
  """A StableDiffusion with ControlNets (made by `StableDiffusion.with_controlnet`): text-to-image (`__call__`),
  `img2img` and `inpaint` under them, as diffusers' StableDiffusionControlNet(Img2Img|Inpaint)Pipeline."""

  controlnets: tuple = ()
  controlnet_params: tuple = ()
  INSTRUCT_PIX2PIX: ClassVar[bool] = False  # (instruct_pix2pix: the plain SD and SDXL pipelines only)

  @classmethod
  def from_pipeline(cls, pipe: StableDiffusion, controlnets, dtype=None, param_dtype=None, allow_pickle: bool = False):
    """`pipe` (its networks and parameters shared, LoRA adapters too) with the given ControlNets."""
    dtype = dtype or pipe.unet.dtype
    modules, params = load_controlnets(controlnets, dtype, param_dtype or pipe.unet.param_dtype, allow_pickle)
    base = {
        f.name: getattr(pipe, f.name)
        for f in dataclasses.fields(type(pipe))
        if f.name not in ("controlnets", "controlnet_params")
    }
    out = cls(**base, controlnets=modules, controlnet_params=params)
    for i, module in enumerate(modules):
      check_fits(out, module, i)
    # its LoRA adapters, IP-Adapter, FreeU, PAG, VAE tiling and slicing go on
    for shared in ("_loras", "_ip_adapter", "_freeu", "_pag", "_vae_tiling", "_vae_slicing"):
      if shared in pipe.__dict__:
        out.__dict__[shared] = pipe.__dict__[shared]
    return out

  @classmethod
  def from_pretrained(cls, path: str, dtype=jnp.float32, param_dtype=None, *, controlnets=None,
                      variant: str | None = None, allow_pickle: bool = False, **unet_kwargs):
    """A diffusers ControlNet pipeline folder (or Hub id) with its ControlNets, as diffusers'
    StableDiffusion(XL)ControlNetPipeline.from_pretrained: the base model as the base class's `from_pretrained`
    reads it, and the folders `jaxsd.model_folder.controlnet_folders` lists (controlnet/, and controlnet_1/, ... for
    a MultiControlNetModel), each in its `variant` where it has one. `controlnets` (what `with_controlnet` takes)
    replace the folder's, which are then not read, or steer a folder that has none."""
    path = hub.resolve(path, variant=variant, allow_pickle=allow_pickle)
    if controlnets is None:
      folders = model_folder.controlnet_folders(path)
      if not folders:
        raise ValueError(f"{path} holds no ControlNet (its model_index.json names no controlnet): give controlnets=, "
                         "or load it with jaxsd.pipeline_xl.load.")
    base = super().from_pretrained(path, dtype, param_dtype, variant=variant, allow_pickle=allow_pickle, **unet_kwargs)
    if controlnets is None:
      dtype, param_dtype = base.unet.dtype, base.unet.param_dtype
      controlnets = [
          pretrained.load_controlnet(d, dtype, param_dtype, allow_pickle=allow_pickle,
                                     variant=variant if variant and model_folder.has_weights(d, variant) else None)
          for d in folders
      ]
    return cls.from_pipeline(base, controlnets, allow_pickle=allow_pickle)

  def save_pretrained(self, path: str, dtype=None) -> None:
    """Writes the diffusers ControlNet pipeline folder that DiffusionPipeline.from_pretrained loads as
    StableDiffusion(XL)ControlNetPipeline (and `from_pretrained` here): the base model's folder (the base class's
    `save_pretrained`), each ControlNet in controlnet/, controlnet_1/, ... (as MultiControlNetModel.save_pretrained),
    and model_index.json with the ControlNet pipeline class and the controlnet entry (`write_controlnet_index`)."""
    super().save_pretrained(path, dtype)
    path = os.fspath(path)
    for k, (module, params) in enumerate(zip(self.controlnets, self.controlnet_params)):
      pretrained.save_pretrained(module, jax.device_get(params), model_folder.controlnet_dir(path, k), dtype)
    own = getattr(self, "model_index", {}).get("_class_name") or self.pipeline_class_name  # SDXL's, SD's
    model_folder.write_controlnet_index(path, own, len(self.controlnets))

  @property
  def params(self) -> dict:
    return {**super().params, "controlnet": tuple(self.controlnet_params)}

  @property
  def lcm_img2img(self) -> bool:
    """False: diffusers has no LCM ControlNet pipeline (AutoPipelineForImage2Image refuses an LCM folder with a
    ControlNet); StableDiffusionControlNetImg2ImgPipeline, which cuts the schedule by strength, runs one."""
    return False

  def check_parts(self, where: str) -> None:
    """`StableDiffusion.check_parts`, and each ControlNet against the U-Net (`check_fits`): a U-Net swapped in
    (`swap_unet`) must take their residuals."""
    super().check_parts(where)
    for i, module in enumerate(self.controlnets):
      try:
        check_fits(self, module, i)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None

  def unet_conditioning(self, params, text_cond, control=None):
    """The encoded prompts with what the ControlNets take: `control` as `program` builds it."""
    if control is None:
      raise ValueError("a ControlNet pipeline needs control images.")
    text_cond = text_cond if isinstance(text_cond, dict) else {"context": text_cond}  # SDXL's is a dict
    return dict(text_cond, controlnet=params["controlnet"], **control)

  def apply_unet(self, unet_params, x: jax.Array, t: jax.Array, cond, i=None, x_extra=None, **unet_kwargs) -> jax.Array:
    """The U-Net with the ControlNets' residuals at model call `i`; `cond` as `unet_conditioning` builds it
    (SDXL's with its pooled text embeddings and time ids, which the ControlNets take too). The ControlNets see
    the latents only, not a 9-channel inpainting U-Net's `x_extra` (as diffusers)."""
    context = cond["context"]
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    copies = x.shape[0] // cond["images"][0].shape[0]  # 2 under guidance; PAG's perturbed rows add one (no guess mode)
    guided = copies == 2
    guess = cond["guess"]
    scales = cond["scales"] * cond["keep"][i]
    down = mid = None
    for k, (net, images) in enumerate(zip(self.controlnets, cond["images"])):
      if guess and guided:  # as diffusers: only the conditional half, the other gets nothing
        net_x, net_context = jnp.split(x, 2)[1], jnp.split(context, 2)[1]
        net_added = {name: jnp.split(v, 2)[1] for name, v in added.items()}
      else:
        net_x, net_context, net_added = x, context, added
        images = jnp.concatenate([images] * copies) if copies > 1 else images  # (PAG's rows: the conditional's)
      d, m = net.apply({"params": cond["controlnet"][k]}, net_x, t, net_context, images, scales[k], guess_mode=guess,
                       **net_added)
      down = d if down is None else tuple(a + b for a, b in zip(down, d))
      mid = m if mid is None else mid + m
    if guess and guided:
      down = tuple(jnp.concatenate([jnp.zeros_like(d), d]) for d in down)
      mid = jnp.concatenate([jnp.zeros_like(mid), mid])
    return self.unet.apply({"params": unet_params}, with_extra(x, x_extra), t, context,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid, **added,
                           **unet_kwargs)

  def program(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              guess_mode: bool = False, pag_layers: tuple[str, ...] = ()):
    """`StableDiffusion.program` with the ControlNets' inputs after `keys`:

        fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep,
           image_latents=None, mask=None, masked_image_latents=None, ..., **text)

    `control_images`: one (B, H, W, 3) array in [0, 1] per ControlNet; `scales` (n,) their conditioning
    scales; `keep` (L, n): 1 where ControlNet k acts at model call i, else 0 (`control_keep`). With `pag_layers`
    (Perturbed-Attention Guidance) the perturbed rows' residuals are the conditional rows', as diffusers' PAG
    ControlNet pipelines compute them; not in guess mode, which those pipelines fail on.
    """
    guess = guess_mode or self.controlnets[0].config.global_pool_conditions  # as diffusers
    if pag_layers and guess:
      why = "guess_mode" if guess_mode else "the ControlNet's global_pool_conditions (guess mode)"
      raise ValueError(f"Perturbed-Attention Guidance with {why} is not supported (diffusers' PAG ControlNet "
                       "pipelines fail on it): drop guess_mode, or pipe.disable_pag().")
    base = super().program(guided, output, task, from_noise, pag_layers)

    def fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, *args, **kw):
      control = dict(images=tuple(control_images), scales=scales, keep=keep, guess=guess)
      return base(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, *args, control=control, **kw)

    return fn

  def generate_fn(self, sampler: str, steps: int, guided: bool, output: str, strength: float = 1.0, task: str = "text",
                  guess_mode: bool = False, eta: float = 0.0, pag_layers: tuple[str, ...] = ()):
    """`program` with the schedule of (sampler, steps, strength, eta) fixed: what `python -m sample` pmaps.

    fn(params, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, image_latents=None,
    mask=None, masked_image_latents=None, **text), the ControlNets' inputs as `program` takes them (`keep`
    for this schedule's model calls: `control_keep`), the rest as `StableDiffusion.generate_fn`'s.
    """
    schedule = samplers.make_schedule(self.scheduler_config, sampler, steps, strength=strength, eta=eta)
    prog = self.program(guided, output, task, from_noise=task == "text" or (task == "inpaint" and strength == 1.0),
                        guess_mode=guess_mode, pag_layers=pag_layers)

    def fn(params, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, image_latents=None,
           mask=None, masked_image_latents=None, **text):
      return prog(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep,
                  image_latents, mask, masked_image_latents, **text)

    return fn

  def _jitted(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              guess_mode: bool = False, pag_layers: tuple[str, ...] = ()):
    key = (("controlnet", guided, output, task, from_noise, guess_mode) + ((pag_layers,) if pag_layers else
                                                                           ()) + self.vae_key())
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self.program(guided, output, task, from_noise, guess_mode, pag_layers))
    return self._compiled[key]

  def _run(self, task, from_noise, prompts, negative_prompts, steps, sampler, strength, guidance_scale, seed, noise,
           output, *, control: ControlRequest, denoising_start=None, denoising_end=None, **kwargs):
    """`StableDiffusion._run` with the control images prepared at the output's size for this batch, and the
    ControlNets' window over this schedule's model calls."""
    f = self.vae.config.downsampling_factor
    height, width, b = noise.shape[1] * f, noise.shape[2] * f, len(prompts)
    n = len(self.controlnets)
    images = []
    for k, x in enumerate(control.per_net):
      im = prepare_control_images(x, height, width, f"control_images[{k}]" if n > 1 else "control_images")
      if im.shape[0] not in (1, b):
        raise ValueError(f"{im.shape[0]} control images for ControlNet {k} and {b} prompts: give one image, or "
                         "one per prompt.")
      images.append(jnp.asarray(np.repeat(im, b, axis=0) if im.shape[0] == 1 else im))
    schedule = samplers.make_schedule(self.scheduler_config, sampler, steps, strength=strength,
                                      denoising_start=denoising_start, denoising_end=denoising_end,
                                      eta=kwargs.get("eta", 0.0))
    keep = control_keep(schedule.timesteps.shape[0], control.start, control.end)
    return super()._run(task, from_noise, prompts, negative_prompts, steps, sampler, strength, guidance_scale, seed,
                        noise, output, denoising_start=denoising_start, denoising_end=denoising_end,
                        program_options={"guess_mode": control.guess_mode}, control_images=tuple(images),
                        scales=jnp.asarray(control.scales, jnp.float32), keep=jnp.asarray(keep), **kwargs)

  def _control(self, control_images, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
               guess_mode) -> ControlRequest:
    n = len(self.controlnets)
    scales, start, end = control_settings(n, controlnet_conditioning_scale, control_guidance_start,
                                          control_guidance_end)
    return ControlRequest(self._per_net(control_images, n), scales, start, end, bool(guess_mode))

  def __call__(self, prompts, control_images, negative_prompts=None, height: int | None = None,
               width: int | None = None, steps: int = 50, guidance_scale: float = 7.5, sampler: str | None = None,
               seed: int = 0, latents=None, output: str = "np", controlnet_conditioning_scale=1.0,
               control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False,
               long_prompts: bool = False, prompt_weighting: bool = False, eta: float = 0.0, ip_adapter_image=None,
               ip_adapter_image_embeds=None, ip_adapter_masks=None, pag_scale: float | None = None,
               pag_adaptive_scale: float = 0.0):
    """Text to image under the ControlNets, as diffusers' StableDiffusionControlNetPipeline.

    Args:
      prompts: a prompt, or one per image.
      control_images: the conditioning images (PIL image(s), uint8 or [0, 1] float NHWC arrays): with one
        ControlNet an image or a batch, with several a list of one image or (B, H, W, 3) array per ControlNet,
        or (as diffusers) a list of lists: per prompt, one image per ControlNet. One image serves the batch.
        PIL images of another size are resized (Lanczos, as diffusers); arrays must have the output's size.
      height, width: default to the (first) control image's size.
      controlnet_conditioning_scale: a float, or one per ControlNet.
      control_guidance_start, control_guidance_end: the fraction of model calls where each ControlNet acts
        (call i of L when start <= i / L and (i + 1) / L <= end): a float, or one per ControlNet.
      guess_mode: residuals from 0.1x to 1x from the first skip to the mid block, and (under guidance)
        only the conditional half steered; turned on by the first ControlNet's global_pool_conditions.
      latents, output, steps, sampler, seed, guidance_scale, long_prompts, prompt_weighting, eta, ip_adapter_image,
        ip_adapter_image_embeds, pag_scale, pag_adaptive_scale: as `StableDiffusion.__call__` (an IP-Adapter and
        Perturbed-Attention Guidance act in the U-Net, not the ControlNets, as diffusers'; PAG not in guess mode).
    """
    return self._control_call(prompts, control_images, negative_prompts, height, width, steps, guidance_scale, sampler,
                              seed, latents, output, controlnet_conditioning_scale,
                              control_guidance_start, control_guidance_end, guess_mode,
                              prompt_syntax.options(long_prompts, prompt_weighting), eta,
                              **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                              **pag.call_options(pag_scale, pag_adaptive_scale))

  def _control_call(self, prompts, control_images, negative_prompts, height, width, steps, guidance_scale, sampler,
                    seed, latents, output, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                    guess_mode, text_options: dict, eta: float = 0.0, **run_options):
    control = self._control(control_images, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                            guess_mode)
    if latents is None:
      height, width = output_size(self, control.per_net[0], height, width)
    if isinstance(prompts, str):
      prompts = [prompts] * max(_count(x) for x in control.per_net)
    return self._text_to_image(prompts, negative_prompts, height, width, steps, guidance_scale, sampler, seed, latents,
                               output, text_options=text_options, control=control, eta=eta, **run_options)

  def img2img(self, prompts, init_images, control_images, strength: float = 0.8, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 7.5, sampler: str | None = None, seed: int = 0, output: str = "np", noise=None,
              image_latents=None, controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
              control_guidance_end=1.0, guess_mode: bool = False, long_prompts: bool = False,
              prompt_weighting: bool = False, eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None,
              ip_adapter_masks=None, pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Image to image under the ControlNets, as diffusers' StableDiffusionControlNetImg2ImgPipeline: the arguments
    of `StableDiffusion.img2img` and the ControlNets' of `__call__`, with diffusers' defaults (strength 0.8,
    conditioning scale 0.8); the control images are resized to the init images' size (PIL) or must have it (arrays),
    and the ControlNets' start/end fractions count the model calls that run (after `strength` cut the schedule)."""
    control = self._control(control_images, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                            guess_mode)
    return self._image_to_image(prompts, init_images, strength, negative_prompts, steps, guidance_scale, sampler, seed,
                                output, noise, image_latents,
                                text_options=prompt_syntax.options(long_prompts,
                                                                   prompt_weighting), control=control, eta=eta,
                                **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                                **pag.call_options(pag_scale, pag_adaptive_scale))

  def inpaint(self, prompts, images, mask_images, control_images, strength: float = 1.0, negative_prompts=None,
              steps: int = 50, guidance_scale: float = 7.5, sampler: str | None = None, seed: int = 0,
              output: str = "np", latents=None, masked_image_latents=None, image_latents=None,
              controlnet_conditioning_scale=0.5, control_guidance_start=0.0, control_guidance_end=1.0,
              guess_mode: bool = False, long_prompts: bool = False, prompt_weighting: bool = False,
              padding_mask_crop: int | None = None, height: int | None = None, width: int | None = None,
              eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
              pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Inpainting under the ControlNets, as diffusers' StableDiffusionControlNetInpaintPipeline: the arguments of
    `StableDiffusion.inpaint` (9-channel U-Nets and 4-channel latent blending alike; the ControlNets see the 4
    latent channels) and the ControlNets' of `__call__` (conditioning scale 0.5 by default, as diffusers). With
    `padding_mask_crop` the control images are cropped and resized with the images (diffusers' "fill" crop of the
    same box)."""
    control = self._control(control_images, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                            guess_mode)
    return self._inpaint(prompts, images, mask_images, strength, negative_prompts, steps, guidance_scale, sampler, seed,
                         output, latents, masked_image_latents, image_latents,
                         prompt_syntax.options(long_prompts, prompt_weighting), padding_mask_crop, height, width,
                         control=control, eta=eta,
                         **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                         **pag.call_options(pag_scale, pag_adaptive_scale))

  def _crop_run_options(self, kwargs: dict, crops: mask_crop.Crops) -> dict:
    """The control images cropped to each image's box and resized as the images are (diffusers' "fill")."""
    control: ControlRequest = kwargs["control"]
    cropped = []
    for k, entry in enumerate(control.per_net):
      name = f"control_images[{k}]" if len(control.per_net) > 1 else "control_images"
      images = conditioning.to_uint8(conditioning.as_images(entry, name))
      if images.shape[0] not in (1, len(crops.boxes)):
        raise ValueError(f"{images.shape[0]} control images for ControlNet {k} and {len(crops.boxes)} images: give "
                         "one, or one per image.")
      if images.shape[1:3] != crops.originals.shape[1:3]:
        raise ValueError(f"{name} are {images.shape[1]}x{images.shape[2]}, the images {crops.originals.shape[1]}x"
                         f"{crops.originals.shape[2]}: with padding_mask_crop they are cropped together; give them "
                         "the images' size.")
      cropped.append(mask_crop.crop_like(images, crops))
    return dict(kwargs, control=dataclasses.replace(control, per_net=cropped))

  @staticmethod
  def _per_net(control_images, n: int) -> list:
    """One image or batch per ControlNet. As diffusers: with several ControlNets, a list of lists holds one
    list per prompt, each with one image per ControlNet."""
    if n == 1:
      return [control_images]
    if isinstance(control_images, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in control_images):
      if any(not isinstance(x, (list, tuple)) or len(x) != n for x in control_images):
        raise ValueError(f"control_images: a list of lists holds one list per prompt, each with one image per "
                         f"ControlNet ({n}); got lists of lengths {[np.shape(x)[:1] for x in control_images]}.")
      control_images = [list(t) for t in zip(*control_images)]
    if not isinstance(control_images, (list, tuple)) or len(control_images) != n:
      got = len(control_images) if isinstance(control_images, (list, tuple)) else "not a list of"
      raise ValueError(f"control_images: {got} entries for {n} ControlNets; give a list with one image (or batch) "
                       "per ControlNet.")
    return list(control_images)


@dataclasses.dataclass(frozen=True)
class ControlRequest:
  """The ControlNet arguments of one call, checked: the images (one entry per ControlNet, as given), and one
  scale, start and end fraction per ControlNet."""

  per_net: list
  scales: list[float]
  start: list[float]
  end: list[float]
  guess_mode: bool


def _count(images) -> int:
  """How many images a control entry holds (a PIL image or an HWC array: 1)."""
  if isinstance(images, (list, tuple)):
    return len(images)
  return 1 if hasattr(images, "mode") or np.ndim(images) == 3 else np.shape(images)[0]


@dataclasses.dataclass
class StableDiffusionXLControlNet(StableDiffusionControlNet, StableDiffusionXL):
  """An SDXL base model with ControlNets (made by `StableDiffusionXL.with_controlnet`): text-to-image, img2img and
  inpainting."""

  def __call__(self, prompts, control_images, negative_prompts=None, height: int | None = None,
               width: int | None = None, steps: int = 50, guidance_scale: float = 5.0, sampler: str | None = None,
               seed: int = 0, latents=None, output: str = "np", controlnet_conditioning_scale=1.0,
               control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False, *, prompts_2=None,
               negative_prompts_2=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
               negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
               long_prompts: bool = False, prompt_weighting: bool = False, eta: float = 0.0, ip_adapter_image=None,
               ip_adapter_image_embeds=None, ip_adapter_masks=None, pag_scale: float | None = None,
               pag_adaptive_scale: float = 0.0):
    """Text to image under the ControlNets, as diffusers' StableDiffusionXLControlNetPipeline: the arguments of
    `StableDiffusionControlNet.__call__` and SDXL's (`StableDiffusionXL.__call__`: second prompts, size
    conditioning, which defaults to the output size, long and weighted prompts); the default sampler is the
    folder's scheduler's."""
    options = pipeline_xl.text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                                       negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                       **prompt_syntax.options(long_prompts, prompt_weighting))
    return self._control_call(prompts, control_images, negative_prompts, height, width, steps, guidance_scale,
                              sampler or self.default_sampler, seed, latents, output, controlnet_conditioning_scale,
                              control_guidance_start, control_guidance_end, guess_mode, options, eta,
                              **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                              **pag.call_options(pag_scale, pag_adaptive_scale))

  def img2img(self, prompts, init_images, control_images, strength: float = 0.8, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 5.0, sampler: str | None = None, seed: int = 0, output: str = "np", noise=None,
              image_latents=None, controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
              control_guidance_end=1.0, guess_mode: bool = False, *, prompts_2=None, negative_prompts_2=None,
              original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
              negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score: float = 6.0,
              negative_aesthetic_score: float = 2.5, long_prompts: bool = False, prompt_weighting: bool = False,
              eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
              pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Image to image under the ControlNets, as diffusers' StableDiffusionXLControlNetImg2ImgPipeline: the
    arguments of `StableDiffusionControlNet.img2img` and SDXL's (`StableDiffusionXL.img2img`)."""
    options = pipeline_xl.text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                                       negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                       aesthetic_score=aesthetic_score,
                                       negative_aesthetic_score=negative_aesthetic_score, image_to_image=True,
                                       **prompt_syntax.options(long_prompts, prompt_weighting))
    control = self._control(control_images, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                            guess_mode)
    return self._image_to_image(prompts, init_images, strength, negative_prompts, steps, guidance_scale, sampler or
                                self.default_sampler, seed, output, noise, image_latents, text_options=options,
                                control=control, eta=eta,
                                **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                                **pag.call_options(pag_scale, pag_adaptive_scale))

  def inpaint(self, prompts, images, mask_images, control_images, strength: float = 0.9999, negative_prompts=None,
              steps: int = 50, guidance_scale: float = 5.0, sampler: str | None = None, seed: int = 0,
              output: str = "np", latents=None, masked_image_latents=None, image_latents=None,
              controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
              guess_mode: bool = False, padding_mask_crop: int | None = None, height: int | None = None,
              width: int | None = None, *, prompts_2=None, negative_prompts_2=None, original_size=None,
              crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
              negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score: float = 6.0,
              negative_aesthetic_score: float = 2.5, long_prompts: bool = False, prompt_weighting: bool = False,
              eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
              pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Inpainting under the ControlNets, as diffusers' StableDiffusionXLControlNetInpaintPipeline: the arguments
    of `StableDiffusionXL.inpaint` and the ControlNets' of `__call__` (scale 1 by default, as diffusers')."""
    options = pipeline_xl.text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                                       negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                       aesthetic_score=aesthetic_score,
                                       negative_aesthetic_score=negative_aesthetic_score, image_to_image=True,
                                       **prompt_syntax.options(long_prompts, prompt_weighting))
    control = self._control(control_images, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                            guess_mode)
    return self._inpaint(prompts, images, mask_images, strength, negative_prompts, steps, guidance_scale, sampler or
                         self.default_sampler, seed, output, latents, masked_image_latents, image_latents, options,
                         padding_mask_crop, height, width, control=control, eta=eta,
                         **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                         **pag.call_options(pag_scale, pag_adaptive_scale))


def control_settings(n: int, scale, start, end) -> tuple[list[float], list[float], list[float]]:
  """(scales, starts, ends), one per ControlNet, from a number or one per ControlNet each; a ValueError
  that says what to give otherwise."""
  scales = _per_controlnet(scale, n, "controlnet_conditioning_scale")
  start = _per_controlnet(start, n, "control_guidance_start")
  end = _per_controlnet(end, n, "control_guidance_end")
  for k, (s, e) in enumerate(zip(start, end)):
    if not 0.0 <= s < e <= 1.0:
      raise ValueError(f"control_guidance_start={s} and control_guidance_end={e} (ControlNet {k}): need "
                       "0 <= start < end <= 1.")
  if not finite32(scales):  # (1e39: inf in fp32)
    raise ValueError(f"controlnet_conditioning_scale={scales}: give finite numbers (1: as trained, 0: off).")
  return scales, start, end


def control_keep(calls: int, start: Sequence[float], end: Sequence[float]) -> np.ndarray:
  """(calls, n) float32: 1 where ControlNet k acts at model call i, as diffusers' `controlnet_keep`."""
  return np.array(
      [[1.0 - float(i / calls < s or (i + 1) / calls > e) for s, e in zip(start, end)] for i in range(calls)],
      np.float32)


def _per_controlnet(value, n: int, name: str) -> list[float]:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} values for {n} ControlNets; give one number, or one per "
                       "ControlNet.")
    return [float(v) for v in value]
  return [float(value)] * n


def output_size(pipe, images: Any, height: int | None, width: int | None) -> tuple[int, int]:
  """(height, width): those given, the others the (first) control image's, as diffusers'; a ValueError that
  names the image when a side it sets is not a multiple the VAE takes (the message named a height not given)."""
  if height is not None and width is not None:
    return height, width
  h, w = image_size(images)
  m = max(8, pipe.vae.config.downsampling_factor)
  if (height is None and h % m) or (width is None and w % m):
    raise ValueError(f"the control image is {w}x{h} pixels (WxH) and sets the output size, whose sides must be "
                     f"multiples of {m} for this model: give height and width (--height / --width; the control "
                     f"images are resized to them) or resize it (e.g. to {max(w // m, 1) * m}x{max(h // m, 1) * m}).")
  return height or h, width or w


def image_size(images: Any) -> tuple[int, int]:
  """(height, width) of an image, a batch or the first of a list."""
  first = images[0] if isinstance(images, (list, tuple)) and images else images
  if hasattr(first, "size") and hasattr(first, "mode"):  # PIL
    return first.size[1], first.size[0]
  shape = np.shape(first)
  return (shape[0], shape[1]) if len(shape) == 3 else (shape[1], shape[2])


def prepare_control_images(images: Any, height: int, width: int, name: str) -> np.ndarray:
  """As diffusers' ControlNet image processor: RGB in [0, 1] (no normalisation), PIL images resized."""
  from PIL import Image

  items = images if isinstance(images, (list, tuple)) else [images]
  if all(hasattr(x, "mode") for x in items):
    items = [x if x.size == (width, height) else x.convert("RGB").resize((width, height), Image.LANCZOS) for x in items]
    images = items
  out = conditioning.as_images(images, name)
  if out.shape[1:3] != (height, width):
    raise ValueError(f"{name} are {out.shape[1]}x{out.shape[2]}, the output {height}x{width}: give arrays of the "
                     "output's size (or PIL images, which are resized).")
  return out
