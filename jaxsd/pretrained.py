"""Load and save the networks as diffusers / transformers model folders (config.json + safetensors).

A folder written by `save_pretrained` loads unchanged with diffusers' and transformers' own
`from_pretrained`, so a model trained here can be served by the PyTorch ecosystem, and the other
way round.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd import hub, model_folder, weights
from jaxsd.config import write_json_object
from jaxsd.model_folder import DIFFUSERS_VERSION
from jaxsd.models import clip, controlnet, t2i_adapter, unet, vae
from jaxsd.files import written_whole


def _spec(module: nn.Module) -> dict[str, Any]:
  """How each network is saved: file name and the config.json entries besides the fields."""
  name = type(module).__name__
  if isinstance(module,
                (unet.UNet2DConditionModel, vae.AutoencoderKL, controlnet.ControlNetModel, t2i_adapter.T2IAdapter)):
    return {
        "file": "diffusion_pytorch_model.safetensors",
        "extra": {
            "_class_name": name,
            "_diffusers_version": DIFFUSERS_VERSION
        }
    }
  model_type = {
      "CLIPTextModel": "clip_text_model",
      "CLIPTextModelWithProjection": "clip_text_model",
      "CLIPVisionModel": "clip_vision_model",
      "CLIPVisionModelWithProjection": "clip_vision_model",
      "CLIPModel": "clip"
  }
  if name in model_type:
    return {"file": "model.safetensors", "extra": {"architectures": [name], "model_type": model_type[name]}}
  raise TypeError(f"save_pretrained does not know {name}; expected a jaxsd U-Net, ControlNet, VAE or CLIP module.")


def example_inputs(module: nn.Module, batch: int = 1) -> tuple:
  """Smallest inputs that trace the network; parameter shapes do not depend on them."""
  cfg = module.config
  if isinstance(module, unet.UNet2DConditionModel):
    size = 8 * cfg.downsampling_factor
    inputs = (jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32), jnp.zeros(
        (batch,), jnp.int32), jnp.zeros((batch, 1, cfg.context_dim), jnp.float32))
    if cfg.addition_embed_type == "text_time":  # any split of add_embedding's input will do: all text, no ids
      inputs += (jnp.zeros((batch, cfg.projection_class_embeddings_input_dim),
                           jnp.float32), jnp.zeros((batch, 0), jnp.float32))
    return inputs
  if isinstance(module, controlnet.ControlNetModel):
    size = cfg.unet_config().downsampling_factor
    cond = size * cfg.conditioning_factor
    inputs = (jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32), jnp.zeros(
        (batch,), jnp.int32), jnp.zeros((batch, 1, cfg.cross_attention_dim), jnp.float32),
              jnp.zeros((batch, cond, cond, cfg.conditioning_channels), jnp.float32))
    if cfg.addition_embed_type == "text_time":
      inputs += (1.0, False, jnp.zeros((batch, cfg.projection_class_embeddings_input_dim),
                                       jnp.float32), jnp.zeros((batch, 0), jnp.float32))
    return inputs
  if isinstance(module, t2i_adapter.T2IAdapter):
    size = cfg.total_downscale_factor
    return (jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32),)
  if isinstance(module, vae.AutoencoderKL):
    size = cfg.downsampling_factor
    return (jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32),)
  if isinstance(module, clip.CLIPTextModel):  # with projection too
    return (jnp.zeros((batch, cfg.max_position_embeddings), jnp.int32),)
  if isinstance(module, clip.CLIPVisionModel):
    return (jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)
  if isinstance(module, clip.CLIPModel):
    t, v = cfg.text_config, cfg.vision_config
    return (jnp.zeros((batch, t.max_position_embeddings),
                      jnp.int32), jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32))
  raise TypeError(f"no example inputs for {type(module).__name__}")


def init_params(module: nn.Module, rng: jax.Array) -> dict:
  """Random initial parameters (training from scratch)."""
  return module.init(rng, *example_inputs(module))["params"]


def abstract_params(module: nn.Module) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything.

  Remembered per network configuration (a module is a hashable dataclass of its config): tracing a network's
  init takes ~0.1-1 s of Python, and a process that loads the same network again (a second folder of the
  same model, a component swapped in, a pipeline reloaded) traced it every time. The caller gets its own
  containers."""
  try:
    hash(module)
  except TypeError:  # a field that is not hashable: trace it afresh
    return _cached_abstract_params.__wrapped__(module)
  return jax.tree.map(lambda x: x, _cached_abstract_params(module))


