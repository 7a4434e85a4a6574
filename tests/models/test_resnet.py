"""jaxsd.models.resnet against diffusers' ResnetBlock2D, Downsample2D and Upsample2D (tiny sizes, fp32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models import downsampling, upsampling
from diffusers.models import resnet as torch_resnet

from jaxsd.models import resnet
from tests import reference
from tests.models.converted import TOL, activations, perturbed, run


@pytest.mark.parametrize("out_channels,with_temb", [(8, True), (16, True), (16, False)])
def test_resnet_block(out_channels, with_temb):
  x, temb = activations((2, 6, 6, 8)), activations((2, 12), seed=1)
  tm = perturbed(
      torch_resnet.ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=12 if with_temb else None,
                                 groups=4, eps=1e-6))
  ours = run(resnet.ResnetBlock2D(out_channels, groups=4), tm, x, temb if with_temb else None)
  with torch.no_grad():
    ref = tm(reference.nhwc_to_nchw(x), torch.from_numpy(temb) if with_temb else None)
  np.testing.assert_allclose(ours, reference.nchw_to_nhwc(ref), **TOL)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
  x = activations((2, 6, 6, 8))
  tm = perturbed(downsampling.Downsample2D(8, use_conv=True, out_channels=8, padding=padding))
  ours = run(resnet.Downsample2D(8, padding=padding), tm, x)
  with torch.no_grad():
    ref = reference.nchw_to_nhwc(tm(reference.nhwc_to_nchw(x)))
  assert ours.shape == ref.shape == (2, 3, 3, 8)
  np.testing.assert_allclose(ours, ref, **TOL)


@pytest.mark.parametrize("output_size", [None, (7, 5)])
def test_upsample(output_size):
  x = activations((2, 3, 3, 8))
  tm = perturbed(upsampling.Upsample2D(8, use_conv=True, out_channels=8))
  ours = run(resnet.Upsample2D(8), tm, x, output_size=output_size)
  with torch.no_grad():
    ref = reference.nchw_to_nhwc(tm(reference.nhwc_to_nchw(x), output_size=output_size))
  np.testing.assert_allclose(ours, ref, **TOL)
  nearest = F.interpolate(reference.nhwc_to_nchw(x), size=output_size, scale_factor=None if output_size else 2.0,
                          mode="nearest")
  np.testing.assert_array_equal(np.asarray(resnet.upsample_nearest(jnp.asarray(x), output_size)),
                                reference.nchw_to_nhwc(nearest))
