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
IP-Adapter Full Face (ip-adapter-full-face_sd15): diffusers' IPAdapterFullImageProjection (a GELU feed-forward and a
LayerNorm) on each of those hidden states, 257 tokens per image, with the same unconditional input as Plus.
IP-Adapter FaceID (ip-adapter-faceid_sd15.bin, ip-adapter-faceid_sdxl.bin; diffusers'
IPAdapterFaceIDImageProjection) takes no image: load it with `image_encoder_folder=None` and pass the face embedding
(insightface's `normed_embedding`, 512 wide) as `ip_adapter_image_embeds=[embeds]`, (2, n, 512) under guidance with
the unconditional row first, zeros as diffusers' documentation makes it (`torch.zeros_like`), (1, n, 512) without;
the documentation's (2, 1, 1, 512) reads the same (diffusers' projection flattens that axis away).
Its checkpoint also holds a LoRA of every attention's to_q / to_k / to_v / to_out, which diffusers 0.42's
`load_ip_adapter` loads itself (PEFT backend) as the LoRA adapter "faceid_<k>" and makes the only active one
(`set_adapters(["faceid_<k>"], [1.0])`); jaxsd does the same (`load_lora`, `set_adapters`; the LoRA stays after
`unload_ip_adapter`, as diffusers': `delete_adapters("faceid_0")` removes it). FaceID Plus (perceiver_resampler) is
refused.

The adapter's weights (read and converted by `jaxsd.ip_adapter_weights`) join the U-Net's parameters under diffusers'
names (`encoder_hid_proj/image_projection_layers_0`, each attn2's `to_k_ip_0` / `to_v_ip_0`), checked strictly against
the U-Net (key sets and shapes; an adapter of another model is refused in one line); the base parameters are left as
they are, and `unload_ip_adapter` gives the plain pipeline back. The image embeddings and the scale are inputs of the
compiled program: a new image or scale compiles nothing, and without an adapter the program is the one without
IP-Adapter support.

Per-block scales (InstantStyle's dicts, `set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})`):
`jaxsd.block_scales`. Several adapters at once (diffusers' lists: `load_ip_adapter(folder, weight_name=[a, b])`,
`set_ip_adapter_scale([0.6, {...}])`, `ip_adapter_image=[image_a, image_b]`): the k-th adapter's parameters are
`image_projection_layers_<k>` and `to_k_ip_<k>` / `to_v_ip_<k>`, each cross-attention adds each adapter's
attention at its own scale, and the adapters share the first fitting image encoder (a plain and a Plus adapter read
the same encoder's two outputs). Attention masks (diffusers' `IPAdapterMaskProcessor` and
`cross_attention_kwargs={"ip_adapter_masks": masks}`; here `ip_adapter_masks=`): each adapter's image, or each of
one adapter's images, only in its region of the picture, e.g. two faces, left and right
(`ip_adapter_image=[[face1, face2]], ip_adapter_masks=[left, right]`), with per-image scales
(`set_ip_adapter_scale([[0.7, 0.5]])`) as diffusers'; `jaxsd.ip_adapter_masks`. Not supported (refused by name):
IP-Adapter FaceID Plus.
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

from jaxsd import conditioning, block_scales, ip_adapter_masks, model_folder, pretrained
from jaxsd.config import finite32
from jaxsd.ip_adapter_weights import (FACEID, HIDDEN_STATE_KINDS, PLAIN, convert, lora_state_dict, merge, numpy_array,
                                      read_state_dict, renumber, unet_inputs)

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
  config.json: projection_dim, Plus and Full Face: hidden_size, transformers' defaults where it has none); None
  without one."""
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
  kind: str  # PLAIN, PLUS, FULL_FACE or FACEID
  embed_dim: int  # the width of the image embeddings it projects
  # one number, or per-block: {attention path: number} (`block_scales.expand`), or per image (with masks): (n,)
  scale: float | dict | np.ndarray
  where: str
  image_encoder: Any = None  # a CLIPVisionModelWithProjection, or None (then only precomputed embeddings)
  image_encoder_params: Any = None
  image_encoder_folder: str | None = None
  feature_extractor: Any = None
  encode: Callable | None = None  # jitted (params, NHWC pixels) -> (image embeddings, unconditional ones)


def call_options(image, image_embeds, masks=None) -> dict:
  """A pipeline call's IP-Adapter arguments, only those given (passed on to `StableDiffusion._run`)."""
  given = (("ip_adapter_image", image), ("ip_adapter_image_embeds", image_embeds), ("ip_adapter_masks", masks))
  return {k: v for k, v in given if v is not None}


class IPAdapterMixin:
  """`load_ip_adapter`, `set_ip_adapter_scale` and `unload_ip_adapter` for a `jaxsd.pipeline.StableDiffusion` (SDXL
  and the ControlNet pipelines too), as diffusers' IPAdapterMixin; the calls take `ip_adapter_image=` or
  `ip_adapter_image_embeds=`."""

  @property
  def ip_adapters(self) -> tuple[LoadedIPAdapter, ...]:
    """The loaded IP-Adapters, in order (diffusers' `image_projection_layers`), or ()."""
    return self.__dict__.get("_ip_adapter", ())

  @property
  def ip_adapter(self) -> LoadedIPAdapter | None:
    """The loaded IP-Adapter (the first, when several are), or None."""
    return self.ip_adapters[0] if self.ip_adapters else None

  def load_ip_adapter(self, source, subfolder: str | list | None = None, weight_name: str | list | None = None,
                      image_encoder_folder: str | None = IMAGE_ENCODER_FOLDER, *, scale=1.0,
                      allow_pickle: bool = False) -> None:
    """Loads one IP-Adapter (plain, Plus, Full Face or FaceID), or several given as lists, and their image encoder,
    as diffusers' `load_ip_adapter`, replacing those loaded before.

    Args:
      source: the adapter: a `.safetensors` file (`image_proj.*` and `ip_adapter.*` keys) or pickled `.bin` (with
        allow_pickle), a folder holding `subfolder/weight_name`, or a state dict (flat, or {"image_proj": ...,
        "ip_adapter": ...}). Local files only.
      subfolder, weight_name: the file in a folder `source` (diffusers' arguments); without weight_name the
        folder's one weight file. Several adapters: lists of sources, subfolders, weight names (a list of one, or a
        single value, serves them all, as diffusers broadcasts them), e.g. `load_ip_adapter("models",
        weight_name=["ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"])`; each adapter's images
        then come in a list with one entry per adapter (`ip_adapter_inputs`).
      image_encoder_folder: the transformers CLIPVisionModelWithProjection the images go through (see
        `find_image_encoder`): diffusers' "image_encoder" is the adapter's folder's `image_encoder/`, a path with "/"
        is looked up from the repository's top ("models/image_encoder"), an absolute path is used as it is; the
        pipeline folder's own image_encoder/ (model_index.json names it) and an encoder a previous adapter loaded
        come first where they fit (their embedding width is the adapter's: projection_dim, Plus: hidden_size).
        None: no encoder, only `ip_adapter_image_embeds`. FaceID never has one (it takes face embeddings).
      scale: the adapter's weight, or per-block weights, or a list of one per adapter (`set_ip_adapter_scale`).
      allow_pickle: read a pickled `.bin` adapter (and image encoder) with `torch.load(weights_only=True)`.

    FaceID's LoRA (in its checkpoint) is loaded as diffusers does: the LoRA adapter "faceid_<k>" (the k-th adapter
    loaded), made the only active one, unless one of that name is loaded already (see the module's docstring).

    Raises a ValueError for an adapter of another model or kind (FaceID Plus: not supported).
    """
    sources, subfolders, names = _broadcast(source, subfolder, weight_name)
    scales = self._ip_scales(scale, len(sources))  # checked before anything is read
    loaded, previous, loras = [], self.ip_adapters, []
    for k, (src, sub, name) in enumerate(zip(sources, subfolders, names)):
      image_proj, ip_adapter, file = read_state_dict(src, sub, name, allow_pickle)
      where = file or "the IP-Adapter state dict"
      params, kind, embed_dim = convert(image_proj, ip_adapter, self.unet, self.unet_params, where)
      loras.append(lora_state_dict(ip_adapter, self.unet_params, where))
      state = LoadedIPAdapter(renumber(params, k), kind, embed_dim, scales[k], where)
      if kind == FACEID:
        log.info("IP-Adapter FaceID %s takes face embeddings: pass ip_adapter_image_embeds (no image encoder).", where)
      elif image_encoder_folder is None:
        log.info("IP-Adapter %s: no image encoder (image_encoder_folder=None); pass ip_adapter_image_embeds.", where)
      elif not _share_image_encoder(state, loaded + list(previous)):  # as diffusers keeps the one it has
        self._load_image_encoder(state, file, src, image_encoder_folder, allow_pickle)
      loaded.append(state)
    if any(loras):
      self._loras.check_unfused("load_ip_adapter (FaceID's LoRA)")
    self.__dict__["_ip_adapter"] = tuple(loaded)
    for k, lora in enumerate(loras):  # FaceID's LoRA, as diffusers' load_ip_adapter (PEFT backend) loads it
      if lora and f"faceid_{k}" not in self._loras.adapters:
        self.load_lora(lora, name=f"faceid_{k}")
        self.set_adapters([f"faceid_{k}"], [1.0])

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
    state.encode = jax.jit(functools.partial(_encode, encoder, state.kind in HIDDEN_STATE_KINDS))

  def _ip_scales(self, scale, n: int) -> list[float | dict]:
    """One scale per adapter (a number or per-block values for this U-Net, `block_scales.expand`) from one for all
    or a list of one per adapter (diffusers' rule), or a ValueError."""
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale]
    if len(scales) == 1:
      scales = scales * n
    if len(scales) != n:
      raise ValueError(f"IP-Adapter scale: {len(scales)} scales for {n} IP-Adapter{'s' * (n > 1)}: give one for all "
                       "or one per adapter.")
    return [_per_image(s) if isinstance(s, (list, tuple)) else block_scales.expand(s, self.unet.config) for s in scales]

  def set_ip_adapter_scale(self, scale) -> None:
    """The adapter's weight as diffusers' `set_ip_adapter_scale`: one number (1 as trained, 0 is the plain model), or
    per-block weights (InstantStyle: {"up": {"block_0": [0.0, 1.0, 0.0]}}, every attention left out at 0;
    `jaxsd.block_scales`); with several adapters one of these for all, or a list of one per adapter; with masks, a
    list of one number per image of an adapter (diffusers' `[[0.7, 0.5]]`, `ip_adapter_masks`). An input of the
    compiled program: changing it compiles nothing (going from one number to a dict, or back, compiles once)."""
    if not self.ip_adapters:
      raise ValueError("set_ip_adapter_scale: no IP-Adapter is loaded; load_ip_adapter(...) first.")
    for state, value in zip(self.ip_adapters, self._ip_scales(scale, len(self.ip_adapters))):
      state.scale = value

  def unload_ip_adapter(self) -> None:
    """Removes the IP-Adapter and its image encoder (as diffusers' `unload_ip_adapter`): the pipeline is the plain
    one again, bit for bit."""
    self.__dict__.pop("_ip_adapter", None)

  def _with_ip_adapter(self, params: dict) -> dict:
    """The program's parameters with the adapters' in the U-Net's (unchanged without an adapter)."""
    if not self.ip_adapters:
      return params
    unet = params["unet"]
    for state in self.ip_adapters:
      unet = merge(unet, state.params)
    return {**params, "unet": unet}

  def encode_ip_adapter_image(self, images, adapter: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, unconditional ones), float32, of one image or a list / batch, as diffusers'
    `encode_image`: the feature extractor's resize, crop and normalisation, then the image encoder's projected pooled
    output (n, D) and zeros; for IP-Adapter Plus and Full Face its penultimate hidden states (n, L, D), of the
    images and of zero pixels. `adapter`: which of several loaded adapters they are for."""
    state = self.ip_adapters[adapter] if adapter < len(self.ip_adapters) else None
    if state is None:
      raise ValueError("encode_ip_adapter_image: no IP-Adapter is loaded; load_ip_adapter(...) first.")
    if state.kind == FACEID:
      raise ValueError("ip_adapter_image: IP-Adapter FaceID has no image encoder (it takes insightface face "
                       f"embeddings): pass ip_adapter_image_embeds=[embeds], (2, n, {state.embed_dim}) with the zero "
                       "row first.")
    if state.image_encoder is None:
      raise ValueError("ip_adapter_image: the IP-Adapter was loaded without an image encoder "
                       "(image_encoder_folder=None): pass ip_adapter_image_embeds, or load it with one.")
    pixels = state.feature_extractor(images=pil_images(images), return_tensors="np").pixel_values
    embeds, uncond = state.encode(state.image_encoder_params, jnp.asarray(np.transpose(pixels, (0, 2, 3, 1))))
    return np.asarray(embeds), np.asarray(uncond)

  def ip_adapter_inputs(self, image=None, image_embeds=None, batch: int = 1, guided: bool = True, masks=None,
                        size: tuple[int, int] | None = None) -> dict | None:
    """The program's `ip_adapter` input for `batch` prompts: {"image_embeds", "uncond_image_embeds": (batch, n, D),
    "scale": ()}; None without an adapter, a ValueError for inputs that do not fit (or none, with an adapter).

    `image`: one image for every prompt; a list (or batch) of `batch` images, one per prompt; or diffusers' nesting
    [[image, ...]] (one list for the one adapter): every prompt sees all n images (their tokens one after the other).
    The unconditional rows get zero embeddings (Plus: a zero image's), as diffusers'. `image_embeds`: diffusers'
    `ip_adapter_image_embeds`, a list with one (2, n, D) array under guidance, the unconditional row first ((1, n,
    D) without), used for every prompt (`prepare_ip_adapter_image_embeds`' output); or (2 batch, n, D) ((batch, n,
    D)): one row per prompt. For IP-Adapter Plus and Full Face they are hidden states: (2, n, L, D) and so on; for
    FaceID face embeddings (2, n, 512), or (2, n, 1, 512) as diffusers' documentation builds them, the
    unconditional row zeros.

    Several adapters (diffusers' lists): `image` is a list with one entry per adapter, each an image or a list of
    images that every prompt sees (diffusers' reading); `image_embeds` a list of one array per adapter, as above;
    the input's entries are then tuples of one per adapter.

    `masks`: diffusers' `ip_adapter_masks` (`jaxsd.ip_adapter_masks.adapter_masks`), read at `size` (height, width),
    the input's "masks" (absent without them).
    """
    states = self.ip_adapters
    if not states:
      if image is not None or image_embeds is not None or masks is not None:
        raise ValueError("ip_adapter_image / ip_adapter_image_embeds / ip_adapter_masks need an IP-Adapter: "
                         "pipe.load_ip_adapter(...) first.")
      return None
    if image is None and image_embeds is None:
      raise ValueError("an IP-Adapter is loaded: pass ip_adapter_image (or ip_adapter_image_embeds), or call "
                       "unload_ip_adapter() for the plain model.")
    if image is not None and image_embeds is not None:
      raise ValueError("give ip_adapter_image or ip_adapter_image_embeds, not both.")
    n = len(states)
    if image_embeds is not None:
      if not isinstance(image_embeds, (list, tuple)):
        raise ValueError(f"ip_adapter_image_embeds: a list with one array per IP-Adapter, as diffusers ({n} "
                         f"adapter{'s' * (n > 1)} loaded).")
      if len(image_embeds) != n:
        raise ValueError(f"ip_adapter_image_embeds: {len(image_embeds)} arrays for {n} IP-Adapter{'s' * (n > 1)}: give "
                         "one per adapter.")
      pairs = [
          _given_embeds(x, batch, guided, st.embed_dim, st.kind, f"ip_adapter_image_embeds[{k}]")
          for k, (x, st) in enumerate(zip(image_embeds, states))
      ]
    elif n == 1:
      pairs = [self._one_adapter_images(image, batch)]
    else:
      if not isinstance(image, (list, tuple)) or len(image) != n:
        got = f"{len(image)} entries" if isinstance(image, (list, tuple)) else "one image"
        raise ValueError(f"ip_adapter_image: {got} for {n} IP-Adapters: give a list with one image (or list of "
                         "images) per adapter, as diffusers.")
      pairs = []
      for k, entry in enumerate(image):
        embeds, uncond = self.encode_ip_adapter_image(entry, k)  # every prompt sees all of the entry's images
        pairs.append(tuple(np.broadcast_to(x[None], (batch,) + x.shape) for x in (embeds, uncond)))
    counts = [p[0].shape[1] for p in pairs]  # each adapter's images
    if masks is not None and size is None:
      raise ValueError("ip_adapter_masks: the picture's size is needed to read them (size=(height, width)).")
    if masks is not None:
      masks = ip_adapter_masks.adapter_masks(masks, counts, *size)
      config, f = self.unet.config, self.vae.config.downsampling_factor
      levels = block_scales.attention_blocks(config)["down"] + [len(config.block_out_channels) - 1]  # (+ the mid)
      ip_adapter_masks.check_sizes(masks, (size[0] // f, size[1] // f), levels)
    _check_per_image_scales(states, masks, counts)
    cond, uncond = (tuple(jnp.asarray(p[i], jnp.float32) for p in pairs) for i in (0, 1))
    scale = tuple(jax.tree.map(jnp.float32, st.scale) for st in states)
    if n == 1:
      cond, uncond, scale = cond[0], uncond[0], scale[0]
    out = {"image_embeds": cond, "uncond_image_embeds": uncond, "scale": scale}
    return out if masks is None else dict(out, masks=jax.tree.map(jnp.asarray, masks))

  def _one_adapter_images(self, image, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(cond, uncond), each (batch, n, ...), of the one adapter's `image` argument (`ip_adapter_inputs`)."""
    nested = isinstance(image, (list, tuple)) and bool(image) and all(isinstance(x, (list, tuple)) for x in image)
    if nested and len(image) > 1:
      raise ValueError(f"ip_adapter_image: {len(image)} lists of images (one per adapter in diffusers) for the one "
                       "IP-Adapter loaded.")
    embeds, uncond = self.encode_ip_adapter_image(image[0] if nested else image)
    if not nested and embeds.shape[0] not in (1, batch):
      raise ValueError(f"{embeds.shape[0]} IP-Adapter images for {batch} prompts: give one image (for every "
                       "prompt), one per prompt, or [[image, ...]] for all of them in every prompt (as diffusers).")
    if nested:  # every prompt, all the images
      return tuple(np.broadcast_to(x[None], (batch,) + x.shape) for x in (embeds, uncond))
    return tuple(np.broadcast_to(x, (batch,) + x.shape[1:])[:, None] for x in (embeds, uncond))  # one or one each

  ip_adapter_unet_inputs = staticmethod(unet_inputs)

  def ip_adapter_cond(self, cond: dict, batch: int, guided: bool, size: tuple[int, int] | None = None) -> dict:
    """`cond` (a pipeline call's program inputs) with its IP-Adapter arguments (`call_options`) turned into the
    program's `ip_adapter` input; unchanged without an adapter or those arguments. `size`: the picture's (height,
    width), which masks are read at."""
    names = ("ip_adapter_image", "ip_adapter_image_embeds", "ip_adapter_masks")
    inputs = self.ip_adapter_inputs(*(cond.get(k) for k in names[:2]), batch, guided, cond.get(names[2]), size)
    cond = {k: v for k, v in cond.items() if k not in names}
    return cond if inputs is None else dict(cond, ip_adapter=inputs)


def _encode(encoder, plus: bool, params, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(embeddings, unconditional ones) of preprocessed NHWC pixels, as diffusers' `encode_image`: the projected pooled
  output and zeros, or (`plus`: Plus, Full Face) the penultimate hidden states of the pixels and of zero pixels."""
  if not plus:
    embeds = encoder.apply({"params": params}, pixels).image_embeds.astype(jnp.float32)
    return embeds, jnp.zeros_like(embeds)
  both = encoder.apply({"params": params}, jnp.concatenate([pixels, jnp.zeros_like(pixels)])).hidden_states[-2]
  return tuple(jnp.split(both.astype(jnp.float32), 2))


def check_embeds(x, kind: str, dim: int, guided: bool, batch: int = 1,
                 name: str = "ip_adapter_image_embeds[0]") -> np.ndarray:
  """One adapter's entry of diffusers' `ip_adapter_image_embeds` checked against the adapter (its `kind` and width
  `dim`) and the guidance, as float32: (2, n, [L,] D) under guidance (the unconditional row first) or (1, n, [L,] D)
  without, for every prompt, or one row per prompt (2 `batch` or `batch` rows, the unconditional half first);
  hidden states (L) for Plus and Full Face, pooled embeddings otherwise; FaceID's documented (2, n, 1, D) as
  (2, n, D). A one-line ValueError naming `name` where it does not fit."""
  hidden = kind in HIDDEN_STATE_KINDS
  ndim = 4 if hidden else 3
  halves = 2 if guided else 1
  x = numpy_array(x).astype(np.float32)
  if kind == FACEID and x.ndim == 4 and x.shape[2] == 1:  # diffusers' documented (2, n, 1, D): its projection's same
    x = x[:, :, 0]
  if x.ndim != ndim:
    what = ("the image encoder's hidden states, (2, n, L, D) or (1, n, L, D)"
            if hidden else "pooled embeddings, (2, n, D) or (1, n, D)"
            if kind != FACEID else "one face embedding per image, (2, n, D) or (1, n, D)")
    raise ValueError(f"{name} has shape {x.shape}: this {kind} adapter takes {what}.")
  if x.shape[-1] != dim:
    raise ValueError(f"{name} is {x.shape[-1]} wide; the adapter takes {dim}-wide embeddings.")
  if x.shape[0] not in (halves, halves * batch):
    per_prompt = f" (or {halves * batch}, one per prompt)" if batch > 1 else ""
    need = (f"with guidance on it takes 2{per_prompt}, the unconditional row first"
            if guided else f"without guidance (a scale <= 1) it takes 1{per_prompt}")
    raise ValueError(f"{name} has {x.shape[0]} row{'s' * (x.shape[0] > 1)} first, shape {x.shape}; {need}.")
  if not finite32(x):
    raise ValueError(f"{name}: not all finite.")
  return x


def _given_embeds(x, batch: int, guided: bool, dim: int, kind: str,
                  name: str = "ip_adapter_image_embeds[0]") -> tuple[np.ndarray, np.ndarray]:
  """(cond, uncond), each (batch, n, [L,] D), from one adapter's entry of `ip_adapter_image_embeds` (`check_embeds`).
  Without guidance the unconditional rows are unused (zeros)."""
  x = check_embeds(x, kind, dim, guided, batch, name)
  halves = 2 if guided else 1
  rows = x.shape[0] // halves
  parts = np.split(x, halves) if guided else [np.zeros_like(x), x]
  uncond, cond = (np.broadcast_to(p, (batch,) + p.shape[1:]) if rows == 1 else p for p in parts)
  return cond, uncond


def _per_image(scale) -> np.ndarray:
  """diffusers' per-image scales of one adapter ([[0.7, 0.5]]: one per image, with masks) as a float32 (n,) array."""
  values = [block_scales.check_number(x, "IP-Adapter per-image scale") for x in scale]
  if not values:
    raise ValueError("IP-Adapter scale: an empty list; give a number, or one per image of the adapter (with masks).")
  return np.asarray(values, np.float32)


def _check_per_image_scales(states, masks, counts: list[int]) -> None:
  """A ValueError where an adapter's per-image scales do not meet one mask per image (diffusers multiplies each
  image's masked attention by its own; without masks it has no reading of them)."""
  per_adapter = masks if isinstance(masks, tuple) else (masks,) * len(states)
  for k, (state, mask, count) in enumerate(zip(states, per_adapter, counts)):
    if not isinstance(state.scale, np.ndarray):
      continue
    which = f" {k}" if len(states) > 1 else ""
    if mask is None:
      raise ValueError(f"IP-Adapter{which} has per-image scales {state.scale.tolist()}: they need ip_adapter_masks "
                       "(one mask per image); give one number otherwise.")
    if len(state.scale) != count:
      raise ValueError(f"IP-Adapter{which}: {len(state.scale)} per-image scales for {count} image{'s' * (count > 1)} "
                       "(and masks): give one per image.")


def _broadcast(source, subfolder, weight_name) -> tuple[list, list, list]:
  """load_ip_adapter's sources, subfolders and weight names as lists of one entry per adapter, as diffusers
  broadcasts them (a single value or a list of one serves all), or a ValueError."""
  lists = [list(x) if isinstance(x, (list, tuple)) else [x] for x in (source, subfolder, weight_name)]
  n = max(len(x) for x in lists)
  if n == 0 or any(len(x) not in (1, n) for x in lists):
    raise ValueError(f"load_ip_adapter: {len(lists[0])} sources, {len(lists[1])} subfolders and {len(lists[2])} "
                     "weight names: give one, or one per adapter, of each.")
  return [x * n if len(x) == 1 else x for x in lists]


def _share_image_encoder(state: LoadedIPAdapter, others) -> bool:
  """Gives `state` the image encoder of one of `others` whose embeddings fit it (the same kind and width, or the
  same encoder's other output: Plus and Full Face read hidden_size, plain projection_dim); False when none
  does."""
  hidden = state.kind in HIDDEN_STATE_KINDS
  for other in others:
    if other.image_encoder is None:
      continue
    same = (other.kind in HIDDEN_STATE_KINDS, other.embed_dim) == (hidden, state.embed_dim)
    if same or embedding_width(other.image_encoder_folder, state.kind) == state.embed_dim:
      state.image_encoder, state.image_encoder_params = other.image_encoder, other.image_encoder_params
      state.image_encoder_folder, state.feature_extractor = other.image_encoder_folder, other.feature_extractor
      state.encode = other.encode if (other.kind in HIDDEN_STATE_KINDS) == hidden else jax.jit(
          functools.partial(_encode, other.image_encoder, hidden))
      return True
  return False
