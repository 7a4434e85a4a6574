"""Batch generation across every local accelerator with `jax.pmap` (what `python -m sample` runs).

Parameters are replicated to the local devices and each global batch is split across them. Image j
of the job list starts from noise drawn with key fold_in(key(seed), j), so the images do not depend
on the number of devices or the batch size. On a multi-host slice (after
`jax.distributed.initialize()`) each host takes every process_count-th batch and writes its own images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.pipeline import StableDiffusion


@dataclasses.dataclass
class GenerateResult:
  files: list[str]
  images: np.ndarray  # uint8 NHWC, this host's images in job order
  compile_seconds: float
  sample_seconds: float
  seconds_per_step: float
  images_per_second: float
  devices: int


def enable_compilation_cache(path: str | None = None) -> str:
  """Switches on JAX's persistent compilation cache so a second process skips compilation."""
  path = path or os.environ.get("JAXSD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxsd", "xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


def image_filename(prompt: str, seed: int, index: int) -> str:
  slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "empty"
  return f"{slug}-seed{seed}-{index:04d}.png"


def contact_sheet(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """Tiles uint8 NHWC images into one image, row by row."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  sheet = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, columns)
    sheet[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
  return sheet


def generate(pipe: StableDiffusion, prompts: Sequence[str], *, num_images: int = 1, steps: int = 25,
             sampler: str = "dpmpp_2m", guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
             width: int | None = None, negative_prompt: str = "", batch_per_device: int = 1,
             out_dir: str | None = None, progress: bool = True, devices=None) -> GenerateResult:
  """Generates `num_images` images per prompt, pmapped over the local devices; writes PNGs and a grid."""
  prompts = [p for p in prompts]
  if not prompts:
    raise ValueError("no prompts: give --prompt or a --prompts-file with at least one non-empty line.")
  if num_images < 1 or batch_per_device < 1:
    raise ValueError("--num-images and --batch-per-device must be at least 1.")
  size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
  height, width = height or size, width or size
  pipe._check(prompts, None, height, width, steps, sampler, "np")

  devices = devices or jax.local_devices()
  n_dev = len(devices)
  jobs = [(p, k) for p in prompts for k in range(num_images)]  # (prompt, index within prompt)
  global_batch = n_dev * batch_per_device
  batches = [list(range(i, min(i + global_batch, len(jobs)))) for i in range(0, len(jobs), global_batch)]
  mine = batches[jax.process_index()::jax.process_count()]

  guided = guidance_scale > 1.0
  fn = pipe.generate_fn(sampler, steps, guided, "np")
  pfn = jax.pmap(fn, in_axes=(0, 0, 0, 0, None, 0), devices=devices)
  params = flax.jax_utils.replicate(pipe.params, devices)  # once, not per call

  def inputs(batch):
    idx = batch + [batch[-1]] * (global_batch - len(batch))  # pad the last batch; padded outputs are dropped
    ids = pipe.tokenize([jobs[j][0] for j in idx])
    uncond = pipe.tokenize([negative_prompt] * len(idx))
    noise = jnp.concatenate([pipe.noise(seed, 1, height, width, offset=j) for j in idx])
    keys = jnp.concatenate([pipe.sampler_keys(seed, 1, offset=j) for j in idx])
    shard = lambda x: x.reshape((n_dev, batch_per_device) + x.shape[1:])
    return shard(ids), shard(uncond), shard(noise), shard(keys)

  compile_seconds = 0.0
  compiled = None
  outputs = []
  sample_seconds = 0.0
  it = mine
  if progress:
    from tqdm import tqdm

    it = tqdm(mine, desc="sampling", unit="batch")
  for batch in it:
    ids, uncond, noise, keys = inputs(batch)
    args = (params, ids, uncond, noise, jnp.float32(guidance_scale), keys)
    if compiled is None:
      t0 = time.perf_counter()
      compiled = pfn.lower(*args).compile()
      compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.asarray(jax.device_get(compiled(*args)))
    sample_seconds += time.perf_counter() - t0
    outputs.append(out.reshape((-1,) + out.shape[2:])[:len(batch)])
  images = np.concatenate(outputs) if outputs else np.zeros((0, height, width, 3), np.uint8)

  files = []
  if out_dir:
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    order = [j for b in mine for j in b]
    for j, im in zip(order, images):
      prompt, k = jobs[j]
      path = os.path.join(out_dir, image_filename(prompt, seed, k))
      Image.fromarray(im).save(path)
      files.append(path)
    if len(images):
      grid_name = "grid.png" if jax.process_count() == 1 else f"grid-host{jax.process_index()}.png"
      Image.fromarray(contact_sheet(images, columns=num_images if num_images > 1 else None)).save(
          os.path.join(out_dir, grid_name))
  n_steps = len(mine) * steps
  return GenerateResult(
      files=files, images=images, compile_seconds=compile_seconds, sample_seconds=sample_seconds,
      seconds_per_step=sample_seconds / max(n_steps, 1), images_per_second=len(images) / max(sample_seconds, 1e-9),
      devices=n_dev)


def benchmark_line(result: GenerateResult) -> str:
  return json.dumps({
      "seconds_per_step": round(result.seconds_per_step, 6), "images_per_second": round(result.images_per_second, 4),
      "compile_seconds": round(result.compile_seconds, 3), "sample_seconds": round(result.sample_seconds, 3),
      "images": int(len(result.images)), "devices": result.devices, "backend": jax.default_backend()})


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
  out = list(prompts)
  if prompts_file:
    if not os.path.exists(prompts_file):
      raise FileNotFoundError(f"--prompts-file {prompts_file}: no such file.")
    with open(prompts_file) as f:
      out += [line.strip() for line in f if line.strip()]
  if not out:
    raise ValueError("no prompts: give --prompt \"...\" or a --prompts-file with one prompt per line.")
  return out


def _check_flags(args) -> None:
  """The checks that need no model, done before anything is loaded."""
  from jaxsd.diffusion import SchedulerConfig, make_schedule

  if args.steps < 1:
    raise ValueError(f"--steps {args.steps}: need at least 1 denoising step.")
  make_schedule(SchedulerConfig(), args.sampler, args.steps)  # raises for an unknown sampler
  for name in ("height", "width"):
    v = getattr(args, name)
    if v is not None and (v <= 0 or v % 8):
      raise ValueError(f"--{name} {v} must be a positive multiple of 8.")
  if args.num_images < 1 or args.batch_per_device < 1:
    raise ValueError("--num-images and --batch-per-device must be at least 1.")


def main(args) -> int:
  """Runs `python -m sample` from parsed flags; bad input exits 2 with a one-paragraph message."""
  import sys

  from jaxsd import pipeline

  try:
    if args.distributed:
      jax.distributed.initialize()
    prompts = read_prompts(args.prompt, args.prompts_file)
    _check_flags(args)
    enable_compilation_cache()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    pipe = pipeline.load(args.model, dtype=dtype)
    result = generate(pipe, prompts, num_images=args.num_images, steps=args.steps, sampler=args.sampler,
                      guidance_scale=args.guidance, seed=args.seed, height=args.height, width=args.width,
                      negative_prompt=args.negative_prompt, batch_per_device=args.batch_per_device,
                      out_dir=args.out, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(result.files)} images and a grid to {args.out}/ on {result.devices} device(s): "
        f"compile {result.compile_seconds:.1f} s, sampling {result.sample_seconds:.1f} s "
        f"({result.seconds_per_step * 1000:.1f} ms/step)", file=sys.stderr)
  if args.benchmark:
    print(benchmark_line(result))
  return 0
