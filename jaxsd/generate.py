"""Batch generation across every local accelerator with `jax.pmap` (what `python -m sample` calls).

Parameters are replicated to the local devices and each global batch is split across them. Image j
of the job list starts from noise drawn with key fold_in(key(seed), j), so the images do not depend
on the number of devices or the batch size. On a multi-host slice (after
`jax.distributed.initialize()`) each host takes every process_count-th batch and writes its own images.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import itertools
import os
import re
import time
from typing import Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import conditioning, mask_crop, pag, pipeline_controlnet, pipeline_image_tasks
from jaxsd.image_grid import contact_sheet
from jaxsd.pipeline import StableDiffusion
from jaxsd.pipeline_controlnet import StableDiffusionControlNet
from jaxsd.pipeline_t2i_adapter import StableDiffusionAdapter, StableDiffusionXLAdapter


@dataclasses.dataclass
class GenerateResult:
  files: list[str]
  images: np.ndarray  # uint8 NHWC, this host's images in job order
  compile_seconds: float
  sample_seconds: float
  seconds_per_step: float
  images_per_second: float
  devices: int


def _slug(prompt: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "empty"


def image_filenames(prompts: Sequence[str], seed: int, num_images: int) -> list[str]:
  """One distinct file name per job (prompt-major, `num_images` each): "<prompt slug>-seed<seed>-<index>.png",
  the index counting that prompt's images (a prompt given twice continues its count); prompts whose slugs
  coincide ("a cat" and "A cat.", prompts in other scripts, a shared first 60 characters) each get the first
  8 hex digits of their SHA-1 after the slug."""
  slugs = {p: _slug(p) for p in prompts}
  by_slug = collections.Counter(slugs.values())  # distinct prompts per slug
  count = collections.Counter()
  names = []
  for p in prompts:
    stem = slugs[p] if by_slug[slugs[p]] == 1 else f"{slugs[p]}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
    for _ in range(num_images):
      names.append(f"{stem}-seed{seed}-{count[p]:04d}.png")
      count[p] += 1
  return names


def check_out_dir(out_dir: str, name: str = "out_dir") -> None:
  """ValueError saying why `out_dir` cannot hold the images (`name`: what the message calls it): a file, or a
  folder (or, for one still to be made, its nearest existing parent) that is not writable. Creates nothing;
  called before anything is loaded or compiled."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"{name} {out_dir} is a file, not a folder: give a folder for the images.")
  if os.path.islink(out_dir) and not os.path.exists(out_dir):  # makedirs cannot make it (found after sampling)
    raise ValueError(f"{name} {out_dir} is a link to {os.readlink(out_dir)}, which does not exist (or loops): make "
                     "that folder, or give another.")
  parent = os.path.abspath(out_dir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{name} {out_dir}: {parent} is a file, so the folder cannot be made there.")
  if not os.access(parent, os.W_OK | os.X_OK):
    what = "is not writable" if parent == os.path.abspath(out_dir) else f"cannot be made: {parent} is not writable"
    raise ValueError(f"{name} {out_dir} {what}; give a folder you can write to.")


def save_new(image: np.ndarray, path: str) -> str:
  """Saves the PNG at `path`, or at "<stem>-1.png", "-2", ... when a file of that name exists (an earlier
  run's images are kept, as A1111 numbers its outputs); returns the path written. The PNG is written whole under a
  hidden temporary name first and then given its name: a run killed while writing leaves no partial PNG."""
  from PIL import Image

  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
  try:
    Image.fromarray(image).save(tmp, format="PNG")
    stem, ext = os.path.splitext(path)
    for n in itertools.count():
      target = path if n == 0 else f"{stem}-{n}{ext}"
      if _claim(tmp, target):
        return target
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _claim(tmp: str, target: str) -> bool:
  """Gives the whole file `tmp` the name `target` unless a file has that name (then False): a hard link, which
  never replaces a file; where the file system has none, the name is taken first (O_EXCL), then replaced."""
  try:
    os.link(tmp, target)
    return True
  except FileExistsError:
    return False
  except OSError:
    pass
  try:
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
  except FileExistsError:
    return False
  os.replace(tmp, target)
  return True


# Default step counts: diffusers' LatentConsistencyModelPipeline's for LCM (distilled for 2-8 steps), else 25.
DEFAULT_STEPS = 25
LCM_STEPS = 4
# LatentConsistencyModelPipeline's guidance default (an LCM-distilled U-Net takes it as an input; no CFG).
LCM_GUIDANCE = 8.5


def generate(pipe: StableDiffusion, prompts: Sequence[str], *, num_images: int = 1, steps: int | None = None,
             sampler: str | None = None, guidance_scale: float | None = None, seed: int = 0, height: int | None = None,
             width: int | None = None, negative_prompt: str | None = None, batch_per_device: int = 1,
             out_dir: str | None = None, progress: bool = True, devices=None, init_image=None, mask_image=None,
             strength: float | None = None, long_prompts: bool = False, prompt_weighting: bool = False,
             padding_mask_crop: int | None = None, control_images=None, controlnet_conditioning_scale=None,
             control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False, eta: float = 0.0,
             ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None, pag_scale: float | None = None,
             pag_adaptive_scale: float = 0.0, adapter_images=None, adapter_conditioning_scale=None,
             adapter_conditioning_factor: float | None = None,
             image_guidance_scale: float | None = None) -> GenerateResult:
  """Generates `num_images` images per prompt, pmapped over the local devices.

  Returns the images (uint8 NHWC, this host's, in job order) with timings; with `out_dir`, also writes
  one PNG per image (see `image_filenames`; existing files are kept, see `save_new`) and the grid of them.
  `sampler` defaults to the folder's own (`pipe.default_sampler`, as diffusers runs a folder's scheduler), `steps`
  to 25 (4 with the `lcm` sampler, as diffusers' LatentConsistencyModelPipeline), and `guidance_scale` to the
  pipeline call's (as diffusers': 7.5, SDXL's 5; 8.5 for an LCM-distilled U-Net, which takes it as an input).
  Height and width default to the model's native size. No `negative_prompt` is the pipeline's own default (SD: "",
  SDXL: zero embeddings where the folder says force_zeros_for_empty_prompt). With `init_image` (one image for every
  job) this is img2img (`strength`, default that of the pipeline's img2img: 0.8 for SD, with ControlNets
  and for an LCM folder (LatentConsistencyModelImg2ImgPipeline's too), 0.3 for SDXL); with `mask_image` too,
  inpainting (strength default the pipeline's inpaint's: 1, SDXL's 0.9999), each job as the pipeline's own call
  with the job's seed-derived keys; `padding_mask_crop` inpaints only a box around the mask at height x width
  (default: the model's size) and pastes it back, as `StableDiffusion.inpaint`.
  `long_prompts` and `prompt_weighting` are the pipeline's (`jaxsd.prompt_syntax`): every batch has the windows of
  the longest prompt. A ControlNet pipeline (`pipe.with_controlnet`) takes `control_images`, one image per
  ControlNet used for every job (resized to height x width, which default to the first one's size; for img2img and
  inpainting the init image's size, and cropped with it under `padding_mask_crop`), and the other ControlNet
  arguments of its call (the conditioning scale defaults to its call's, as diffusers': 1 for text-to-image, 0.8 for
  img2img, 0.5 for SD's inpainting and 1 for SDXL's). `eta` is the pipeline calls' (diffusers'): ddim's weight of
  fresh noise and tcd's gamma, refused by the other samplers unless 0. With an IP-Adapter loaded
  (`pipe.load_ip_adapter`), `ip_adapter_image` is the image prompt of every job, at the adapter's scale, or
  `ip_adapter_image_embeds` its embeddings (diffusers' list of one array per adapter, as the pipeline calls take
  it: (2, n, D) under guidance, (1, n, D) without; FaceID's face embeddings); with several adapters the two may be
  mixed, a list each with None where the other gives that adapter's input. `ip_adapter_masks` are the calls'
  (`jaxsd.ip_adapter_masks`), read at height x width. FreeU acts
  as `pipe.enable_freeu` set it. With Perturbed-Attention Guidance on (`pipe.enable_pag`), `pag_scale` (default 3.0)
  and `pag_adaptive_scale` are the pipeline calls' (`jaxsd.pag`). A T2I-Adapter pipeline
  (`jaxsd.pipeline_t2i_adapter`, text-to-image only) takes `adapter_images` (one image per adapter, used for every
  job; height and width default to the first one's size), `adapter_conditioning_scale` (one, or one per adapter;
  default 1) and, for SDXL, `adapter_conditioning_factor` (default 1), as its call. On an InstructPix2Pix model
  (`pipe.pix2pix_unet`) `init_image` is the image every job edits as its prompt instructs (`pipe.instruct_pix2pix`;
  no strength, no mask), at `image_guidance_scale` (default the call's, diffusers' 1.5). Bad
  arguments, checked before anything compiles, raise a ValueError that says what to change.
  """
  if num_images < 1 or batch_per_device < 1:
    raise ValueError(f"num_images={num_images} and batch_per_device={batch_per_device} must be at least 1.")
  sampler = sampler or pipe.default_sampler
  if steps is None:
    steps = LCM_STEPS if sampler == "lcm" else DEFAULT_STEPS
  if out_dir:
    check_out_dir(out_dir)
  task = "text" if init_image is None else "img2img" if mask_image is None else "inpaint"
  if task == "img2img" and pipe.pix2pix_unet:  # the image an InstructPix2Pix model edits
    task = "pix2pix"
  if mask_image is not None and init_image is None:
    raise ValueError("a mask without an init image: give the image to inpaint too.")
  if strength is not None and task == "text":
    raise ValueError("strength applies to img2img and inpainting: give an init image.")
  if strength is not None and task == "pix2pix":
    raise ValueError("strength does not apply to an InstructPix2Pix model (it edits the init image over the whole "
                     "schedule, as diffusers' StableDiffusionInstructPix2PixPipeline): drop it.")
  if image_guidance_scale is not None and not pipe.pix2pix_unet:
    raise ValueError("image_guidance_scale applies to an InstructPix2Pix model (an 8-channel U-Net, e.g. "
                     "timbrooks/instruct-pix2pix); this one is not: drop it.")
  if padding_mask_crop is not None and task != "inpaint":
    raise ValueError("padding_mask_crop applies to inpainting: give an init image and a mask.")
  controlled = isinstance(pipe, StableDiffusionControlNet)
  if control_images is not None and not controlled:
    raise ValueError("control images without ControlNets: steer the pipeline with pipe.with_controlnet(...).")
  pipe.check_task(task)
  if task == "pix2pix":
    pipe.check_pix2pix_extras()
  call = {  # what each job is
      "text": pipe.__call__,
      "img2img": pipe.img2img,
      "inpaint": pipe.inpaint,
      "pix2pix": pipe.instruct_pix2pix
  }[task]
  if task == "pix2pix":
    if image_guidance_scale is None:  # the call's own, diffusers' 1.5
      image_guidance_scale = inspect.signature(call).parameters["image_guidance_scale"].default
    pipeline_image_tasks.check_image_guidance_scale(image_guidance_scale)
  if guidance_scale is None and pipe.guidance_embedded:  # the pipeline diffusers builds for such a folder
    guidance_scale = LCM_GUIDANCE
  elif guidance_scale is None:  # the call's own, as diffusers' (7.5; SDXL's 5)
    guidance_scale = inspect.signature(call).parameters["guidance_scale"].default
  if strength is None:  # the call's own, diffusers' (img2img 0.8, SDXL's 0.3; inpainting 1, SDXL's 0.9999)
    strength = inspect.signature(call).parameters["strength"].default if task not in ("text", "pix2pix") else 1.0
  image = mask = crops = None
  crop = padding_mask_crop is not None
  if task != "text":
    image = conditioning.as_images(init_image, "init image")
    if image.shape[0] != 1:
      raise ValueError(f"give one init image (used for every image generated); got {image.shape[0]}.")
    for name, v, have in (("height", height, image.shape[1]), ("width", width, image.shape[2])):
      if v is not None and v != have and not crop:
        raise ValueError(f"{name}={v} but the init image's {name} is {have}: resize the image or drop {name}.")
    if not crop:
      height, width = image.shape[1:3]
      m = max(8, pipe.vae.config.downsampling_factor)
      if height % m or width % m:
        raise ValueError(f"the init image is {width}x{height} pixels (WxH): both sides must be multiples of {m} for "
                         f"this model; crop or resize it (e.g. to {width // m * m}x{height // m * m}).")
  if task == "inpaint":
    pad = None if not crop else mask_crop.check_padding(padding_mask_crop)
    mask = conditioning.mask_levels(mask_image, "mask")
    if mask.shape[:3] != image.shape[:3]:
      raise ValueError(f"the mask is {mask.shape[2]}x{mask.shape[1]} (WxH), the init image {image.shape[2]}x"
                       f"{image.shape[1]}: give a mask of the image's size (white = repaint).")
  adapted = isinstance(pipe, StableDiffusionAdapter)
  given = (adapter_images, adapter_conditioning_scale, adapter_conditioning_factor)
  if not adapted and any(v is not None for v in given):
    raise ValueError("adapter images or settings without T2I-Adapters: steer the pipeline with "
                     "StableDiffusionAdapter.from_pipeline(pipe, adapters).")
  if adapted:
    if adapter_conditioning_factor is not None and not isinstance(pipe, StableDiffusionXLAdapter):
      raise ValueError("adapter_conditioning_factor applies to SDXL T2I-Adapter pipelines (diffusers' "
                       "StableDiffusionXLAdapterPipeline); the SD one adds the features at every step.")
    height, width = pipe.output_size(adapter_images, height, width)
  control, control_options = None, {"guess_mode": bool(guess_mode)} if controlled else {}
  if guess_mode and not controlled:
    raise ValueError("guess_mode applies to ControlNet pipelines (pipe.with_controlnet(...)).")
  if controlled:
    if controlnet_conditioning_scale is None:  # the pipeline call's own, diffusers' (SDXL inpainting: 1, not 0.5)
      controlnet_conditioning_scale = inspect.signature(call).parameters["controlnet_conditioning_scale"].default
    settings = (controlnet_conditioning_scale, control_guidance_start, control_guidance_end)
    if crop:  # at the init image's size, to be cut with it and resized as the crop is (below)
      control, _, _ = _control_inputs(pipe, control_images, *image.shape[1:3], *settings)
    else:
      control, height, width = _control_inputs(pipe, control_images, height, width, *settings)
  height, width = pipe.size_or_default(height, width)
  prompts, _ = pipe.check_inputs(prompts, None, height, width, steps, sampler, "np", guidance_scale)
  schedule = pipe.sampling_schedule(sampler, steps, strength, task, eta=eta)  # raises for a bad strength or eta
  if control is not None:  # which ControlNets act at each model call of this schedule
    control_ims, scales, start, end = control
    control = control_ims, scales, pipeline_controlnet.control_keep(schedule.timesteps.shape[0], start, end)
  adapter = None
  if adapted:  # one image per adapter (a batch of one, on every device), its scales, the calls that get features
    factor = None  # the SD pipeline's: every call; SDXL's default 1: the first `steps` calls, as diffusers
    if isinstance(pipe, StableDiffusionXLAdapter):
      factor = 1.0 if adapter_conditioning_factor is None else adapter_conditioning_factor
    adapter = pipe.adapter_inputs(adapter_images, height, width,
                                  1.0 if adapter_conditioning_scale is None else adapter_conditioning_scale, factor,
                                  schedule.timesteps.shape[0], steps, 1)
  if task == "inpaint" and crop:  # the crop, inpainted at height x width, is pasted back at the end
    crops = mask_crop.crop(image, mask, width, height, pad)
    image, mask = crops.images, crops.masks
    if control is not None:
      cut = (mask_crop.crop_like(conditioning.to_uint8(np.asarray(im)), crops) for im in control[0])
      control = (tuple(jnp.asarray(conditioning.as_images(im, "control image")) for im in cut), *control[1:])
  elif task == "inpaint":
    mask = (mask >= 0.5).astype(np.float32)[..., None]  # as conditioning.as_masks
  # Every prompt tokenized once (a bad weight raises here), all to the same number of windows: one program.
  # SDXL's img2img and inpainting condition on other time ids (the refiner: the negative aesthetic score).
  options = {k: True for k, v in (("long_prompts", long_prompts), ("prompt_weighting", prompt_weighting)) if v}
  negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
  all_ids, all_uncond, all_text = pipe.text_inputs(prompts, negatives, height, width, image_to_image=task
                                                   in ("img2img", "inpaint"), **options)

  devices = devices or jax.local_devices()
  n_dev = len(devices)
  jobs = [(p, k) for p in prompts for k in range(num_images)]  # (prompt, index within prompt)
  global_batch = n_dev * batch_per_device
  batches = [list(range(i, min(i + global_batch, len(jobs)))) for i in range(0, len(jobs), global_batch)]
  mine = batches[jax.process_index()::jax.process_count()]

  guided = pipe.guided(guidance_scale, image_guidance_scale)
  if ip_adapter_image is not None and ip_adapter_image_embeds is not None:  # images for some adapters, embeds others
    ip_adapter_image_embeds = _mixed_ip_adapter_embeds(pipe, ip_adapter_image, ip_adapter_image_embeds, guided)
    ip_adapter_image = None
  # one image's (or embedding's) tokens for every job, or None
  ip = pipe.ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, 1, guided, ip_adapter_masks, (height, width))
  freeu = pipe.freeu_inputs()  # {} when off
  pag_inputs, pag_options = pipe.pag_cond(pag.call_options(pag_scale, pag_adaptive_scale))  # ({}, {}) when off
  fn = pipe.generate_fn(sampler, steps, guided, "np", strength, task, eta=eta, **control_options, **pag_options)
  pfn = jax.pmap(fn, in_axes=(0, 0, 0, 0, None, 0), devices=devices)  # the conditioning (kwargs) on axis 0 too
  params = flax.jax_utils.replicate(pipe.params, devices)  # once, not per call
  cond_fn = None if task == "text" else jax.pmap(_conditioning_fn(pipe, task, strength, image, mask), devices=devices)

  def inputs(batch):
    idx = batch + [batch[-1]] * (global_batch - len(batch))  # pad the last batch; padded outputs are dropped
    rows = np.asarray(idx) // num_images  # job j is prompt j // num_images
    ids, uncond, text = all_ids[rows], all_uncond[rows], {k: np.asarray(v)[rows] for k, v in all_text.items()}
    noise = jnp.concatenate([pipe.noise(seed, 1, height, width, offset=j) for j in idx])
    keys = jnp.concatenate([pipe.sampler_keys(seed, 1, offset=j) for j in idx])
    shard = lambda x: x.reshape((n_dev, batch_per_device) + x.shape[1:])
    cond = {name: shard(jnp.asarray(v)) for name, v in text.items()}
    if control is not None:  # every job the same images, scales and keep (pmap maps keyword arguments on axis 0)
      control_ims, scales, keep = control
      cond["control_images"] = tuple(shard(jnp.broadcast_to(im, (global_batch,) + im.shape[1:])) for im in control_ims)
      cond["scales"], cond["keep"] = (jnp.broadcast_to(x, (n_dev,) + x.shape) for x in (scales, keep))
    if adapter is not None:  # the adapter images (one each, the features broadcast to the batch), once per device
      cond.update({k: jax.tree.map(lambda x: jnp.broadcast_to(x, (n_dev,) + x.shape), v) for k, v in adapter.items()})
    if ip is not None:  # the image embeddings of every job, the scales once per device (several adapters: tuples)
      every_job = lambda v: shard(jnp.broadcast_to(v, (global_batch,) + v.shape[1:]))  # noqa: E731
      cond["ip_adapter"] = {k: jax.tree.map(every_job, v) for k, v in ip.items() if k not in ("scale", "masks")}
      per_device = lambda v: jnp.broadcast_to(v, (n_dev,) + v.shape)  # noqa: E731
      cond["ip_adapter"].update({k: jax.tree.map(per_device, ip[k]) for k in ("scale", "masks") if k in ip})
    for name, v in freeu.items():  # FreeU's factors (pipe.enable_freeu), once per device
      cond[name] = jnp.broadcast_to(v, (n_dev,) + v.shape)
    if task == "pix2pix" and guided:  # InstructPix2Pix's image guidance, once per device
      cond["image_guidance_scale"] = jnp.full((n_dev,), image_guidance_scale, jnp.float32)
    if pag_inputs:  # PAG's scales, once per device
      cond["pag_scales"] = {k: jnp.broadcast_to(v, (n_dev,)) for k, v in pag_inputs["pag_scales"].items()}
    if cond_fn is not None:
      cond.update(cond_fn(params["vae"], shard(jnp.concatenate([pipe.posterior_keys(seed, 1, offset=j) for j in idx]))))
    return (shard(jnp.asarray(ids)), shard(jnp.asarray(uncond)), shard(noise), shard(keys)), cond

  files = []
  if out_dir:  # each batch's images are written as it ends: a run stopped late keeps what it made
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
      raise ValueError(f"out_dir {out_dir}: cannot create the folder ({e.strerror}).") from None
    names = image_filenames(prompts, seed, num_images)
  compile_seconds = 0.0
  compiled = None
  outputs = []
  sample_seconds = 0.0
  it = mine
  if progress:
    from tqdm import tqdm

    it = tqdm(mine, desc="sampling", unit="batch")
  for batch in it:
    (ids, uncond, noise, keys), cond = inputs(batch)
    args = (params, ids, uncond, noise, jnp.float32(guidance_scale), keys)
    if compiled is None:
      t0 = time.perf_counter()
      compiled = pfn.lower(*args, **cond).compile()
      compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.asarray(jax.device_get(compiled(*args, **cond)))
    sample_seconds += time.perf_counter() - t0
    out = out.reshape((-1,) + out.shape[2:])[:len(batch)]
    if crops is not None:
      out = mask_crop.paste(out, crops)
    outputs.append(out)
    if out_dir:
      files += [save_new(im, os.path.join(out_dir, names[j])) for j, im in zip(batch, out)]
  shape = (height, width, 3) if crops is None else crops.originals.shape[1:]
  images = np.concatenate(outputs) if outputs else np.zeros((0,) + shape, np.uint8)
  if out_dir and len(images):
    grid_name = "grid.png" if jax.process_count() == 1 else f"grid-host{jax.process_index()}.png"
    save_new(contact_sheet(images, columns=num_images if num_images > 1 else None), os.path.join(out_dir, grid_name))
  n_steps = len(mine) * steps
  return GenerateResult(files=files, images=images, compile_seconds=compile_seconds, sample_seconds=sample_seconds,
                        seconds_per_step=sample_seconds / max(n_steps, 1),
                        images_per_second=len(images) / max(sample_seconds, 1e-9), devices=n_dev)


