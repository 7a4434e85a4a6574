"""jaxsd.models.transformer against diffusers' Attention and Transformer2DModel (tiny sizes, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models import attention_processor
from diffusers.models.transformers import transformer_2d

from jaxsd.models import transformer
from tests import reference
from tests.models.converted import TOL, activations, perturbed, run


def test_cross_attention():
  x, ctx = activations((2, 10, 16)), activations((2, 7, 12), seed=1)
  tm = perturbed(attention_processor.Attention(16, cross_attention_dim=12, heads=2, dim_head=8))
  ours = run(transformer.Attention(heads=2, dim_head=8, attention_implementation="xla"), tm, x, ctx)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx))
  np.testing.assert_allclose(ours, ref.numpy(), **TOL)


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_2d(linear):
  x, ctx = activations((2, 4, 4, 16)), activations((2, 7, 12), seed=1)
  tm = perturbed(
      transformer_2d.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                        cross_attention_dim=12, norm_num_groups=4, use_linear_projection=linear))
  ours = run(
      transformer.Transformer2DModel(heads=2, dim_head=8, norm_num_groups=4, use_linear_projection=linear,
                                     attention_implementation="xla"), tm, x, ctx)
  with torch.no_grad():
    ref = tm(reference.nhwc_to_nchw(x), encoder_hidden_states=torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(ours, reference.nchw_to_nhwc(ref), rtol=1e-4, atol=1e-4)
