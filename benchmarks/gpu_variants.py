"""Variants of the SD 1.5 train step and sampling program on one GPU, beside PyTorch, one process each.

Issue 16's second round. Each variant (batch, cross-attention path, parameter layouts, AdamW's
first-moment dtype, XLA flags) and each PyTorch peer runs in its own worker process, one after
another in the order of `VARIANTS` (most wanted first, in case the budget runs out): compile (or
load), 2 warm-up and 8 timed iterations, one JSON line appended to `<out>/variants.jsonl`. The
driver prints the table last. Set JAX_COMPILATION_CACHE_DIR so that a rerun on a warm machine
skips the compiles.

Compiling the variants concurrently was tried on the H200 (2026-12-04) and does not pay: XLA's
GPU compiler already spreads one compile over the 16 cores and autotunes on the GPU, so 15
concurrent workers took 240-255 s to compile the sampling program (33 s alone) and none of the
six train steps was compiled after 390 s; two train steps side by side were not compiled after
212 s (75-95 s alone).

  python benchmarks/gpu_variants.py --models-dir /tmp/models --out /tmp/variants [--only a,b] [--budget 480]

`--model tiny` runs every variant on this CPU in a few minutes (a dry run of the script).
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
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # jaxsd without install

TRAIN = dict(workload="train", dtype="bfloat16")
SAMPLE = dict(workload="sample", dtype="bfloat16", steps=25, sampler="ddim", guidance_scale=7.5)
# pad_keys=False: the 77-token cross-attention on XLA's path, as before cuDNN's keys were padded
# to 128 (each other change is also measured on that path, so that a failure of the padded cuDNN
# call cannot hide it); auto_layout: XLA picks the train state's layouts (conv kernels and their
# AdamW state in cuDNN's layout, no transposes in the update); mu_dtype: AdamW's first moment;
# autotune0: XLA's GPU autotuning off (a compile-time figure; sampling's time shows what it costs);
# guard-cond: the step's non-finite guard as a lax.cond, as on the CPU (`train_state._if_finite`: no
# copies of AdamW's moments, but the host waits for the predicate before the update's kernels).
VARIANTS = {  # run in this order
    "train b16 xla-cross": dict(TRAIN, batch=16, pad_keys=False),
    "train b16": dict(TRAIN, batch=16),
    "torch train b16": dict(TRAIN, batch=16, impl="torch"),
    "sample b8 xla-cross": dict(SAMPLE, batch=8, pad_keys=False),
    "sample b8": dict(SAMPLE, batch=8),
    "torch sample b8": dict(SAMPLE, batch=8, impl="torch"),
    "train b32 auto-layout mu-bf16": dict(TRAIN, batch=32, auto_layout=True, mu_dtype="bfloat16"),
    "train b32": dict(TRAIN, batch=32),
    "torch train b32": dict(TRAIN, batch=32, impl="torch"),
    "train b16 guard-cond": dict(TRAIN, batch=16, guard="cond"),
    "train b16 xla-cross auto-layout": dict(TRAIN, batch=16, pad_keys=False, auto_layout=True),
    "train b16 xla-cross mu-bf16": dict(TRAIN, batch=16, pad_keys=False, mu_dtype="bfloat16"),
    "sample b1": dict(SAMPLE, batch=1),
    "torch sample b1": dict(SAMPLE, batch=1, impl="torch"),
    "train b16 xla-cross autotune0": dict(TRAIN, batch=16, pad_keys=False, xla_flags="--xla_gpu_autotune_level=0"),
    "sample b8 xla-cross autotune0": dict(SAMPLE, batch=8, pad_keys=False, xla_flags="--xla_gpu_autotune_level=0"),
}
TIMED, WARMUP = 8, 2


def _random_params(abstract, key):
  import jax
  import jax.numpy as jnp

  import model_folder

  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for (path, leaf), k in zip(leaves, jax.random.split(key, len(leaves))):
    scale = model_folder.leaf_scale(path, tuple(leaf.shape))
    if isinstance(scale, str):
      out.append((jnp.zeros if scale == "zeros" else jnp.ones)(leaf.shape, leaf.dtype))
    else:
      out.append(jax.random.normal(k, leaf.shape, leaf.dtype) * scale)
  return jax.tree_util.tree_unflatten(treedef, out)


def _jaxsd_train(spec: dict):
  """(prepare, run, info): prepare() -> (state, batch) on the device; run(state, batch) -> (state, loss)."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.layout import Format, Layout

  from jaxsd import flops, pretrained
  from jaxsd.diffusion import schedules
  from jaxsd.models import unet as unet_lib
  from jaxsd.training import optimizer
  from jaxsd.training.train_state import TrainState, make_train_step

  import workloads_jaxsd

  cfg = json.load(open(os.path.join(spec["model"], "unet", "config.json")))
  module = unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(cfg), dtype=jnp.bfloat16)
  sched = schedules.SchedulerConfig.from_json(os.path.join(spec["model"], "scheduler", "scheduler_config.json"))
  tx, _ = optimizer.make_optimizer({"lr": 1e-4, "warmup_steps": 0, "mu_dtype": spec.get("mu_dtype", "float32")})

  loss_fn = workloads_jaxsd.noise_prediction_loss(module, sched)
  if spec.get("guard") == "cond":
    from jaxsd.training import train_state
    train_state._COND_BACKENDS = ("cpu", "gpu", "tpu")  # read while tracing, in this worker process only
  step = make_train_step(loss_fn, tx)
  create = lambda p: TrainState.create(p, tx)
  b, s = spec["batch"], spec["latent"]
  abstract_params = pretrained.abstract_params(module)
  abstract_state = jax.eval_shape(create, abstract_params)
  batch_shapes = (jax.ShapeDtypeStruct(
      (b, s, s, cfg["in_channels"]), jnp.float32), jax.ShapeDtypeStruct((b, 77, cfg["cross_attention_dim"]),
                                                                        jnp.float32))
  rng = jax.random.key(2)
  kw = {"donate_argnums": (0,)}
  if spec.get("auto_layout"):
    kw.update(in_shardings=(Format(Layout.AUTO), None, None), out_shardings=(Format(Layout.AUTO), None))
  t0 = time.perf_counter()
  compiled = jax.jit(step, **kw).lower(abstract_state, batch_shapes, rng).compile()
  # Model FLOPs (attention written out, costed on the CPU client) once the timing is done.
  info = {
      "compile_s": time.perf_counter() - t0,
      "flops": lambda: flops.model_flops(step, abstract_state, batch_shapes, rng)
  }
  state_format = compiled.input_formats[0][0] if spec.get("auto_layout") else None
  # Random weights drawn on the device (the same in every variant; model_folder's rule, not its
  # file: no host copy of 860M parameters to read and transfer).
  create_c = jax.jit(lambda key: create(_random_params(abstract_params, key)),
                     out_shardings=state_format).lower(jax.random.key(0)).compile()

  def prepare():
    k = jax.random.split(jax.random.key(1), 2)
    batch = (jax.random.normal(k[0], batch_shapes[0].shape), jax.random.normal(k[1], batch_shapes[1].shape))
    return create_c(jax.random.key(0)), batch

  def run(state, batch):
    state, metrics = compiled(state, batch, rng)
    return state, float(metrics["loss"])

  info["images"] = b
  return prepare, run, info


