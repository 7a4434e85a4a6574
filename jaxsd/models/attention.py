"""Scaled dot-product attention through `jax.nn.dot_product_attention`.

On a GPU with half-precision inputs and head sizes cuDNN accepts, the cuDNN fused (flash)
kernel is used; everywhere else the plain XLA path, whose logits and softmax are fp32.
"""

from __future__ import annotations

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
  if implementation not in ("xla", "cudnn"):
    raise ValueError(f"attention implementation must be 'auto', 'xla' or 'cudnn', got {implementation!r}")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)
