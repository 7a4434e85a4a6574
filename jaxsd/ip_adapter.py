"""IP-Adapter (Ye et al., 2023): an image as a prompt, as diffusers' `load_ip_adapter` / `ip_adapter_image=`.

    pipe = jaxsd.StableDiffusion.from_pretrained("sd15")
    pipe.load_ip_adapter("IP-Adapter/models", weight_name="ip-adapter_sd15.safetensors")  # + models/image_encoder/
    pipe.set_ip_adapter_scale(0.6)
    images = pipe("a cat, best quality", ip_adapter_image=Image.open("style.png"))

The plain IP-Adapter (h94/IP-Adapter's ip-adapter_sd15, ip-adapter_sdxl, ip-adapter_sdxl_vit-h, ...): a CLIP image
encoder (transformers' CLIPVisionModelWithProjection) turns the image into one pooled embedding; the adapter's
`image_proj` (diffusers' ImageProjection: a Linear to 4 tokens and a LayerNorm) makes tokens of it, and every
cross-attention of the U-Net adds `scale` x its attention over those tokens through the adapter's own key and value
projections (`ip_adapter`: `to_k_ip` / `to_v_ip` per cross-attention layer, diffusers' IPAdapterAttnProcessor2_0).
Under classifier-free guidance the unconditional half sees the projection of a zero embedding, as diffusers'.
IP-Adapter Plus (ip-adapter-plus_sd15, ip-adapter-plus-face_sd15, ip-adapter-plus_sdxl_vit-h, ...): its `image_proj`
is a Resampler (diffusers' IPAdapterPlusImageProjection, the original keys converted as diffusers converts them) over
the image encoder's penultimate hidden states; the unconditional half sees those of a zero (preprocessed) image.

The adapter's weights join the U-Net's parameters under diffusers' names (`encoder_hid_proj/image_projection_layers_0`,
each attn2's `to_k_ip_0` / `to_v_ip_0`), checked strictly against the U-Net (key sets and shapes; an adapter of
another model is refused in one line); the base parameters are left as they are, and `unload_ip_adapter` gives the
plain pipeline back. The image embeddings and the scale are inputs of the compiled program: a new image or scale
compiles nothing, and without an adapter the program is the one without IP-Adapter support.

Not supported (refused by name): IP-Adapter Full Face, FaceID and FaceID Plus (and their LoRA), several adapters at
once, per-layer scales (InstantStyle's dicts) and attention masks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd import conditioning, model_folder, pretrained, weights
from jaxsd.config import finite32
from jaxsd.models.image_projection import NUM_TOKENS, ResamplerConfig, resampler_config

log = logging.getLogger(__name__)

IMAGE_ENCODER_FOLDER = "image_encoder"  # diffusers' default image_encoder_folder
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


def _numpy(value) -> np.ndarray:
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
  image_proj, ip_adapter = ({k: _numpy(v) for k, v in halves[h].items()} for h in ("image_proj", "ip_adapter"))
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
  (as the prompts' halves); the projection's kind and sizes read off the parameters (static when traced)."""
  embeds = ip_adapter["image_embeds"]
  if guided:
    embeds = jnp.concatenate([ip_adapter["uncond_image_embeds"], embeds])
  projection = resampler_config(unet_params["encoder_hid_proj"]["image_projection_layers_0"])
  return {"image_embeds": embeds, "ip_adapter_scale": ip_adapter["scale"], "image_projection": projection}


# --- the image encoder -------------------------------------------------------------------------------


def find_image_encoder(adapter_file: str | None, source, image_encoder_folder: str,
                       pipeline_folder: str | None) -> list[str]:
  """The image-encoder folders to try, in order: the pipeline folder's own `image_encoder/` where its
  model_index.json names one (diffusers' pipeline has it loaded, and load_ip_adapter keeps it); then diffusers' rule
  for `image_encoder_folder`: one folder name is looked up in the adapter's folder (`<source>/<subfolder>/
  image_encoder`), a relative path with "/" from the repository's top (`<source>/models/image_encoder`; for a file,
  from its folder and the one above: h94/IP-Adapter's sdxl_models/ adapters read models/image_encoder); last the
  path itself. An absolute path is the only one tried."""
  name = os.fspath(image_encoder_folder)
  if os.path.isabs(name):
    return [name]
  out = []
  if pipeline_folder and _index_names(pipeline_folder, "image_encoder"):
    out.append(os.path.join(pipeline_folder, "image_encoder"))
  if adapter_file is not None:
    here = os.path.dirname(adapter_file)
    top = os.fspath(source) if os.path.isdir(os.fspath(source)) else None
    if "/" not in name.strip("/"):
      out.append(os.path.join(here, name))
    else:
      out += [os.path.join(top, name)] if top else [os.path.join(here, name), os.path.join(os.path.dirname(here), name)]
  out.append(name)
  return list(dict.fromkeys(os.path.normpath(p) for p in out))


