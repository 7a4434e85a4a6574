"""diffusers 0.39 Flax's side of the benchmarks (the last diffusers release with Flax), a worker
run by the venv `run.py` creates (benchmarks/.venv-flax039: diffusers 0.39.0, transformers 4.57.6,
jax 0.10.2).

The U-Net and VAE weights are read from the shared folder's safetensors with numpy and converted
by diffusers' own `convert_pytorch_state_dict_to_flax` rules; the parameter tree is shaped with
`jax.eval_shape` instead of diffusers' random `init_weights` (~50 s for SD 1.5, and its values are
thrown away). The text encoder goes through transformers' `from_pt=True` (needs torch).
"""

from __future__ import annotations

import os
import time

import protocol

PROMPT = "a photograph of an astronaut riding a horse"


def _dtype(name: str):
  import jax.numpy as jnp

  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def _load(cls, folder: str, dtype):
  """(module, params) of a diffusers Flax model from a PyTorch-layout safetensors folder."""
  import jax
  import jax.numpy as jnp
  from diffusers.models import modeling_flax_pytorch_utils as conv
  from flax.traverse_util import flatten_dict, unflatten_dict
  from safetensors.numpy import load_file

  module = cls.from_config(cls.load_config(folder), dtype=dtype)
  shapes = flatten_dict(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)))
  params = {}
  for key, value in load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")).items():
    flax_key, tensor = conv.rename_key_and_reshape_tensor(tuple(conv.rename_key(key).split(".")), value, shapes)
    if flax_key not in shapes or shapes[flax_key].shape != tensor.shape:
      raise ValueError(f"{folder}: {key} -> {flax_key} {tensor.shape} does not fit the Flax model")
    params[flax_key] = jnp.asarray(tensor, dtype)
  missing = set(shapes) - set(params)
  if missing:
    raise ValueError(f"{folder}: no weights for {sorted(missing)[:5]} ...")
  return module, unflatten_dict(params)


def unet_forward(spec: dict) -> protocol.Case:
  import jax
  import jax.numpy as jnp
  from diffusers import FlaxUNet2DConditionModel

  dtype = _dtype(spec["dtype"])
  unet, params = _load(FlaxUNet2DConditionModel, os.path.join(spec["model"], "unet"), dtype)
  b, s = spec["batch"], spec["latent"]
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  x = jax.random.normal(k[0], (b, unet.config.in_channels, s, s), jnp.float32).astype(dtype)  # NCHW, as diffusers
  ctx = jax.random.normal(k[1], (b, 77, unet.config.cross_attention_dim), jnp.float32).astype(dtype)
  t = jnp.full((b,), 500, jnp.int32)
  fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample)
  t0 = time.perf_counter()
  compiled = fn.lower(params, x, t, ctx).compile()
  info = {"compile_s": time.perf_counter() - t0}
  return protocol.Case(lambda: protocol.timed(lambda: compiled(params, x, t, ctx).block_until_ready()), info)


def sample(spec: dict) -> protocol.Case:
  """FlaxStableDiffusionPipeline._generate (text encode, fori_loop, decode) jitted on one device:
  what the pipeline's `jit=True` path runs per device, without the pmap wrapper."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel
  from transformers import CLIPTokenizer, FlaxCLIPTextModel

  if spec["sampler"] != "ddim":
    raise ValueError(f"the 0.39 Flax worker runs DDIM only, not {spec['sampler']!r}")
  dtype = _dtype(spec["dtype"])
  folder = spec["model"]
  unet, unet_params = _load(FlaxUNet2DConditionModel, os.path.join(folder, "unet"), dtype)
  vae, vae_params = _load(FlaxAutoencoderKL, os.path.join(folder, "vae"), dtype)
  # (from_pt cannot skip the random init: transformers' converter reads `model.params`)
  text_encoder = FlaxCLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), from_pt=True, dtype=dtype)
  te_params = text_encoder.params
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
  scheduler = FlaxDDIMScheduler.from_config(FlaxDDIMScheduler.load_config(os.path.join(folder, "scheduler")))
  config = unet._internal_dict
  pipe = FlaxStableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None, dtype=dtype)
  # For sample_size < 64 the pipeline's __init__ rewrites the U-Net config as a flax FrozenDict,
  # which has no attribute access, and `_generate` then fails on `unet.config.in_channels`.
  object.__setattr__(unet, "_internal_dict", config)
  params = {"unet": unet_params, "vae": vae_params, "text_encoder": te_params, "scheduler": scheduler.create_state()}
  prompts = [PROMPT] * spec["batch"]
  steps, h, w = spec["steps"], spec["height"], spec["width"]
  generate = jax.jit(pipe._generate, static_argnums=(3, 4, 5))

  def call():
    ids = pipe.prepare_inputs(prompts)
    images = generate(ids, params, jax.random.PRNGKey(0), steps, h, w, jnp.float32(spec["guidance_scale"]))
    return np.asarray((images * 255).round().astype(jnp.uint8))  # uint8 on the host, as the others

  t0 = time.perf_counter()
  call()
  return protocol.Case(lambda: protocol.timed(call), {
      "first_call_s": time.perf_counter() - t0,
      "images": spec["batch"]
  })


WORKLOADS = {"unet_forward": unet_forward, "sample": sample}


def setup(spec: dict) -> protocol.Case:
  import diffusers
  import jax

  if spec["workload"] not in WORKLOADS:
    raise ValueError(f"no diffusers 0.39 Flax version of workload {spec['workload']!r}")
  case = WORKLOADS[spec["workload"]](spec)
  case.info.update({"diffusers": diffusers.__version__, "jax": jax.__version__})
  return case


def device_memory():
  import jax

  stats = jax.devices()[0].memory_stats()
  return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


if __name__ == "__main__":
  protocol.serve(setup, device_memory)
