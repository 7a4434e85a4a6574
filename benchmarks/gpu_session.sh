#!/bin/bash
# One short session on a lent GPU machine: environment facts, numerical checks (gpu_check.py),
# then the --gpu suite (sampling and training first). Everything it keeps goes to $OUT, copied
# as it goes, so a run cut off by its time limit still returns what it measured.
#
#   OUT=/tmp/gpu_out SECONDS_BUDGET=540 bash benchmarks/gpu_session.sh
#
# Python packages the machine lacks (diffusers, ml_collections) travel as wheels in .whl/.
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${SECONDS_BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
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
} 2>&1 | tee "$OUT/env.txt"

# Copies the suite's partial results and worker logs back every few seconds.
( while sleep 5; do
    cp /tmp/bench/results.json "$OUT/" 2>/dev/null
    tar czf "$OUT/worker_logs.tgz.tmp" -C /tmp/bench logs 2>/dev/null && mv "$OUT/worker_logs.tgz.tmp" "$OUT/worker_logs.tgz"
  done ) &
copier=$!

timeout 240 python3 benchmarks/gpu_check.py --models-dir /tmp/models --out "$OUT/gpu_check.json" 2>&1 \
  | grep -v -i "warning" | tee "$OUT/gpu_check.log"
left=$((BUDGET - SECONDS))
echo "== suite, $left s left"
timeout "$left" python3 benchmarks/run.py --gpu --only sample,train --repeats 5 --timeout 300 \
  --out /tmp/bench --models-dir /tmp/models 2>&1 | tee "$OUT/suite.log"
sleep 6
kill $copier 2>/dev/null
cp /tmp/bench/results.json "$OUT/" 2>/dev/null
tar czf "$OUT/worker_logs.tgz" -C /tmp/bench logs 2>/dev/null
echo "== done after $SECONDS s"
