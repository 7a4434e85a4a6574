"""Test setup: 8 simulated CPU devices (sharding tests), XLA's CPU code generated at -O0 (tests/__init__.py:
the suite's time is mostly compilation), fp32 matmuls at full precision, and one
persistent XLA compilation cache for the session, shared with the subprocesses the tests start: the
same tiny models are compiled by many tests and by `python -m train` / `python -m sample` subprocesses,
and a cache hit is the same executable (results are unchanged, bit for bit)."""

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
# Only programs that took 2 s or more to compile go to the cache (the library's default is 0.5 s), here and in the
# subprocesses: on 2026-12-07 night (AMD EPYC VM) one worker died in XLA's executable.serialize() while writing an
# entry (a segfault; the test passed in the other whole run and alone twice), and pytest-xdist then hung instead of
# ending. The hits that matter (train steps, sampling programs in `python -m train` / `sample` subprocesses) are of
# programs that take seconds to compile; the many sub-second ones were written for little.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
if "JAXSD_CACHE_DIR" not in os.environ:
  os.environ["JAXSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsd-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["JAXSD_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxsd.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ["JAXSD_CACHE_DIR"])

import importlib.util  # noqa: E402

import pytest  # noqa: E402

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
