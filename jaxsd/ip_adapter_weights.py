"""An IP-Adapter's weights: reading its file (safetensors, or a pickled .bin with allow_pickle) and converting them,
strictly, to parameters of jaxsd's U-Net under diffusers' names (`encoder_hid_proj/image_projection_layers_0`, each
attn2's `to_k_ip_0` / `to_v_ip_0`), as diffusers' `_convert_ip_adapter_image_proj_to_diffusers` /
`_convert_ip_adapter_attn_to_diffusers` do. The pipeline side (image encoder, inputs, load / unload) is
`jaxsd.ip_adapter`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd import pretrained, weights
from jaxsd.models.image_projection import NUM_TOKENS, ResamplerConfig, resampler_config

_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")
# The image_proj keys of the variants diffusers loads and jaxsd does not, by what marks each (checked in order).
_OTHER_KINDS = (
    ("perceiver_resampler.proj_in.weight", "IP-Adapter FaceID Plus"),
    ("proj.3.weight", "IP-Adapter Full Face"),
    ("norm.weight", "IP-Adapter FaceID"),
)
_SUPPORTED = ("the plain IP-Adapter and IP-Adapter Plus are (e.g. ip-adapter_sd15, ip-adapter_sdxl_vit-h, "
              "ip-adapter-plus_sd15, ip-adapter-plus-face_sd15)")
PLAIN, PLUS = "plain", "plus"  # the kinds jaxsd loads

# --- the adapter's file ---------------------------------------------------------------------------


def read_state_dict(source, subfolder: str | None = None, weight_name: str | None = None,
                    allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str | None]:
  """(image_proj, ip_adapter, the file read or None for a dict) of an IP-Adapter: `source` a `.safetensors` file
  with `image_proj.*` / `ip_adapter.*` keys, a pickled `.bin` ({"image_proj": {...}, "ip_adapter": {...}}, read with
  `torch.load(weights_only=True)` only with `allow_pickle`), a folder holding `subfolder/weight_name` (as diffusers;
  without a weight_name its one adapter file), or a state dict in either layout (numpy or torch arrays)."""
  file = None
  if isinstance(source, Mapping):
    state_dict = source
  else:
    file = weight_file(source, subfolder, weight_name)
    state_dict = _read_file(file, allow_pickle)
  image_proj, ip_adapter = _split(state_dict, file or "the state dict")
  return image_proj, ip_adapter, file


def weight_file(source, subfolder: str | None = None, weight_name: str | None = None) -> str:
  """The adapter's file: `source` itself, or `source/subfolder/weight_name` (without a weight_name: the folder's one
  .safetensors / .bin file)."""
  path = os.fspath(source)
  if os.path.isfile(path):
    if weight_name is not None and os.path.basename(path) != weight_name:
      raise ValueError(f"{path} is a file: weight_name={weight_name!r} names a file of a folder; drop it.")
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such IP-Adapter file or folder (a .safetensors file, or a folder with "
                            "weight_name=).")
  folder = os.path.join(path, subfolder or "")
  if weight_name is None:
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    names = [f for f in names if f.endswith((".safetensors",) + _PICKLED)]
    if len(names) != 1:
      raise ValueError(f"{folder} holds {len(names)} weight files ({', '.join(names) or 'none'}): name the "
                       "adapter's with weight_name= (e.g. ip-adapter_sd15.safetensors).")
    weight_name = names[0]
  file = os.path.join(folder, weight_name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: no such IP-Adapter file.")
  return file


def _read_file(path: str, allow_pickle: bool) -> Mapping:
  if path.endswith(".safetensors"):
    from safetensors import safe_open

    try:
      with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
      raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]}).") from None
  if not path.endswith(_PICKLED):
    raise ValueError(f"{path}: an IP-Adapter is a .safetensors file (or, with allow_pickle, a pickled .bin).")
  if not allow_pickle:
    raise ValueError(f"{path} is pickled: unpickling can run arbitrary code, so it is off by default; use the "
                     ".safetensors file, or if you trust its source pass allow_pickle=True (--allow-pickle): it is "
                     "read with torch.load(weights_only=True).")
  import torch

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError, RuntimeError (not a zip / truncated), EOFError
    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({' '.join(str(e).split())[:200]}).") from None


def numpy_array(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (bf16 has no numpy dtype)
    value = value.detach().cpu().float()
  return np.asarray(value)


def _split(state_dict: Mapping, where: str) -> tuple[dict, dict]:
  """The two halves of an adapter, from the nested layout ({"image_proj": ..., "ip_adapter": ...}, the original
  .bin's) or the flat one (`image_proj.<key>`, `ip_adapter.<key>`, the .safetensors')."""
  if isinstance(state_dict.get("image_proj"), Mapping) or isinstance(state_dict.get("ip_adapter"), Mapping):
    halves = {h: dict(state_dict.get(h) or {}) for h in ("image_proj", "ip_adapter")}
    other = [k for k in state_dict if k not in halves]
  else:
    halves, other = {"image_proj": {}, "ip_adapter": {}}, []
    for key in state_dict:
      head, _, rest = key.partition(".")
      if head in halves and rest:
        halves[head][rest] = state_dict[key]
      else:
        other.append(key)
  if not halves["image_proj"] or not halves["ip_adapter"]:
    raise ValueError(f"{where}: not an IP-Adapter (no image_proj and ip_adapter weights; keys like "
                     f"{', '.join(map(repr, sorted(state_dict)[:3]))}).")
  if other:
    raise ValueError(f"{where}: keys outside image_proj / ip_adapter ({', '.join(map(repr, sorted(other)[:3]))}): "
                     "not an IP-Adapter jaxsd reads.")
  image_proj, ip_adapter = ({k: numpy_array(v) for k, v in halves[h].items()} for h in ("image_proj", "ip_adapter"))
  return image_proj, ip_adapter


def check_kind(image_proj: Mapping, ip_adapter: Mapping, where: str) -> str:
  """PLAIN or PLUS (as diffusers tells them apart: `proj.weight`, else `latents`); a one-line ValueError naming the
  IP-Adapter variants jaxsd does not implement."""
  if any("lora" in k for k in ip_adapter):
    raise ValueError(f"{where}: an IP-Adapter with LoRA weights (FaceID) is not supported; {_SUPPORTED}.")
  if "proj.weight" in image_proj:
    return PLAIN
  kind = next((name for key, name in _OTHER_KINDS if key in image_proj), None)
  if kind is not None:
    raise ValueError(f"{where}: {kind} is not supported; {_SUPPORTED}.")
  if "latents" in image_proj and "proj_in.weight" in image_proj and "proj_out.weight" in image_proj:
    return PLUS
  raise ValueError(f"{where}: image_proj has none of the known layouts (keys like "
                   f"{', '.join(map(repr, sorted(image_proj)[:3]))}); {_SUPPORTED}.")


# IP-Adapter Plus' Resampler: the original layer names -> diffusers' (`_convert_ip_adapter_image_proj_to_diffusers`).
_PLUS_NAMES = {
    "0.norm1": "ln0",
    "0.norm2": "ln1",
    "0.to_q": "attn.to_q",
    "0.to_out": "attn.to_out.0",
    "1.0": "ff.0",
    "1.1": "ff.1.net.0.proj",
    "1.3": "ff.1.net.2",
}


def _plus_names(key: str, value) -> list[tuple[str, Any]]:
  """diffusers' names of one original Resampler key (to_kv splits into to_k and to_v); others as they are."""
  m = re.fullmatch(r"layers\.(\d+)\.(\d\.[a-z_0-9]+)\.(weight|bias)", key)
  if m is None:
    return [(key, value)]
  i, layer, leaf = m.groups()
  if layer == "0.to_kv":
    k, v = np.split(np.asarray(value), 2)
    return [(f"layers.{i}.attn.to_k.{leaf}", k), (f"layers.{i}.attn.to_v.{leaf}", v)]
  return [(f"layers.{i}.{_PLUS_NAMES.get(layer, layer)}.{leaf}", value)]


