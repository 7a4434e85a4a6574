"""Text-to-image steered by ControlNets (diffusers' StableDiffusionControlNetPipeline and MultiControlNet, and
StableDiffusionXLControlNetPipeline for SDXL).

    pipe = jaxsd.StableDiffusion.from_pretrained("sd").with_controlnet(["canny", "depth"])
    images = pipe(prompts, control_images=[edges, depths], controlnet_conditioning_scale=[1.0, 0.5])

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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import conditioning, pretrained
from jaxsd.diffusion import samplers
from jaxsd.models.controlnet import ControlNetModel
from jaxsd.pipeline import StableDiffusion, _finish, _syntax
from jaxsd.pipeline_xl import StableDiffusionXL


def load_controlnets(controlnets, dtype, param_dtype=None) -> tuple[tuple, tuple]:
  """(modules, params) of one ControlNet or a list: each a diffusers ControlNet folder or a (module, params) pair."""
  items = [controlnets] if isinstance(controlnets, (str, os.PathLike)) or _is_pair(controlnets) else list(controlnets)
  if not items:
    raise ValueError("with_controlnet: no ControlNet given; pass a ControlNet folder or a list of them.")
  modules, params = [], []
  for item in items:
    if _is_pair(item):
      module, p = item
    else:
      module, p = pretrained.load_controlnet(os.fspath(item), dtype, param_dtype)
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
  mine = (c.block_out_channels, c.layers_per_block, c.cross_attention_dim, c.in_channels)
  theirs = (u.block_out_channels, u.layers_per_block, u.cross_attention_dim, u.in_channels)
  if mine != theirs:
    raise ValueError(f"ControlNet {i} (block_out_channels, layers_per_block, cross_attention_dim, in_channels) = "
                     f"{mine} does not match the U-Net's {theirs}: it was trained for another model.")
  if c.conditioning_channels != 3:
    raise ValueError(f"ControlNet {i} takes {c.conditioning_channels}-channel conditions; the pipeline gives RGB "
                     "control images (3 channels): call the ControlNet module directly.")
  if c.conditioning_factor != pipe.vae.config.downsampling_factor:
    raise ValueError(f"ControlNet {i} downsamples its conditioning image by {c.conditioning_factor}, the VAE "
                     f"by {pipe.vae.config.downsampling_factor}: they must agree.")


@dataclasses.dataclass
class StableDiffusionControlNet(StableDiffusion):
  """A StableDiffusion with ControlNets (made by `StableDiffusion.with_controlnet`); runs text-to-image."""

  controlnets: tuple = ()
  controlnet_params: tuple = ()

  @classmethod
  def from_pipeline(cls, pipe: StableDiffusion, controlnets, dtype=None, param_dtype=None):
    """`pipe` (its networks and parameters shared, LoRA adapters too) with the given ControlNets."""
    dtype = dtype or pipe.unet.dtype
    modules, params = load_controlnets(controlnets, dtype, param_dtype or pipe.unet.param_dtype)
    base = {
        f.name: getattr(pipe, f.name)
        for f in dataclasses.fields(type(pipe))
        if f.name not in ("controlnets", "controlnet_params")
    }
    out = cls(**base, controlnets=modules, controlnet_params=params)
    for i, module in enumerate(modules):
      check_fits(out, module, i)
    if "_loras" in pipe.__dict__:
      out.__dict__["_loras"] = pipe.__dict__["_loras"]
    return out

  @property
  def params(self) -> dict:
    return {**super().params, "controlnet": tuple(self.controlnet_params)}

  def check_task(self, task: str) -> None:
    if task != "text":
      raise ValueError(f"task {task!r}: this ControlNet pipeline runs text-to-image only; call {task} on the "
                       "pipeline without ControlNets.")
    super().check_task(task)

  def apply_unet(self, unet_params, x: jax.Array, t: jax.Array, cond) -> jax.Array:
    """The U-Net with the ControlNets' residuals; `cond` as `program` builds it (SDXL's with its pooled
    text embeddings and time ids, which the ControlNets take too)."""
    context = cond["context"]
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    guided = x.shape[0] == 2 * cond["images"][0].shape[0]
    guess = cond["guess"]
    down = mid = None
    for k, (net, images) in enumerate(zip(self.controlnets, cond["images"])):
      if guess and guided:  # as diffusers: only the conditional half, the other gets nothing
        net_x, net_context = jnp.split(x, 2)[1], jnp.split(context, 2)[1]
        net_added = {name: jnp.split(v, 2)[1] for name, v in added.items()}
      else:
        net_x, net_context, net_added = x, context, added
        images = jnp.concatenate([images, images]) if guided else images
      d, m = net.apply({"params": cond["controlnet"][k]}, net_x, t, net_context, images, cond["scales"][k],
                       guess_mode=guess, **net_added)
      down = d if down is None else tuple(a + b for a, b in zip(down, d))
      mid = m if mid is None else mid + m
    if guess and guided:
      down = tuple(jnp.concatenate([jnp.zeros_like(d), d]) for d in down)
      mid = jnp.concatenate([jnp.zeros_like(mid), mid])
    return self.unet.apply({"params": unet_params}, x, t, context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid, **added)

  def program(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              guess_mode: bool = False):
    """The pure function of one generation:

        fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, **text)

    `control_images`: one (B, H, W, 3) array in [0, 1] per ControlNet; `scales` (n,) their conditioning
    scales; `keep` (L, n): 1 where ControlNet k acts at model call i, else 0 (`control_keep`).
    """
    self.check_task(task)
    if output not in ("np", "latent"):
      raise ValueError(f"output={output!r}: the program returns 'np' (uint8) or 'latent'.")
    guess = guess_mode or self.controlnets[0].config.global_pool_conditions  # as diffusers

    def fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, **text):
      encoded = self.encode_prompts(params, ids, uncond_ids, guided, **text)
      text_cond = encoded if isinstance(encoded, dict) else {"context": encoded}  # SDXL's is a dict
      x = samplers.prepare_latents(schedule, noise)

      def body(carry, i):  # samplers.sample's loop, with the call index for the ControlNets' keep
        x, state = carry
        cond = dict(text_cond, controlnet=params["controlnet"], images=control_images, scales=scales * keep[i],
                    guess=guess)
        model_fn = self.denoiser(params["unet"], cond, guidance_scale, guided)
        out = model_fn(samplers.model_input(schedule, i, x), schedule.timesteps[i])
        return samplers.step(schedule, i, x, out, state, samplers.step_noise(schedule, i, x, keys)), None

      (latents, _), _ = jax.lax.scan(body, (x, samplers.init_state(schedule, x)),
                                     jnp.arange(schedule.timesteps.shape[0]))
      if output == "latent":
        return latents
      return jnp.round(self.decode(params["vae"], latents) * 255).astype(jnp.uint8)

    return fn

  def generate_fn(self, sampler: str, steps: int, guided: bool, output: str, strength: float = 1.0, task: str = "text",
                  guess_mode: bool = False):
    """`program` with the schedule of (sampler, steps) fixed: what `python -m sample` pmaps.

    fn(params, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, **text), the
    last three as `program` takes them (`keep` for this schedule's model calls: `control_keep`).
    """
    if strength != 1.0:
      raise ValueError(f"strength={strength}: this ControlNet pipeline runs text-to-image only (strength 1).")
    schedule = samplers.make_schedule(self.scheduler_config, sampler, steps)
    prog = self.program(guided, output, task, guess_mode=guess_mode)

    def fn(params, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, **text):
      return prog(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, control_images, scales, keep, **text)

    return fn

  def _jitted_control(self, guided: bool, output: str, guess_mode: bool):
    key = ("controlnet", guided, output, guess_mode)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self.program(guided, output, guess_mode=guess_mode))
    return self._compiled[key]

  def __call__(self, prompts, control_images, negative_prompts=None, height: int | None = None,
               width: int | None = None, steps: int = 50, guidance_scale: float = 7.5, sampler: str = "pndm",
               seed: int = 0, latents=None, output: str = "np", controlnet_conditioning_scale=1.0,
               control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False,
               long_prompts: bool = False, prompt_weighting: bool = False):
    """Text to image under the ControlNets, as diffusers' StableDiffusionControlNetPipeline.

    Args:
      prompts: a prompt, or one per image.
      control_images: the conditioning images (PIL image(s), uint8 or [0, 1] float NHWC arrays): with one
        ControlNet an image or a batch, with several a list of one image or (B, H, W, 3) array per ControlNet,
        or (as diffusers) a list of lists: per prompt, one image per ControlNet. One image serves the batch. PIL images of another size are resized (Lanczos, as diffusers);
        arrays must have the output's size.
      height, width: default to the (first) control image's size.
      controlnet_conditioning_scale: a float, or one per ControlNet.
      control_guidance_start, control_guidance_end: the fraction of model calls where each ControlNet acts
        (call i of L when start <= i / L and (i + 1) / L <= end): a float, or one per ControlNet.
      guess_mode: residuals from 0.1x to 1x from the first skip to the mid block, and (under guidance)
        only the conditional half steered; turned on by the first ControlNet's global_pool_conditions.
      latents, output, steps, sampler, seed, guidance_scale, long_prompts, prompt_weighting: as
        `StableDiffusion.__call__`.
    """
    return self._control_call(prompts, control_images, negative_prompts, height, width, steps, guidance_scale, sampler,
                              seed, latents, output, controlnet_conditioning_scale, control_guidance_start,
                              control_guidance_end, guess_mode, _syntax(long_prompts, prompt_weighting))

  def _control_call(self, prompts, control_images, negative_prompts, height, width, steps, guidance_scale, sampler,
                    seed, latents, output, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                    guess_mode, text_options: dict):
    self.check_task("text")
    n = len(self.controlnets)
    per_net = self._per_net(control_images, n)
    scales, start, end = control_settings(n, controlnet_conditioning_scale, control_guidance_start,
                                          control_guidance_end)
    if height is None or width is None:
      size = image_size(per_net[0])
      if latents is not None and np.ndim(latents) == 4:
        f = self.vae.config.downsampling_factor
        size = (np.shape(latents)[1] * f, np.shape(latents)[2] * f)
      height, width = height or size[0], width or size[1]
    images = [
        prepare_control_images(x, height, width, f"control_images[{k}]" if n > 1 else "control_images")
        for k, x in enumerate(per_net)
    ]
    if isinstance(prompts, str):
      prompts = [prompts] * max(im.shape[0] for im in images)
    given = negative_prompts
    prompts, negative_prompts = self.check_inputs(prompts, negative_prompts, height, width, steps, sampler, output,
                                                  guidance_scale)
    b = len(prompts)
    for k, im in enumerate(images):
      if im.shape[0] not in (1, b):
        raise ValueError(f"{im.shape[0]} control images for ControlNet {k} and {b} prompts: give one image, or "
                         "one per prompt.")
    images = tuple(jnp.asarray(np.repeat(im, b, axis=0) if im.shape[0] == 1 else im) for im in images)
    noise = self._given_noise(latents, "latents", b, height, width, seed)

    schedule = samplers.make_schedule(self.scheduler_config, sampler, steps)
    keep = control_keep(schedule.timesteps.shape[0], start, end)
    guided = guidance_scale > 1.0
    ids, uncond_ids, text = self.text_inputs(prompts, None if given is None else negative_prompts, height, width,
                                             **text_options)
    fn = self._jitted_control(guided, "latent" if output == "latent" else "np", bool(guess_mode))
    out = fn(self.params, schedule, ids, uncond_ids, noise, jnp.float32(guidance_scale), self.sampler_keys(seed, b),
             images, jnp.asarray(scales, jnp.float32), jnp.asarray(keep), **text)
    return _finish(out, output)

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


@dataclasses.dataclass
class StableDiffusionXLControlNet(StableDiffusionControlNet, StableDiffusionXL):
  """An SDXL base model with ControlNets (made by `StableDiffusionXL.with_controlnet`); runs text-to-image."""

  def __call__(self, prompts, control_images, negative_prompts=None, height: int | None = None,
               width: int | None = None, steps: int = 50, guidance_scale: float = 5.0, sampler: str | None = None,
               seed: int = 0, latents=None, output: str = "np", controlnet_conditioning_scale=1.0,
               control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False, *, prompts_2=None,
               negative_prompts_2=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
               negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None):
    """Text to image under the ControlNets, as diffusers' StableDiffusionXLControlNetPipeline: the arguments of
    `StableDiffusionControlNet.__call__` and SDXL's (`StableDiffusionXL.__call__`: second prompts, size
    conditioning, which defaults to the output size); the default sampler is the folder's scheduler's."""
    options = dict(prompts_2=prompts_2, negative_prompts_2=negative_prompts_2, original_size=original_size,
                   crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                   negative_original_size=negative_original_size,
                   negative_crops_coords_top_left=negative_crops_coords_top_left,
                   negative_target_size=negative_target_size)
    return self._control_call(prompts, control_images, negative_prompts, height, width, steps, guidance_scale,
                              sampler or self.default_sampler, seed, latents, output, controlnet_conditioning_scale,
                              control_guidance_start, control_guidance_end, guess_mode, options)


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
  if not all(np.isfinite(scales)):
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
