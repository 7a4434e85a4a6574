"""Numerical checks of jaxsd on a GPU, run before the --gpu benchmark: cuDNN attention and bf16.

    python benchmarks/gpu_check.py --models-dir /tmp/models [--model sd15] [--out check.json]

1. Attention at the SD 1.5 shapes (self-attention over 4096/1024 latent tokens, cross-attention
   over 77 context tokens, the VAE's single 512-wide head): jaxsd's "auto" choice (cuDNN's fused
   kernel for bf16 where it applies, the 77 keys padded to 128) and the XLA path in bf16, each
   against an fp32 reference at "highest" matmul precision; ||out - ref|| / ||ref||, for the
   output and (the largest of) the gradients with respect to q, k and v. Whether the compiled program holds a cuDNN
   fused-attention custom call is read from its HLO, and both paths are timed.
2. The U-Net (random weights of the benchmark folder): jaxsd fp32 and jaxsd bf16 against diffusers
   PyTorch fp32 on the same GPU, TF32 off on both sides for the fp32 comparison.
Prints one JSON line per check and writes them all to --out.
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

RESULTS = []


def report(**kw):
  RESULTS.append(kw)
  print(json.dumps(kw), flush=True)


def rel(a, b) -> float:
  import numpy as np

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bench(fn, n=20) -> float:
  import statistics

  fn().block_until_ready()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn().block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def attention_checks() -> None:
  import jax
  import jax.numpy as jnp

  from jaxsd.models import attention

  shapes = {  # (B, T, S, N, H): batch 2 = one guided SD 1.5 step at batch 1
      "unet level-0 self 4096x4096 8x40": (2, 4096, 4096, 8, 40),
      "unet level-0 cross 4096x77 8x40": (2, 4096, 77, 8, 40),
      "unet level-1 self 1024x1024 8x80": (2, 1024, 1024, 8, 80),
      "unet level-2 self 256x256 8x160": (2, 256, 256, 8, 160),
      "vae mid self 4096x4096 1x512": (1, 4096, 4096, 1, 512),
  }
  for name, (b, t, s, n, h) in shapes.items():
    if jax.default_backend() == "cpu":  # a dry run of the script: same code, 16x shorter sequences
      t, s = t // 16, (s if s == 77 else s // 16)
    k = jax.random.split(jax.random.key(len(name)), 3)
    q = jax.random.normal(k[0], (b, t, n, h), jnp.float32)
    kk = jax.random.normal(k[1], (b, s, n, h), jnp.float32)
    v = jax.random.normal(k[2], (b, s, n, h), jnp.float32)
    g = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)  # cotangent of the output

    def grads(impl, g):  # d(sum(out * g)) / d(q, k, v)
      return jax.jit(lambda q, k, v: jax.vjp(lambda *a: attention.dot_product_attention(*a, implementation=impl), q, k,
                                             v)[1](g.astype(q.dtype)))

    with jax.default_matmul_precision("highest"):
      ref = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla"))(q, kk, v)
      ref_grads = grads("xla", g)(q, kk, v)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, kk, v))
    row = {"check": "attention", "case": name}
    for impl in ("auto", "xla"):
      f = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(q, k, v, implementation=impl))
      hlo = f.lower(qb, kb, vb).compile().as_text()
      out = f(qb, kb, vb)
      try:
        grad_err = max(rel(a, b) for a, b in zip(grads(impl, g)(qb, kb, vb), ref_grads))
      except Exception as e:  # e.g. cuDNN refusing a backward shape: reported, not fatal
        grad_err = f"{type(e).__name__}: {e}"[:300]
      row[impl] = {
          "rel_err_vs_fp32": rel(out, ref),
          "grad_rel_err_vs_fp32": grad_err,
          "cudnn_fmha_in_hlo": "cudnn$fmha" in hlo or "fmha" in hlo,
          "ms": 1e3 * bench(lambda: f(qb, kb, vb))
      }
    report(**row)


def unet_checks(folder: str) -> None:
  import diffusers
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from jaxsd import pretrained

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  rng = np.random.default_rng(0)
  with open(os.path.join(folder, "unet", "config.json")) as f:
    cfg = json.load(f)
  b, s = 2, cfg["sample_size"]  # batch 2: one guided step at batch 1
  x = rng.standard_normal((b, s, s, cfg["in_channels"])).astype(np.float32)
  ctx = rng.standard_normal((b, 77, cfg["cross_attention_dim"])).astype(np.float32)
  t = np.array([500, 20], np.int64)

  t0 = time.perf_counter()
  tu = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).to(dev).eval()
  with torch.no_grad():
    ref = tu(
        torch.from_numpy(x).permute(0, 3, 1, 2).to(dev),
        torch.from_numpy(t).to(dev),
        torch.from_numpy(ctx).to(dev)).sample.permute(0, 2, 3, 1).float().cpu().numpy()
    torch_s = time.perf_counter() - t0
    for half in (torch.bfloat16, torch.float16):  # the peer's own half-precision error, for scale
      out = tu.to(half)(torch.from_numpy(x).permute(0, 3, 1, 2).to(dev, half), torch.from_numpy(t).to(dev),
                        torch.from_numpy(ctx).to(dev, half)).sample.permute(0, 2, 3, 1).float().cpu().numpy()
      report(check="torch half vs torch fp32", torch_dtype=str(half), rel_err=rel(out, ref),
             max_abs=float(np.abs(out - ref).max()))
  del tu
  torch.cuda.empty_cache()

  module, params = pretrained.load_unet(os.path.join(folder, "unet"), jnp.float32)
  for dtype, precision in ((jnp.bfloat16, "default"), (jnp.float32, "highest")):  # bf16 first: the point
    m = module.clone(dtype=dtype)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    with jax.default_matmul_precision(precision):
      f = jax.jit(lambda p, x, t, c: m.apply({"params": p}, x, t, c))
      t0 = time.perf_counter()
      compiled = f.lower(p, x.astype(dtype), t.astype(np.int32), ctx.astype(dtype)).compile()
      compile_s = time.perf_counter() - t0
      out = np.asarray(compiled(p, x.astype(dtype), t.astype(np.int32), ctx.astype(dtype)).astype(jnp.float32))
    report(check="unet vs torch fp32", jaxsd_dtype=jnp.dtype(dtype).name, matmul_precision=precision,
           rel_err=rel(out, ref), max_abs=float(np.abs(out - ref).max()), ref_abs_mean=float(np.abs(ref).mean()),
           compile_s=compile_s, cudnn_fmha_in_hlo="fmha" in compiled.as_text(), torch_load_and_run_s=torch_s)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models-dir", required=True)
  p.add_argument("--model", default="sd15")
  p.add_argument("--out", default=None)
  p.add_argument("--skip-attention", action="store_true", help="only the U-Net checks")
  p.add_argument("--only-attention", action="store_true", help="only the attention checks")
  args = p.parse_args()
  import jax

  import model_folder

  report(check="devices", devices=[d.device_kind for d in jax.devices()], backend=jax.default_backend(),
         jax=jax.__version__)
  if not args.skip_attention:
    attention_checks()
  if not args.only_attention:
    unet_checks(model_folder.write(args.model, args.models_dir))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(RESULTS, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
