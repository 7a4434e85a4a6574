#!/bin/bash
# One short session on a lent GPU machine: environment facts, the --gpu suite (SUITE_ONLY picks
# its cases), a per-layer profile of the SD 1.5 train step (profile_ops.py), the numerical
# checks (gpu_check.py), then SUITE2's cases with what time is left. Everything it keeps goes to
# $OUT (session.log, results*.json, worker_logs.tgz, profile_summary.json, profile.xplane.pb),
# copied as it goes, so a run cut off by its time limit still returns what it measured.
#
#   OUT=/tmp/gpu_out SECONDS_BUDGET=540 SUITE_ONLY="train sd15 b16" SUITE2=sample bash benchmarks/gpu_session.sh
#
# The suite and the profile share a persistent compilation cache, so the profile reuses the
# suite's compiled train step. Python packages the machine lacks (diffusers, ml_collections)
# travel as wheels in .whl/.
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${SECONDS_BUDGET:-540}
SUITE_ONLY=${SUITE_ONLY:-sample,train}
SUITE2=${SUITE2:-}
PROFILE=${PROFILE:-"--model sd15 --workload train --batch 16 --latent 64"}
LOG="$OUT/session.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint as o, transformers, diffusers, torch
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'torch', torch.__version__)
print(jax.devices())"
} 2>&1 | tee -a "$LOG"

left() { echo $((BUDGET - SECONDS)); }

suite() {  # suite ONLY RESULTS_NAME: the --gpu suite's chosen cases, results copied as they come
  ( while sleep 5; do
      cp /tmp/bench/results.json "$OUT/$2" 2>/dev/null
      tar czf "$OUT/worker_logs.tgz.tmp" -C /tmp/bench logs 2>/dev/null && mv "$OUT/worker_logs.tgz.tmp" "$OUT/worker_logs.tgz"
    done ) &
  local copier=$!
  echo "== suite ($1), $(left) s left" | tee -a "$LOG"
  timeout "$(left)" python3 benchmarks/run.py --gpu --only "$1" --repeats 5 --timeout 300 \
    --out /tmp/bench --models-dir /tmp/models 2>&1 | tee -a "$LOG"
  sleep 6
  kill $copier 2>/dev/null
  cp /tmp/bench/results.json "$OUT/$2" 2>/dev/null
  tar czf "$OUT/worker_logs.tgz" -C /tmp/bench logs 2>/dev/null
  rm -f "$OUT/worker_logs.tgz.tmp" /tmp/bench/results.json
}

suite "$SUITE_ONLY" results.json

if [ -n "$PROFILE" ] && [ "$(left)" -gt 60 ]; then
  echo "== profile ($PROFILE), $(left) s left" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "$(left)" python3 benchmarks/profile_ops.py --models-dir /tmp/models --dtype bfloat16 --runs 2 \
    $PROFILE --out /tmp/prof 2>&1 | grep -v -i "warning" | tee -a "$LOG"
  cp /tmp/prof/summary.json "$OUT/profile_summary.json" 2>/dev/null
  x=$(find /tmp/prof/trace -name "*.xplane.pb" | head -1)
  [ -n "$x" ] && [ "$(stat -c %s "$x")" -lt 16000000 ] && cp "$x" "$OUT/profile.xplane.pb"
fi

if [ "$(left)" -gt 40 ]; then
  echo "== gpu_check, $(left) s left" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "$(left)" python3 benchmarks/gpu_check.py ${CHECK_ARGS:-} --models-dir /tmp/models 2>&1 \
    | grep -v -i "warning" | tee -a "$LOG"
fi

if [ -n "$SUITE2" ] && [ "$(left)" -gt 60 ]; then
  suite "$SUITE2" results2.json
fi
echo "== done after $SECONDS s" | tee -a "$LOG"
