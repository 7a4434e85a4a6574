"""How long a new process takes to its first image: tracing the sampling program, or a program saved by `jaxsd.aot`.

Both with a warm persistent compilation cache (the compile itself is then a cache load), so what is
left is tracing and lowering (skipped by the saved program) and loading the executable. Each variant
runs in a fresh process: load the random benchmark model, then time the first `pipe(...)` call and a
second one; start overhead = first - second.

  python benchmarks/aot_start.py --models-dir /tmp/models [--model sd15] [--size 64] [--steps 25] [--dtype float32]

The image size hardly changes the tracing (the same program at other shapes); on a CPU a small size
keeps the calls short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

PROMPTS = ["a photograph of an astronaut riding a horse"]


def worker(a) -> None:
  import jax
  import jax.numpy as jnp

  import jaxsd
  from jaxsd import aot

  jax.config.update("jax_compilation_cache_dir", a.cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  pipe = jaxsd.StableDiffusion.from_pretrained(a.folder, getattr(jnp, a.dtype))
  call = lambda: pipe(PROMPTS, height=a.size, width=a.size, steps=a.steps, sampler="ddim", guidance_scale=7.5)
  if a.worker == "save":
    aot.save_program(pipe, a.programs, batch=1, height=a.size, width=a.size, steps=a.steps, sampler="ddim")
  t0 = time.perf_counter()
  if a.worker == "saved":
    aot.load_programs(pipe, a.programs)
  call()
  t1 = time.perf_counter()
  call()
  t2 = time.perf_counter()
  print(json.dumps({"variant": a.worker, "first_s": t1 - t0, "second_s": t2 - t1, "traced": len(pipe._compiled)}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models-dir", default="/tmp/models")
  p.add_argument("--model", default="sd15")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
  p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
  p.add_argument("--programs", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    return worker(a)
  import model_folder

  folder = model_folder.write(a.model, a.models_dir)
  tmp = tempfile.mkdtemp()
  base = [
      sys.executable, __file__, "--folder", folder, "--cache",
      os.path.join(tmp, "cache"), "--programs",
      os.path.join(tmp, "programs"), "--size",
      str(a.size), "--steps",
      str(a.steps), "--dtype", a.dtype
  ]
  # "save" traces and compiles cold (filling the cache) and saves the program; then warm-cache starts.
  for variant in ("save", "traced", "saved", "traced", "saved"):
    res = subprocess.run(base + ["--worker", variant], capture_output=True, text=True)
    if res.returncode:
      sys.exit(res.stderr[-3000:])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        f"{r['variant']:7s} first image {r['first_s']:7.3f} s, second {r['second_s']:7.3f} s, start overhead "
        f"{r['first_s'] - r['second_s']:7.3f} s, programs traced {r['traced']}", flush=True)


if __name__ == "__main__":
  main()
