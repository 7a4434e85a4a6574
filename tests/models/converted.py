"""Shared by the block tests: a flax block run with a PyTorch module's weights converted, on inputs like activations."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from jaxsd import weights
from tests import reference

TOL = dict(rtol=1e-5, atol=1e-5)


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  reference._jitter(module, scale=0.1, seed=seed)  # norm scales off 1, biases off 0: every weight matters
  return module.eval()


def run(flax_module, torch_module, *inputs, **static) -> np.ndarray:
  """The flax module with the torch module's weights converted, on NHWC or (B, L, C) inputs."""
  abstract = jax.eval_shape(functools.partial(flax_module.init, **static), jax.random.key(0), *inputs)["params"]
  # (diffusers' Downsample2D also lists its conv under the legacy name Conv2d_0)
  sd = {k: v.numpy() for k, v in torch_module.state_dict().items() if not k.startswith("Conv2d_0.")}
  params = weights.state_dict_to_params(sd, abstract)
  ours = jax.jit(functools.partial(flax_module.apply, **static))({"params": params}, *inputs)
  return np.asarray(ours)


def activations(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.5  # a mean, as activations
