"""Our attention against jax.nn.dot_product_attention, including the CPU-blocked path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models import attention


def _qkv(b, t, s, n, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, s, n, h)),
          jax.random.normal(ks[2], (b, s, n, h)))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_jax_nn(causal):
  q, k, v = _qkv(2, 7, 7, 4, 8)
  ours = attention.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_mask_matches_jax_nn():
  q, k, v = _qkv(2, 5, 9, 2, 8)
  mask = jnp.arange(9)[None, None, None, :] < jnp.array([9, 4])[:, None, None, None]
  ours = attention.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  np.testing.assert_allclose(ours, ref, atol=2e-6)


@pytest.mark.parametrize("shape", [(2, 64, 64, 4, 8),    # several (batch, head) slices per block
                                   (1, 256, 128, 2, 8)])  # blocks of queries within one slice
def test_cpu_blocked_path_matches_and_has_gradients(monkeypatch, shape):
  # Shrink the thresholds so small arrays take the blocked path the SD 1.5 sizes take.
  monkeypatch.setattr(attention, "_CPU_BLOCK_LOGITS", 2**12)
  monkeypatch.setattr(attention, "_CPU_BLOCKED_FROM", 2**13)
  b, t, s, n, h = shape
  q, k, v = _qkv(b, t, s, n, h, seed=1)
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
  g = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  assert "while" in str(jax.jit(f).lower(q, k, v).as_text()), "the blocked (lax.map) path was not taken"
  np.testing.assert_allclose(jax.jit(f)(q, k, v), g(q, k, v), atol=2e-6)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  for ours, ref in zip(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(g), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(ours, ref, atol=1e-5)