@functools.lru_cache(maxsize=64)
def _cached_abstract_params(module: nn.Module) -> dict:
  return jax.eval_shape(lambda: init_params(module, jax.random.key(0)))


def _legacy_vae_names(key: str) -> str:
  # diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn.
  return re.sub(
      r"(attentions\.\d+\.)(query|key|value|proj_attn)\.", lambda m: m.group(1) + {
          "query": "to_q",
          "key": "to_k",
          "value": "to_v",
          "proj_attn": "to_out.0"
      }[m.group(2)] + ".", key)


def _prefixed(prefix: str, *own: str):
  # transformers 5 saves a standalone CLIPTextModel without the `text_model.` prefix; SD folders
  # written by transformers 4 have it. Accept both (transformers does too). Keys starting with one of
  # `own` (CLIPTextModelWithProjection's `text_projection.`) belong to the outer model.
  return lambda key: key if key.startswith((prefix,) + own) else prefix + key


def _convert(module_cls, config, state_dict, where: str, dtype, param_dtype, rename=None, **kw):
  """(module, host parameters): the device copy is made by the caller, after it lets go of the state dict."""
  param_dtype = param_dtype or dtype
  module = module_cls(config, dtype=dtype, param_dtype=param_dtype, **kw)
  try:
    params = weights.state_dict_to_params(state_dict, abstract_params(module), dtype=param_dtype, rename=rename)
  except weights.WeightLoadError as e:
    raise weights.WeightLoadError(f"{where}: {e}") from None
  return module, params


def _load(module_cls, config_cls, path: str, dtype, param_dtype, variant, allow_pickle, rename=None, **kw):
  path = hub.resolve(path, variant=variant, allow_pickle=allow_pickle)  # a folder, or a Hub id ("owner/name")
  config = config_cls.from_json(path)
  state_dict = model_folder.read_state_dict(path, variant=variant, allow_pickle=allow_pickle)
  module, params = _convert(module_cls, config, state_dict, path, dtype, param_dtype, rename, **kw)
  del state_dict  # closes the memory-mapped files before the device copy (at most two copies in host memory)
  return module, jax.device_put(params)


_KINDS = {
    "unet": (unet.UNet2DConditionModel, unet.UNet2DConditionConfig, None),
    "controlnet": (controlnet.ControlNetModel, controlnet.ControlNetConfig, None),
    "t2i_adapter": (t2i_adapter.T2IAdapter, t2i_adapter.T2IAdapterConfig, None),
    "vae": (vae.AutoencoderKL, vae.AutoencoderKLConfig, _legacy_vae_names),
    "text_encoder": (clip.CLIPTextModel, clip.CLIPTextConfig, _prefixed("text_model.")),
    "text_encoder_2": (clip.CLIPTextModelWithProjection, clip.CLIPTextConfig,
                       _prefixed("text_model.", "text_projection.")),
    "image_encoder": (clip.CLIPVisionModelWithProjection, clip.CLIPVisionConfig,
                      _prefixed("vision_model.", "visual_projection.")),
}


def from_state_dict(kind: str, config: dict, state_dict, where: str, dtype=jnp.float32, param_dtype=None,
                    **module_kwargs):
  """(module, params) of a "unet", "vae", "text_encoder" or "text_encoder_2" (CLIPTextModelWithProjection)
  from its config.json dict and a state dict
  in diffusers / transformers names (loaded as strictly as a folder; `where` names it in errors)."""
  module_cls, config_cls, rename = _KINDS[kind]
  module, params = _convert(module_cls, config_cls.from_dict(config), state_dict, where, dtype, param_dtype, rename,
                            **module_kwargs)
  return module, jax.device_put(params)


