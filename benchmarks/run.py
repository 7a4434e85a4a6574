"""Throughput of jaxsd against diffusers PyTorch and diffusers 0.39 Flax, measured side by side.

    python benchmarks/run.py --quick                 # tiny models, every code path, a few minutes
    python benchmarks/run.py                         # SD 1.5 architecture on this CPU (about an hour)
    python benchmarks/run.py --gpu                   # SD 1.5 at 512x512 in bf16 on one accelerator
    python benchmarks/run.py --only unet_forward,train --out bench_out/

Each case starts one worker process per implementation (a fresh process, so its peak RSS is that
of the case), loads the same random-weight diffusers folder in each, compiles and warms up, then
asks the workers for timed iterations in turn (A, B, C, A, B, C, ...) so that drift of a shared
machine hits them alike. Prints a table and writes `<out>/results.json`; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # jaxsd without install (model_folder imports it)

import chart  # noqa: E402
import protocol  # noqa: E402
import sd15_configs  # noqa: E402

WORKLOADS = ("unet_forward", "vae_decode", "sample", "train", "compile")
IMPLS = ("jaxsd", "torch", "flax039")
FLAX039_VENV = os.path.join(HERE, ".venv-flax039")
FLAX039_PACKAGES = ["diffusers==0.39.0", "transformers==4.57.6", "jax==0.10.2", "flax", "safetensors",
                    "torch==2.13.0"]  # torch: transformers' FlaxCLIPTextModel.from_pretrained(from_pt=True)

# --- what runs -------------------------------------------------------------------------------


def _case(workload, model, impls, repeats, warmup, sequential=False, optional=False, **spec):
  px = spec.get("latent", 0) * sd15_configs.vae_factor(model)
  labels = {
      "unet_forward": "b{batch} {latent}x{latent} latents {dtype}",
      "vae_decode": "b{batch} {px}x{px} from {latent}x{latent} latents {dtype}",
      "sample": "b{batch} {height}x{width} {steps} steps {sampler} cfg {guidance_scale} {dtype}",
      "train": "b{batch} {px}px ({latent}x{latent} latents) {dtype}"
  }
  label = labels[spec.get("program", workload)].format(px=px, **spec)
  if workload == "compile":
    label = f"{spec['program']} {label}"
  return {
      "name": f"{workload} {model} {label}",
      "workload": workload,
      "model_name": model,
      "impls": list(impls),
      "repeats": repeats,
      "warmup": warmup,
      "sequential": sequential,
      "optional": optional,
      "spec": {
          "workload": workload,
          **spec
      }
  }


def plan(args) -> list[dict]:
  """The cases of a run: --quick (tiny, CPU), default (SD 1.5 architecture, CPU), or --gpu."""
  all3, two = IMPLS, ("jaxsd", "torch")
  r = args.repeats
  if args.quick:
    m, s = "tiny", sd15_configs.image_size("tiny")
    sample_spec = dict(batch=1, height=s, width=s, steps=25, sampler="ddim", guidance_scale=7.5, dtype="float32")
    train_spec = dict(batch=2, latent=sd15_configs.MODELS[m]["unet"]["sample_size"], dtype="float32")
    return [
        _case("unet_forward", m, all3, r or 10, 2, batch=1, latent=16, dtype="float32"),
        _case("unet_forward", m, all3, r or 10, 2, batch=2, latent=16, dtype="float32"),
        _case("vae_decode", m, two, r or 10, 2, batch=1, latent=16, dtype="float32"),
        _case("sample", m, all3, r or 5, 1, **sample_spec),
        _case("train", m, two, r or 10, 2, **train_spec),
        _case("compile", m, ("jaxsd",), 0, 0, program="sample", **sample_spec),
        _case("compile", m, ("jaxsd",), 0, 0, program="train", **train_spec),
    ]
  if args.gpu:
    # The default --gpu run (sampling, training at 256 and 512) is sized for ~5 minutes on one
    # H100; the U-Net forward and compile-time cases run only when --only names them.
    sample_spec = dict(batch=8, height=512, width=512, steps=25, sampler="ddim", guidance_scale=7.5, dtype="bfloat16")
    train256 = dict(batch=32, latent=32, dtype="bfloat16")
    return [
        _case("unet_forward", "sd15", two, r or 10, 3, optional=True, batch=1, latent=64, dtype="bfloat16"),
        _case("unet_forward", "sd15", two, r or 10, 3, optional=True, batch=2, latent=64, dtype="bfloat16"),
        _case("vae_decode", "sd15", two, r or 10, 3, optional=True, batch=1, latent=64, dtype="bfloat16"),
        _case("sample", "sd15", two, r or 3, 1, **sample_spec),
        # Two SD 1.5 training processes (AdamW state, activations) need not fit one card together.
        _case("train", "sd15", two, r or 10, 3, sequential=True, **train256),
        _case("train", "sd15", two, r or 10, 3, sequential=True, batch=16, latent=64, dtype="bfloat16"),
        _case("compile", "sd15", ("jaxsd",), 0, 0, optional=True, program="sample", **sample_spec),
        _case("compile", "sd15", ("jaxsd",), 0, 0, optional=True, program="train", **train256),
    ]
  sd15_sample = dict(batch=1, height=512, width=512, steps=25, sampler="ddim", guidance_scale=7.5, dtype="float32")
  small_px = sd15_configs.image_size("small")
  sd15_train = dict(batch=1, latent=32, dtype="float32")  # 256x256 images, cached latents
  return [
      _case("unet_forward", "sd15", all3, r or 5, 1, batch=1, latent=64, dtype="float32"),
      _case("unet_forward", "sd15", all3, r or 5, 1, batch=2, latent=64, dtype="float32"),
      _case("vae_decode", "sd15", two, r or 5, 1, batch=1, latent=64, dtype="float32"),  # 512x512
      # The guided batch of one small-model sampling step (2 x 32x32 latents).
      _case("unet_forward", "small", all3, r or 10, 2, batch=2, latent=32, dtype="float32"),
      _case("sample", "small", all3, r or 3, 1, batch=1, height=small_px, width=small_px, steps=25, sampler="ddim",
            guidance_scale=7.5, dtype="float32"),
      # One SD 1.5 call is ~25 batch-2 U-Net forwards (minutes on a CPU): no warm-up call beyond
      # the first (compiling) one each worker makes in setup.
      _case("sample", "sd15", all3, r or 1, 0, **sd15_sample),
      _case("train", "small", two, r or 5, 1, batch=2, latent=sd15_configs.MODELS["small"]["unet"]["sample_size"],
            dtype="float32"),
      # fp32 AdamW state of the 860M U-Net is ~14 GB per process: one process at a time.
      _case("train", "sd15", two, r or 3, 1, sequential=True, **sd15_train),
      _case("compile", "sd15", ("jaxsd",), 0, 0, program="sample", **sd15_sample),
      _case("compile", "sd15", ("jaxsd",), 0, 0, program="train", **sd15_train),
  ]


# --- the workers ---------------------------------------------------------------------------


def ensure_flax039_venv(log) -> str | None:
  """Creates benchmarks/.venv-flax039 once; returns None when ready, else why it is not."""
  python = os.path.join(FLAX039_VENV, "bin", "python")
  marker = os.path.join(FLAX039_VENV, ".bench-ready")
  if os.path.exists(marker):
    return None
  log(f"creating {FLAX039_VENV} ({' '.join(FLAX039_PACKAGES)}); once, about a minute")
  try:
    if not os.path.exists(python):
      base = getattr(sys, "_base_executable", sys.executable)
      subprocess.run([base, "-m", "venv", FLAX039_VENV], check=True, capture_output=True, text=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *FLAX039_PACKAGES], check=True, capture_output=True,
                   text=True, timeout=1800)
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
    detail = getattr(e, "stderr", "") or str(e)
    return f"could not create the diffusers 0.39 venv: {detail.strip().splitlines()[-1] if detail else e}"
  open(marker, "w").close()
  return None


def availability(impl: str, args, log) -> str | None:
  """None when `impl` can run here, else the reason it is skipped."""
  if impl == "torch":
    if args.no_torch:
      return "--no-torch"
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    return f"not installed here: {', '.join(missing)}" if missing else None
  if impl == "flax039":
    if args.no_flax039:
      return "--no-flax039"
    if args.gpu:
      return "the diffusers 0.39 venv holds CPU jax only (and the GPU machine has no PyPI access)"
    return ensure_flax039_venv(log)
  return None


def start_worker(impl: str, case_dir: str, tag: str) -> protocol.Worker:
  script = os.path.join(HERE, f"workloads_{impl}.py")
  python = os.path.join(FLAX039_VENV, "bin", "python") if impl == "flax039" else sys.executable
  extra = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") and impl != "flax039" else []
  env = {
      "PYTHONPATH": HERE if impl == "flax039" else os.pathsep.join([ROOT, HERE, *extra]),
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "TOKENIZERS_PARALLELISM": "false"
  }
  if impl != "torch":  # two processes share the accelerator: no JAX up-front 75% grab
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if impl == "torch":
    # PyTorch's OpenMP threads spin-wait at barriers by default; on a machine shared with other
    # processes a descheduled spinner stalls every op (a tiny U-Net forward went from 0.03 s to
    # 0.7 s with 2 threads). PASSIVE waiting avoids that; set OMP_WAIT_POLICY yourself to override.
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
  return protocol.Worker(python, script, os.path.join(case_dir, f"{tag}.log"), env)


# --- running a case ----------------------------------------------------------------------------


def run_timed_case(case: dict, spec: dict, args, case_dir: str, log) -> dict:
  impls = {}
  for impl in case["impls"]:
    reason = availability(impl, args, log)
    impls[impl] = {"status": "skipped", "reason": reason} if reason else {"status": "pending", "times": []}
  runnable = [i for i in case["impls"] if impls[i]["status"] == "pending"]
  n = case["warmup"] + case["repeats"]

  def setup(impl):
    log(f"  {impl}: loading and compiling")
    w = start_worker(impl, case_dir, impl)
    try:
      reply = w.call({"cmd": "setup", "spec": spec}, args.timeout)
    except protocol.WorkerError as e:
      w.close(kill=True)
      impls[impl].update(status="failed", reason=str(e))
      log(f"  {impl}: FAILED: {e}")
      return None
    impls[impl].update(info=reply["info"], setup_s=reply["setup_s"])
    return w

  def finish(impl, w):
    try:
      impls[impl].update(w.call({"cmd": "stats"}, 60), status="ok")
    except protocol.WorkerError as e:
      impls[impl].update(status="failed", reason=str(e))
    w.close()

  def one_run(impl, w, r):
    try:
      t = w.call({"cmd": "run"}, args.timeout)
    except protocol.WorkerError as e:
      impls[impl].update(status="failed", reason=str(e))
      log(f"  {impl}: FAILED: {e}")
      w.close(kill=True)
      return False
    if r >= case["warmup"]:
      impls[impl]["times"].append(t["seconds"])
      if "extra" in t:
        impls[impl].setdefault("extra", []).append(t["extra"])
    log(f"  {impl}: {'warm-up' if r < case['warmup'] else 'run'} {r + 1}/{n}: {t['seconds']:.4f} s")
    return True

  if case["sequential"]:  # one process at a time (memory): no interleaving
    for impl in runnable:
      w = setup(impl)
      if w and all(one_run(impl, w, r) for r in range(n)):
        finish(impl, w)
  else:
    workers = {impl: w for impl in runnable if (w := setup(impl))}
    for r in range(n):
      for impl in list(workers):
        if not one_run(impl, workers[impl], r):
          del workers[impl]
    for impl, w in workers.items():
      finish(impl, w)
  return impls


def run_compile_case(case: dict, spec: dict, args, case_dir: str, log) -> dict:
  """Cold: a fresh process with an empty persistent cache; warm: a second process, same cache."""
  cache = tempfile.mkdtemp(prefix="jax-cache-", dir=case_dir)
  out = {}
  for phase in ("cold", "warm"):
    log(f"  jaxsd: {phase} compile")
    w = start_worker("jaxsd", case_dir, f"jaxsd-{phase}")
    try:
      reply = w.call({"cmd": "setup", "spec": {**spec, "cache_dir": cache}}, args.timeout)
      stats = w.call({"cmd": "stats"}, 60)
      out[phase] = {"status": "ok", "info": reply["info"], "setup_s": reply["setup_s"], **stats}
      log(f"  jaxsd: {phase}: trace+lower {reply['info']['trace_lower_s']:.2f} s, "
          f"compile {reply['info']['compile_s']:.2f} s")
      w.close()
    except protocol.WorkerError as e:
      w.close(kill=True)
      out[phase] = {"status": "failed", "reason": str(e)}
      log(f"  jaxsd: {phase}: FAILED: {e}")
  shutil.rmtree(cache, ignore_errors=True)
  return {"jaxsd": out}


def summarise(case: dict, impls: dict) -> None:
  """Adds median/min/max, FLOP rates and the interleaved jaxsd/peer ratios to each implementation."""
  if case["workload"] == "compile":
    return
  ref = impls.get("jaxsd", {})
  flops = (ref.get("info") or {}).get("flops")
  peak = (ref.get("info") or {}).get("peak_bf16_flops")
  for impl, r in impls.items():
    times = r.get("times") or []
    if not times:
      continue
    med = statistics.median(times)
    r.update(median_s=med, min_s=min(times), max_s=max(times), n=len(times))
    images = case["spec"]["batch"] if case["workload"] in ("sample", "train") else None
    if images:
      r["images_per_s"] = images / med
    if flops:
      r["flops"] = flops
      r["tflops_per_s"] = flops / med / 1e12
      m = chart.mfu(flops, med, peak, case["spec"].get("dtype"))
      if m is not None:
        r["mfu"] = m
    if impl != "jaxsd" and ref.get("times"):
      pairs = list(zip(ref["times"], times))
      if case["sequential"] or len(ref["times"]) != len(times):
        r["jaxsd_over_this"] = statistics.median(ref["times"]) / med
      else:  # interleaved: the median of per-round ratios cancels drift between rounds
        r["jaxsd_over_this"] = statistics.median(a / b for a, b in pairs)
  if case["workload"] == "sample" and ref.get("extra"):
    # Per round: the full call against steps x one guided U-Net call timed right after it.
    steps = case["spec"]["steps"]
    call, loop = [], []
    for t, e in zip(ref["times"], ref["extra"]):
      call.append(t / (steps * e["unet_call_s"]) - 1)
      loop.append((t - e["text_encode_s"] - e["vae_decode_s"]) / (steps * e["unet_call_s"]) - 1)
    ref["overhead"] = {
        "call_over_steps_x_unet": statistics.median(call),
        "loop_over_steps_x_unet": statistics.median(loop),
        **{
            k: statistics.median(e[k] for e in ref["extra"]) for k in ref["extra"][0]
        }
    }


# --- output ------------------------------------------------------------------------------------


def _fmt_s(x):
  return "-" if x is None else (f"{x:.3f}" if x >= 0.1 else f"{x * 1000:.2f}ms")


def _opt(r: dict, key: str, fmt: str) -> str:
  return format(r[key], fmt) if r.get(key) is not None else "-"


def table(results: list[dict]) -> str:
  head = (f"{'case':<64} {'impl':<8} {'median s':>9} {'min':>9} {'max':>9} {'n':>2} {'GFLOP':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'img/s':>8} {'RSS MB':>7} {'dev MB':>7} {'jaxsd/this':>10}")
  lines = [head, "-" * len(head)]
  notes = []
  for res in results:
    for impl, r in res["impls"].items():
      if res["workload"] == "compile":
        for phase, p in r.items():
          if p["status"] != "ok":
            lines.append(f"{res['name'] + ' ' + phase:<64} {impl:<8} {p['status']}: {p['reason'][:150]}")
            continue
          i = p["info"]
          lines.append(f"{res['name'] + ' ' + phase:<64} {impl:<8} {_fmt_s(i['total_s']):>9} "
                       f"(trace+lower {i['trace_lower_s']:.2f} s, compile {i['compile_s']:.2f} s)"
                       f"{'':>17} {p['maxrss_mb']:>7.0f}")
        continue
      if r.get("status") != "ok":
        lines.append(f"{res['name']:<64} {impl:<8} {r.get('status')}: {(r.get('reason') or '')[:150]}")
        continue
      g = r.get("flops")
      lines.append(
          f"{res['name']:<64} {impl:<8} {_fmt_s(r['median_s']):>9} {_fmt_s(r['min_s']):>9} {_fmt_s(r['max_s']):>9} "
          f"{r['n']:>2} {(g / 1e9 if g else 0):>9.1f} {r.get('tflops_per_s', 0):>8.4f} {_opt(r, 'mfu', '.1%'):>6} "
          f"{_opt(r, 'images_per_s', '.3f'):>8} {r['maxrss_mb']:>7.0f} {_opt(r, 'device_peak_mb', '.0f'):>7} "
          f"{_opt(r, 'jaxsd_over_this', '.3f'):>10}")
      if "overhead" in r:
        o = r["overhead"]
        notes.append(f"{res['name']}: jaxsd call {r['median_s']:.3f} s vs {res['spec']['steps']} x guided U-Net "
                     f"call {o['unet_call_s']:.4f} s (medians): call overhead {o['call_over_steps_x_unet']:+.1%}; "
                     f"text encode {o['text_encode_s']:.4f} s + VAE decode {o['vae_decode_s']:.4f} s; loop overhead "
                     f"{o['loop_over_steps_x_unet']:+.1%} (target <= 5%; medians of per-round ratios)")
        step_flops, peak = r["info"].get("unet_call_flops"), r["info"].get("peak_bf16_flops")
        if step_flops:
          bound = (
              f"; compute bound at bf16 peak {res['spec']['batch'] * peak / (res['spec']['steps'] * step_flops):.2f}"
              f" img/s vs {r['images_per_s']:.2f} measured" if peak else "")
          notes.append(f"  one guided step (U-Net on {2 * res['spec']['batch']} latents): "
                       f"{step_flops / 1e9:.1f} GFLOP{bound}")
  if notes:
    lines += ["", *notes]
  return "\n".join(lines)


def machine() -> dict:
  cpu, fields = "", {}
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    cpu = fields.get("model name", "")
  # "AMD EPYC" alone names several generations; the vector extensions and the cache tell them apart (this
  # project's VM ran the same U-Net step 2-3x faster on some days than on others).
  flags = set(fields.get("flags", "").split())
  isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vp2intersect", "amx_tile") if x in flags]
  mem = ""
  if os.path.exists("/proc/meminfo"):
    with open("/proc/meminfo") as f:
      mem = next((l.split(":", 1)[1].strip() for l in f if l.startswith("MemTotal")), "")
  return {
      "host": platform.node(),
      "cpu": cpu,
      "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
      "cpu_isa": " ".join(isa),
      "cache": fields.get("cache size", ""),
      "cores": os.cpu_count(),
      "memory": mem,
      "python": platform.python_version(),
      "platform": platform.platform()
  }


# --- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny models: every code path in a few minutes")
  p.add_argument("--gpu", action="store_true", help="SD 1.5, 512x512, bf16 on the first accelerator")
  p.add_argument("--only", default="", help=f"comma-separated workloads out of {','.join(WORKLOADS)}, "
                 "or substrings of case names")
  p.add_argument("--out", default="bench_out", help="results.json, worker logs and the model folders go here")
  p.add_argument("--models-dir", default=None, help="where the random model folders are kept (default <out>/models)")
  p.add_argument("--repeats", type=int, default=0, help="timed runs per implementation (default: per case)")
  p.add_argument("--timeout", type=float, default=3600, help="seconds a worker may take for one request")
  p.add_argument("--no-flax039", action="store_true", help="skip the diffusers 0.39 Flax peer")
  p.add_argument("--no-torch", action="store_true",
                 help="skip the diffusers PyTorch peer (e.g. on a TPU VM, where it would run on the host CPU)")
  p.add_argument("--model", choices=sorted(sd15_configs.MODELS), default=None,
                 help="run every case on this model instead (e.g. a dry run of --gpu with tiny)")
  p.add_argument("--list", action="store_true", help="print the cases and exit")
  args = p.parse_args(argv)
  if args.quick and args.gpu:
    p.error("--quick and --gpu exclude each other")

  cases = plan(args)
  if args.model:
    for c in cases:
      c["name"] = c["name"].replace(f" {c['model_name']} ", f" {args.model} ", 1)
      c["model_name"] = args.model
  if args.only:
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    cases = [c for c in cases if any(k == c["workload"] or k in c["name"] for k in keys)]
  else:
    cases = [c for c in cases if not c["optional"]]
  if args.list or not cases:
    print("\n".join(c["name"] + f"  [{', '.join(c['impls'])}]" for c in cases) or "no case matches --only")
    return 0 if cases else 2

  os.makedirs(args.out, exist_ok=True)
  models_dir = args.models_dir or os.path.join(args.out, "models")
  t_start = time.time()

  def log(msg):
    print(f"[{time.time() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

  import model_folder

  results = []
  for k, case in enumerate(cases):
    log(f"case {k + 1}/{len(cases)}: {case['name']}")
    folder = model_folder.write(case["model_name"], models_dir, log=log)
    spec = {**case["spec"], "model": os.path.abspath(folder), "gpu": args.gpu}
    case_dir = os.path.join(args.out, "logs", f"{k + 1:02d}-{case['workload']}-{case['model_name']}")
    os.makedirs(case_dir, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.time()
    runner = run_compile_case if case["workload"] == "compile" else run_timed_case
    impls = runner(case, spec, args, case_dir, log)
    res = {
        **{
            k2: case[k2] for k2 in ("name", "workload", "model_name", "repeats", "warmup", "sequential")
        }, "spec": case["spec"],
        "parameters": model_folder.parameter_counts(folder),
        "impls": impls,
        "wall_s": time.time() - t0,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()
    }
    summarise(res, impls)
    results.append(res)
    with open(os.path.join(args.out, "results.json"), "w") as f:  # after every case: partial runs count
      json.dump({"meta": meta(args, argv, t_start), "results": results}, f, indent=2)

  print(table(results))
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({time.time() - t_start:.0f} s)", file=sys.stderr)
  png = os.path.join(args.out, "results.png")
  why = chart.draw(results, png, title=f"{meta(args, argv, t_start)['mode']} run of {datetime.date.today()}")
  print(f"wrote {png}" if why is None else f"no chart: {why}", file=sys.stderr)
  return 0


def meta(args, argv, t_start) -> dict:
  return {
      "date": datetime.datetime.fromtimestamp(t_start).isoformat(timespec="seconds"),
      "command": " ".join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
      "mode": "gpu" if args.gpu else ("quick" if args.quick else "cpu"),
      "machine": machine(),
      "wall_s": time.time() - t_start
  }


if __name__ == "__main__":
  sys.exit(main())
