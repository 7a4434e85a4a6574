"""A second process's start of the U-Net train step: plain `jax.jit` against a step saved with `jax.export`.

    python benchmarks/train_step_export.py save --model-dir DIR   # exports the step to --program
    python benchmarks/train_step_export.py jit  --model-dir DIR   # new process: trace + lower + compile, 3 steps
    python benchmarks/train_step_export.py load --model-dir DIR   # new process: the saved step, 3 steps

Run `jit` and `load` twice each (the first fills the persistent compilation cache in --cache), alternating.
Each prints its tracing / lowering and compile seconds and the step times, and saves the first 1,000 values of
every parameter after its steps (`<out>/params_<mode>.npy`) to compare the two to the bit. The state and batch
are passed as flat leaves: optax's state types are not registered for `jax.export`'s serialization. Measured
and not adopted: docs/benchmarks.md ("Why a second process still compiles the CPU train step").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import workloads_jaxsd  # noqa: E402
from jaxsd import compilation_cache  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("mode", choices=("save", "jit", "load"))
  p.add_argument("--model-dir", required=True, help="a benchmark model folder (benchmarks/model_folder.py)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--latent", type=int, default=32)
  p.add_argument("--out", default="/tmp/train_step_export")
  p.add_argument("--cache", default="/tmp/train_step_export/cache")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  compilation_cache.enable_compilation_cache(args.cache)
  spec = dict(model=args.model_dir, batch=args.batch, latent=args.latent, dtype="float32")
  step, (state, batch, rng) = workloads_jaxsd._train_parts(spec)
  key_data = jax.random.key_data(rng)
  leaves, tree = jax.tree.flatten((state, batch))
  n_state = len(jax.tree.leaves(state))
  donate = tuple(range(1, 1 + n_state))

  def flat_step(key_data, *leaves):
    s, b = jax.tree.unflatten(tree, leaves)
    new_state, metrics = step(s, b, jax.random.wrap_key_data(key_data))
    return jax.tree.leaves(new_state), metrics

  program = os.path.join(args.out, "train_step.jaxexport")
  t0 = time.perf_counter()
  if args.mode == "save":
    exported = jax.export.export(jax.jit(flat_step, donate_argnums=donate))(key_data, *leaves)
    with open(program, "wb") as f:
      f.write(exported.serialize())
    print(f"exported in {time.perf_counter() - t0:.2f} s to {program} ({os.path.getsize(program)} bytes)")
    return
  if args.mode == "jit":
    lowered = jax.jit(flat_step, donate_argnums=donate).lower(key_data, *leaves)
  else:
    with open(program, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    lowered = jax.jit(exported.call, donate_argnums=donate).lower(key_data, *leaves)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  print(f"{args.mode}: trace + lower {t1 - t0:.2f} s, compile (or cache load) {time.perf_counter() - t1:.2f} s")
  for i in range(3):
    t = time.perf_counter()
    new_leaves, metrics = compiled(key_data, *leaves)
    jax.block_until_ready(new_leaves)
    print(f"  step {i}: {time.perf_counter() - t:.2f} s, loss {float(metrics['loss']):.6f}")
    leaves = list(new_leaves) + leaves[n_state:]
  np.save(os.path.join(args.out, f"params_{args.mode}.npy"),
          np.concatenate([np.asarray(x).ravel()[:1000] for x in leaves[:n_state]]))


if __name__ == "__main__":
  main()