def _jaxsd_sample(spec: dict):
  """A user's `pipe(prompts, ...)` call (tokenize, the compiled program, images to the host), as the
  PyTorch peer's pipeline call is timed; its first call, made here, compiles."""
  import workloads_jaxsd

  pipe, prompts, _, _ = workloads_jaxsd._pipeline_and_args(spec)
  call = lambda: pipe(prompts, height=spec["height"], width=spec["width"], steps=spec["steps"], guidance_scale=spec[
      "guidance_scale"], sampler=spec["sampler"], seed=0, output="np")
  t0 = time.perf_counter()
  call()
  info = {"compile_s": time.perf_counter() - t0, "images": len(prompts)}

  def run(_, __):
    call()
    return None, None

  return (lambda: (None, None)), run, info


def _torch(spec: dict):
  import torch

  import workloads_torch

  t0 = time.perf_counter()
  case = workloads_torch.setup(dict(spec, gpu=torch.cuda.is_available()))
  info = {"load_s": time.perf_counter() - t0, "images": spec["batch"], **case.info}

  def run(_, __):
    out = case.run()
    return None, (out[1].get("loss") if isinstance(out, tuple) else None)

  return (lambda: (None, None)), run, info


def worker(name: str, spec: dict, out: str) -> None:
  t_start = time.perf_counter()
  result = {"name": name, "spec": spec}
  try:
    if spec.get("impl") == "torch":
      prepare, run, info = _torch(spec)
    else:
      from jaxsd.models import attention

      with attention.cudnn_key_padding(spec.get("pad_keys", True)):
        prepare, run, info = (_jaxsd_train if spec["workload"] == "train" else _jaxsd_sample)(spec)
    result.update(info)
    result["setup_s"] = time.perf_counter() - t_start
    state, batch = prepare()
    times, losses = [], []
    for i in range(WARMUP + TIMED):
      t0 = time.perf_counter()
      state, loss = run(state, batch)
      if i >= WARMUP:
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    result.update(times=times, median_s=statistics.median(times), losses=losses)
    result["device_peak_mb"], result["device_kind"], result["peak_flops"] = _device_facts(spec)
    if callable(result.get("flops")):
      result["flops"] = result["flops"]()
  except Exception as e:  # reported in the table; the next variant goes on
    result["error"] = f"{type(e).__name__}: {e}"[:2000]
  with open(os.path.join(out, "variants.jsonl"), "a") as f:
    f.write(json.dumps(result, default=str) + "\n")


