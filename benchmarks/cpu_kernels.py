"""SD 1.5's CPU kernels one by one, jaxsd beside PyTorch: where a host's whole-network ratio comes from.

    python benchmarks/cpu_kernels.py [--rounds 9] [--only conv,attention,matmul]

Each row compiles jaxsd's own code for one kernel (the 3x3 convolution as `jaxsd.models.cpu_conv` runs it,
XLA's convolution and the im2col matmul side by side; the attention as `jaxsd.models.attention` runs it on the
CPU, cache-sized blocks included; a plain matmul) and times it against the PyTorch op that diffusers calls
(`conv2d` -> oneDNN, `scaled_dot_product_attention` -> its CPU flash kernel, `@` -> MKL/oneDNN), fp32, all
cores, interleaved round by round (so a noisy neighbour slows both); medians in ms. The whole-network figures
are `benchmarks/run.py`'s; this says which kernels make the difference on a given CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jaxsd without install

from protocol import timed

# (batch, side, in, out): SD 1.5's 3x3 convolutions at 64x64 latents, batch 2 as under guidance.
CONVS = [(2, 64, 320, 320), (2, 64, 640, 320), (2, 32, 640, 640), (2, 32, 1280, 640), (2, 16, 1280, 1280),
         (2, 8, 1280, 1280)]
# (batch, queries, keys, heads, head_dim): its self-attentions at each level and the cross-attention.
ATTENTIONS = [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160), (2, 4096, 77, 8, 40)]
# (m, k, n): its feed-forward and projection matmuls at the 64x64 and 16x16 levels, and a 4096^3 matmul: the
# best rate each library's matmul reaches on the host (a bound on any network's rate: FLOPs / that rate).
MATMULS = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (512, 1280, 10240), (512, 5120, 1280),
           (4096, 4096, 4096)]


def _rounds(fns: dict, rounds: int) -> dict:
  """Median ms of each zero-argument function, called once per round in turn after two warm-ups."""
  for f in fns.values():
    f()
    f()
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      times[k].append(timed(f))
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def conv_rows(rounds: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from jaxsd.models import cpu_conv

  pad = ((1, 1), (1, 1))
  for b, h, ci, co in CONVS:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, h, ci), dtype=np.float32)
    w = rng.standard_normal((3, 3, ci, co), dtype=np.float32) * np.float32(0.05)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xla = jax.jit(lambda x, w: cpu_conv._xla_conv(x, w, (1, 1), pad, None))
    mm = jax.jit(lambda x, w: cpu_conv._matmul_conv(x, w, (1, 1), pad, None))
    jaxsd = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=
                                                               ("NHWC", "HWIO", "NHWC")))
    xt, wt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    with torch.no_grad():
      ms = _rounds(
          {
              "jaxsd": lambda: jaxsd(xj, wj).block_until_ready(),
              "xla conv": lambda: xla(xj, wj).block_until_ready(),
              "im2col": lambda: mm(xj, wj).block_until_ready(),
              "torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
          }, rounds)
    yield f"conv 3x3 b{b} {h}x{h} {ci}->{co}", ms, 2 * b * h * h * 9 * ci * co


def attention_rows(rounds: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from jaxsd.models import attention

  for b, t, s, n, hd in ATTENTIONS:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, length, n, hd), dtype=np.float32) for length in (t, s, s))
    qj, kj, vj = (jnp.asarray(a) for a in (q, k, v))
    f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v))
    qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))  # (B, N, L, H)
    with torch.no_grad():
      ms = _rounds(
          {
              "jaxsd": lambda: f(qj, kj, vj).block_until_ready(),
              "torch": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
          }, rounds)
    yield f"attention b{b} {t}x{s} heads {n}x{hd}", ms, 4 * b * n * t * s * hd


def matmul_rows(rounds: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  for m, k, n in MATMULS:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    aj, bj = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.dot)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    ms = _rounds({"jaxsd": lambda: f(aj, bj).block_until_ready(), "torch": lambda: at @ bt}, rounds)
    yield f"matmul {m}x{k}x{n}", ms, 2 * m * k * n


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--only", default="conv,attention,matmul")
  args = p.parse_args(argv)
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/run.py runs PyTorch
  import torch

  torch.set_num_threads(os.cpu_count())
  rows = {"conv": conv_rows, "attention": attention_rows, "matmul": matmul_rows}
  for name in args.only.split(","):
    for label, ms, flop in rows[name](args.rounds):
      cols = "  ".join(f"{k} {v:7.1f}" for k, v in ms.items())
      rates = ", ".join(f"{k} {flop / v / 1e6:.0f}" for k, v in ms.items())
      print(f"{label:40s} {cols}  ms | jaxsd/torch {ms['jaxsd'] / ms['torch']:.2f}, GFLOP/s {rates}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
