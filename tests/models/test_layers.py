"""The shared blocks of the networks, one at a time, against diffusers' PyTorch modules (tiny sizes, fp32)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models import attention_processor, embeddings, resnet, upsampling, downsampling
from diffusers.models.transformers import transformer_2d

from jaxsd import weights
from jaxsd.models import layers
from tests import reference

TOL = dict(rtol=1e-5, atol=1e-5)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  reference._jitter(module, scale=0.1, seed=seed)  # norm scales off 1, biases off 0: every weight matters
  return module.eval()


def _run(flax_module, torch_module, *inputs, **static):
  """The flax module with the torch module's weights converted, on NHWC or (B, L, C) inputs."""
  abstract = jax.eval_shape(functools.partial(flax_module.init, **static), jax.random.key(0), *inputs)["params"]
  # (diffusers' Downsample2D also lists its conv under the legacy name Conv2d_0)
  sd = {k: v.numpy() for k, v in torch_module.state_dict().items() if not k.startswith("Conv2d_0.")}
  params = weights.state_dict_to_params(sd, abstract)
  ours = jax.jit(functools.partial(flax_module.apply, **static))({"params": params}, *inputs)
  return np.asarray(ours)


def _nchw(x):
  return reference.nhwc_to_nchw(x)


def _x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.5  # a mean, as activations


def test_group_norm_and_layer_norm():
  x = _x((2, 4, 4, 8)) * 30  # a large mean: the two-pass variance keeps parity
  tgn = _perturbed(torch.nn.GroupNorm(4, 8, eps=1e-6))
  ours = _run(layers.GroupNorm(4, 1e-6), tgn, x)
  with torch.no_grad():
    ref = reference.nchw_to_nhwc(tgn(_nchw(x)))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)

  y = _x((2, 5, 16))
  tln = _perturbed(torch.nn.LayerNorm(16))
  ours = _run(layers.LayerNorm(), tln, y)
  with torch.no_grad():
    np.testing.assert_allclose(ours, tln(torch.from_numpy(y)).numpy(), **TOL)


@pytest.mark.parametrize("channels,flip,shift", [(32, True, 0), (7, False, 1)])
def test_timesteps(channels, flip, shift):
  t = np.array([0, 1, 481, 999], np.float32)
  ours = layers.Timesteps(channels, flip, shift).apply({}, jnp.asarray(t))
  ref = embeddings.get_timestep_embedding(torch.from_numpy(t), channels, flip_sin_to_cos=flip,
                                          downscale_freq_shift=shift)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=2e-5)


def test_timestep_embedding():
  x = _x((3, 8))
  tm = _perturbed(embeddings.TimestepEmbedding(8, 16))
  ours = _run(layers.TimestepEmbedding(16), tm, x)
  with torch.no_grad():
    np.testing.assert_allclose(ours, tm(torch.from_numpy(x)).numpy(), **TOL)


@pytest.mark.parametrize("out_channels,with_temb", [(8, True), (16, True), (16, False)])
def test_resnet_block(out_channels, with_temb):
  x, temb = _x((2, 6, 6, 8)), _x((2, 12), seed=1)
  tm = _perturbed(
      resnet.ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=12 if with_temb else None, groups=4,
                           eps=1e-6))
  ours = _run(layers.ResnetBlock2D(out_channels, groups=4), tm, x, temb if with_temb else None)
  with torch.no_grad():
    ref = tm(_nchw(x), torch.from_numpy(temb) if with_temb else None)
  np.testing.assert_allclose(ours, reference.nchw_to_nhwc(ref), **TOL)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
  x = _x((2, 6, 6, 8))
  tm = _perturbed(downsampling.Downsample2D(8, use_conv=True, out_channels=8, padding=padding))
  ours = _run(layers.Downsample2D(8, padding=padding), tm, x)
  with torch.no_grad():
    ref = reference.nchw_to_nhwc(tm(_nchw(x)))
  assert ours.shape == ref.shape == (2, 3, 3, 8)
  np.testing.assert_allclose(ours, ref, **TOL)


@pytest.mark.parametrize("output_size", [None, (7, 5)])
def test_upsample(output_size):
  x = _x((2, 3, 3, 8))
  tm = _perturbed(upsampling.Upsample2D(8, use_conv=True, out_channels=8))
  ours = _run(layers.Upsample2D(8), tm, x, output_size=output_size)
  with torch.no_grad():
    ref = reference.nchw_to_nhwc(tm(_nchw(x), output_size=output_size))
  np.testing.assert_allclose(ours, ref, **TOL)
  nearest = F.interpolate(_nchw(x), size=output_size, scale_factor=None if output_size else 2.0, mode="nearest")
  np.testing.assert_array_equal(np.asarray(layers.upsample_nearest(jnp.asarray(x), output_size)),
                                reference.nchw_to_nhwc(nearest))


def test_cross_attention():
  x, ctx = _x((2, 10, 16)), _x((2, 7, 12), seed=1)
  tm = _perturbed(attention_processor.Attention(16, cross_attention_dim=12, heads=2, dim_head=8))
  ours = _run(layers.Attention(heads=2, dim_head=8, attention_implementation="xla"), tm, x, ctx)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx))
  np.testing.assert_allclose(ours, ref.numpy(), **TOL)


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_2d(linear):
  x, ctx = _x((2, 4, 4, 16)), _x((2, 7, 12), seed=1)
  tm = _perturbed(
      transformer_2d.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                        cross_attention_dim=12, norm_num_groups=4, use_linear_projection=linear))
  ours = _run(
      layers.Transformer2DModel(heads=2, dim_head=8, norm_num_groups=4, use_linear_projection=linear,
                                attention_implementation="xla"), tm, x, ctx)
  with torch.no_grad():
    ref = tm(_nchw(x), encoder_hidden_states=torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(ours, reference.nchw_to_nhwc(ref), rtol=1e-4, atol=1e-4)


def test_geglu_gradient_against_torch():
  """layers.geglu's written-out gradient against PyTorch's autograd of diffusers' GEGLU after its projection, on
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
  out, vjp = jax.vjp(layers.geglu, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), ref_out.detach().numpy(), rtol=1e-6, atol=1e-6)
  (dx,) = vjp(jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
  # bf16 in, bf16 gradient out, within bf16's rounding of the fp32 one.
  (dx16,) = jax.vjp(layers.geglu, jnp.asarray(x, jnp.bfloat16))[1](jnp.asarray(g, jnp.bfloat16))
  assert dx16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx16, np.float32), tx.grad.numpy(), rtol=0.05, atol=0.05)


def test_group_norm_gradients_against_torch():
  """layers.group_norm's written-out gradient (x, scale, bias) against torch.nn.GroupNorm's autograd, on
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
  tx = _nchw(x).requires_grad_(True)
  (tgn(tx) * _nchw(g)).sum().backward()

  def f(x, s, b):
    return layers.group_norm(x, s, b, 4, 1e-6, jnp.dtype(jnp.float32))

  out, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  dx, dscale, dbias = vjp(jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), reference.nchw_to_nhwc(tx.grad), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dscale), tgn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dbias), tgn.bias.grad.numpy(), rtol=1e-4, atol=1e-5)

  def f16(x):
    return layers.group_norm(x, jnp.asarray(scale), jnp.asarray(bias), 4, 1e-6, jnp.dtype(jnp.bfloat16))

  (dx16,) = jax.vjp(f16, jnp.asarray(x, jnp.bfloat16))[1](jnp.asarray(g, jnp.bfloat16))
  assert dx16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx16, np.float32), np.asarray(dx), rtol=0.1, atol=0.1)
