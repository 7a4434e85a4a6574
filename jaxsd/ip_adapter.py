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

The adapter's weights (read and converted by `jaxsd.ip_adapter_weights`) join the U-Net's parameters under diffusers'
names (`encoder_hid_proj/image_projection_layers_0`, each attn2's `to_k_ip_0` / `to_v_ip_0`), checked strictly against
the U-Net (key sets and shapes; an adapter of another model is refused in one line); the base parameters are left as
they are, and `unload_ip_adapter` gives the plain pipeline back. The image embeddings and the scale are inputs of the
compiled program: a new image or scale compiles nothing, and without an adapter the program is the one without
IP-Adapter support.

Per-block scales (InstantStyle's dicts, `set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})`):
`jaxsd.block_scales`. Not supported (refused by name): IP-Adapter Full Face, FaceID and FaceID Plus (and their
LoRA), several adapters at once, and attention masks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import conditioning, block_scales, model_folder, pretrained
from jaxsd.config import finite32
from jaxsd.ip_adapter_weights import PLAIN, PLUS, convert, merge, numpy_array, read_state_dict, unet_inputs

log = logging.getLogger(__name__)

IMAGE_ENCODER_FOLDER = "image_encoder"  # diffusers' default image_encoder_folder

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
  scale: float | dict  # one number, or per-block: {attention path: number} (`block_scales.expand`)
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
      scale: the adapter's weight, or per-block weights (`set_ip_adapter_scale`).
      allow_pickle: read a pickled `.bin` adapter (and image encoder) with `torch.load(weights_only=True)`.

    Raises a ValueError for an adapter of another model or kind (Full Face, FaceID: not supported), and for a list
    of adapters (one at a time).
    """
    if isinstance(source, (list, tuple)) or isinstance(weight_name, (list, tuple)):
      raise ValueError("load_ip_adapter: several IP-Adapters at once are not supported; load one.")
    scale = self.ip_adapter_scale_value(scale)  # checked before anything is read
    image_proj, ip_adapter, file = read_state_dict(source, subfolder, weight_name, allow_pickle)
    where = file or "the IP-Adapter state dict"
    params, kind, embed_dim = convert(image_proj, ip_adapter, self.unet, self.unet_params, where)
    previous = self.ip_adapter
    state = LoadedIPAdapter(params, kind, embed_dim, scale, where)
    if image_encoder_folder is None:
      log.warning("IP-Adapter %s: no image encoder (image_encoder_folder=None); pass ip_adapter_image_embeds.", where)
    elif previous is not None and previous.image_encoder is not None and (previous.kind,
                                                                          previous.embed_dim) == (kind, embed_dim):
      state = dataclasses.replace(previous, params=params, scale=scale, where=where)  # as diffusers keeps it
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

  def ip_adapter_scale_value(self, scale) -> float | dict:
    """`scale` as one finite number or per-block values for this U-Net (`block_scales.expand`), or a ValueError
    naming what does not fit (several adapters' lists)."""
    if isinstance(scale, (list, tuple)) and len(scale) == 1:  # diffusers' one entry per adapter
      scale = scale[0]
    if isinstance(scale, (list, tuple)):
      raise ValueError(f"set_ip_adapter_scale: {len(scale)} scales: several IP-Adapters are not supported; give one "
                       "number or one per-block dict.")
    return block_scales.expand(scale, self.unet.config)

  def set_ip_adapter_scale(self, scale) -> None:
    """The adapter's weight as diffusers' `set_ip_adapter_scale`: one number (1 as trained, 0 is the plain model), or
    per-block weights (InstantStyle: {"up": {"block_0": [0.0, 1.0, 0.0]}}, every attention left out at 0;
    `jaxsd.block_scales`). An input of the compiled program: changing it compiles nothing (going from one number
    to a dict, or back, compiles once)."""
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
        "scale": jax.tree.map(jnp.float32, state.scale)
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
  x = numpy_array(image_embeds[0]).astype(np.float32)
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