def _plus_config(image_proj: Mapping) -> ResamplerConfig:
  """The Resampler's sizes as diffusers reads them off the weights (64-wide heads, 4 layers)."""
  _, queries, hidden = np.shape(image_proj["latents"])
  to_q = image_proj.get("layers.0.0.to_q.weight")
  if to_q is None:
    raise ValueError("IP-Adapter Plus without layers.0.0.to_q.weight: not the Resampler diffusers reads.")
  return ResamplerConfig(hidden, queries, np.shape(to_q)[0] // 64)


# --- the U-Net's parameters ------------------------------------------------------------------------

_SECTIONS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # UNet2DConditionModel's order of registration


def cross_attention_layers(unet_params) -> list[tuple[str, ...]]:
  """The paths of the U-Net's cross-attentions (attn2) in the order of diffusers' `unet.attn_processors` (down
  blocks, up blocks, mid block; by index within each), which numbers an adapter's layers: the k-th is
  `ip_adapter.{2k + 1}.to_k_ip.weight` (the attn1 between them have even numbers)."""
  paths = {p[:p.index("attn2") + 1] for p in traverse_util.flatten_dict(_plain(unet_params)) if "attn2" in p}

  def order(path):
    head = re.fullmatch(r"(.+?)(?:_(\d+))?", path[0])
    numbers = [int(m.group(1)) for part in path[1:] for m in [re.search(r"_(\d+)$", part)] if m]
    return (_SECTIONS.get(head.group(1), 3), int(head.group(2) or 0), *numbers)

  return sorted(paths, key=order)


def _plain(tree):
  return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def to_unet_names(image_proj: Mapping, ip_adapter: Mapping, layers: list[tuple[str, ...]]) -> dict[str, np.ndarray]:
  """The adapter under the names its weights have in diffusers' U-Net after `load_ip_adapter` (without the
  attention processors' `.processor`): `encoder_hid_proj.image_projection_layers.0.{image_embeds,norm}.*` and
  `<attn2>.to_k_ip.0.weight` / `to_v_ip.0.weight`. Keys that fit nowhere keep their own (prefixed) names, so the
  strict conversion reports them."""
  out = {}
  prefix = "encoder_hid_proj.image_projection_layers.0."
  for key, value in image_proj.items():
    if "latents" in image_proj:  # Plus: the Resampler
      out.update((prefix + name, v) for name, v in _plus_names(key, value))
    else:
      head, _, leaf = key.partition(".")
      name = {"proj": "image_embeds", "norm": "norm"}.get(head)
      out[f"{prefix}{name}.{leaf}" if name else f"image_proj.{key}"] = value
  for key, value in ip_adapter.items():
    m = _IP_KEY.fullmatch(key)
    k = (int(m.group(1)) - 1) // 2 if m and int(m.group(1)) % 2 else None
    if k is None or k >= len(layers):
      out[f"ip_adapter.{key}"] = value
    else:
      out[weights.path_to_torch_key(layers[k] + (f"{m.group(2)}_0", "kernel"))] = value
  return out


def convert(image_proj: Mapping, ip_adapter: Mapping, unet, unet_params, where: str) -> tuple[dict, str, int]:
  """(the adapter's parameters as a subtree of the U-Net's, its kind (PLAIN, PLUS), the width of the image
  embeddings it takes: the image encoder's projection_dim, Plus: its hidden_size), checked strictly against the
  U-Net: one-line errors for an adapter of another model (cross-attention width, number of cross-attention layers),
  then every missing or unexpected key and shape mismatch (`weights.WeightLoadError`)."""
  kind = check_kind(image_proj, ip_adapter, where)
  cfg = unet.config
  if kind == PLAIN:
    rows, embed_dim = np.shape(image_proj["proj.weight"])
    width = rows / NUM_TOKENS
  else:
    width, embed_dim = np.shape(image_proj["proj_out.weight"])[0], np.shape(image_proj["proj_in.weight"])[1]
  if width != cfg.context_dim:
    raise ValueError(f"{where}: the adapter's image tokens are {width:g} wide but this U-Net's "
                     f"cross-attention width (cross_attention_dim) is {cfg.context_dim}: it is an IP-Adapter for "
                     "another model (e.g. SDXL's on SD 1.5).")
  layers = cross_attention_layers(unet_params)
  ids = {int(m.group(1)) for m in map(_IP_KEY.fullmatch, ip_adapter) if m}
  if len(ids) != len(layers):
    raise ValueError(f"{where}: the adapter has weights for {len(ids)} cross-attention layers, this U-Net has "
                     f"{len(layers)}: it is an IP-Adapter for another model.")
  abstract = _abstract_ip_params(unet, unet_params, embed_dim, _plus_config(image_proj) if kind == PLUS else None)
  try:
    params = weights.state_dict_to_params(to_unet_names(image_proj, ip_adapter, layers), abstract)
  except weights.WeightLoadError as e:
    raise weights.WeightLoadError(f"{where}: {e}") from None
  return jax.device_put(params), kind, int(embed_dim)


def _abstract_ip_params(unet, unet_params, embed_dim: int, resampler: ResamplerConfig | None) -> dict:
  """The parameters (shapes) the U-Net adds when it is given image embeddings of `embed_dim` (Plus: hidden states
  through a Resampler of these sizes)."""
  inputs = pretrained.example_inputs(unet)
  embeds = jnp.zeros((1, embed_dim) if resampler is None else (1, 1, 1, embed_dim), jnp.float32)
  full = jax.eval_shape(
      lambda: unet.init(jax.random.key(0), *inputs, image_embeds=embeds, image_projection=resampler)["params"])
  base = set(traverse_util.flatten_dict(_plain(unet_params)))
  flat = traverse_util.flatten_dict(_plain(full))
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in base})


