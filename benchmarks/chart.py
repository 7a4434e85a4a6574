"""The suite's results as one chart: time per case, jaxsd beside each peer, and MFU against the peak.

    python benchmarks/chart.py bench_out/results.json [more results.json ...] --out bench_out/results.png
    python benchmarks/chart.py docs/runs/2026-11-26-h100-suite-train512.json --gflop "train sd15 b16=37724.9"

`run.py` draws it after every run (`<out>/results.png`). Left panel: each timed case's median time per
implementation (log scale; jaxsd/peer ratio written at jaxsd's bar). Right panel: jaxsd's model FLOP
utilisation (FLOPs / median / the device's dense bf16 peak) per case, with the 50% target line; a case
without a peak (the CPU) or without a FLOP count has no bar there. `--gflop "PART=GFLOP"` supplies the
count for cases whose name contains PART (runs made before the suite counted FLOPs on every backend
recorded 0 on GPUs; docs/benchmarks.md says which counts were used).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

COLOURS = {"jaxsd": "#1f77b4", "torch": "#ee4c2c", "flax039": "#7f7f7f"}
LABELS = {"jaxsd": "jaxsd", "torch": "diffusers PyTorch", "flax039": "diffusers 0.39 Flax"}
MFU_TARGET = 0.5


def mfu(flops: float | None, seconds: float, peak: float | None, dtype: str | None) -> float | None:
  """Model FLOP utilisation: FLOPs / seconds / the device's dense bf16 peak; None without a FLOP count or a peak,
  or for a run that is not in bf16/fp16 (the peak is the low-precision one). run.py's figures use it too."""
  if not (flops and peak and seconds) or dtype not in ("bfloat16", "float16"):
    return None
  return flops / seconds / peak


def rows(results: list[dict], gflop: dict[str, float] | None = None) -> list[dict]:
  """One row per timed case: name, device, {impl: median s}, jaxsd's MFU (or None)."""
  out = []
  for r in results:
    if r.get("workload") == "compile":
      continue
    times = {i: v["median_s"] for i, v in r.get("impls", {}).items() if v.get("median_s")}
    if not times:
      continue
    ref = r["impls"].get("jaxsd", {})
    info = ref.get("info") or {}
    flops = info.get("flops") or 0.0
    for part, g in (gflop or {}).items():
      if part in r["name"]:
        flops = g * 1e9
    m = mfu(flops, times["jaxsd"], info.get("peak_bf16_flops"), r.get("spec", {}).get("dtype")) \
        if "jaxsd" in times else None
    out.append({"name": r["name"], "device": info.get("device_kind", ""), "times": times, "mfu": m})
  return out


def draw(results: list[dict], path: str, *, title: str = "", gflop: dict[str, float] | None = None) -> str | None:
  """Writes the chart to `path`; returns None, or why nothing was drawn."""
  data = rows(results, gflop)
  if not data:
    return "no timed case with a median"
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  impls = [i for i in COLOURS if any(i in d["times"] for d in data)]
  n = len(data)
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.55 * n * max(1, len(impls)) / 2 + 0.6),
                                   gridspec_kw={"width_ratios": [3, 1.2]}, sharey=True)
  height = 0.8 / len(impls)
  for k, impl in enumerate(impls):
    ys = [j + (k - (len(impls) - 1) / 2) * height for j in range(n)]
    vals = [d["times"].get(impl, float("nan")) for d in data]
    ax_t.barh(ys, vals, height=height, color=COLOURS[impl], label=LABELS[impl])
    for y, v, d in zip(ys, vals, data):
      if impl == "jaxsd" and v == v:
        peers = [p for p in d["times"] if p != "jaxsd"]
        note = ", ".join(f"{d['times']['jaxsd'] / d['times'][p]:.2f}x {p}" for p in peers)
        ax_t.text(v, y, f" {v:.3g} s" + (f" ({note})" if note else ""), va="center", fontsize=7)
      elif v == v:
        ax_t.text(v, y, f" {v:.3g} s", va="center", fontsize=7)
  ax_t.set_xscale("log")
  ax_t.set_yticks(range(n))
  ax_t.set_yticklabels([textwrap.fill(d["name"], 34) + (f"\n[{d['device']}]" if d["device"] else "") for d in data],
                       fontsize=7)
  ax_t.invert_yaxis()
  ax_t.set_xlabel("median seconds per call (log); jaxsd/peer time ratio at jaxsd's bar, < 1 = jaxsd faster")
  ax_t.legend(fontsize=7, loc="lower right")
  mfus = [d["mfu"] for d in data]
  ax_m.barh(range(n), [m if m is not None else 0 for m in mfus], color=COLOURS["jaxsd"])
  for j, m in enumerate(mfus):
    ax_m.text(m or 0, j, f" {m:.1%}" if m is not None else " no peak / FLOPs", va="center", fontsize=7)
  ax_m.axvline(MFU_TARGET, color="k", ls="--", lw=1)
  ax_m.text(MFU_TARGET, -0.6, " target 50%", fontsize=7)
  ax_m.set_xlim(0, 1)
  ax_m.set_xlabel("jaxsd MFU (model FLOPs / dense bf16 peak)")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("results", nargs="+", help="results.json files of run.py (their cases are drawn together)")
  p.add_argument("--out", default="bench_out/results.png")
  p.add_argument("--title", default="")
  p.add_argument("--gflop", action="append", default=[], metavar="PART=GFLOP",
                 help="the FLOP count of cases whose name contains PART (repeatable)")
  args = p.parse_args(argv)
  gflop = {}
  for g in args.gflop:
    part, _, value = g.rpartition("=")
    if not part:
      p.error(f"--gflop {g!r}: expected PART=GFLOP, e.g. 'train sd15 b16=37724.9'")
    gflop[part] = float(value)
  results = []
  for path in args.results:
    with open(path) as f:
      results += json.load(f)["results"]
  why = draw(results, args.out, title=args.title, gflop=gflop)
  if why:
    print(f"nothing drawn: {why}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
