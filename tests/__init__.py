"""The test suite's shared settings."""

# Tests compile XLA's CPU code at LLVM -O0 (conftest.py sets it for the session; subprocesses the tests
# start take it from `xla_flags`): the suite's time is mostly the compilation of small programs, which -O0
# halves (a tiny U-Net's train step 33 s -> 16 s; the smoke config's clip + vae stages 86 -> 72 s of CPU,
# training included), as the parity tests' per-jit `xla_backend_optimization_level: 0` already did. The
# programs compute the same operations; only LLVM's code generation is less optimised.
# Tried on 2026-12-07 (2-core Intel VM), not taken: --xla_cpu_use_fusion_emitters=false compiles a tiny U-Net's
# train step in 6-7 s instead of 8-11 s alone, but test_pipeline_sdxl.py + models/test_unet.py took 194 s
# against 137 s (one run each, another job beside both), and the IP-Adapter tests' "scale 0 is the plain
# U-Net" checks moved from < 1e-6 to 1.4e-5 relative; `pytest -n 3` instead of 2 was 9% faster on six files
# but not on the whole suite (31:33 vs 30:43).
# Taken on 2026-12-07: OMP_WAIT_POLICY=PASSIVE (conftest.py). PyTorch's OpenMP threads spin after each
# parallel region, and with two xdist workers on two cores the spinning worker took the other's core:
# test_lora.py beside test_pipeline_controlnet.py took 43-51 s / 49-56 s, with passive waiting 27-30 s /
# 39-41 s; alone, test_lora.py is 25-27 s either way; training files (little torch) are unchanged.
# Measured on 2026-12-07 with jax.monitoring listeners per test file (backend_compile_duration,
# jaxpr_trace_duration, jaxpr_to_mlir_module_duration; a throwaway pytest plugin): of 3,025 s of test time,
# 1,309 s were XLA compiles (5,744 of them; 94 persistent-cache hits), 586 s Python tracing, 145 s lowering.
# Most of the tracing was `pretrained.abstract_params` tracing a network's init on every load: it is now
# remembered per configuration (trace time of the files measured after the change: 279 -> 148 s).
# Tried on 2026-12-07 evening (same VM), not taken: OMP_NUM_THREADS=1 (test_pipeline, test_pipeline_sdxl,
# test_ip_adapter, models/test_unet with -n 2: 274 s against 271 s); for compile time, a tiny U-Net's train step
# (6.7-7.5 s to compile either way, ~1.5 s of it tracing and lowering) with --xla_cpu_parallel_codegen_split_count=1,
# --xla_cpu_copy_insertion_use_region_analysis=false, --xla_cpu_enable_concurrency_optimized_scheduler=false,
# --xla_cpu_emitter_verification_level=0 or --xla_cpu_use_xnnpack=false: no change. What the smoke config's run
# (tests/training/test_run.py's `trained`, 103 s under cProfile) spends: 46 s in 154 XLA compiles (the U-Net stage's
# train step 13.8 s, its scratch init 10.1 s: a tiny U-Net's init, 494 parameters each drawn by its own threefry,
# compiles in 13.9 s, HLO passes and LLVM half each, longer than its train step), 21 s tracing, 7 s lowering,
# ~10 s running steps. The suite's time is distinct programs compiled once each, not repeats.
# Measured on 2026-12-07 night on a 2-core AMD EPYC VM (torch's CPU capability AVX2, where the Intel hosts above have
# AVX-512): the whole suite 35:16 (1,698 passed; 29:47 on the Intel VM the same day), 4,095 s of test time on the two
# workers: tests/training/test_run.py 540 s, test_pipeline.py 336 s, test_distributed.py 165 s. The smoke config's
# run (the `trained` fixture) there: 126 s, of which 64 s in 154 XLA compiles, 15 s tracing, 6 s lowering. 14 parity
# tests failed there on an ulp of diffusers' float32 rounding that differs by ISA; their tolerances now cover both.
XLA_OPTIMIZATION_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess: `devices` simulated CPU devices, compiled as in the test session (so that
  its programs equal, and hit the persistent compilation cache of, the session's own)."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_OPTIMIZATION_FLAG}"