def _mixed_ip_adapter_embeds(pipe, images, embeds, guided: bool) -> list:
  """diffusers' `ip_adapter_image_embeds` (one array per adapter) from `images` and `embeds`, lists with one entry
  per loaded adapter and None where the other gives it: each image through its adapter's image encoder, as
  diffusers' `prepare_ip_adapter_image_embeds` lays it out ((2, n, ...) under guidance, the unconditional row first,
  (1, n, ...) without)."""
  n = len(pipe.ip_adapters)
  if not all(isinstance(x, (list, tuple)) and len(x) == n for x in (images, embeds)):
    raise ValueError(f"ip_adapter_image and ip_adapter_image_embeds together: give each as a list with one entry per "
                     f"IP-Adapter ({n}), None where the other gives that adapter's input.")
  out = []
  for k, (image, given) in enumerate(zip(images, embeds)):
    if (image is None) == (given is None):
      raise ValueError(f"IP-Adapter {k}: give its ip_adapter_image or its ip_adapter_image_embeds entry (the other "
                       "None), not both or neither.")
    if image is None:
      out.append(given)
      continue
    cond, uncond = pipe.encode_ip_adapter_image(image, k)
    out.append(np.stack([uncond, cond]) if guided else cond[None])
  return out


def _control_inputs(pipe, control_images, height, width, scale, start, end):
  """((images, scales, keep), height, width) of a ControlNet pipeline's pmapped program: one (1, H, W, 3)
  image per ControlNet, resized to height x width (default: the first image's size), as its call does."""
  n = len(pipe.controlnets)
  if control_images is None:
    raise ValueError(f"a ControlNet pipeline needs control images: give one per ControlNet ({n}).")
  items = list(control_images) if isinstance(control_images, (list, tuple)) else [control_images]
  if len(items) != n:
    raise ValueError(f"{len(items)} control images for {n} ControlNets: give one per ControlNet, in the same order.")
  scales, start, end = pipeline_controlnet.control_settings(n, scale, start, end)
  height, width = pipeline_controlnet.output_size(pipe, items[0], height, width)
  images = []
  for k, item in enumerate(items):
    im = pipeline_controlnet.prepare_control_images(item, height, width, f"control image {k}")
    if im.shape[0] != 1:
      raise ValueError(f"control image {k} is a batch of {im.shape[0]}: give one image per ControlNet (used for "
                       "every image generated).")
    images.append(jnp.asarray(im))
  return (tuple(images), np.asarray(scales, np.float32), start, end), height, width


