"""An IP-Adapter's weights: reading its file (safetensors, or a pickled .bin with allow_pickle) and converting them,
strictly, to parameters of jaxsd's U-Net under diffusers' names (`encoder_hid_proj/image_projection_layers_0`, each
attn2's `to_k_ip_0` / `to_v_ip_0`), as diffusers' `_convert_ip_adapter_image_proj_to_diffusers` /
`_convert_ip_adapter_attn_to_diffusers` do: the plain IP-Adapter, Plus, Full Face and FaceID (FaceID Plus is
refused). FaceID's checkpoints also hold a LoRA of every attention's to_q / to_k / to_v / to_out (`<n>.to_q_lora.down.
weight`, ...); `lora_state_dict` names it as diffusers' `_load_ip_adapter_loras` does, for the pipeline to load as a
LoRA adapter. The pipeline side (image encoder, inputs, load / unload) is `jaxsd.ip_adapter`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd import pretrained, weights
from jaxsd.models.image_projection import (NUM_TOKENS, FaceIDConfig, FullFaceConfig, ProjectionConfig, ResamplerConfig,
                                           projection_config, takes_hidden_states)

_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")
_LORA_KEY = re.compile(r"(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")  # FaceID's LoRA
_SUPPORTED = ("the plain IP-Adapter, Plus, Full Face and FaceID are (e.g. ip-adapter_sd15, ip-adapter-plus_sd15, "
              "ip-adapter-full-face_sd15, ip-adapter-faceid_sd15)")
PLAIN, PLUS, FULL_FACE, FACEID = "plain", "plus", "full_face", "faceid"  # the kinds jaxsd loads
HIDDEN_STATE_KINDS = (PLUS, FULL_FACE)  # those that read the image encoder's penultimate hidden states

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
  """PLAIN, FULL_FACE, FACEID or PLUS, told apart by the keys diffusers checks, in its order (`proj.weight`,
  `proj.3.weight`, `perceiver_resampler.*` (FaceID Plus: refused), `norm.weight`, else `latents`); a one-line
  ValueError for the others."""
  del ip_adapter  # (its LoRA keys, FaceID's, are `lora_state_dict`'s)
  if "proj.weight" in image_proj:
    return PLAIN
  if "proj.3.weight" in image_proj:
    return FULL_FACE
  if "perceiver_resampler.proj_in.weight" in image_proj:
    raise ValueError(f"{where}: IP-Adapter FaceID Plus (perceiver_resampler; it needs face embeddings and CLIP hidden "
                     f"states at once) is not supported; {_SUPPORTED}.")
  if "norm.weight" in image_proj:
    if "proj.0.weight" not in image_proj or "proj.2.weight" not in image_proj:
      raise ValueError(f"{where}: image_proj has norm.weight but not proj.0.weight / proj.2.weight: not the IP-Adapter "
                       "FaceID projection diffusers reads.")
    return FACEID
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


def _projection_config(kind: str, image_proj: Mapping, width: int) -> ProjectionConfig:
  """The projection's config as diffusers reads its sizes off the weights (Plus: `_plus_config`; FaceID: tokens
  `proj.2` rows / cross_attention_dim, mult `proj.0` rows / columns)."""
  if kind == PLUS:
    return _plus_config(image_proj)
  if kind == FULL_FACE:
    return FullFaceConfig()
  if kind == FACEID:
    rows, columns = np.shape(image_proj["proj.0.weight"])
    return FaceIDConfig(np.shape(image_proj["proj.2.weight"])[0] // width, rows // columns)
  return None


def _plus_config(image_proj: Mapping) -> ResamplerConfig:
  """The Resampler's sizes as diffusers reads them off the weights (64-wide heads, 4 layers)."""
  _, queries, hidden = np.shape(image_proj["latents"])
  to_q = image_proj.get("layers.0.0.to_q.weight")
  if to_q is None:
    raise ValueError("IP-Adapter Plus without layers.0.0.to_q.weight: not the Resampler diffusers reads.")
  return ResamplerConfig(hidden, queries, np.shape(to_q)[0] // 64)


# --- the U-Net's parameters ------------------------------------------------------------------------

_SECTIONS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # UNet2DConditionModel's order of registration


def attention_layers(unet_params) -> list[tuple[str, ...]]:
  """The paths of the U-Net's transformer attentions (attn1, attn2) in the order of diffusers'
  `unet.attn_processors` (down blocks, up blocks, mid block; by index within each; attn1 before attn2), which
  numbers an adapter's layers: FaceID's LoRA of the k-th is `ip_adapter.{k}.to_q_lora.down.weight`, ..."""
  paths = {
      p[:i + 1]
      for p in traverse_util.flatten_dict(_plain(unet_params))
      for i, part in enumerate(p)
      if part in ("attn1", "attn2")
  }

  def order(path):
    head = re.fullmatch(r"(.+?)(?:_(\d+))?", path[0])
    numbers = [int(m.group(1)) for part in path[1:] for m in [re.search(r"_(\d+)$", part)] if m]
    return (_SECTIONS.get(head.group(1), 3), int(head.group(2) or 0), *numbers, path[-1])

  return sorted(paths, key=order)


def cross_attention_layers(unet_params) -> list[tuple[str, ...]]:
  """The cross-attentions (attn2) of `attention_layers`, in order: the k-th is `ip_adapter.{2k + 1}.to_k_ip.weight`
  (the attn1 between them have even numbers)."""
  return [p for p in attention_layers(unet_params) if p[-1] == "attn2"]


def _plain(tree):
  return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def to_unet_names(image_proj: Mapping, ip_adapter: Mapping, layers: list[tuple[str, ...]]) -> dict[str, np.ndarray]:
  """The adapter under the names its weights have in diffusers' U-Net after `load_ip_adapter` (without the
  attention processors' `.processor`): `encoder_hid_proj.image_projection_layers.0.{image_embeds,norm}.*` and
  `<attn2>.to_k_ip.0.weight` / `to_v_ip.0.weight`. Keys that fit nowhere keep their own (prefixed) names, so the
  strict conversion reports them."""
  out = {}
  prefix = "encoder_hid_proj.image_projection_layers.0."
  # Full Face's and FaceID's feed-forward and norm (Full Face's norm is proj.3), as diffusers renames them
  ff_names = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2", "proj.3": "norm", "norm": "norm"}
  for key, value in image_proj.items():
    if "latents" in image_proj:  # Plus: the Resampler
      out.update((prefix + name, v) for name, v in _plus_names(key, value))
      continue
    head, _, leaf = key.rpartition(".")
    name = {"proj": "image_embeds", "norm": "norm"}.get(head) if "proj.weight" in image_proj else ff_names.get(head)
    out[f"{prefix}{name}.{leaf}" if name else f"image_proj.{key}"] = value
  for key, value in ip_adapter.items():
    if _LORA_KEY.fullmatch(key):  # FaceID's LoRA: `lora_state_dict`'s
      continue
    m = _IP_KEY.fullmatch(key)
    k = (int(m.group(1)) - 1) // 2 if m and int(m.group(1)) % 2 else None
    if k is None or k >= len(layers):
      out[f"ip_adapter.{key}"] = value
    else:
      out[weights.path_to_torch_key(layers[k] + (f"{m.group(2)}_0", "kernel"))] = value
  return out


def convert(image_proj: Mapping, ip_adapter: Mapping, unet, unet_params, where: str) -> tuple[dict, str, int]:
  """(the adapter's parameters as a subtree of the U-Net's, its kind (PLAIN, PLUS, FULL_FACE, FACEID), the width of
  the image embeddings it takes: the image encoder's projection_dim, Plus and Full Face: its hidden_size, FaceID: the
  face embedding's), checked strictly against the U-Net: one-line errors for an adapter of another model
  (cross-attention width, number of cross-attention layers), then every missing or unexpected key and shape mismatch
  (`weights.WeightLoadError`). FaceID's LoRA keys are left to `lora_state_dict`."""
  kind = check_kind(image_proj, ip_adapter, where)
  cfg = unet.config
  if kind == PLAIN:
    rows, embed_dim = np.shape(image_proj["proj.weight"])
    width = rows / NUM_TOKENS
  elif kind == FULL_FACE:  # diffusers: image_embed_dim = proj.0's rows (FeedForward mult=1: square)
    width, embed_dim = np.shape(image_proj["proj.3.weight"])[0], np.shape(image_proj["proj.0.weight"])[0]
  elif kind == FACEID:
    width, embed_dim = np.shape(image_proj["norm.weight"])[0], np.shape(image_proj["proj.0.weight"])[1]
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
  abstract = _abstract_ip_params(unet, unet_params, embed_dim, _projection_config(kind, image_proj, int(width)))
  try:
    params = weights.state_dict_to_params(to_unet_names(image_proj, ip_adapter, layers), abstract)
  except weights.WeightLoadError as e:
    raise weights.WeightLoadError(f"{where}: {e}") from None
  return jax.device_put(params), kind, int(embed_dim)


def _abstract_ip_params(unet, unet_params, embed_dim: int, projection: ProjectionConfig) -> dict:
  """The parameters (shapes) the U-Net adds when it is given image embeddings of `embed_dim` through a projection
  of this config (Plus, Full Face: hidden states)."""
  base = set(traverse_util.flatten_dict(_plain(unet_params)))
  shapes = _flat_shapes_with_adapter
  try:
    hash((unet, projection))
  except TypeError:  # a field that is not hashable: trace it afresh
    shapes = _flat_shapes_with_adapter.__wrapped__
  flat = shapes(unet, int(embed_dim), projection)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in base})


