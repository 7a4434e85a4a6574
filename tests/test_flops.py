"""jaxsd.flops: model FLOPs that count attention and loops alike on every backend."""

import jax
import jax.numpy as jnp
import pytest

from jaxsd import flops
from jaxsd.models import attention


def test_matmul_is_two_m_n_k():
  a = jax.ShapeDtypeStruct((32, 48), jnp.float32)
  b = jax.ShapeDtypeStruct((48, 16), jnp.float32)
  assert flops.model_flops(jnp.matmul, a, b) == 2 * 32 * 48 * 16


def _attention_matmul_flops(b, t, s, n, h):
  return 2 * (2 * b * n * t * s * h)  # q k^T and p v


@pytest.mark.parametrize("shape", [(1, 64, 64, 2, 8), (2, 128, 77, 4, 16)])
def test_attention_counts_both_matmuls(shape):
  b, t, s, n, h = shape
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, s, n, h), jnp.float32)
  f = flops.model_flops(lambda q, k, v: attention.dot_product_attention(q, k, v), q, kv, kv)
  matmuls = _attention_matmul_flops(*shape)
  assert matmuls <= f <= 1.2 * matmuls  # plus scaling and softmax, a few per logit


def test_blocked_cpu_attention_is_counted_in_full(monkeypatch):
  # On the CPU a large attention loops over blocks; the compiled program's cost analysis counts
  # the loop body once, model_flops the whole attention.
  monkeypatch.setattr(attention, "_CPU_BLOCK_LOGITS", 2**10)
  monkeypatch.setattr(attention, "_CPU_BLOCKED_FROM", 2**11)
  shape = (1, 256, 256, 2, 8)
  b, t, s, n, h = shape
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v)
  compiled = flops.cost_flops(jax.jit(fn).lower(q, q, q).compile().cost_analysis())
  full = flops.model_flops(fn, q, q, q)
  assert compiled < 0.1 * full  # 64 loop steps, counted as one
  assert _attention_matmul_flops(*shape) <= full
  # The switch is off again outside model_flops: the same function still traces the loop.
  assert "while" in jax.jit(fn).lower(q, q, q).as_text()


def test_backend_without_lowered_cost_analysis_is_costed_on_cpu(monkeypatch):
  # The CUDA plugin (PJRT C API) has no Lowered.cost_analysis: it returns None there, and the
  # H100 benchmark then printed 0 FLOPs. The CPU client costs the same module instead.
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  a = jax.ShapeDtypeStruct((32, 48), jnp.float32)
  b = jax.ShapeDtypeStruct((48, 16), jnp.float32)
  assert flops.model_flops(jnp.matmul, a, b) == 2 * 32 * 48 * 16
