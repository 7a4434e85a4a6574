"""JAX's persistent compilation cache, so that a second process skips compilation."""

from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str | None = None) -> str:
  """Switches the cache on in `path` (default `$JAXSD_CACHE_DIR`, else ~/.cache/jaxsd/xla); returns it. Programs that
  took 0.5 s or more to compile are kept, unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
  path = path or os.environ.get("JAXSD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxsd", "xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # (JAX's own setting, where given, stays)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path
