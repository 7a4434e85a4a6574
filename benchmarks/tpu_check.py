"""Numerical checks of jaxsd on a TPU, run before the benchmark: the Pallas flash-attention path.

    python benchmarks/tpu_check.py [--out check.json]

At the SD 1.5 shapes (self-attention over 4096 / 1024 latent tokens with 40-wide heads padded to 128,
cross-attention over 77 context tokens, CLIP's causal 77-token attention), the Pallas kernel that "auto"
picks on a TPU and the XLA path, in bf16 and fp32, each against an fp32 XLA reference at "highest" matmul
precision: ||out - ref|| / ||ref|| for the forward and for the gradients of sum(sin(out)) with respect to
q, k and v; both paths timed (forward + backward). The same comparisons run in CI on the CPU in Pallas'
interpret mode (tests/models/test_attention.py); this is the compiled kernel on the chip.
Prints one JSON line per check and writes them all to --out. Elsewhere than on a TPU it runs small shapes in
Pallas' interpret mode (a dry run of the script itself; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from gpu_check import rel  # noqa: E402  ||out - ref|| / ||ref||, as the GPU checks report it

SHAPES = (  # (batch, queries, keys, heads, head_dim, causal)
    (2, 4096, 4096, 8, 40, False),  # SD 1.5 64x64 self-attention
    (2, 1024, 1024, 8, 80, False),  # 32x32
    (2, 4096, 77, 8, 40, False),  # cross-attention on the prompt
    (8, 77, 77, 12, 64, True),  # CLIP ViT-L text encoder
)
SMALL_SHAPES = ((1, 256, 256, 2, 40, False), (1, 256, 77, 2, 40, False), (1, 77, 77, 2, 64, True))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="tpu_check.json")
  args = p.parse_args(argv)
  import contextlib

  import jax

  results = []
  shapes, interpret = SHAPES, contextlib.nullcontext()
  if jax.default_backend() != "tpu":
    from jax.experimental.pallas import tpu as pltpu

    shapes, interpret = SMALL_SHAPES, pltpu.force_tpu_interpret_mode()
  print(json.dumps({"devices": [str(d) for d in jax.devices()], "kind": jax.devices()[0].device_kind}), flush=True)
  with interpret:
    for shape in shapes:
      results += check(*shape)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  return 0


def check(b, t, s, n, h, causal) -> list[dict]:
  """Pallas and XLA, fp32 and bf16, at one shape, against the fp32 "highest" XLA reference."""
  import contextlib

  import jax
  import jax.numpy as jnp

  from jaxsd.models import attention

  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (b, L, n, h), jnp.float32) for kk, L in zip(keys, (t, s, s)))

  def loss(impl, precision=None):

    def f(q, k, v):
      with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        out = attention.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, ref), ref_g = loss("xla", "highest")(q, k, v)
  results = []
  for impl in ("pallas", "xla"):
    for dtype in (jnp.float32, jnp.bfloat16):
      fn = loss(impl)
      args3 = tuple(x.astype(dtype) for x in (q, k, v))
      (_, out), g = jax.block_until_ready(fn(*args3))
      t0 = time.perf_counter()
      for _ in range(10):
        jax.block_until_ready(fn(*args3))
      r = {
          "shape": [b, t, s, n, h],
          "causal": causal,
          "impl": impl,
          "dtype": jnp.dtype(dtype).name,
          "out_rel": rel(out, ref),
          "grad_rel": [rel(a, c) for a, c in zip(g, ref_g)],
          "fwd_bwd_ms": (time.perf_counter() - t0) / 10 * 1e3,
          "pallas_in_hlo": "tpu_custom_call" in fn.lower(*args3).as_text()
      }
      results.append(r)
      print(json.dumps(r), flush=True)
  return results


if __name__ == "__main__":
  sys.exit(main())
