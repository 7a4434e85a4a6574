"""Seconds per denoising step: the sampling loop compiled (one lax.scan) vs stepped from Python.

  .venv/bin/python benchmarks/loop_overhead.py [--model DIR] [--steps 25] [--batch 2] [--repeats 5]

Without --model it writes a tiny random diffusers model (tests/reference.py) and uses that. The
Python-stepped loop jits one guided U-Net call plus one sampler update and calls it once per step,
as a diffusers-style loop does; both produce the same latents (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsd  # noqa: E402
from jaxsd.diffusion import samplers  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model")
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=0, help="image side (default: the model's)")
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  model = args.model
  if not model:
    from tests import reference

    model = reference.make_tiny_sd_folder(os.path.join(tempfile.mkdtemp(), "sd"))
  pipe = jaxsd.StableDiffusion.from_pretrained(model)
  size = args.size or pipe.default_size
  prompts = ["a red circle"] * args.batch
  ids, uncond = pipe.tokenize(prompts), pipe.tokenize([""] * args.batch)
  noise = pipe.noise(0, args.batch, size, size)
  g = jnp.float32(7.5)
  schedule = samplers.make_schedule(pipe.scheduler_config, args.sampler, args.steps)

  # Compiled: text encoding + the whole loop in one program (the latents, no decode).
  full = jax.jit(pipe.generate_fn(args.sampler, args.steps, True, "latent"))
  keys = pipe.sampler_keys(0, args.batch)
  jax.block_until_ready(full(pipe.params, ids, uncond, noise, g, keys))

  # Python-stepped: one jitted (guided U-Net call + sampler update) per step.
  def encode(params, ids, uncond):
    return jnp.concatenate([pipe.encode_text(params, uncond), pipe.encode_text(params, ids)])

  @jax.jit
  def one_step(params, context, x, state, i):
    model_fn = pipe.denoiser(params, context, g, True)
    out = model_fn(samplers.model_input(schedule, i, x), schedule.timesteps[i])
    return samplers.step(schedule, i, x, out, state)

  def stepped():
    context = jax.jit(encode)(pipe.text_encoder_params, ids, uncond)
    x = samplers.prepare_latents(schedule, noise)
    state = samplers.init_state(schedule, x)
    for i in range(schedule.timesteps.shape[0]):
      x, state = one_step(pipe.unet_params, context, x, state, jnp.int32(i))
    return x

  jax.block_until_ready(stepped())
  a, b = np.asarray(full(pipe.params, ids, uncond, noise, g, keys)), np.asarray(stepped())
  times = {"compiled": [], "python_stepped": []}
  for _ in range(args.repeats):  # interleaved, so drift hits both
    t0 = time.perf_counter()
    jax.block_until_ready(full(pipe.params, ids, uncond, noise, g, keys))
    times["compiled"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(stepped())
    times["python_stepped"].append(time.perf_counter() - t0)
  n = schedule.timesteps.shape[0]
  out = {k: round(statistics.median(v) / n * 1000, 3) for k, v in times.items()}
  print(
      json.dumps({
          "ms_per_step": out,
          "model_calls": n,
          "batch": args.batch,
          "size": size,
          "sampler": args.sampler,
          "max_abs_diff_latents": float(np.abs(a - b).max()),
          "backend": jax.default_backend()
      }))


if __name__ == "__main__":
  main()
