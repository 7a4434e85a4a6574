"""jaxsd.models.cpu_conv: the CPU's matmul convolutions equal lax.conv_general_dilated, values and
gradients, and are used only where they apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsd.models import cpu_conv

DN = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _both(x, w, strides, padding):
  """(y, dx, dw) of a non-trivial loss through our conv and through lax's."""
  out = []
  for conv in (cpu_conv.conv_general_dilated, lax.conv_general_dilated):
    f = lambda x, w: conv(x, w, strides, padding, dimension_numbers=DN)
    loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    out.append((jax.jit(f)(x, w), *jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)))
  return out


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((2, 8, 8, 16), (3, 3, 16, 24), (1, 1), ((1, 1), (1, 1))),  # im2col forward and backward
        ((1, 9, 7, 8), (3, 3, 8, 4), (2, 2), ((0, 1), (0, 1))),  # Downsample2D: stride 2, pad right
        ((1, 6, 6, 4), (3, 3, 4, 4), (1, 1), ((0, 0), (0, 0))),  # valid
        ((2, 40, 40, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),  # 3200 pixels: XLA's both ways
    ])
def test_matches_lax_values_and_gradients(shape, kernel, strides, padding):
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], shape)
  w = jax.random.normal(k[1], kernel) * 0.2
  (y, dx, dw), (y_ref, dx_ref, dw_ref) = _both(x, w, strides, padding)
  assert y.shape == y_ref.shape
  for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    assert _rel(a, b) < 2e-6


def test_large_cols_keep_xla_backward(monkeypatch):
  monkeypatch.setattr(cpu_conv, "IM2COL_BACKWARD_MAX_BYTES", 1024)
  k = jax.random.split(jax.random.key(1), 2)
  x, w = jax.random.normal(k[0], (1, 8, 8, 8)), jax.random.normal(k[1], (3, 3, 8, 8))
  (y, dx, dw), (y_ref, dx_ref, dw_ref) = _both(x, w, (1, 1), ((1, 1), (1, 1)))
  assert _rel(dx, dx_ref) < 2e-6 and _rel(dw, dw_ref) < 2e-6


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_small_convolution_is_a_matmul_large_stays_a_convolution():
  conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
  w = jnp.ones((3, 3, 8, 8))
  small = _hlo(conv, jnp.ones((1, 16, 16, 8)), w)  # 256 pixels
  large = _hlo(conv, jnp.ones((1, 32, 32, 8)), w)  # 1024 pixels
  assert "convolution(" not in small and "dot(" in small
  assert "convolution(" in large


@pytest.mark.parametrize("kwargs", [
    dict(padding="SAME"),
    dict(rhs_dilation=(2, 2)),
    dict(feature_group_count=2),
    dict(kernel=(1, 1, 8, 8)),
])
def test_uncovered_convolutions_go_to_lax(kwargs):
  kwargs = dict(kwargs)
  kernel = kwargs.pop("kernel", (3, 3, 4 if kwargs.get("feature_group_count") else 8, 8))
  padding = kwargs.pop("padding", ((1, 1), (1, 1)))
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 8))
  w = jax.random.normal(jax.random.key(3), kernel)
  ours = cpu_conv.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN, **kwargs)
  ref = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN, **kwargs)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
