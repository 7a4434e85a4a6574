#!/bin/bash
# One session on a Cloud TPU VM (v5e / v5p / v6e, one host), as is, from the repository root:
#
#   pip install -e . "jax[tpu]"   # once, on the VM
#   OUT=/tmp/tpu_out SECONDS_BUDGET=1200 bash benchmarks/tpu_session.sh
#
# 1. environment facts (jax, the chips, their HBM); 2. benchmarks/tpu_check.py: the Pallas flash-attention
# kernel against XLA at SD 1.5's shapes, forward and gradients, fp32 and bf16, timed; 3. the suite's
# accelerator cases for jaxsd alone (`run.py --gpu --no-torch --no-flax039`: SD 1.5 sampling at 512², batch
# 8, and U-Net training on cached latents at 256² b32 and 512² b16, bf16, MFU against the chip's peak);
# 4. a per-layer profile of the 512² train step; 5. that step at the per-chip batch of
# train/configs/tpu_v5e.py or tpu_v5p.py, if time is left. Everything goes to $OUT
# (session.log, results.json, profile_summary.json, tpu_check.json) as it is made, so a run cut off by
# its budget still returns what it measured. Send $OUT back (docs/runs/) for docs/benchmarks.md.
set -u
OUT=${OUT:-/tmp/tpu_out}
BUDGET=${SECONDS_BUDGET:-1200}
LOG="$OUT/session.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
left() { echo $((BUDGET - SECONDS)); }
{
  date -u
  python3 -c "import sys, jax, flax, optax
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
for d in jax.local_devices():
    s = d.memory_stats() or {}
    print(d, d.device_kind, 'HBM GiB', round(s.get('bytes_limit', 0) / 2**30, 1))"
} 2>&1 | tee -a "$LOG"

echo "== tpu_check, $(left) s left" | tee -a "$LOG"
timeout "$(left)" python3 benchmarks/tpu_check.py --out "$OUT/tpu_check.json" 2>&1 | grep -v -i warning | tee -a "$LOG"

echo "== suite, $(left) s left" | tee -a "$LOG"
timeout "$(left)" python3 benchmarks/run.py --gpu --no-torch --no-flax039 --only "${SUITE_ONLY:-sample,train}" \
  --repeats 5 --timeout 600 --out /tmp/bench --models-dir /tmp/models 2>&1 | tee -a "$LOG"
cp /tmp/bench/results.json /tmp/bench/results.png "$OUT/" 2>/dev/null

if [ "$(left)" -gt 120 ]; then
  echo "== profile, $(left) s left" | tee -a "$LOG"
  timeout "$(left)" python3 benchmarks/profile_ops.py --models-dir /tmp/models --model sd15 --workload train \
    --batch 16 --latent 64 --dtype bfloat16 --runs 2 --out /tmp/prof 2>&1 | grep -v -i warning | tee -a "$LOG"
  cp /tmp/prof/summary.json "$OUT/profile_summary.json" 2>/dev/null
fi

if [ "$(left)" -gt 120 ]; then
  # The suite's train step (cached latents, no gradient checkpointing, no collectives) at the configs'
  # per-chip batch: v5e 32 (the config adds checkpointing: this says whether it is needed), v5p 64.
  kind=$(python3 -c "import jax; print(jax.devices()[0].device_kind)")
  case "$kind" in *"v5 lite"*|*v5e*) b=32;; *) b=64;; esac
  echo "== train step at the config's per-chip batch $b ($kind), $(left) s left" | tee -a "$LOG"
  timeout "$(left)" python3 benchmarks/profile_ops.py --models-dir /tmp/models --model sd15 --workload train \
    --batch "$b" --latent 64 --dtype bfloat16 --runs 1 --out /tmp/prof_b$b 2>&1 | grep -v -i warning \
    | head -3 | tee -a "$LOG"
fi
echo "== done after $SECONDS s" | tee -a "$LOG"
