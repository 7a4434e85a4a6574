"""One SDXL base U-Net forward at 128x128 latents (1024² images), batch 1, fp32, on the CPU: jaxsd against
diffusers-PyTorch, each in its own process (one 2.6B-parameter U-Net is 10.3 GB in fp32), one after the other.

  python benchmarks/sdxl_cpu_forward.py [--repeats 3] [--out docs/runs/sdxl_cpu_forward.json]

Random weights (the timing does not depend on them): jaxsd's drawn with numpy into the parameter tree of
the published config (`sdxl_configs.SDXL_UNET`), diffusers' by its own initialisation of the same config.
The same inputs' shapes: latents (1, 128, 128, 4) (NCHW for PyTorch), t = 500, 77 x 2048 context, the pooled
1280 and six time ids. Reports the median of `--repeats` timed forwards after one untimed (compiling) one;
the machine should be quiet (issue 11 asks for the ratio, no absolute target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # sdxl_configs

LATENT, TOKENS = 128, 77


def _jaxsd(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import sdxl_configs
  from jaxsd import pretrained
  from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel

  t0 = time.perf_counter()
  unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(sdxl_configs.SDXL_UNET))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02),
                                  pretrained.abstract_params(unet))
  params = jax.device_put(params)
  x = jnp.asarray(rng.standard_normal((1, LATENT, LATENT, 4), dtype=np.float32))
  ctx = jnp.asarray(rng.standard_normal((1, TOKENS, 2048), dtype=np.float32))
  pooled = jnp.asarray(rng.standard_normal((1, 1280), dtype=np.float32))
  ids = jnp.asarray([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
  t = jnp.full((1,), 500, jnp.int32)
  init_s = time.perf_counter() - t0
  fn = jax.jit(lambda p, x, t, c, pooled, ids: unet.apply({"params": p}, x, t, c, text_embeds=pooled, time_ids=ids))
  t0 = time.perf_counter()
  compiled = fn.lower(params, x, t, ctx, pooled, ids).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    compiled(params, x, t, ctx, pooled, ids).block_until_ready()
    times.append(time.perf_counter() - t0)
  return dict(impl="jaxsd", jax=jax.__version__, init_s=init_s, compile_s=compile_s, first_s=times[0],
              times_s=times[1:], median_s=statistics.median(times[1:]))


def _torch(repeats: int) -> dict:
  import diffusers
  import torch

  import sdxl_configs

  torch.set_num_threads(os.cpu_count())
  t0 = time.perf_counter()
  unet = diffusers.UNet2DConditionModel.from_config(sdxl_configs.SDXL_UNET).eval()
  g = torch.Generator().manual_seed(0)
  x = torch.randn((1, 4, LATENT, LATENT), generator=g)
  ctx = torch.randn((1, TOKENS, 2048), generator=g)
  cond = {
      "text_embeds": torch.randn((1, 1280), generator=g),
      "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
  }
  t = torch.full((1,), 500, dtype=torch.long)
  init_s = time.perf_counter() - t0
  times = []
  with torch.no_grad():
    for _ in range(repeats + 1):
      t0 = time.perf_counter()
      unet(x, t, ctx, added_cond_kwargs=cond).sample
      times.append(time.perf_counter() - t0)
  return dict(impl="torch", torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads(),
              init_s=init_s, first_s=times[0], times_s=times[1:], median_s=statistics.median(times[1:]))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  parser.add_argument("--impl", choices=("jaxsd", "torch"), help=argparse.SUPPRESS)  # a worker
  args = parser.parse_args(argv)
  if args.impl:
    print(json.dumps((_jaxsd if args.impl == "jaxsd" else _torch)(args.repeats)), flush=True)
    return {}
  results = {}
  for impl in ("jaxsd", "torch"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--impl", impl, "--repeats",
                          str(args.repeats)], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      raise SystemExit(f"the {impl} worker failed:\n{out.stderr[-3000:]}")
    results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(results[impl]), flush=True)
  results["ratio_jaxsd_over_torch"] = results["jaxsd"]["median_s"] / results["torch"]["median_s"]
  print(f"jaxsd {results['jaxsd']['median_s']:.1f} s, torch {results['torch']['median_s']:.1f} s: "
        f"ratio {results['ratio_jaxsd_over_torch']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