def _index_names(folder: str, component: str) -> bool:
  """Whether the pipeline folder's model_index.json names `component` (diffusers then loads it with the pipeline)."""
  index = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index) or not os.path.isdir(os.path.join(folder, component)):
    return False
  entry = model_folder.read_json(index).get(component)
  return isinstance(entry, (list, tuple)) and bool(entry) and entry[0] is not None


def embedding_width(folder: str, kind: str = PLAIN) -> int | None:
  """The width of the embeddings the CLIPVisionModelWithProjection in `folder` gives an adapter of `kind` (its
  config.json: projection_dim, Plus: hidden_size, transformers' defaults where it has none); None without one."""
  file = os.path.join(folder, "config.json")
  if not os.path.isfile(file):
    return None
  config = model_folder.read_json(file)
  config = config.get("vision_config", config) if config.get("model_type") == "clip" else config
  return config.get("projection_dim", 512) if kind == PLAIN else config.get("hidden_size", 768)


def feature_extractor(pipeline_folder: str | None, image_size: int):
  """transformers' CLIPImageProcessor as diffusers' pipeline has it: the folder's `feature_extractor/` where its
  model_index.json names one, else `CLIPImageProcessor(size=image_size, crop_size=image_size)` (load_ip_adapter's)."""
  from transformers import CLIPImageProcessor

  if pipeline_folder and _index_names(pipeline_folder, "feature_extractor"):
    return CLIPImageProcessor.from_pretrained(os.path.join(pipeline_folder, "feature_extractor"))
  return CLIPImageProcessor(size=image_size, crop_size=image_size)


def pil_images(images, name: str = "ip_adapter_image") -> list:
  """One image or a list / batch of them (PIL, uint8 or [0, 1] float arrays) as RGB PIL images, the input diffusers'
  feature extractor gets (arrays are made 8-bit first, as an image file would be)."""
  from PIL import Image

  items = list(images) if isinstance(images, (list, tuple)) else [images]
  if not items:
    raise ValueError(f"{name}: no image given.")
  out = []
  for item in items:
    if conditioning._pil(item):  # pylint: disable=protected-access
      conditioning.as_images(item, name)  # the colour-mode check
      out.append(item.convert("RGB"))
    else:
      out += [Image.fromarray(im) for im in conditioning.to_uint8(conditioning.as_images(item, name))]
  return out


@dataclasses.dataclass
class LoadedIPAdapter:
  """An IP-Adapter attached to a pipeline: its U-Net parameters, scale and image encoder."""

  params: dict  # a subtree of the U-Net's parameters (`merge`)
  kind: str  # PLAIN or PLUS
  embed_dim: int  # the width of the image embeddings it projects
  scale: float
  where: str
  image_encoder: Any = None  # a CLIPVisionModelWithProjection, or None (then only precomputed embeddings)
  image_encoder_params: Any = None
  image_encoder_folder: str | None = None
  feature_extractor: Any = None
  encode: Callable | None = None  # jitted (params, NHWC pixels) -> (image embeddings, unconditional ones)


def call_options(image, image_embeds) -> dict:
  """A pipeline call's IP-Adapter arguments, only those given (passed on to `StableDiffusion._run`)."""
  return {k: v for k, v in (("ip_adapter_image", image), ("ip_adapter_image_embeds", image_embeds)) if v is not None}


