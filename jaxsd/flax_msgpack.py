"""Weights saved by diffusers <= 0.39's Flax models and transformers' Flax models, as PyTorch state dicts.

`FlaxStableDiffusionPipeline.save_pretrained` (diffusers <= 0.39) writes `unet/` and `vae/` as
`diffusion_flax_model.msgpack` and `text_encoder/` as transformers' `flax_model.msgpack`: a msgpack
(`flax.serialization.to_bytes`) of the nested parameter dict. Its paths are the inverse of diffusers'
`convert_pytorch_state_dict_to_flax` (diffusers 0.39, models/modeling_flax_pytorch_utils.py) and
transformers' (4.57, modeling_flax_pytorch_utils.py):

  flax `down_blocks_0/resnets_0/conv1/kernel` (HWIO)  ->  torch `down_blocks.0.resnets.0.conv1.weight` (OIHW)
  flax `text_model/encoder/layers/0/self_attn/q_proj/kernel` (in, out)  ->  torch `...layers.0...q_proj.weight`

- `kernel` -> `weight`, transposed (4-d: HWIO -> OIHW; 2-d: (in, out) -> (out, in)); `scale` and
  `embedding` -> `weight`; `bias` unchanged;
- the VAE's attention layers, `query`, `key`, `value`, `proj_attn` in diffusers' Flax VAE, keep those
  names: they are diffusers < 0.14's PyTorch names, which the VAE loader already renames
  (`jaxsd.pretrained._legacy_vae_names`); the U-Net's Flax attention uses today's PyTorch names.

The result is a lazy mapping in PyTorch names, so `jaxsd.weights.state_dict_to_params` loads it as
strictly as a safetensors file (missing, unexpected and mis-shaped keys are all reported).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from jaxsd import weights


def _torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == "kernel" and value.ndim == 2:
    return np.transpose(value)
  if leaf == "kernel":
    raise ValueError(f"a {value.ndim}-d kernel ({value.shape}): diffusers' and transformers' Flax models "
                     "only have 2-d (Dense) and 4-d (Conv) kernels; this is not one of their files.")
  return value


class MsgpackStateDict(Mapping):
  """The parameters of a Flax `.msgpack` weights file, in PyTorch names and layout (converted on access)."""

  def __init__(self, files: list[str]):
    from flax import serialization, traverse_util

    self._flat = {}
    for file in files:  # transformers' shards each hold a nested dict of some of the parameters
      with open(file, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
      if set(tree) == {"params"}:  # a full variables dict rather than the params alone
        tree = tree["params"]
      for path, value in traverse_util.flatten_dict(tree).items():
        path = tuple(str(p) for p in path)
        key = weights.path_to_torch_key(path)
        if key in self._flat:
          raise ValueError(f"{file}: the Flax parameters {'/'.join(self._flat[key][0])} and {'/'.join(path)} "
                           f"both map to the PyTorch key {key}; this is not a diffusers or transformers Flax file.")
        self._flat[key] = (path, value)

  def __getitem__(self, key: str) -> np.ndarray:
    path, value = self._flat[key]
    return _torch_layout(path[-1], np.asarray(value))

  def __iter__(self) -> Iterator[str]:
    return iter(self._flat)

  def __len__(self) -> int:
    return len(self._flat)
