"""Where one jaxsd program spends its time: device time per layer kind, from a profiler trace.

    python benchmarks/profile_ops.py --model small --workload train --batch 2
    python benchmarks/profile_ops.py --model sd15 --workload train --batch 16 --latent 64 --dtype bfloat16

Compiles the suite's own workload (`workloads_jaxsd`: the U-Net train step with AdamW on cached
latents, or one U-Net forward), runs it a few times under `jax.profiler`, and reads the trace
back with `jax.profiler.ProfileData` (no TensorBoard needed). Each kernel / thunk is attributed
to the HLO instruction that launched it, and through that instruction's `op_name` metadata to
the Flax module and primitive it came from: "conv fwd", "conv bwd", "attention core bwd",
"norm fwd", "optimizer", ... Prints a table and writes a JSON summary (and keeps the trace).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b(fusion|custom-call|convolution|dot|[a-z\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> {"opcode", "op_name", "target"} from a compiled module's HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    op = _OP_NAME.search(line)
    tg = _TARGET.search(line)
    out[m.group(1)] = {"opcode": m.group(2), "op_name": op.group(1) if op else "",
                       "target": tg.group(1) if tg else ""}
  return out


_LAYER_KINDS = (  # (substring of a module path component, kind); the innermost match wins
    ("conv_shortcut", "conv"), ("conv", "conv"), ("time_emb_proj", "time embedding"),
    ("time_embedding", "time embedding"), ("norm", "norm"), ("attn", "attention"), ("ff", "feed-forward"),
    ("proj_in", "transformer proj"), ("proj_out", "transformer proj"), ("downsamplers", "conv"),
    ("upsamplers", "conv"),
)


def classify(op_name: str, target: str = "", kernel: str = "") -> str:
  """A short category for one instruction: "<layer kind>[ core] fwd|bwd", or "optimizer", ..."""
  if not op_name:
    low = (target + " " + kernel).lower()
    return "conv (no metadata)" if "conv" in low else "other (no metadata)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  parts = op_name.split("/")
  kind = None
  for comp in reversed(parts):
    c = re.sub(r"\(.*?\)", "", comp).lower()
    for sub, k in _LAYER_KINDS:
      if sub in c:
        kind = k
        break
    if kind:
      break
  if kind is None:
    if "UNet" not in op_name and "apply" not in op_name:
      return "optimizer / step" if not any(s in op_name for s in ("jvp", "transpose")) else "loss / other"
    kind = "other layer"
  if kind == "attention":
    if any(p in op_name for p in ("to_q", "to_k", "to_v", "to_out")):
      kind = "attention proj"
    else:
      kind = "attention core"
  return f"{kind} {direction}"


def device_events(xplane_path: str):
  """[(kernel or thunk name, HLO instruction, duration in ns)] of the device's events: the GPU's
  kernels on its stream lines (or, lacking their HLO names, the "XLA Ops" line), or the CPU's
  XLA thunks."""
  import jax

  pd = jax.profiler.ProfileData.from_file(xplane_path)
  gpu = [p for p in pd.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  planes = gpu or [p for p in pd.planes if p.name == "/host:CPU"]
  kernels, ops = [], []
  for plane in planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "XLA Ops" in line.name:
          ops.append((ev.name, ev.name, float(ev.duration_ns)))
        elif stats.get("hlo_op") is not None and (not gpu or line.name.startswith("Stream")):
          kernels.append((ev.name, str(stats["hlo_op"]), float(ev.duration_ns)))
  return kernels or ops


def summarise(events, index: dict, runs: int) -> dict:
  by_cat = collections.Counter()
  by_kernel = collections.Counter()
  count = collections.Counter()
  for kernel, hlo, ns in events:
    info = index.get(hlo, {})
    cat = classify(info.get("op_name", ""), info.get("target", ""), kernel)
    by_cat[cat] += ns
    key = f"{cat} | {info.get('target') or info.get('opcode', '?')} | {kernel[:60]}"
    by_kernel[key] += ns
    count[key] += 1
  total = sum(by_cat.values()) or 1.0
  ms = lambda ns: ns / runs / 1e6
  return {"runs": runs, "device_ms_per_run": ms(total),
          "categories": [{"category": c, "ms": ms(v), "share": v / total} for c, v in by_cat.most_common()],
          "top_kernels": [{"kernel": k, "ms": ms(v), "calls_per_run": count[k] / runs}
                          for k, v in by_kernel.most_common(40)]}


def build(args):
  """(compiled, call) of the chosen workload, from the benchmark suite's own code."""
  import jax

  import model_folder
  import workloads_jaxsd as w

  folder = args.model_dir or model_folder.write(args.model, args.models_dir, log=lambda m: print(m, file=sys.stderr))
  spec = {"model": os.path.abspath(folder), "batch": args.batch, "latent": args.latent, "dtype": args.dtype}
  if args.workload == "train":
    step, (state, batch, rng) = w._train_parts(spec)
    compiled, info = w.compile_timed(step, state, batch, rng, donate_argnums=(0,))
    holder = {"state": state}

    def call():
      holder["state"], m = compiled(holder["state"], batch, rng)
      jax.block_until_ready((holder["state"], m))
    return compiled, call, info
  import jax.numpy as jnp

  from jaxsd import pretrained
  dtype = w._dtype(args.dtype)
  module, params = pretrained.load_unet(os.path.join(spec["model"], "unet"), dtype)
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (args.batch, args.latent, args.latent, module.config.in_channels)).astype(dtype)
  ctx = jax.random.normal(k[1], (args.batch, 77, module.config.cross_attention_dim)).astype(dtype)
  t = jnp.full((args.batch,), 500, jnp.int32)
  compiled, info = w.compile_timed(lambda p, x, t, c: module.apply({"params": p}, x, t, c), params, x, t, ctx)
  return compiled, lambda: compiled(params, x, t, ctx).block_until_ready(), info


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small", help="a benchmark model name (tiny, small, sd15)")
  p.add_argument("--model-dir", default=None, help="a diffusers folder to use instead of --model")
  p.add_argument("--models-dir", default="bench_out/models")
  p.add_argument("--workload", choices=("train", "unet_forward"), default="train")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--latent", type=int, default=None, help="latent side (default: the model's sample_size)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--runs", type=int, default=3, help="profiled runs, after two warm-ups")
  p.add_argument("--out", default="bench_out/profile", help="summary JSON and the trace go here")
  args = p.parse_args(argv)
  import jax

  import sd15_configs
  if args.latent is None:
    args.latent = sd15_configs.MODELS[args.model]["unet"]["sample_size"]
  compiled, call, info = build(args)
  for _ in range(2):
    call()
  walls = []
  for _ in range(5):
    t0 = time.perf_counter()
    call()
    walls.append(time.perf_counter() - t0)
  wall = sorted(walls)[2]  # median of 5, unprofiled
  os.makedirs(args.out, exist_ok=True)
  trace_dir = os.path.join(args.out, "trace")
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.runs):
    call()
  jax.profiler.stop_trace()
  xplane = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)[-1]
  index = hlo_index(compiled.as_text())
  summary = summarise(device_events(xplane), index, args.runs)
  summary.update({"workload": args.workload, "model": args.model, "batch": args.batch, "latent": args.latent,
                  "dtype": args.dtype, "wall_s_unprofiled": wall, "wall_s_all": walls, "flops": info.get("flops"),
                  "compile_s": info.get("compile_s"), "device": jax.devices()[0].device_kind, "xplane": xplane})
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"{args.workload} {args.model} b{args.batch} {args.latent}x{args.latent} {args.dtype} on "
        f"{summary['device']}: wall {wall * 1e3:.1f} ms, device time {summary['device_ms_per_run']:.1f} ms per run")
  for c in summary["categories"]:
    print(f"  {c['category']:<28} {c['ms']:9.2f} ms  {100 * c['share']:5.1f}%")
  print("top kernels:")
  for k in summary["top_kernels"][:25]:
    print(f"  {k['ms']:9.2f} ms  x{k['calls_per_run']:<5g} {k['kernel']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