class IPAdapterMixin:
  """`load_ip_adapter`, `set_ip_adapter_scale` and `unload_ip_adapter` for a `jaxsd.pipeline.StableDiffusion` (SDXL
  and the ControlNet pipelines too), as diffusers' IPAdapterMixin; the calls take `ip_adapter_image=` or
  `ip_adapter_image_embeds=`."""

  @property
  def ip_adapter(self) -> LoadedIPAdapter | None:
    """The loaded IP-Adapter, or None."""
    return self.__dict__.get("_ip_adapter")

  def load_ip_adapter(self, source, subfolder: str | None = None, weight_name: str | None = None,
                      image_encoder_folder: str | None = IMAGE_ENCODER_FOLDER, *, scale: float = 1.0,
                      allow_pickle: bool = False) -> None:
    """Loads an IP-Adapter (plain or Plus) and its image encoder, as diffusers' `load_ip_adapter`, replacing one
    loaded before.

    Args:
      source: the adapter: a `.safetensors` file (`image_proj.*` and `ip_adapter.*` keys) or pickled `.bin` (with
        allow_pickle), a folder holding `subfolder/weight_name`, or a state dict (flat, or {"image_proj": ...,
        "ip_adapter": ...}). Local files only.
      subfolder, weight_name: the file in a folder `source` (diffusers' arguments); without weight_name the
        folder's one weight file.
      image_encoder_folder: the transformers CLIPVisionModelWithProjection the images go through (see
        `find_image_encoder`): diffusers' "image_encoder" is the adapter's folder's `image_encoder/`, a path with "/"
        is looked up from the repository's top ("models/image_encoder"), an absolute path is used as it is; the
        pipeline folder's own image_encoder/ (model_index.json names it) and an encoder a previous adapter loaded
        come first where they fit (their embedding width is the adapter's: projection_dim, Plus: hidden_size).
        None: no encoder, only `ip_adapter_image_embeds`.
      scale: the adapter's weight (`set_ip_adapter_scale`).
      allow_pickle: read a pickled `.bin` adapter (and image encoder) with `torch.load(weights_only=True)`.

    Raises a ValueError for an adapter of another model or kind (Full Face, FaceID: not supported), and for a list
    of adapters (one at a time).
    """
    if isinstance(source, (list, tuple)) or isinstance(weight_name, (list, tuple)):
      raise ValueError("load_ip_adapter: several IP-Adapters at once are not supported; load one.")
    self.ip_adapter_scale_value(scale)  # checked before anything is read
    image_proj, ip_adapter, file = read_state_dict(source, subfolder, weight_name, allow_pickle)
    where = file or "the IP-Adapter state dict"
    params, kind, embed_dim = convert(image_proj, ip_adapter, self.unet, self.unet_params, where)
    previous = self.ip_adapter
    state = LoadedIPAdapter(params, kind, embed_dim, float(scale), where)
    if image_encoder_folder is None:
      log.warning("IP-Adapter %s: no image encoder (image_encoder_folder=None); pass ip_adapter_image_embeds.", where)
    elif previous is not None and previous.image_encoder is not None and (previous.kind,
                                                                          previous.embed_dim) == (kind, embed_dim):
      state = dataclasses.replace(previous, params=params, scale=float(scale), where=where)  # as diffusers keeps it
    else:
      self._load_image_encoder(state, file, source, image_encoder_folder, allow_pickle)
    self.__dict__["_ip_adapter"] = state

  def _load_image_encoder(self, state: LoadedIPAdapter, file, source, image_encoder_folder, allow_pickle) -> None:
    folder = getattr(self, "source_folder", None)
    tried = find_image_encoder(file, source, image_encoder_folder, folder)
    widths = {p: embedding_width(p, state.kind) for p in tried}
    found = [(p, width) for p, width in widths.items() if width is not None]
    fits = [p for p, dim in found if dim == state.embed_dim]
    if not fits:
      if found:
        raise ValueError(f"{state.where}: the adapter takes {state.embed_dim}-wide image embeddings; the image encoder "
                         f"{found[0][0]} gives {found[0][1]}: give the one it was trained with (image_encoder_folder=, "
                         "--image-encoder).")
      raise FileNotFoundError(f"{state.where}: no image encoder (a CLIPVisionModelWithProjection folder) at "
                              f"{' or '.join(tried)}: give image_encoder_folder= (--image-encoder), or None to pass "
                              "ip_adapter_image_embeds.")
    encoder, params = pretrained.load_image_encoder(fits[0], self.unet.dtype, self.unet.param_dtype,
                                                    allow_pickle=allow_pickle)
    state.image_encoder, state.image_encoder_params, state.image_encoder_folder = encoder, params, fits[0]
    state.feature_extractor = feature_extractor(folder, encoder.config.image_size)
    state.encode = jax.jit(functools.partial(_encode, encoder, state.kind == PLUS))

  @staticmethod
  def ip_adapter_scale_value(scale) -> float:
    """`scale` as one finite number, or a ValueError naming what is not supported (per-layer dicts, lists)."""
    if isinstance(scale, (list, tuple)) and len(scale) == 1:  # diffusers' one entry per adapter
      scale = scale[0]
    if isinstance(scale, Mapping):
      raise ValueError("set_ip_adapter_scale: per-block scales (InstantStyle's dicts) are not supported; give one "
                       "number.")
    if isinstance(scale, (list, tuple)):
      raise ValueError(f"set_ip_adapter_scale: {len(scale)} scales: several IP-Adapters are not supported; give one "
                       "number.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) or not finite32(scale):
      raise ValueError(f"IP-Adapter scale {scale!r}: give a finite number (1: as trained, 0: off).")
    return float(scale)

  def set_ip_adapter_scale(self, scale) -> None:
    """The adapter's weight (diffusers' `set_ip_adapter_scale` with one number): 1 as trained, 0 is the plain model.
    An input of the compiled program: changing it compiles nothing."""
    if self.ip_adapter is None:
      raise ValueError("set_ip_adapter_scale: no IP-Adapter is loaded; load_ip_adapter(...) first.")
    self.ip_adapter.scale = self.ip_adapter_scale_value(scale)

  def unload_ip_adapter(self) -> None:
    """Removes the IP-Adapter and its image encoder (as diffusers' `unload_ip_adapter`): the pipeline is the plain
    one again, bit for bit."""
    self.__dict__.pop("_ip_adapter", None)

  def _with_ip_adapter(self, params: dict) -> dict:
    """The program's parameters with the adapter's in the U-Net's (unchanged without an adapter)."""
    state = self.ip_adapter
    if state is None:
      return params
    return {**params, "unet": merge(params["unet"], state.params)}

  def encode_ip_adapter_image(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, unconditional ones), float32, of one image or a list / batch, as diffusers'
    `encode_image`: the feature extractor's resize, crop and normalisation, then the image encoder's projected pooled
    output (n, D) and zeros; for IP-Adapter Plus its penultimate hidden states (n, L, D), of the images and of zero
    pixels."""
    state = self.ip_adapter
    if state is None:
      raise ValueError("encode_ip_adapter_image: no IP-Adapter is loaded; load_ip_adapter(...) first.")
    if state.image_encoder is None:
      raise ValueError("ip_adapter_image: the IP-Adapter was loaded without an image encoder "
                       "(image_encoder_folder=None): pass ip_adapter_image_embeds, or load it with one.")
    pixels = state.feature_extractor(images=pil_images(images), return_tensors="np").pixel_values
    embeds, uncond = state.encode(state.image_encoder_params, jnp.asarray(np.transpose(pixels, (0, 2, 3, 1))))
    return np.asarray(embeds), np.asarray(uncond)

  def ip_adapter_inputs(self, image=None, image_embeds=None, batch: int = 1, guided: bool = True) -> dict | None:
    """The program's `ip_adapter` input for `batch` prompts: {"image_embeds", "uncond_image_embeds": (batch, n, D),
    "scale": ()}; None without an adapter, a ValueError for inputs that do not fit (or none, with an adapter).

    `image`: one image for every prompt; a list (or batch) of `batch` images, one per prompt; or diffusers' nesting
    [[image, ...]] (one list for the one adapter): every prompt sees all n images (their tokens one after the other).
    The unconditional rows get zero embeddings (Plus: a zero image's), as diffusers'. `image_embeds`: diffusers'
    `ip_adapter_image_embeds`, a list with one (2, n, D) array under guidance, the unconditional row first ((1, n,
    D) without), used for every prompt (`prepare_ip_adapter_image_embeds`' output); or (2 batch, n, D) ((batch, n,
    D)): one row per prompt. For IP-Adapter Plus they are hidden states: (2, n, L, D) and so on.
    """
    state = self.ip_adapter
    if state is None:
      if image is not None or image_embeds is not None:
        raise ValueError("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter: pipe.load_ip_adapter(...) "
                         "first.")
      return None
    if image is None and image_embeds is None:
      raise ValueError("an IP-Adapter is loaded: pass ip_adapter_image (or ip_adapter_image_embeds), or call "
                       "unload_ip_adapter() for the plain model.")
    if image is not None and image_embeds is not None:
      raise ValueError("give ip_adapter_image or ip_adapter_image_embeds, not both.")
    if image_embeds is not None:
      cond, uncond = _given_embeds(image_embeds, batch, guided, state.embed_dim, state.kind)
    else:
      nested = isinstance(image, (list, tuple)) and bool(image) and all(isinstance(x, (list, tuple)) for x in image)
      if nested and len(image) > 1:
        raise ValueError(f"ip_adapter_image: {len(image)} lists of images (one per adapter in diffusers): several "
                         "IP-Adapters are not supported.")
      embeds, uncond = self.encode_ip_adapter_image(image[0] if nested else image)
      if not nested and embeds.shape[0] not in (1, batch):
        raise ValueError(f"{embeds.shape[0]} IP-Adapter images for {batch} prompts: give one image (for every "
                         "prompt), one per prompt, or [[image, ...]] for all of them in every prompt (as diffusers).")
      if nested:  # every prompt, all the images
        cond, uncond = (np.broadcast_to(x[None], (batch,) + x.shape) for x in (embeds, uncond))
      else:  # one image for every prompt, or one each
        cond, uncond = (np.broadcast_to(x, (batch,) + x.shape[1:])[:, None] for x in (embeds, uncond))
    return {
        "image_embeds": jnp.asarray(cond, jnp.float32),
        "uncond_image_embeds": jnp.asarray(uncond, jnp.float32),
        "scale": jnp.float32(state.scale)
    }

  ip_adapter_unet_inputs = staticmethod(unet_inputs)

  def ip_adapter_cond(self, cond: dict, batch: int, guided: bool) -> dict:
    """`cond` (a pipeline call's program inputs) with its IP-Adapter arguments (`call_options`) turned into the
    program's `ip_adapter` input; unchanged without an adapter or those arguments."""
    image, embeds = cond.get("ip_adapter_image"), cond.get("ip_adapter_image_embeds")
    inputs = self.ip_adapter_inputs(image, embeds, batch, guided)
    cond = {k: v for k, v in cond.items() if k not in ("ip_adapter_image", "ip_adapter_image_embeds")}
    return cond if inputs is None else dict(cond, ip_adapter=inputs)


def _encode(encoder, plus: bool, params, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(embeddings, unconditional ones) of preprocessed NHWC pixels, as diffusers' `encode_image`: the projected pooled
  output and zeros, or (`plus`) the penultimate hidden states of the pixels and of zero pixels."""
  if not plus:
    embeds = encoder.apply({"params": params}, pixels).image_embeds.astype(jnp.float32)
    return embeds, jnp.zeros_like(embeds)
  both = encoder.apply({"params": params}, jnp.concatenate([pixels, jnp.zeros_like(pixels)])).hidden_states[-2]
  return tuple(jnp.split(both.astype(jnp.float32), 2))


def _given_embeds(image_embeds, batch: int, guided: bool, dim: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(cond, uncond), each (batch, n, [L,] D), from diffusers' `ip_adapter_image_embeds` (a list with one array per
  adapter): (2, n, [L,] D) under guidance (unconditional row first) or (1, n, [L,] D) without, for every prompt; or
  one row per prompt (2 batch or batch rows, the unconditional half first). Without guidance the unconditional
  rows are unused (zeros)."""
  ndim, what = (3, "n") if kind == PLAIN else (4, "n, L")
  halves = 2 if guided else 1
  if not isinstance(image_embeds, (list, tuple)):
    raise ValueError(f"ip_adapter_image_embeds: a list with one array per IP-Adapter, as diffusers ([embeds] of "
                     f"shape ({halves}, {what}, {dim})).")
  if len(image_embeds) != 1:
    raise ValueError(f"ip_adapter_image_embeds: {len(image_embeds)} arrays: several IP-Adapters are not supported; "
                     "give a list with one.")
  x = _numpy(image_embeds[0]).astype(np.float32)
  if x.ndim != ndim or x.shape[0] not in (halves, halves * batch) or x.shape[-1] != dim:
    hint = ""
    if x.ndim == 4 and kind == PLAIN:
      hint = " (hidden states: IP-Adapter Plus's; this adapter takes pooled embeddings)"
    elif x.ndim == 3 and kind == PLUS:
      hint = " (pooled embeddings; IP-Adapter Plus takes the image encoder's hidden states)"
    half = ", the unconditional rows first" if guided else ""
    raise ValueError(f"ip_adapter_image_embeds[0] has shape {x.shape}{hint}; this call needs ({halves}, {what}, "
                     f"{dim}) for every prompt or ({halves * batch}, {what}, {dim}) for each{half}.")
  if not finite32(x):
    raise ValueError("ip_adapter_image_embeds: not all finite.")
  rows = x.shape[0] // halves
  parts = np.split(x, halves) if guided else [np.zeros_like(x), x]
  uncond, cond = (np.broadcast_to(p, (batch,) + p.shape[1:]) if rows == 1 else p for p in parts)
  return cond, uncond
