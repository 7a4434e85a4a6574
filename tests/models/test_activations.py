"""jaxsd.models.activations against diffusers' (GEGLU's written-out gradient under torch's autograd)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxsd.models import activations


def test_geglu_gradient_against_torch():
  """activations.geglu's written-out gradient against PyTorch's autograd of diffusers' GEGLU after its projection, on
  values that reach GELU's tails."""
  from diffusers.models.activations import GEGLU

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 2 * 24)).astype(np.float32) * 3.0
  g = rng.normal(size=(2, 7, 24)).astype(np.float32)
  ref = GEGLU(24, 24)
  ref.proj = torch.nn.Identity()  # what follows diffusers' projection
  tx = torch.from_numpy(x).requires_grad_(True)
  ref_out = ref(tx)
  (ref_out * torch.from_numpy(g)).sum().backward()
  out, vjp = jax.vjp(activations.geglu, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), ref_out.detach().numpy(), rtol=1e-6, atol=1e-6)
  (dx,) = vjp(jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
  # bf16 in, bf16 gradient out, within bf16's rounding of the fp32 one.
  (dx16,) = jax.vjp(activations.geglu, jnp.asarray(x, jnp.bfloat16))[1](jnp.asarray(g, jnp.bfloat16))
  assert dx16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx16, np.float32), tx.grad.numpy(), rtol=0.05, atol=0.05)
