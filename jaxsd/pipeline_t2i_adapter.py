"""Text-to-image steered by T2I-Adapters (diffusers' StableDiffusionAdapterPipeline and, for SDXL,
StableDiffusionXLAdapterPipeline; several adapters as its MultiAdapter), through the programs of `StableDiffusion`
with the adapters' features added inside the U-Net's encoder (`down_intrablock_additional_residuals`).

    pipe = StableDiffusionAdapter.from_pipeline(jaxsd.StableDiffusion.from_pretrained("sd"), "t2iadapter_canny")
    images = pipe(prompts, adapter_images=edges, adapter_conditioning_scale=0.8)
    xl = StableDiffusionAdapter.from_pipeline(jaxsd.StableDiffusionXL.from_pretrained("sdxl"), ["canny", "depth"])
    images = xl(prompts, adapter_images=[edges, depth], adapter_conditioning_scale=[0.8, 0.5],
                adapter_conditioning_factor=0.5)

As diffusers: each adapter sees its image once per call (resized to the output size with Lanczos, in [0, 1], grey
for one-channel adapters), before the denoising loop; its feature maps are scaled by its conditioning scale
(several adapters: summed, each weighted by its scale, MultiAdapter's `adapter_weights`), repeated for every image
of the batch and for both halves of classifier-free guidance, and added at every model call (SDXL: the first
int(steps x adapter_conditioning_factor) calls). The scales and the calls that get the features are arguments of the
compiled program: other values compile nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import conditioning, ip_adapter, pag, pipeline_xl, pretrained, prompt_syntax
from jaxsd.config import finite32
from jaxsd.models.t2i_adapter import T2IAdapter
from jaxsd.pipeline import StableDiffusion, with_extra
from jaxsd.pipeline_xl import StableDiffusionXL


def load_adapters(adapters, dtype, param_dtype=None, allow_pickle: bool = False) -> tuple[tuple, tuple]:
  """(modules, params) of one T2I-Adapter or a list: each a diffusers T2IAdapter folder (or Hub id) or a
  (module, params) pair from `jaxsd.load_t2i_adapter`."""
  single = isinstance(adapters, (str, os.PathLike)) or _is_pair(adapters)
  items = [adapters] if single else list(adapters)
  if not items:
    raise ValueError("no T2I-Adapter given; pass a T2IAdapter folder or a list of them.")
  modules, params = [], []
  for item in items:
    module, p = item if _is_pair(item) else pretrained.load_t2i_adapter(os.fspath(item), dtype, param_dtype,
                                                                        allow_pickle=allow_pickle)
    modules.append(module)
    params.append(p)
  return tuple(modules), tuple(params)


def _is_pair(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], T2IAdapter)


def unet_targets(cfg, height: int, width: int) -> tuple[list[tuple[int, int, int]], tuple[int, int, int] | None]:
  """(shape (h, w, c) of the feature each down block adds, in order; the mid block output's, or None) of a U-Net of
  config `cfg` at latents of height x width: a cross-attention block's before its downsampler, a DownBlock2D's
  after it (diffusers' places)."""
  h, w = height, width
  out = []
  n = len(cfg.block_out_channels)
  for i, (kind, c) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
    final = i == n - 1
    smaller = (h, w) if final else ((h + 1) // 2, (w + 1) // 2)
    out.append((h, w, c) if kind == "CrossAttnDownBlock2D" else smaller + (c,))
    h, w = smaller
  return out, None if cfg.mid_block_type is None else (h, w, cfg.block_out_channels[-1])


def check_fits(pipe: StableDiffusion, adapter: T2IAdapter, i: int, height: int, width: int) -> None:
  """Raises a ValueError when adapter i's features at height x width do not fit the U-Net's blocks, as diffusers'
  U-Net would fail to add them (a feature map past the down blocks that is not the mid block's shape is unused, as
  in diffusers)."""
  f = pipe.vae.config.downsampling_factor
  down, _ = unet_targets(pipe.unet.config, height // f, width // f)
  for j, (got, want) in enumerate(zip(adapter.config.feature_shapes(height, width), down)):
    if got != want:
      raise ValueError(f"T2I-Adapter {i}: its feature map {j} at {width}x{height} px has {got[2]} channels at "
                       f"{got[1]}x{got[0]}, the U-Net's down block {j} takes {want[2]} at {want[1]}x{want[0]}: the "
                       "adapter was trained for another model (SD 1.x / 2.x adapters: downscale_factor 8, SDXL: 16).")


@dataclasses.dataclass
class StableDiffusionAdapter(StableDiffusion):
  """A StableDiffusion with T2I-Adapters (made by `from_pipeline`): text-to-image under them, as diffusers'
  StableDiffusionAdapterPipeline (one adapter, or several as its MultiAdapter)."""

  adapters: tuple = ()
  adapter_params: tuple = ()
  INSTRUCT_PIX2PIX: ClassVar[bool] = False  # (instruct_pix2pix: the plain SD and SDXL pipelines only)

  @classmethod
  def from_pipeline(cls, pipe: StableDiffusion, adapters, dtype=None, param_dtype=None, allow_pickle: bool = False):
    """`pipe` (its networks and parameters shared, LoRA adapters, IP-Adapter, FreeU and PAG settings too) steered
    by `adapters`: a diffusers T2IAdapter folder or Hub id, a (module, params) pair from `jaxsd.load_t2i_adapter`,
    or a list of them (MultiAdapter). An SDXL base pipeline gives a `StableDiffusionXLAdapter`. The adapters
    compute in `dtype` (default: the U-Net's)."""
    if getattr(pipe, "controlnets", ()):
      raise ValueError("T2I-Adapters with ControlNets are not supported (diffusers has no such pipeline): steer the "
                       "plain model.")
    if isinstance(pipe, StableDiffusionXL):
      if pipe.text_encoder is None:
        raise ValueError("this is an SDXL refiner (no first text encoder); T2I-Adapters steer the base model, as "
                         "diffusers' StableDiffusionXLAdapterPipeline.")
      cls = StableDiffusionXLAdapter
    modules, params = load_adapters(adapters, dtype or pipe.unet.dtype, param_dtype or pipe.unet.param_dtype,
                                    allow_pickle)
    first = modules[0].config
    for k, module in enumerate(modules[1:], 1):
      c = module.config
      if (c.downscale_factor, c.total_downscale_factor) != (first.downscale_factor, first.total_downscale_factor):
        raise ValueError(f"T2I-Adapter {k} downscales by {c.downscale_factor} (in all {c.total_downscale_factor}), "
                         f"adapter 0 by {first.downscale_factor} ({first.total_downscale_factor}): their features are "
                         "summed, so they must agree (as diffusers' MultiAdapter).")
    base = {  # (another adapter pipeline's adapters are replaced)
        f.name: getattr(pipe, f.name)
        for f in dataclasses.fields(type(pipe))
        if f.name not in ("adapters", "adapter_params")
    }
    out = cls(**base, adapters=modules, adapter_params=params)
    out.check_parts("from_pipeline")
    for shared in ("_loras", "_ip_adapter", "_freeu", "_pag", "_vae_tiling", "_vae_slicing"):  # as ControlNets'
      if shared in pipe.__dict__:
        out.__dict__[shared] = pipe.__dict__[shared]
    return out

  @property
  def params(self) -> dict:
    return {**super().params, "adapter": tuple(self.adapter_params)}

  def save_pretrained(self, path: str, dtype=None) -> None:
    """Not implemented for adapter pipelines (diffusers' adapter/ folders): save the base pipeline you attached the
    adapters to, and each adapter with `jaxsd.save_pretrained(module, params, folder)`."""
    raise ValueError("save_pretrained of a T2I-Adapter pipeline is not implemented: save the base pipeline and each "
                     "adapter (jaxsd.save_pretrained(pipe.adapters[k], pipe.adapter_params[k], folder)).")

  @property
  def size_multiple(self) -> int:
    """What the output's sides must be multiples of: the VAE's (at least 8) and the adapters' pixel unshuffle's."""
    m = max(8, self.vae.config.downsampling_factor)
    return m * self.adapters[0].config.downscale_factor // math.gcd(m, self.adapters[0].config.downscale_factor)

  def check_parts(self, where: str) -> None:
    """`StableDiffusion.check_parts`, and each adapter against the U-Net at its default size (or one size_multiple
    times 8): a U-Net swapped in (`swap_unet`) must take their features."""
    super().check_parts(where)
    try:
      height, width = self.default_hw
    except ValueError:
      height = width = 8 * self.size_multiple
    for i, module in enumerate(self.adapters):
      try:
        check_fits(self, module, i, height, width)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None

  # --- the compiled program --------------------------------------------------------------------

  def adapter_features(self, adapter_params, images, scales, batch: int) -> tuple[jax.Array, ...]:
    """The summed feature maps of the adapters (each (1 or B, H, W, C) image through its adapter, times its scale,
    as diffusers' MultiAdapter sums w_k * features_k), fp32, repeated to `batch` rows."""
    total = None
    for k, (module, params, image) in enumerate(zip(self.adapters, adapter_params, images)):
      features = [f.astype(jnp.float32) * scales[k] for f in module.apply({"params": params}, image)]
      total = features if total is None else [a + b for a, b in zip(total, features)]
    return tuple(jnp.broadcast_to(f, (batch,) + f.shape[1:]) for f in total)

  def unet_conditioning(self, params, text_cond, control=None):
    """The encoded prompts with the adapters' features and which model calls get them (`control`, as `program`
    builds it)."""
    if control is None:
      raise ValueError("a T2I-Adapter pipeline needs adapter images (adapter_images=).")
    text_cond = text_cond if isinstance(text_cond, dict) else {"context": text_cond}  # SDXL's is a dict
    return dict(text_cond, adapter_features=control["features"], adapter_keep=control["keep"])

  def apply_unet(self, unet_params, x: jax.Array, t: jax.Array, cond, i=None, x_extra=None, **unet_kwargs) -> jax.Array:
    """The U-Net with the adapters' features at model call `i`, repeated for each copy of the batch in `x` (both
    halves of classifier-free guidance, as diffusers; PAG's perturbed rows too), times 0 at calls past
    adapter_conditioning_factor (adding 0 is the U-Net without them, exactly)."""
    features = cond["adapter_features"]
    copies = x.shape[0] // features[0].shape[0]
    keep = 1.0 if i is None else cond["adapter_keep"][i]
    residuals = tuple((jnp.concatenate([f] * copies) if copies > 1 else f) * keep for f in features)
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return self.unet.apply({"params": unet_params}, with_extra(x, x_extra), t, cond["context"],
                           down_intrablock_additional_residuals=residuals, **added, **unet_kwargs)

  def program(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              pag_layers: tuple[str, ...] = ()):
    """`StableDiffusion.program` with the adapters' inputs after `keys`:

        fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, adapter_images, adapter_scales,
           adapter_keep, ..., **text)

    `adapter_images`: one (1 or B, H, W, in_channels) array in [0, 1] per adapter, at the output's size;
    `adapter_scales` (n,) their conditioning scales (weights); `adapter_keep` (L,): 1 where model call i gets the
    features, else 0. The features are computed once, before the loop.
    """
    base = super().program(guided, output, task, from_noise, pag_layers)

    def fn(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, adapter_images, adapter_scales, adapter_keep,
           *args, **kw):
      features = self.adapter_features(params["adapter"], adapter_images, adapter_scales, noise.shape[0])
      control = dict(features=features, keep=adapter_keep)
      return base(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, *args, control=control, **kw)

    return fn

  def generate_fn(self, sampler: str, steps: int, guided: bool, output: str, strength: float = 1.0, task: str = "text",
                  eta: float = 0.0, pag_layers: tuple[str, ...] = ()):
    """`program` with the schedule fixed, what `python -m sample` pmaps: fn(params, ids, uncond_ids, noise,
    guidance_scale, keys, adapter_images, adapter_scales, adapter_keep, **text)."""
    self.check_task(task)
    schedule = self.sampling_schedule(sampler, steps, strength, task, eta=eta)
    prog = self.program(guided, output, task, True, pag_layers)

    def fn(params, ids, uncond_ids, noise, guidance_scale, keys, adapter_images, adapter_scales, adapter_keep, **text):
      return prog(params, schedule, ids, uncond_ids, noise, guidance_scale, keys, adapter_images, adapter_scales,
                  adapter_keep, **text)

    return fn

  def _jitted(self, guided: bool, output: str, task: str = "text", from_noise: bool | None = None,
              pag_layers: tuple[str, ...] = ()):
    key = ("t2i_adapter", guided, output, task, from_noise) + ((pag_layers,) if pag_layers else ()) + self.vae_key()
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self.program(guided, output, task, from_noise, pag_layers))
    return self._compiled[key]

  # --- calls -------------------------------------------------------------------------------------

  def adapter_inputs(self, adapter_images, height: int, width: int, scale=1.0, factor: float | None = None,
                     calls: int = 1, steps: int | None = None, batch: int | None = None) -> dict:
    """The program's adapter inputs for one call, checked: {"adapter_images": one float32 (1 or batch, H, W, C)
    array per adapter, "adapter_scales": (n,), "adapter_keep": (calls,)}. `adapter_images`: with one adapter an
    image or a batch, with several a list of one per adapter. The first int(steps x factor) of the `calls` model
    calls get the features (`steps`: the step count diffusers' SDXL loop compares with; default `calls`), all of
    them with `factor` None (the SD pipeline's)."""
    n = len(self.adapters)
    per_adapter = self._per_adapter(adapter_images, n)
    scales = adapter_scales(scale, n)
    keep = adapter_keep(calls, calls if steps is None else steps, factor)
    images = []
    for k, (module, item) in enumerate(zip(self.adapters, per_adapter)):
      name = f"adapter_images[{k}]" if n > 1 else "adapter_images"
      im = prepare_adapter_images(item, height, width, module.config.in_channels, name)
      if batch is not None and im.shape[0] not in (1, batch):
        raise ValueError(f"{im.shape[0]} images for T2I-Adapter {k} and {batch} prompts: give one image, or one per "
                         "prompt.")
      check_fits(self, module, k, height, width)
      images.append(jnp.asarray(im))
    return {
        "adapter_images": tuple(images),
        "adapter_scales": jnp.asarray(scales, jnp.float32),
        "adapter_keep": jnp.asarray(keep)
    }

  def output_size(self, adapter_images, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): those given (multiples of `size_multiple`), the others the (first) adapter image's rounded
    down to a multiple of `size_multiple`, as diffusers' `_default_height_width` rounds to the adapter's factor."""
    m = self.size_multiple
    for name, v in (("height", height), ("width", width)):
      if v is not None and (v <= 0 or v % m):
        raise ValueError(f"{name}={v}: with this T2I-Adapter (pixel unshuffle by "
                         f"{self.adapters[0].config.downscale_factor}) sides must be positive multiples of {m}.")
    if height is not None and width is not None:
      return height, width
    h, w = _image_hw(self._per_adapter(adapter_images, len(self.adapters))[0], self.adapters[0].config.in_channels)
    if (height is None and h < m) or (width is None and w < m):
      raise ValueError(f"the adapter image is {w}x{h} pixels (WxH), smaller than {m}: give height and width.")
    return height or h // m * m, width or w // m * m

  @staticmethod
  def _per_adapter(adapter_images, n: int) -> list:
    if adapter_images is None:
      raise ValueError(f"a T2I-Adapter pipeline needs adapter images (adapter_images=): one per adapter ({n}).")
    if n == 1:
      return [adapter_images]
    if not isinstance(adapter_images, (list, tuple)) or len(adapter_images) != n:
      got = len(adapter_images) if isinstance(adapter_images, (list, tuple)) else "not a list of"
      raise ValueError(f"adapter_images: {got} entries for {n} T2I-Adapters; give a list with one image (or batch) "
                       "per adapter, as diffusers' MultiAdapter.")
    return list(adapter_images)

  def _adapter_call(self, prompts, adapter_images, negative_prompts, height, width, steps, guidance_scale, sampler,
                    seed, latents, output, scale, factor, text_options: dict, **run_options):
    n = len(self.adapters)
    per_adapter = self._per_adapter(adapter_images, n)
    adapter_scales(scale, n)
    adapter_keep(1, 1, factor)  # (checks, before anything is read)
    if latents is None or height is not None or width is not None:
      height, width = self.output_size(adapter_images, height, width)
    if isinstance(prompts, str):
      prompts = [prompts] * max(_count(x) for x in per_adapter)
    request = dict(images=adapter_images, scale=scale, factor=factor)
    return self._text_to_image(prompts, negative_prompts, height, width, steps, guidance_scale, sampler, seed, latents,
                               output, text_options=text_options, adapter=request, **run_options)

  def _run(self, task, from_noise, prompts, negative_prompts, steps, sampler, strength, guidance_scale, seed, noise,
           output, *, adapter: dict, denoising_end=None, **kwargs):
    """`StableDiffusion._run` with the adapter images prepared at the output's size for this batch and the calls
    that get the features (diffusers: i < int(num_inference_steps x factor), its step count the number of steps,
    or of calls left by denoising_end)."""
    f = self.vae.config.downsampling_factor
    height, width = noise.shape[1] * f, noise.shape[2] * f
    if height % self.size_multiple or width % self.size_multiple:
      raise ValueError(f"the output is {width}x{height} px; with this T2I-Adapter sides must be multiples of "
                       f"{self.size_multiple}.")
    schedule = self.sampling_schedule(sampler, steps, strength, task, denoising_end=denoising_end,
                                      eta=kwargs.get("eta", 0.0))
    calls = schedule.timesteps.shape[0]
    inputs = self.adapter_inputs(adapter["images"], height, width, adapter["scale"], adapter["factor"], calls,
                                 steps if denoising_end is None else calls, len(prompts))
    return super()._run(task, from_noise, prompts, negative_prompts, steps, sampler, strength, guidance_scale, seed,
                        noise, output, denoising_end=denoising_end, **inputs, **kwargs)

  def check_task(self, task: str) -> None:
    """`StableDiffusion.check_task`, and text-to-image only: diffusers has no T2I-Adapter img2img or inpainting."""
    super().check_task(task)
    if task != "text":
      raise ValueError(f"T2I-Adapter pipelines do text-to-image only (as diffusers'); {task} is not supported: use "
                       "the plain pipeline for it.")

  def img2img(self, *args, **kwargs):
    self.check_task("img2img")

  def inpaint(self, *args, **kwargs):
    self.check_task("inpaint")

  def __call__(self, prompts, adapter_images, negative_prompts=None, height: int | None = None,
               width: int | None = None, steps: int = 50, guidance_scale: float = 7.5, sampler: str | None = None,
               seed: int = 0, latents=None, output: str = "np", adapter_conditioning_scale=1.0,
               long_prompts: bool = False, prompt_weighting: bool = False, eta: float = 0.0, ip_adapter_image=None,
               ip_adapter_image_embeds=None, ip_adapter_masks=None, pag_scale: float | None = None,
               pag_adaptive_scale: float = 0.0):
    """Text to image under the T2I-Adapters, as diffusers' StableDiffusionAdapterPipeline.

    Args:
      prompts: a prompt, or one per image.
      adapter_images: diffusers' `image`: with one adapter a PIL image, a uint8 or [0, 1] float array (H, W[, C])
        or a batch (B, H, W, C) or a list; with several, a list of one such entry per adapter. One image serves the
        batch. PIL images are resized to the output size (Lanczos, as diffusers) and converted to the adapter's
        channels (grey "L" for in_channels=1, else RGB); arrays must have the output's size and the channels.
      height, width: default to the (first) adapter image's size, rounded down to a multiple of the adapter's
        downscale factor (8 for SD adapters), as diffusers.
      adapter_conditioning_scale: the features' scale: a float, or one per adapter (diffusers' MultiAdapter
        weights; a float weighs every adapter alike).
      latents, output, steps, sampler, seed, guidance_scale, negative_prompts, long_prompts, prompt_weighting, eta,
        ip_adapter_image, ip_adapter_image_embeds, pag_scale, pag_adaptive_scale: as `StableDiffusion.__call__`.
    """
    return self._adapter_call(prompts, adapter_images, negative_prompts, height, width, steps, guidance_scale, sampler,
                              seed, latents, output, adapter_conditioning_scale, None,
                              prompt_syntax.options(long_prompts, prompt_weighting), eta=eta,
                              **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                              **pag.call_options(pag_scale, pag_adaptive_scale))


@dataclasses.dataclass
class StableDiffusionXLAdapter(StableDiffusionAdapter, StableDiffusionXL):
  """An SDXL base model with T2I-Adapters (`StableDiffusionAdapter.from_pipeline` of an SDXL pipeline): text to
  image, as diffusers' StableDiffusionXLAdapterPipeline."""

  def __call__(self, prompts, adapter_images, negative_prompts=None, height: int | None = None,
               width: int | None = None, steps: int = 50, guidance_scale: float = 5.0, sampler: str | None = None,
               seed: int = 0, latents=None, output: str = "np", adapter_conditioning_scale=1.0,
               adapter_conditioning_factor: float = 1.0, *, prompts_2=None, negative_prompts_2=None, original_size=None,
               crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
               negative_crops_coords_top_left=(0, 0), negative_target_size=None, guidance_rescale: float = 0.0,
               denoising_end: float | None = None, long_prompts: bool = False, prompt_weighting: bool = False,
               eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
               pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Text to image under the T2I-Adapters, as diffusers' StableDiffusionXLAdapterPipeline: the arguments of
    `StableDiffusionAdapter.__call__` (the default size rounded to the SDXL adapters' factor, 16) and SDXL's
    (`StableDiffusionXL.__call__`), and `adapter_conditioning_factor` in [0, 1]: the fraction of the steps that get
    the features (model call i gets them while i < int(steps x factor), as diffusers)."""
    options = pipeline_xl.text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                                       negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                       **prompt_syntax.options(long_prompts, prompt_weighting))
    return self._adapter_call(prompts, adapter_images, negative_prompts, height, width, steps, guidance_scale,
                              sampler or self.default_sampler, seed, latents, output, adapter_conditioning_scale,
                              adapter_conditioning_factor, options, guidance_rescale=guidance_rescale,
                              denoising_end=denoising_end, eta=eta,
                              **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                              **pag.call_options(pag_scale, pag_adaptive_scale))


def adapter_scales(scale, n: int) -> list[float]:
  """One conditioning scale per adapter, from a number or a list of one per adapter; a one-line ValueError else."""
  if isinstance(scale, (list, tuple)):
    if len(scale) != n:
      raise ValueError(f"adapter_conditioning_scale has {len(scale)} values for {n} T2I-Adapters; give one number, "
                       "or one per adapter.")
    scales = [float(s) for s in scale]
  else:
    scales = [float(scale)] * n
  if not finite32(scales):
    raise ValueError(f"adapter_conditioning_scale={scales}: give finite numbers (1: as trained, 0: off).")
  return scales


def adapter_keep(calls: int, steps: int, factor: float | None) -> np.ndarray:
  """(calls,) float32: 1 for model call i < int(steps x factor), else 0, as diffusers' SDXL adapter loop (whose
  `steps` is the step count: with Heun, 2 steps - 1 calls, the first `steps` calls at factor 1); `factor` None:
  every call (its SD loop)."""
  if factor is None:
    return np.ones((calls,), np.float32)
  if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating)) or not 0.0 <= factor <= 1.0:
    raise ValueError(f"adapter_conditioning_factor={factor!r}: give the fraction of the steps that get the adapter's "
                     "features, in [0, 1].")
  cut = int(steps * factor)
  return (np.arange(calls) < cut).astype(np.float32)


def prepare_adapter_images(images: Any, height: int, width: int, channels: int, name: str) -> np.ndarray:
  """As diffusers' `_preprocess_adapter_image`: PIL images resized to width x height (Lanczos), in [0, 1], as
  float32 (B, H, W, channels); PIL images are first converted to grey (L) for a one-channel adapter, else to RGB.
  Arrays: uint8 or floats in [0, 1], (H, W[, C]) or (B, H, W, C), of the output's size and the adapter's channels."""
  from PIL import Image

  items = images if isinstance(images, (list, tuple)) else [images]
  if items and all(hasattr(x, "mode") for x in items):
    mode = "L" if channels == 1 else "RGB"
    converted = []
    for x in items:
      if x.mode in conditioning.HIGH_BIT_MODES:
        x = conditioning.to_rgb(x)
      converted.append(np.asarray(x.convert(mode).resize((width, height), Image.LANCZOS)))
    out = np.stack(converted)
  else:
    out = np.stack([np.asarray(x) for x in items]) if isinstance(images, (list, tuple)) else np.asarray(images)
  if out.ndim == 2:  # one grey image
    out = out[None, ..., None]
  elif out.ndim == 3 and out.shape[-1] == channels:  # one image (H, W, C)
    out = out[None]
  elif out.ndim == 3 and channels == 1 and out.shape[-1] not in (3, 4):  # grey ones (B, H, W), not colour (H, W, 3)
    out = out[..., None]
  if out.ndim != 4 or out.shape[-1] != channels:
    what = "grey (H, W) or (B, H, W, 1)" if channels == 1 else f"(B, H, W, {channels})"
    raise ValueError(f"{name}: an array of shape {out.shape}; this adapter takes {channels}-channel images: "
                     f"{what}, or PIL images.")
  if out.shape[1:3] != (height, width):
    raise ValueError(f"{name} are {out.shape[2]}x{out.shape[1]} (WxH), the output {width}x{height}: give arrays of "
                     "the output's size (or PIL images, which are resized).")
  if out.dtype == np.uint8:
    return out.astype(np.float32) / 255.0
  if out.dtype.kind != "f":
    raise ValueError(f"{name}: an array of {out.dtype}; give uint8 (0..255) or floats in [0, 1].")
  out = out.astype(np.float32)
  if out.size and not (np.isfinite(out).all() and out.min() >= -1e-3 and out.max() <= 1 + 1e-3):
    raise ValueError(f"{name}: values from {out.min():g} to {out.max():g}; give uint8 (0..255) or floats in [0, 1].")
  return out


def _image_hw(images, channels: int) -> tuple[int, int]:
  """(height, width) of an adapter entry: a PIL image, an array as `prepare_adapter_images` reads it, or the first
  of a list."""
  first = images[0] if isinstance(images, (list, tuple)) and images else images
  if hasattr(first, "mode"):
    return first.size[1], first.size[0]
  shape = np.shape(first)
  if len(shape) == 2 or (len(shape) == 3 and shape[-1] == channels):
    return shape[0], shape[1]
  return shape[1], shape[2]  # (B, H, W[, C])


def _count(images) -> int:
  """How many images an adapter entry holds (a PIL image or an (H, W[, C]) array: 1)."""
  if isinstance(images, (list, tuple)):
    return len(images)
  return 1 if hasattr(images, "mode") or np.ndim(images) <= 3 else np.shape(images)[0]
