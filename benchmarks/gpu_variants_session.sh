#!/bin/bash
# Issue 16's second GPU session: gpu_variants.py (the SD 1.5 train step and sampling program in
# several variants beside PyTorch, one process after another), then gpu_check.py's
# attention checks (cuDNN with the 77 keys padded to 128: output and gradients against fp32).
# What it keeps goes to $OUT: env.txt, log.txt, variants.jsonl, workers.log, check.json.
#
#   OUT=/tmp/gpu_out BUDGET=450 bash benchmarks/gpu_variants_session.sh
#
# Sizing (H100/H200, 2026-11-26 and 2026-12-04): writing the random SD 1.5 folder ~40 s; each jaxsd
# train variant ~90-110 s (compile 75-95 s, then 10 steps); each sampling variant ~45 s (compile
# 33-37 s); each PyTorch peer 15-30 s. A 450 s budget reaches about the first six variants of
# gpu_variants.VARIANTS (train b16 with and without the padded cross-attention, PyTorch's b16, the
# same three for sampling); name others with ONLY="a,b,..." to spend a session on them instead.
#
# Python packages the machine lacks (diffusers, ml_collections) travel as wheels in .whl/.
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache  # a rerun on a warm machine skips compiles
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  nproc; free -g | head -2
  python3 -c "import sys, jax, flax, optax, transformers, diffusers, torch
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'torch', torch.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout $((BUDGET + 40)) python3 benchmarks/gpu_variants.py --out "$OUT" --models-dir /tmp/models --budget "$BUDGET" \
  ${ONLY:+--only "$ONLY"} 2>&1 \
  | tee "$OUT/log.txt"
timeout 100 python3 benchmarks/gpu_check.py --models-dir /tmp/models --only-attention --out "$OUT/check.json" 2>&1 \
  | grep -v -i warning | tee -a "$OUT/log.txt"
echo "== done after $SECONDS s"
