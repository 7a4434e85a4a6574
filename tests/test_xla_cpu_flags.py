"""The XLA:CPU setting `import jaxsd` adds: when it is added, and that it takes the convolutions off YNNPACK."""

import importlib.metadata
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import tests
from jaxsd import xla_cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTING = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
JAXLIB = importlib.metadata.version("jaxlib")

CONV_HLO = """
import jax, jax.numpy as jnp
x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(jax.jit(conv).lower(x, w).compile().as_text())
"""


@pytest.mark.parametrize(
    "flags, version, want",
    [
        ("", "0.10.2", SETTING),
        ("--xla_force_host_platform_device_count=8", "0.10.0", "--xla_force_host_platform_device_count=8 " + SETTING),
        (SETTING, "0.10.2", SETTING),  # a second import adds nothing
        # the user's own value stays, whatever it is
        ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", "0.10.2",
         "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"),
        ("--xla_cpu_experimental_ynn_fusion_type=", "0.10.2", "--xla_cpu_experimental_ynn_fusion_type="),
        # other jaxlib releases may not know the flag (XLA aborts on an unknown one): nothing is added
        ("", "0.11.0", ""),
        ("--xla_force_host_platform_device_count=8", "0.9.2", "--xla_force_host_platform_device_count=8"),
        ("", "0.10.3.dev20261201", SETTING),
        ("", None, ""),
    ])
def test_the_setting_is_added_only_where_checked_and_not_set(flags, version, want):
  assert xla_cpu_flags.with_cpu_flags(flags, version) == want


def test_apply_writes_the_environment():
  checked = xla_cpu_flags._release(JAXLIB) in xla_cpu_flags.CHECKED_JAXLIB
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  xla_cpu_flags.apply(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2" + (" " + SETTING if checked else "")
  empty = {}
  xla_cpu_flags.apply(empty)
  assert empty == ({"XLA_FLAGS": SETTING} if checked else {})


def _conv_hlo(env: dict) -> str:
  res = subprocess.run([sys.executable, "-c", CONV_HLO], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  return res.stdout


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU setting")
@pytest.mark.skipif(
    xla_cpu_flags._release(JAXLIB) not in xla_cpu_flags.CHECKED_JAXLIB,
    reason=f"jaxlib {JAXLIB}: not a release the setting was checked on, so none is added")
def test_convolutions_leave_ynnpack_in_this_process_and_not_without_jaxsd():
  # This session imported jaxsd (conftest.py) before JAX started its backend: the setting applies here.
  assert SETTING in os.environ["XLA_FLAGS"]
  x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1),
                                                                  (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = jax.jit(conv).lower(x, w).compile().as_text()
  assert "convolution(" in ours and "ynn_fusion" not in ours
  # A process without jaxsd, same flags otherwise: YNNPACK takes the convolution (what the setting is
  # for; if a jaxlib stops doing so, the setting has no reason left and CHECKED_JAXLIB should not list it).
  # (jaxlib 0.10.0 ran convolutions in XLA's own kernels already; from 0.10.1 they are YNNPACK's.)
  plain = _conv_hlo(dict(os.environ, XLA_FLAGS=tests.xla_flags(1), JAX_PLATFORMS="cpu"))
  if JAXLIB != "0.10.0":
    assert "ynn_fusion" in plain