def _conditioning_fn(pipe: StableDiffusion, task: str, strength: float, image: np.ndarray, mask: np.ndarray | None):
  """(vae params, per-image posterior keys [b]) -> the program's conditioning for b copies of the one
  init image, as `StableDiffusion.img2img` / `inpaint` compute it from the same keys."""
  f = pipe.vae.config.downsampling_factor
  image = jnp.asarray(image)
  need_image = task == "img2img" or strength < 1.0 or not pipe.inpainting_unet

  def fn(vae_params, keys):
    b = keys.shape[0]
    images = jnp.broadcast_to(image, (b,) + image.shape[1:])
    cond = {}
    if task == "pix2pix":  # the posterior's mode, unscaled (no key)
      cond["image_latents"] = pipe.encode_image_modes(vae_params, images)
    elif need_image:
      cond["image_latents"] = pipe.encode_images(vae_params, images, keys)
    if task == "inpaint":
      masks = jnp.broadcast_to(jnp.asarray(mask), (b,) + mask.shape[1:])
      cond["mask"] = conditioning.latent_mask(masks, f)
      if pipe.inpainting_unet:
        masked = conditioning.masked_images(images, masks)
        masked_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        cond["masked_image_latents"] = pipe.encode_images(vae_params, masked, masked_keys)
    return cond

  return fn