@functools.lru_cache(maxsize=16)
def _flat_shapes_with_adapter(unet, embed_dim: int, projection: ProjectionConfig) -> dict:
  """The flattened parameter shapes of the U-Net with an adapter's projection: tracing its init takes ~0.1-1 s of
  Python, remembered per (U-Net config, width, projection) as `pretrained.abstract_params` (read-only here: the
  caller builds its own tree from it)."""
  inputs = pretrained.example_inputs(unet)
  embeds = jnp.zeros((1, 1, 1, embed_dim) if takes_hidden_states(projection) else (1, embed_dim), jnp.float32)
  full = jax.eval_shape(
      lambda: unet.init(jax.random.key(0), *inputs, image_embeds=embeds, image_projection=projection)["params"])
  return traverse_util.flatten_dict(_plain(full))


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
  # (batch, n, L, D): hidden states, which tell Full Face's feed-forward from FaceID's
  config = lambda k, e: projection_config(layers[f"image_projection_layers_{k}"], e.ndim == 4)
  if isinstance(embeds, tuple):  # several adapters: one projection each
    projection = tuple(config(k, e) for k, e in enumerate(embeds))
  else:
    projection = config(0, embeds)
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


def lora_state_dict(ip_adapter: Mapping, unet_params, where: str) -> dict[str, np.ndarray]:
  """The LoRA an adapter's `ip_adapter` half carries (FaceID's: `<n>.to_q_lora.down.weight`, ..., `<n>` numbering
  every attention, `attention_layers`), as diffusers' `_load_ip_adapter_loras` names it for `load_lora_weights`:
  `unet.<attention>.processor.to_q_lora.down.weight`, ... ({} without one). diffusers takes the layers that have
  `to_k_lora.down.weight`; a layer number this U-Net lacks is an adapter for another model (refused here; diffusers
  skips it)."""
  layers = attention_layers(unet_params)
  numbers = {int(m.group(1)) for m in map(_LORA_KEY.fullmatch, ip_adapter) if m}
  if not numbers:
    return {}
  if max(numbers) >= len(layers):
    raise ValueError(
        f"{where}: the adapter's LoRA has weights for attention layer {max(numbers)} (from 0), this U-Net has "
        f"{len(layers)}: it is an IP-Adapter for another model.")
  out = {}
  for n in sorted(numbers):
    if f"{n}.to_k_lora.down.weight" not in ip_adapter:
      continue
    name = "unet." + weights.path_to_torch_key(layers[n]) + ".processor"
    for proj in ("to_k", "to_q", "to_v", "to_out"):
      for part in ("down", "up"):
        key = f"{n}.{proj}_lora.{part}.weight"
        if key not in ip_adapter:
          raise ValueError(f"{where}: the adapter's LoRA lacks {key} (diffusers reads all of to_q / to_k / to_v / "
                           "to_out, down and up, of a layer).")
        out[f"{name}.{proj}_lora.{part}.weight"] = ip_adapter[key]
  return out
