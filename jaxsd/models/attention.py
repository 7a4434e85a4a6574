"""Scaled dot-product attention: cuDNN's fused kernel where it applies, else written out in XLA ops.

On a GPU with half-precision inputs and head sizes cuDNN accepts, `jax.nn.dot_product_attention`
runs the cuDNN fused (flash) kernel. Everywhere else the attention is written out here, with fp32
logits and softmax: the same computation as `jax.nn.dot_product_attention(implementation="xla")`,
but laid out for XLA's CPU backend, where that function made the SD 1.5 U-Net forward 1.4x slower.
Its logits are scaled after q.k, a (B, N, T, S)-sized multiply the CPU backend materialises as an
array of that size; here q is scaled instead, and the heads are moved ahead of the sequence
(B, N, L, H) so that one attention is one fused batched matmul-softmax-matmul. On the CPU, large
attentions also run in cache-sized blocks (`_cpu_blocked`).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]


def _cudnn_ok(q: jax.Array, k: jax.Array) -> bool:
  if jax.default_backend() != "gpu":
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  head_dim = q.shape[-1]
  return head_dim % 8 == 0 and head_dim <= 128


# Logits per step of the CPU loop: 2**20 fp32 values (4 MiB) stay in a server CPU's L2/L3 cache.
_CPU_BLOCK_LOGITS = 2**20
# Below this many logits in all, one fused attention beats the loop's per-step overhead.
_CPU_BLOCKED_FROM = 4 * _CPU_BLOCK_LOGITS


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T) v over the last two axes, any leading axes; q already scaled; fp32 logits and softmax."""
  logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    # jax.nn's value: finite, so a fully masked row gives a uniform average rather than NaN.
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("...ts,...sh->...th", probs, v)


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(at_most, 1))


def _cpu_blocked(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Loops over blocks of (batch x head) slices, or of queries, so each block's logits stay in cache.

  XLA's CPU backend runs a fused matmul-softmax-matmul one whole op after another: with SD 1.5's
  4096 latent tokens that is a 512 MiB logits array per attention, written and re-read from memory;
  the loop makes that self-attention about 3x faster. Arrays are (B, N, L, H).
  """
  b, n, t, h = q.shape
  s = k.shape[2]
  if t * s <= _CPU_BLOCK_LOGITS:  # several (batch, head) slices per step
    g = _largest_divisor(b * n, _CPU_BLOCK_LOGITS // (t * s))
    qb, kb, vb = (x.reshape(b * n // g, g, x.shape[2], h) for x in (q, k, v))
    return jax.lax.map(lambda a: _softmax_attention(*a), (qb, kb, vb)).reshape(b, n, t, h)
  chunk = _largest_divisor(t, _CPU_BLOCK_LOGITS // s)  # one slice, blocks of queries per step
  qb = q.reshape(b * n, t // chunk, chunk, h)
  kb, vb = (x.reshape(b * n, s, h) for x in (k, v))
  per_slice = lambda a: jax.lax.map(lambda qc: _softmax_attention(qc, a[1], a[2]), a[0])
  return jax.lax.map(per_slice, (qb, kb, vb)).reshape(b, n, t, h)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool, mask: jax.Array | None) -> jax.Array:
  # Scaling q (T x H values) rather than the logits (T x S) is a rounding step in q's dtype: exact
  # for fp32 parity; for bf16 within the rounding q already carries.
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, N, L, H)
  b, n, t, _ = q.shape
  if is_causal:
    causal = jnp.tril(jnp.ones((t, k.shape[2]), dtype=bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is None and jax.default_backend() == "cpu" and b * n * t * k.shape[2] > _CPU_BLOCKED_FROM:
    out = _cpu_blocked(q, k, v)
  else:
    out = _softmax_attention(q, k, v, mask)
  return jnp.swapaxes(out, 1, 2)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    implementation: Implementation = "auto",
) -> jax.Array:
  """Multi-head attention on (batch, length, heads, head_dim) arrays; returns the same layout.

  Args:
    q, k, v: queries (B, T, N, H), keys and values (B, S, N, H).
    is_causal: mask out keys after each query (the CLIP text transformer).
    mask: optional boolean mask broadcastable to (B, N, T, S), True where attention is allowed.
    implementation: "auto" picks cuDNN where it applies, else XLA; "xla" and "cudnn" force one.
  """
  if implementation == "auto":
    implementation = "cudnn" if (mask is None and _cudnn_ok(q, k)) else "xla"
  if implementation == "xla":
    return _xla_attention(q, k, v, is_causal, mask)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")
  raise ValueError(f"attention implementation must be 'auto', 'xla' or 'cudnn', got {implementation!r}")
