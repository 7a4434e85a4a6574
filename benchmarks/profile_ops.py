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
import gzip
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
_COMPUTATION = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> {"opcode", "op_name", "target"} from a compiled module's HLO text. A
  fusion without metadata of its own takes its fused computation's (the root's, else the first)."""
  out, comp_ops, current = {}, {}, None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c and " = " not in line:
      current = c.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    op = _OP_NAME.search(line)
    tg = _TARGET.search(line)
    calls = _CALLS.search(line)
    out[m.group(1)] = {
        "opcode": m.group(2),
        "op_name": op.group(1) if op else "",
        "target": tg.group(1) if tg else "",
        "calls": calls.group(1) if calls else ""
    }
    if op and current:
      ops = comp_ops.setdefault(current, [])
      ops.insert(0, op.group(1)) if line.lstrip().startswith("ROOT") else ops.append(op.group(1))
  for info in out.values():
    if not info["op_name"] and info["calls"] in comp_ops:
      info["op_name"] = comp_ops[info["calls"]][0]
  return out


_LAYER_KINDS = (  # (substring of a module path component, kind); the innermost match wins
    ("conv_shortcut", "conv"),
    ("conv", "conv"),
    ("time_emb_proj", "time embedding"),
    ("time_embedding", "time embedding"),
    ("norm", "norm"),
    ("attn", "attention"),
    ("ff", "feed-forward"),
    ("proj_in", "transformer proj"),
    ("proj_out", "transformer proj"),
    ("downsamplers", "conv"),
    ("upsamplers", "conv"),
)


def classify(op_name: str, target: str = "", kernel: str = "") -> str:
  """A short category for one instruction: "<layer kind>[ core] fwd|bwd", or "optimizer", ..."""
  if not op_name:
    return kernel_class(target + " " + kernel)
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
  """[(kernel or thunk name, HLO instruction, duration in ns, stats)] of the device's events: the GPU's
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
          ops.append((ev.name, ev.name, float(ev.duration_ns), stats))
        elif stats.get("hlo_op") is not None and (not gpu or line.name.startswith("Stream")):
          kernels.append((ev.name, str(stats["hlo_op"]), float(ev.duration_ns), stats))
  return kernels or ops


def kernel_class(name: str) -> str:
  """The category of a kernel or instruction without a module path (no HLO metadata, or a
  library's kernel inside a CUDA graph that no instruction is named after), from its name."""
  low = name.lower()
  if "sdpa" in low or "fmha" in low or "flash" in low:
    return "attention core (cuDNN) " + ("bwd" if "bprop" in low or "backward" in low else "fwd")
  if "conv" in low or "fprop" in low or "dgrad" in low or "wgrad" in low:
    return "conv (no module path)"
  if "gemm" in low or "nvjet" in low or "cutlass" in low or "xmma" in low or "dot" in low:
    return "matmul (no module path)"
  if "memcpy" in low or "memset" in low:
    return "memcpy / memset"
  return "other (no module path)"


def _by_kernel_name(kernel: str, index: dict) -> dict:
  """A kernel launched from a CUDA graph (hlo_op "command_buffer_N") is named after its fusion,
  with "_N" for ".N" ("input_transpose_fusion_6" is input_transpose_fusion.6)."""
  return index.get(kernel) or index.get(re.sub(r"_(\d+)$", r".\1", kernel)) or {}


def summarise(events, index: dict, runs: int) -> dict:
  by_cat = collections.Counter()
  by_kernel = collections.Counter()
  count = collections.Counter()
  unmatched = collections.Counter()
  for kernel, hlo, ns, stats in events:
    info = index.get(hlo) or _by_kernel_name(kernel, index)
    if not info:
      unmatched[kernel] += ns
    cat = classify(info["op_name"], info["target"], kernel) if info else kernel_class(kernel)
    by_cat[cat] += ns
    key = f"{cat} | {info.get('target') or info.get('opcode', '?')} | {kernel[:60]}"
    by_kernel[key] += ns
    count[key] += 1
  total = sum(by_cat.values()) or 1.0
  ms = lambda ns: ns / runs / 1e6
  return {
      "runs": runs,
      "device_ms_per_run": ms(total),
      "categories": [{
          "category": c,
          "ms": ms(v),
          "share": v / total
      } for c, v in by_cat.most_common()],
      "top_kernels": [{
          "kernel": k,
          "ms": ms(v),
          "calls_per_run": count[k] / runs
      } for k, v in by_kernel.most_common(40)],
      "unmatched_ms": ms(sum(unmatched.values())),
      "unmatched_examples": [h for h, _ in unmatched.most_common(10)]
  }


def build(args):
  """(compiled, call, info) of the chosen workload, from the benchmark suite's own code."""
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
  fn, fargs = w._unet_forward_parts(spec)
  compiled, info = w.compile_timed(fn, *fargs)
  return compiled, lambda: compiled(*fargs).block_until_ready(), info


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
  p.add_argument("--from-trace", nargs=2, metavar=("XPLANE", "HLO"), default=None,
                 help="re-read a kept trace (.xplane.pb[.gz]) with its program's HLO text (hlo.txt[.gz])")
  args = p.parse_args(argv)
  import jax

  if args.from_trace:
    return reread(*args.from_trace, runs=args.runs, out=args.out)

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
  events = device_events(xplane)
  summary = summarise(events, index, args.runs)
  summary["sample_events"] = [{
      "kernel": k[:80],
      "hlo_op": h,
      "stats": {
          a: str(b)[:120] for a, b in st.items()
      }
  } for k, h, _, st in events[:5]]
  with gzip.open(os.path.join(args.out, "hlo.txt.gz"), "wt") as f:
    f.write(compiled.as_text())
  summary.update({
      "workload": args.workload,
      "model": args.model,
      "batch": args.batch,
      "latent": args.latent,
      "dtype": args.dtype,
      "wall_s_unprofiled": wall,
      "wall_s_all": walls,
      "flops": info.get("flops"),
      "compile_s": info.get("compile_s"),
      "device": jax.devices()[0].device_kind,
      "xplane": xplane
  })
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"{args.workload} {args.model} b{args.batch} {args.latent}x{args.latent} {args.dtype} on "
        f"{summary['device']}: wall {wall * 1e3:.1f} ms, device time {summary['device_ms_per_run']:.1f} ms per run")
  show(summary)
  return 0


def _read(path: str, mode: str):
  return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def reread(xplane: str, hlo: str, runs: int, out: str) -> int:
  """The table of a kept trace, e.g. one fetched from a GPU machine."""
  import tempfile

  with _read(hlo, "rt") as f:
    index = hlo_index(f.read())
  with _read(xplane, "rb") as f, tempfile.NamedTemporaryFile(suffix=".xplane.pb") as tmp:
    tmp.write(f.read())
    tmp.flush()
    summary = summarise(device_events(tmp.name), index, runs)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"xplane": xplane, **summary}, f, indent=2)
  print(f"{xplane}: device time {summary['device_ms_per_run']:.1f} ms per run "
        f"(unattributed {summary['unmatched_ms']:.1f} ms)")
  show(summary)
  return 0


def show(summary: dict) -> None:
  for c in summary["categories"]:
    print(f"  {c['category']:<28} {c['ms']:9.2f} ms  {100 * c['share']:5.1f}%")
  print("top kernels:")
  for k in summary["top_kernels"][:25]:
    print(f"  {k['ms']:9.2f} ms  x{k['calls_per_run']:<5g} {k['kernel']}")


if __name__ == "__main__":
  sys.exit(main())
