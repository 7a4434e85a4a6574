"""Writes the one random-weight diffusers folder that every implementation of a benchmark loads.

Weights are drawn with numpy from the parameter shapes jaxsd derives from the config (no network is
initialised, so the 860M-parameter SD 1.5 U-Net costs seconds), converted to the PyTorch layout with
`jaxsd.weights` and saved as safetensors beside the config.json dicts of `sd15_configs`. diffusers
PyTorch, diffusers 0.39 Flax and jaxsd then all read the same file. A folder is written once and
reused (keyed by a hash of its configs and the seed); a `.complete` marker guards partial writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np

import sd15_configs


def _key(cfgs: dict, seed: int) -> str:
  return hashlib.sha256(json.dumps([cfgs, seed], sort_keys=True).encode()).hexdigest()[:10]


def leaf_scale(path, shape: tuple) -> float | str:
  """How a random benchmark weight is drawn: "zeros" (biases), "ones" (norm scales), or the
  standard deviation of a Gaussian (fan-in scaled for kernels, 0.02 for embeddings and vectors)."""
  name = str(getattr(path[-1], "key", path[-1]))
  if name == "bias":
    return "zeros"
  if name == "scale":
    return "ones"
  if name == "embedding" or len(shape) < 2:
    return 0.02
  return 1.0 / math.sqrt(math.prod(shape[:-1]))  # flax layout: (..., in, out)


def _random_params(abstract, rng: np.random.Generator):
  """Fan-in scaled Gaussians for kernels and embeddings, ones for norm scales, zeros for biases."""
  import jax

  def draw(path, leaf):
    shape = tuple(leaf.shape)
    scale = leaf_scale(path, shape)
    if isinstance(scale, str):
      return (np.zeros if scale == "zeros" else np.ones)(shape, np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _write_network(module, config: dict, path: str, file: str, rng: np.random.Generator) -> int:
  from jaxsd import model_folder as folder_lib, pretrained, weights

  os.makedirs(path, exist_ok=True)
  params = _random_params(pretrained.abstract_params(module), rng)
  state_dict = weights.params_to_state_dict(params)
  folder_lib.write_safetensors(state_dict, os.path.join(path, file))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return sum(v.size for v in state_dict.values())


def write(name: str, root: str, seed: int = 0, log=print) -> str:
  """Returns the folder of model `name` under `root`, writing it first if needed."""
  from jaxsd import model_folder as folder_lib, tokenizer as tok
  from jaxsd.models import clip, unet, vae

  cfgs = sd15_configs.model(name)
  path = os.path.join(root, f"{name}-{_key(cfgs, seed)}")
  if os.path.exists(os.path.join(path, ".complete")):
    return path
  shutil.rmtree(path, ignore_errors=True)
  log(f"writing random {name} weights to {path}")
  rng = np.random.default_rng(seed)
  counts = {}
  counts["unet"] = _write_network(unet.UNet2DConditionModel(unet.UNet2DConditionConfig.from_dict(cfgs["unet"])),
                                  cfgs["unet"], os.path.join(path, "unet"), "diffusion_pytorch_model.safetensors", rng)
  counts["vae"] = _write_network(vae.AutoencoderKL(vae.AutoencoderKLConfig.from_dict(cfgs["vae"])), cfgs["vae"],
                                 os.path.join(path, "vae"), "diffusion_pytorch_model.safetensors", rng)
  text_encoder = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(cfgs["text_encoder"]))
  counts["text_encoder"] = _write_network(text_encoder, cfgs["text_encoder"], os.path.join(path, "text_encoder"),
                                          "model.safetensors", rng)
  tok.save_tokenizer(tok.load_tokenizer(), os.path.join(path, "tokenizer"))
  os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
  with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(cfgs["scheduler"], f, indent=2, sort_keys=True)
  # jaxsd's index as diffusers 0.39's Flax loader reads it: an old version and no image_encoder entry.
  index = {k: v for k, v in folder_lib.MODEL_INDEX.items() if k != "image_encoder"}
  index["_diffusers_version"] = "0.6.0"
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  with open(os.path.join(path, "parameters.json"), "w") as f:
    json.dump(counts, f, indent=2)
  open(os.path.join(path, ".complete"), "w").close()
  log(f"  parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
  return path


def parameter_counts(path: str) -> dict:
  with open(os.path.join(path, "parameters.json")) as f:
    return json.load(f)
