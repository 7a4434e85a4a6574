"""jaxsd.models.embeddings against diffusers' embeddings (tiny sizes, fp32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import embeddings as torch_embeddings

from jaxsd.models import embeddings
from tests.models.converted import TOL, activations, perturbed, run


@pytest.mark.parametrize("channels,flip,shift", [(32, True, 0), (7, False, 1)])
def test_timesteps(channels, flip, shift):
  t = np.array([0, 1, 481, 999], np.float32)
  ours = embeddings.Timesteps(channels, flip, shift).apply({}, jnp.asarray(t))
  ref = torch_embeddings.get_timestep_embedding(torch.from_numpy(t), channels, flip_sin_to_cos=flip,
                                                downscale_freq_shift=shift)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=2e-5)


def test_timestep_embedding():
  x = activations((3, 8))
  tm = perturbed(torch_embeddings.TimestepEmbedding(8, 16))
  ours = run(embeddings.TimestepEmbedding(16), tm, x)
  with torch.no_grad():
    np.testing.assert_allclose(ours, tm(torch.from_numpy(x)).numpy(), **TOL)
