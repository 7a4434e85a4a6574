"""Test setup: 8 simulated CPU devices (sharding tests), XLA's CPU code generated at -O0 (tests/__init__.py:
the suite's time is mostly compilation), fp32 matmuls at full precision, and one
persistent XLA compilation cache shared by the `python -m train` / `python -m sample` subprocesses the tests start
(a hit is the same executable: results are unchanged, bit for bit). The test processes themselves do not use it
(see below)."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
from tests import XLA_OPTIMIZATION_FLAG, xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + XLA_OPTIMIZATION_FLAG
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch's OpenMP threads spin-wait for work after each parallel region (libgomp's default); with two
# pytest-xdist workers on two cores, one worker's idle spinning took the core the other was computing on:
# the parity files ran 35-45% slower side by side than with passive waiting (tests/__init__.py). Read by
# libgomp when torch is first imported, which is after this file.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The subprocesses' cache keeps programs that took 2 s or more to compile (the library's default is 0.5 s): the hits
# that matter (train steps, sampling programs, seconds each) stay, the many sub-second programs are not written.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
if "JAXSD_CACHE_DIR" not in os.environ:
  os.environ["JAXSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsd-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["JAXSD_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# No persistent cache in the test processes (pytest-xdist workers, which compile thousands of programs each): on a
# 2-core AMD EPYC VM (jaxlib 0.10.2) 3 of 4 whole runs and a CI run lost a worker to a native crash. One core dump
# (2026-12-08) showed the mechanism of one kind: XLA's PjRtCpuExecutable::SerializeExecutable, writing a cache entry,
# returned an error; the C++ exception that jaxlib throws for it (XlaRuntimeError) crashed in libgcc's unwinder
# (_Unwind_Find_FDE reading an unmapped page) - the unwinder walks the frame tables registered for JIT-compiled code.
# The session no longer turns the cache on (whole runs so, same VM: 1,714 passed, no crash, 37:37 and 36:33, against
# 35:16 with it; a noisy VM), and the in-process calls of the commands' main() cannot either (this fixture; in those
# two runs they still could, for a worker's tests after one). The subprocesses, short-lived, keep theirs.


@pytest.fixture(scope="session", autouse=True)
def no_compilation_cache_in_process():
  """`python -m sample` / `train`'s main() called in a test process turns the persistent cache on (for this
  process's remaining tests): made a no-op here, for the whole session (subprocesses are unaffected)."""
  from jaxsd import compilation_cache
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(compilation_cache, "enable_compilation_cache", lambda *a, **kw: None)
    yield


# The parity tests compare against PyTorch references: torch, diffusers and transformers are hard test
# dependencies (`pip install -e '.[test]'`). Without one the run fails at once instead of skipping
# them, and any test still skipped because a module could not be imported fails the run.
REFERENCE_MODULES = ("torch", "diffusers", "transformers")
_import_skips: list[str] = []


def pytest_configure(config):
  missing = [m for m in REFERENCE_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    raise pytest.UsageError(f"the parity tests need {', '.join(missing)}: install the test extra "
                            "(pip install -e '.[test]'); they are not optional.")


def _skipped_for_an_import(report) -> bool:
  return report.skipped and "could not import" in str(report.longrepr)


def pytest_collectreport(report):
  if _skipped_for_an_import(report):
    _import_skips.append(report.nodeid)


def pytest_runtest_logreport(report):
  if _skipped_for_an_import(report):
    _import_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
  if _import_skips and exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
  if _import_skips:
    terminalreporter.write_line(
        f"FAILED: {len(_import_skips)} test(s) or module(s) skipped because a module could not be imported "
        f"({', '.join(_import_skips[:5])}); every test dependency is required.", red=True)