def load_unet(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None, allow_pickle: bool = False,
              **module_kwargs):
  """Loads a diffusers `UNet2DConditionModel` folder. Returns (module, params).

  `dtype` is the computation dtype; parameters are cast to `param_dtype` (default: `dtype`).
  Extra keyword arguments go to the module (`attention_implementation`, `gradient_checkpointing`).
  """
  return _load(unet.UNet2DConditionModel, unet.UNet2DConditionConfig, path, dtype, param_dtype, variant, allow_pickle,
               **module_kwargs)


def load_controlnet(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                    allow_pickle: bool = False, **module_kwargs):
  """Loads a diffusers `ControlNetModel` folder (config.json + weights), strictly. Returns (module, params)."""
  return _load(controlnet.ControlNetModel, controlnet.ControlNetConfig, path, dtype, param_dtype, variant, allow_pickle,
               **module_kwargs)


def load_t2i_adapter(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                     allow_pickle: bool = False):
  """Loads a diffusers `T2IAdapter` folder (config.json + weights; TencentARC's t2iadapter_* and
  t2i-adapter-*-sdxl-1.0), strictly. Returns (module, params)."""
  return _load(t2i_adapter.T2IAdapter, t2i_adapter.T2IAdapterConfig, path, dtype, param_dtype, variant, allow_pickle)


def load_vae(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None, allow_pickle: bool = False,
             **module_kwargs):
  """Loads a diffusers `AutoencoderKL` folder (legacy attention names accepted). Returns (module, params)."""
  return _load(vae.AutoencoderKL, vae.AutoencoderKLConfig, path, dtype, param_dtype, variant, allow_pickle,
               rename=_legacy_vae_names, **module_kwargs)


def load_text_encoder(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                      allow_pickle: bool = False, projection: bool | None = None, **module_kwargs):
  """Loads a transformers `CLIPTextModel` folder, or a `CLIPTextModelWithProjection` one (SDXL's
  `text_encoder_2/`). Returns (module, params).

  `projection` picks the class; by default the config.json's "architectures" says which.
  """
  if projection is None:
    projection = "CLIPTextModelWithProjection" in _read_config(path).get("architectures", ())
  module_cls, config_cls, rename = _KINDS["text_encoder_2" if projection else "text_encoder"]
  return _load(module_cls, config_cls, path, dtype, param_dtype, variant, allow_pickle, rename=rename, **module_kwargs)


def _read_config(path: str) -> dict:
  file = os.path.join(os.fspath(path), "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: no config.json here; a model folder needs config.json next to its weights.")
  return model_folder.read_json(file)


def load_image_encoder(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                       allow_pickle: bool = False, **module_kwargs):
  """Loads a transformers `CLIPVisionModelWithProjection` folder (an IP-Adapter's image encoder, a pipeline's
  `image_encoder/`). Returns (module, params)."""
  module_cls, config_cls, rename = _KINDS["image_encoder"]
  return _load(module_cls, config_cls, path, dtype, param_dtype, variant, allow_pickle, rename=rename, **module_kwargs)


def load_clip(path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None, allow_pickle: bool = False,
              **module_kwargs):
  """Loads a transformers `CLIPModel` folder (both towers). Returns (module, params)."""
  return _load(clip.CLIPModel, clip.CLIPConfig, path, dtype, param_dtype, variant, allow_pickle, **module_kwargs)


def save_pretrained(module: nn.Module, params: Any, path: str, dtype=None) -> None:
  """Writes config.json and the safetensors weights that diffusers / transformers load unchanged.

  `dtype` (e.g. np.float16) casts the saved weights; by default they keep the parameters' dtype.
  """
  spec = _spec(module)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  state_dict = weights.params_to_state_dict(params, dtype=dtype)
  config = {**spec["extra"], **module.config.to_dict()}
  with written_whole(os.path.join(path, spec["file"])) as tmp:
    model_folder.write_safetensors(state_dict, tmp)
  write_json_object(os.path.join(path, "config.json"), config, indent=2, sort_keys=True)


__all__ = [
    "load_unet", "load_controlnet", "load_t2i_adapter", "load_vae", "load_text_encoder", "load_image_encoder",
    "load_clip", "save_pretrained", "init_params", "abstract_params", "example_inputs"
]
