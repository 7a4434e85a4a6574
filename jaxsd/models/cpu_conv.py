"""2-D convolutions laid out for XLA's CPU backend: im2col matrix products where they are faster.

On the CPU, XLA's own convolution is fast for large images but slow where there are few
output pixels and many channels (SD 1.5's 16x16 and 8x8 levels with 1280 channels: 68 ms for a
3x3 1280->1280 conv at 16x16 against 39 ms as one (256 x 11520) @ (11520 x 1280) product), and its
gradients are slow at every size. (Measured with YNNPACK's convolutions, jax 0.10's default, which
`import jaxsd` now turns off, jaxsd/xla_cpu_flags.py. With XLA's Eigen convolution instead, on a 2-core
Xeon on 2026-12-07, the forward at <= 512 pixels is 10-25% faster as XLA's convolution than as a matmul
but forward + gradients are 1.3-2.3x faster as matmuls (2x16x16 1280->1280: 250 vs 190 ms; 1x8x8: 97 vs
43 ms), so the rule below stays.) `conv_general_dilated` here is a drop-in for
`lax.conv_general_dilated` (`nn.Conv(conv_general_dilated=...)`) that, on the CPU only:
- with <= 512 output pixels per call (batch x height x width): the forward as im2col + one matmul,
  the gradients as dW = cols^T @ dY and dX = col2im(dY @ W^T) (cols recomputed from x, not kept);
- above that, XLA's own convolution and its transposes, which win or tie there (measured on a
  2-core CPU, fwd+bwd: 1x32x32 640->320 62 ms XLA vs 77 ms matmuls; 2x16x16 1280->1280 346 vs
  243 ms; 1x8x8 1280->1280 156 vs 49 ms).
Other backends, and convolutions it does not cover (1x1, dilated, grouped, not NHWC/HWIO), go to
`lax.conv_general_dilated` unchanged. Same arithmetic, other summation order: fp32 results agree
to ~1e-6 relative.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

IM2COL_MAX_PIXELS = 512  # batch x output pixels up to which forward and gradients are matmuls
IM2COL_BACKWARD_MAX_BYTES = 256 * 2**20  # and, for the gradients, a cols buffer no larger than this


def _nhwc_hwio(lhs_shape, rhs_shape, dimension_numbers) -> bool:
  want = lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
  if dimension_numbers is None:
    return False
  if not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    dimension_numbers = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  return dimension_numbers == want


def _out_size(n: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (n + pad[0] + pad[1] - k) // s + 1


def _im2col(x: jax.Array, kh: int, kw: int, strides: tuple[int, int], padding) -> jax.Array:
  """(B, Ho, Wo, kh*kw*C) patches in HWIO kernel order (tap-major, channels minor)."""
  b, h, w, c = x.shape
  sh, sw = strides
  ho, wo = _out_size(h, kh, sh, padding[0]), _out_size(w, kw, sw, padding[1])
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  taps = [
      lax.slice(xp, (0, dy, dx, 0), (b, dy + sh * (ho - 1) + 1, dx + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
      for dy in range(kh)
      for dx in range(kw)
  ]
  return jnp.concatenate(taps, axis=-1)


def _matmul_conv(x, w, strides, padding, precision):
  kh, kw, c, o = w.shape
  cols = _im2col(x, kh, kw, strides, padding)
  b, ho, wo, _ = cols.shape
  y = jnp.dot(cols.reshape(b * ho * wo, kh * kw * c), w.reshape(kh * kw * c, o), precision=precision)
  return y.reshape(b, ho, wo, o)


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, padding, precision):
  return _matmul_conv(x, w, strides, padding, precision)


def _cpu_conv_fwd(x, w, strides, padding, precision):
  return _matmul_conv(x, w, strides, padding, precision), (x, w)


def _cpu_conv_bwd(strides, padding, precision, res, dy):
  x, w = res
  kh, kw, c, o = w.shape
  b, ho, wo, _ = dy.shape
  if b * ho * wo * kh * kw * c * x.dtype.itemsize > IM2COL_BACKWARD_MAX_BYTES:
    _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, strides, padding, precision), x, w)
    return vjp(dy)
  cols, cols_t = jax.vjp(lambda x: _im2col(x, kh, kw, strides, padding), x)
  dy2 = dy.reshape(b * ho * wo, o)
  dw = jnp.dot(cols.reshape(b * ho * wo, kh * kw * c).T, dy2, precision=precision,
               preferred_element_type=jnp.float32).reshape(w.shape)
  dcols = jnp.dot(dy2, w.reshape(kh * kw * c, o).T, precision=precision).reshape(cols.shape)
  (dx,) = cols_t(dcols.astype(cols.dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with the CPU's faster formulation where it applies (see above)."""
  plain = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
               feature_group_count=feature_group_count, batch_group_count=batch_group_count, precision=precision,
               preferred_element_type=preferred_element_type)
  covered = (jax.default_backend() == "cpu" and lhs.ndim == 4 and rhs.shape[:2] != (1, 1) and
             not isinstance(padding, str) and all(d in (None, 1) for d in (lhs_dilation or [1])) and
             all(d == 1 for d in (rhs_dilation or [1])) and feature_group_count == 1 and batch_group_count == 1 and
             preferred_element_type is None and _nhwc_hwio(lhs.shape, rhs.shape, dimension_numbers))
  if covered:
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    kh, kw = rhs.shape[:2]
    pixels = (lhs.shape[0] * _out_size(lhs.shape[1], kh, strides[0], pads[0]) *
              _out_size(lhs.shape[2], kw, strides[1], pads[1]))
    if pixels <= IM2COL_MAX_PIXELS:
      return _cpu_conv(lhs, rhs, strides, pads, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **plain)