def merge(unet_params, ip_params):
  """The U-Net's parameters with the adapter's added (new dicts along the way; the leaves are shared, not copied)."""
  out = dict(unet_params)
  for k, v in ip_params.items():
    if isinstance(v, Mapping):
      if k in out and not isinstance(out[k], Mapping):
        raise ValueError(f"the IP-Adapter's parameters do not fit this U-Net at {k!r}.")
      out[k] = merge(out[k], v) if k in out else v
    else:
      out[k] = v
  return out


def unet_inputs(ip_adapter: Mapping, guided: bool, unet_params) -> dict:
  """The U-Net's keyword arguments from a program's `ip_adapter` input: with guidance the unconditional rows first
  (as the prompts' halves); the projection's kind and sizes read off the parameters (static when traced); region
  masks, where given, as they are (every row sees them, as diffusers')."""
  embeds = ip_adapter["image_embeds"]
  if guided:
    embeds = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), ip_adapter["uncond_image_embeds"], embeds)
  layers = unet_params["encoder_hid_proj"]
  if isinstance(embeds, tuple):  # several adapters: one projection each
    projection = tuple(resampler_config(layers[f"image_projection_layers_{k}"]) for k in range(len(embeds)))
  else:
    projection = resampler_config(layers["image_projection_layers_0"])
  out = {"image_embeds": embeds, "ip_adapter_scale": ip_adapter["scale"], "image_projection": projection}
  if ip_adapter.get("masks") is not None:  # (none: the program without masks)
    out["ip_adapter_masks"] = ip_adapter["masks"]
  return out


def renumber(ip_params, k: int):
  """`convert`'s parameters (adapter 0: `image_projection_layers_0`, `to_k_ip_0`, `to_v_ip_0`) as the k-th adapter's,
  diffusers' names when several are loaded at once."""
  if not isinstance(ip_params, Mapping):
    return ip_params
  rename = {
      "image_projection_layers_0": f"image_projection_layers_{k}",
      "to_k_ip_0": f"to_k_ip_{k}",
      "to_v_ip_0": f"to_v_ip_{k}"
  }
  return {rename.get(name, name): renumber(v, k) for name, v in ip_params.items()}