def _device_facts(spec: dict):
  """(peak device memory in MB, device kind, peak dense bf16 FLOP/s)."""
  from jaxsd import flops

  if spec.get("impl") == "torch":  # asked of torch: starting jax's GPU client here would take the card's memory
    import torch

    if not torch.cuda.is_available():
      return None, "cpu", flops.peak_flops_per_device("cpu")
    kind = torch.cuda.get_device_name()
    return torch.cuda.max_memory_allocated() / 2**20, kind, flops.peak_flops_per_device(kind)
  import jax

  kind = jax.devices()[0].device_kind
  stats = jax.devices()[0].memory_stats()
  return (stats.get("peak_bytes_in_use", 0) / 2**20 if stats else None), kind, flops.peak_flops_per_device(kind)


def table(path: str) -> str:
  rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
  kinds = sorted({r["device_kind"] for r in rows if r.get("device_kind")})
  peak = max([r.get("peak_flops") or 0.0 for r in rows] + [0.0])
  lines = [
      f"{'variant':34} {'median s':>9} {'min':>7} {'max':>7} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
      f"{'compile s':>9} {'dev MB':>7}  losses / error"
  ]
  for r in sorted(rows, key=lambda r: list(VARIANTS).index(r["name"]) if r["name"] in VARIANTS else 99):
    if "median_s" not in r:
      lines.append(f"{r['name']:34} {r.get('error', 'no timing')}")
      continue
    tf = r.get("flops", 0) / r["median_s"] / 1e12 if r.get("flops") else 0.0
    mfu = f"{100 * tf * 1e12 / peak:.1f}%" if tf and peak else "-"
    comp = r.get("compile_s", r.get("load_s", 0.0))
    losses = " ".join(f"{x:.3f}" for x in r["losses"] if isinstance(x, float))
    lines.append(
        f"{r['name']:34} {r['median_s']:9.4f} {min(r['times']):7.4f} {max(r['times']):7.4f} "
        f"{r['images'] / r['median_s']:8.2f} {tf:8.1f} {mfu:>6} {comp:9.1f} {r.get('device_peak_mb') or 0:7.0f}  "
        f"{losses}")
  return f"device: {', '.join(kinds) or '?'}, peak {peak / 1e12:.0f} TFLOP/s\n" + "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--models-dir", default="/tmp/models")
  p.add_argument("--model", default="sd15", help="sd15 (the benchmark) or tiny (a CPU dry run)")
  p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  p.add_argument("--budget", type=float, default=480.0, help="seconds before every worker is stopped")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    return worker(a.worker, json.loads(a.spec), a.out)
  t0 = time.perf_counter()
  import sd15_configs, model_folder

  names = [n.strip() for n in a.only.split(",") if n.strip()] or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  os.makedirs(a.out, exist_ok=True)
  folder = model_folder.write(a.model, a.models_dir)
  latent = sd15_configs.image_size(a.model) // sd15_configs.vae_factor(a.model)
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  log = open(os.path.join(a.out, "workers.log"), "a")
  say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
  for n in names:
    left = a.budget - (time.perf_counter() - t0)
    if left < 10:
      say(f"budget spent: {n} not run")
      continue
    spec = dict(VARIANTS[n], model=folder, latent=latent, height=latent * sd15_configs.vae_factor(a.model))
    spec["width"] = spec["height"]
    e = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " " + spec.get("xla_flags", "")).strip())
    cmd = [sys.executable, __file__, "--worker", n, "--spec", json.dumps(spec), "--out", a.out]
    try:
      subprocess.run(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, timeout=left)
      say(f"{n}: done")
    except subprocess.TimeoutExpired:
      say(f"budget spent: {n} stopped")
  print(f"[{time.perf_counter() - t0:6.1f}s] done")
  print(table(os.path.join(a.out, "variants.jsonl")))


if __name__ == "__main__":
  main()
