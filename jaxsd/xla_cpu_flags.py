"""The XLA:CPU setting `import jaxsd` adds to XLA_FLAGS: convolutions in XLA's own kernels, not YNNPACK's.

jax 0.10's CPU backend hands every large convolution to YNNPACK (`ynn_fusion` in the compiled HLO).
XLA's own (Eigen) convolution is faster for every Stable Diffusion shape measured on a 2-core Xeon
(2026-12-07, docs/benchmarks.md): 3x3 forward 1.3-1.7x, forward + gradients at 64x64 x 320 channels
2.6x (477 -> 186 ms); the SD 1.5 U-Net forward at batch 2 took 0.895 of the time, the VAE decode at
512 px 0.867, outputs within 5e-8. So, when the installed jaxlib is one whose flag this was checked
on, `import jaxsd` appends `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to XLA_FLAGS
(YNNPACK keeps its matmuls and reductions).

- XLA reads XLA_FLAGS once, when JAX starts its first backend: import jaxsd before running any JAX
  computation for the setting to apply. Processes started afterwards inherit it.
- A value of your own for `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is left as it is
  (`=+individual_convolution` puts YNNPACK's convolutions back).
- Other jaxlib versions get nothing: XLA aborts the process on a flag it does not know.
- GPUs and TPUs are unaffected (the flag is read by the CPU compiler only).
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

OPTION = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "-individual_convolution"
# jaxlib releases (major, minor) whose XLA was checked to take OPTION=VALUE: 0.10.0 (whose convolutions
# are not YNNPACK's anyway), 0.10.1 and 0.10.2 (YNNPACK's without it; XLA's own with it).
CHECKED_JAXLIB = ((0, 10),)


def _release(version: str) -> tuple[int, ...]:
  parts = []
  for piece in version.split(".")[:2]:
    digits = "".join(c for c in piece if c.isdigit())
    if not digits:
      break
    parts.append(int(digits))
  return tuple(parts)


def with_cpu_flags(xla_flags: str, jaxlib_version: str | None) -> str:
  """`xla_flags` with jaxsd's CPU setting appended, or unchanged (see the module's docstring)."""
  if jaxlib_version is None or _release(jaxlib_version) not in CHECKED_JAXLIB:
    return xla_flags
  if OPTION in xla_flags:
    return xla_flags
  return f"{xla_flags} {OPTION}={VALUE}".strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets `environ["XLA_FLAGS"]` to `with_cpu_flags` of its value and the installed jaxlib's version."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    version = None
  flags = with_cpu_flags(environ.get("XLA_FLAGS", ""), version)
  if flags:
    environ["XLA_FLAGS"] = flags
