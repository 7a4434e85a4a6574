"""jaxsd.models.normalization against torch.nn.GroupNorm / LayerNorm: outputs and the written-out gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxsd.models import normalization
from tests import reference
from tests.models.converted import TOL, activations, perturbed, run


def test_group_norm_and_layer_norm():
  x = activations((2, 4, 4, 8)) * 30  # a large mean: the two-pass variance keeps parity
  tgn = perturbed(torch.nn.GroupNorm(4, 8, eps=1e-6))
  ours = run(normalization.GroupNorm(4, 1e-6), tgn, x)
  with torch.no_grad():
    ref = reference.nchw_to_nhwc(tgn(reference.nhwc_to_nchw(x)))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)

  y = activations((2, 5, 16))
  tln = perturbed(torch.nn.LayerNorm(16))
  ours = run(normalization.LayerNorm(), tln, y)
  with torch.no_grad():
    np.testing.assert_allclose(ours, tln(torch.from_numpy(y)).numpy(), **TOL)


def test_group_norm_gradients_against_torch():
  """normalization.group_norm's written-out gradient (x, scale, bias) against torch.nn.GroupNorm's autograd, on
  activations with a mean and spread like a U-Net's; a bf16 input gets a bf16 gradient."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 5, 3, 16)) * 4 + 3).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  scale = (1 + 0.3 * rng.normal(size=16)).astype(np.float32)
  bias = (0.3 * rng.normal(size=16)).astype(np.float32)
  tgn = torch.nn.GroupNorm(4, 16, eps=1e-6)
  with torch.no_grad():
    tgn.weight.copy_(torch.from_numpy(scale))
    tgn.bias.copy_(torch.from_numpy(bias))
  tx = reference.nhwc_to_nchw(x).requires_grad_(True)
  (tgn(tx) * reference.nhwc_to_nchw(g)).sum().backward()

  def f(x, s, b):
    return normalization.group_norm(x, s, b, 4, 1e-6, jnp.dtype(jnp.float32))

  out, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  dx, dscale, dbias = vjp(jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), reference.nchw_to_nhwc(tx.grad), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dscale), tgn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dbias), tgn.bias.grad.numpy(), rtol=1e-4, atol=1e-5)

  def f16(x):
    return normalization.group_norm(x, jnp.asarray(scale), jnp.asarray(bias), 4, 1e-6, jnp.dtype(jnp.bfloat16))

  (dx16,) = jax.vjp(f16, jnp.asarray(x, jnp.bfloat16))[1](jnp.asarray(g, jnp.bfloat16))
  assert dx16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx16, np.float32), np.asarray(dx), rtol=0.1, atol=0.1)
