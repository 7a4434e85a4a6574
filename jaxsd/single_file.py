"""The original CompVis / A1111 single-file checkpoint, read as the diffusers state dicts of its three networks.

One `.safetensors` file holds the U-Net under `model.diffusion_model.`, the VAE under
`first_stage_model.` and the text encoder under `cond_stage_model.`: SD 1.x's CLIP in the
transformers layout under `transformer.`, SD 2.x's OpenCLIP tower under `model.` (one fused q/k/v
projection per layer, split here; its last layer is not part of the text encoder, which SD 2 reads
at the penultimate layer). Conversion is a table of renames built from the networks' configs (which
LDM block index is which diffusers block), plus two reshapes: the VAE's mid-block attention is 1x1
convolutions there and linear layers in diffusers, and OpenCLIP's fused projection. The configs do
not travel with the file: `config="v1"` / `"v2"` are SD 1.5's and SD 2.1's (768 px, v-prediction),
or a diffusers folder gives its own. Nothing here knows the networks: the pipeline builds them from
the configs and loads these state dicts strictly, so a key the tables do not know is named in the error.

SDXL files (`split_xl`) keep the U-Net and VAE there, with the size conditioning's MLP as `label_emb.0.0/0.2`, and
the text encoders under `conditioner.embedders.`: the base's CLIP ViT-L in the transformers layout as `0.transformer.`
and OpenCLIP ViT-bigG as `1.model.` (all its layers, and its `text_projection`), the refiner's bigG alone as
`0.model.`. `config="xl"` / `"xl-refiner"` / `"xl-inpainting"` are Stability's SDXL 1.0 base and refiner and
diffusers' SDXL inpainting 0.1.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxsd.model_folder import SafetensorsDict, read_pickled

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}

# runwayml/stable-diffusion-v1-5's config.json files (the keys jaxsd reads; the rest are diffusers' defaults).
V1 = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "in_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408
    },
    "scheduler": {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None
    },
}
# stabilityai/stable-diffusion-2-1 (768 px, v-prediction): what differs from SD 1.5. Written from the
# published config.json files (nothing can be downloaded here to check them against).
V2 = copy.deepcopy(V1)
V2["unet"].update(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                  use_linear_projection=True, upcast_attention=True)
V2["vae"].update(sample_size=768)
V2["text_encoder"].update(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_hidden_layers=23, projection_dim=512)
V2["scheduler"].update(_class_name="DDIMScheduler", prediction_type="v_prediction")
# The inpainting fine-tunes (diffusers' "inpainting" / "inpainting_v2" single-file types): a U-Net of 9 input
# channels (latents, mask, masked-image latents); SD 2's is stabilityai/stable-diffusion-2-inpainting, at 512 px
# with epsilon prediction. (That U-Net's upcast_attention is false; it changes nothing in fp32 / bf16 here.)
V1_INPAINTING = copy.deepcopy(V1)
V1_INPAINTING["unet"].update(in_channels=9)
V2_INPAINTING = copy.deepcopy(V2)
V2_INPAINTING["unet"].update(in_channels=9, sample_size=64, upcast_attention=False)
V2_INPAINTING["vae"].update(sample_size=512)
V2_INPAINTING["scheduler"].update(prediction_type="epsilon")
# timbrooks/instruct-pix2pix (diffusers' "instruct-pix2pix" single-file type, whose configs diffusers takes from that
# repository): SD 1.5's networks with an 8-channel U-Net (latents + the image's latents) and the Euler ancestral
# scheduler, SD 1.5's schedule (written from the published model_index / configs; not downloaded here to check).
INSTRUCT_PIX2PIX = copy.deepcopy(V1)
INSTRUCT_PIX2PIX["unet"].update(in_channels=8)
INSTRUCT_PIX2PIX["scheduler"].update(_class_name="EulerAncestralDiscreteScheduler")
PRESETS = {
    "v1": V1,
    "v2": V2,
    "v1-inpainting": V1_INPAINTING,
    "v2-inpainting": V2_INPAINTING,
    "instruct-pix2pix": INSTRUCT_PIX2PIX
}
# diffusers' pipeline class of a preset's folder where it is not StableDiffusionPipeline.
PIPELINE_CLASS = {"instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline"}
# SD 2.x's tokenizer pads with "!" (id 0), SD 1.x's with the end token
PAD_TOKEN = {"v1": None, "v2": "!", "v1-inpainting": None, "v2-inpainting": "!", "instruct-pix2pix": None}
CONV_IN = PREFIXES["unet"] + "input_blocks.0.0.weight"  # (out, in_channels, 3, 3)

XL_PREFIXES = {
    "unet": PREFIXES["unet"],
    "vae": PREFIXES["vae"],
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model."
}
XL_REFINER_TEXT = "conditioner.embedders.0.model."  # the refiner's one text encoder, OpenCLIP bigG
# stabilityai/stable-diffusion-xl-base-1.0's config.json files and model_index.json (the keys jaxsd reads), from the
# published files (nothing can be downloaded here to check them against; tests/test_single_file_xl.py builds
# diffusers' and transformers' networks from them and compares every parameter's shape with jaxsd's).
XL = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG) text features
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "in_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,  # bigG's 1280 pooled + 6 time ids x 256
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True
    },
    "vae": dict(V1["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "text_encoder": dict(V1["text_encoder"]),  # CLIP ViT-L/14's text tower, as SD 1.5's
    "text_encoder_2": {
        "architectures": ["CLIPTextModelWithProjection"],
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "pad_token_id": 1,
        "projection_dim": 1280,
        "vocab_size": 49408
    },
    "scheduler": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False
    },
    "model_index": {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]
    },
}
# stabilityai/stable-diffusion-xl-refiner-1.0: no first text encoder; a wider U-Net of four levels conditioned on
# bigG alone (1280 text features) and 5 time ids (the aesthetic score in place of the target size).
XL_REFINER = copy.deepcopy({k: v for k, v in XL.items() if k != "text_encoder"})
XL_REFINER["unet"].update(attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536,
                                                                                  1536], cross_attention_dim=1280,
                          down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                          projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4,
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"])
XL_REFINER["model_index"].update(_class_name="StableDiffusionXLImg2ImgPipeline", force_zeros_for_empty_prompt=False,
                                 requires_aesthetics_score=True)
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (diffusers' "xl_inpaint"): the base with a 9-channel U-Net.
XL_INPAINTING = copy.deepcopy(XL)
XL_INPAINTING["unet"].update(in_channels=9)
XL_INPAINTING["model_index"].update(_class_name="StableDiffusionXLInpaintPipeline", requires_aesthetics_score=False)
XL_PRESETS = {"xl": XL, "xl-refiner": XL_REFINER, "xl-inpainting": XL_INPAINTING}
XL_PAD_TOKEN_2 = "!"  # SDXL's second tokenizer pads with "!" (id 0); the first with the end token, as SD 1.x's


class RenamedDict(Mapping):
  """A read-only view of `source` under new keys: new key -> (source key, transform of the array or None)."""

  def __init__(self, source: Mapping[str, Any], table: dict[str, tuple[str, Callable | None]]):
    self._source, self._table = source, table

  def __getitem__(self, key: str) -> np.ndarray:
    old, fn = self._table[key]
    value = np.asarray(self._source[old])
    return fn(value) if fn else value

  def __iter__(self) -> Iterator[str]:
    return iter(self._table)

  def __len__(self) -> int:
    return len(self._table)


def _rename(key: str, prefixes: list[tuple[str, str]]) -> str:
  """`key` with the longest matching LDM prefix replaced by its diffusers one (unchanged if none matches)."""
  for old, new in prefixes:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def _sorted(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
  return sorted(pairs, key=lambda p: -len(p[0]))


_LDM_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
               ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]


def _resnet(ldm: str, diffusers: str, inner=_LDM_RESNET) -> list[tuple[str, str]]:
  return [(ldm + a, diffusers + b) for a, b in inner]


def unet_prefixes(config: dict) -> list[tuple[str, str]]:
  """(LDM prefix, diffusers prefix) pairs of a UNet2DConditionModel config (longest first)."""
  n, layers = len(config["block_out_channels"]), config["layers_per_block"]
  if not isinstance(layers, int):
    raise ValueError(f"layers_per_block={layers!r}: single files of per-block layer counts are not supported.")
  down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
  up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
  pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
  if config.get("addition_embed_type") == "text_time":  # SDXL's MLP of the pooled text and the time ids
    pairs += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
  k = 1
  for b in range(n):
    for i in range(layers):
      pairs += _resnet(f"input_blocks.{k}.0.", f"down_blocks.{b}.resnets.{i}.")
      if down_attn[b]:
        pairs.append((f"input_blocks.{k}.1.", f"down_blocks.{b}.attentions.{i}."))
      k += 1
    if b < n - 1:
      pairs.append((f"input_blocks.{k}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
      k += 1
  pairs += _resnet("middle_block.0.", "mid_block.resnets.0.") + _resnet("middle_block.2.", "mid_block.resnets.1.")
  pairs.append(("middle_block.1.", "mid_block.attentions.0."))
  k = 0
  for b in range(n):
    for i in range(layers + 1):
      pairs += _resnet(f"output_blocks.{k}.0.", f"up_blocks.{b}.resnets.{i}.")
      if up_attn[b]:
        pairs.append((f"output_blocks.{k}.1.", f"up_blocks.{b}.attentions.{i}."))
      if i == layers and b < n - 1:
        pairs.append((f"output_blocks.{k}.{2 if up_attn[b] else 1}.conv.", f"up_blocks.{b}.upsamplers.0.conv."))
      k += 1
  return _sorted(pairs)


_VAE_RESNET = [(x, x) for x in ("norm1.", "conv1.", "norm2.", "conv2.")] + [("nin_shortcut.", "conv_shortcut.")]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0.")]


def vae_prefixes(config: dict) -> list[tuple[str, str]]:
  """(LDM prefix, diffusers prefix) pairs of an AutoencoderKL config (longest first)."""
  n, layers = len(config["block_out_channels"]), config["layers_per_block"]
  pairs = []
  for part in ("encoder", "decoder"):
    pairs += [(f"{part}.norm_out.", f"{part}.conv_norm_out.")]
    pairs += _resnet(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET)
    pairs += _resnet(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET)
    pairs += _resnet(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTENTION)
  for b in range(n):
    for i in range(layers):
      pairs += _resnet(f"encoder.down.{b}.block.{i}.", f"encoder.down_blocks.{b}.resnets.{i}.", _VAE_RESNET)
    if b < n - 1:
      pairs.append((f"encoder.down.{b}.downsample.conv.", f"encoder.down_blocks.{b}.downsamplers.0.conv."))
    up = n - 1 - b  # the decoder's LDM levels count from the lowest resolution
    for i in range(layers + 1):
      pairs += _resnet(f"decoder.up.{b}.block.{i}.", f"decoder.up_blocks.{up}.resnets.{i}.", _VAE_RESNET)
    if b > 0:
      pairs.append((f"decoder.up.{b}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
  return _sorted(pairs)


def _squeeze_1x1(value: np.ndarray) -> np.ndarray:
  return value[:, :, 0, 0] if value.ndim == 4 else value


def _network(
    sd: Mapping[str, Any], prefix: str, prefixes: list[tuple[str, str]],
    transform: Callable[[str], Callable | None] = lambda key: None, own: tuple[str, ...] = ("",)) -> RenamedDict:
  """The keys under `prefix` (and, after it, under one of `own`), renamed by `prefixes`."""
  table = {}
  for key in sd.keys():
    if key.startswith(prefix) and key[len(prefix):].startswith(own):
      new = _rename(key[len(prefix):], prefixes)
      table[new] = (key, transform(new))
  return RenamedDict(sd, table)


_OPEN_CLIP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = _sorted([("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                            ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."),
                            ("mlp.c_proj.", "mlp.fc2.")])
_NOT_THE_TEXT_ENCODER = ("text_projection", "logit_scale", "attn_mask")  # OpenCLIP's, not CLIPTextModel's


def _open_clip(sd: Mapping[str, Any], prefix: str, config: dict, projection: bool = False) -> RenamedDict:
  """An OpenCLIP text tower as a transformers state dict (as diffusers' convert_open_clip_checkpoint): SD 2.x's as a
  CLIPTextModel without the layers after `config`'s last; with `projection` SDXL's bigG as a
  CLIPTextModelWithProjection, every layer kept (a layer too many is an error) and the (width, dim) projection
  matrix, applied as x @ P, transposed into the (dim, width) weight of a linear layer."""
  width, layers = config["hidden_size"], config["num_hidden_layers"]
  table = {}
  if projection and prefix + "text_projection" in sd.keys():
    table["text_projection.weight"] = (prefix + "text_projection", np.transpose)
  for key in sd.keys():
    if not key.startswith(prefix):
      continue
    k = key[len(prefix):]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
    if k in _OPEN_CLIP:
      table[_OPEN_CLIP[k]] = (key, None)
    elif m and int(m[1]) >= layers and not projection:
      continue  # the layers after the one SD 2 reads (the penultimate) are not part of the text encoder
    elif m and m[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
      base, kind = f"text_model.encoder.layers.{m[1]}.self_attn.", m[2].rsplit("_", 1)[1]
      for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        table[f"{base}{name}.{kind}"] = (key, lambda v, j=j: v[j * width:(j + 1) * width])
    elif m:
      table[f"text_model.encoder.layers.{m[1]}." + _rename(m[2], _OPEN_CLIP_LAYER)] = (key, None)
    elif k not in _NOT_THE_TEXT_ENCODER:
      table[k] = (key, None)  # unknown: the strict loader names it
  return RenamedDict(sd, table)


def _vae_transform(key: str) -> Callable | None:
  return _squeeze_1x1 if ".mid_block.attentions." in key and key.endswith(
      ".weight") and "group_norm" not in key else None


def _missing(sd: Mapping[str, Any], prefixes: dict, need_vae: bool, kind: str) -> list[str]:
  """The networks of `prefixes` the file has no keys of; a missing VAE is refused only when `need_vae` (else it is
  given apart: `vae=`)."""
  missing = [name for name, p in prefixes.items() if not any(k.startswith(p) for k in sd.keys())]
  if missing == ["vae"] and need_vae:
    raise ValueError(f"the single file has no VAE weights (no keys under {prefixes['vae']}): some checkpoints ship "
                     "without one; give a VAE with vae=<a VAE folder, Hub id or file> (--vae on the command line), as "
                     "diffusers' from_single_file(..., vae=...).")
  if [m for m in missing if m != "vae"]:
    what = "SDXL single file" if kind.startswith("SDXL") else "single file"
    raise ValueError(f"the {what} has no {', '.join(missing)} weights (no keys under "
                     f"{', '.join(prefixes[m] for m in missing)}): is it a full {kind} checkpoint?")
  return missing


def split(sd: Mapping[str, Any], configs: dict, need_vae: bool = True) -> dict[str, RenamedDict | None]:
  """{"unet", "vae", "text_encoder"} -> that network's state dict in diffusers / transformers names ("vae": None
  for a file without one, when not `need_vae`)."""
  if is_sdxl(sd):
    raise ValueError("this is an SDXL single file: load it with jaxsd.StableDiffusionXL.from_single_file.")
  missing = _missing(sd, PREFIXES, need_vae, "Stable Diffusion")
  if any(k.startswith(PREFIXES["text_encoder"] + "model.") for k in sd.keys()):  # SD 2.x
    text = _open_clip(sd, PREFIXES["text_encoder"] + "model.", configs["text_encoder"])
  else:  # SD 1.x keeps the transformers layout under `transformer.`; the loader adds `text_model.` where missing
    text = _network(sd, PREFIXES["text_encoder"], [("transformer.", "")])
  return {
      "unet": _network(sd, PREFIXES["unet"], unet_prefixes(configs["unet"])),
      "vae": None if "vae" in missing else _network(sd, PREFIXES["vae"], vae_prefixes(configs["vae"]), _vae_transform),
      "text_encoder": text,
  }


def split_xl(sd: Mapping[str, Any], configs: dict, need_vae: bool = True) -> dict[str, RenamedDict | None]:
  """An SDXL file's {"unet", "vae", "text_encoder" (not for a refiner), "text_encoder_2"} in diffusers /
  transformers names; `configs` without "text_encoder" read a refiner's file (bigG under `conditioner.embedders.0`);
  "vae" is None for a file without one, when not `need_vae`."""
  prefixes = dict(XL_PREFIXES)
  if "text_encoder" not in configs:
    del prefixes["text_encoder"]
    prefixes["text_encoder_2"] = XL_REFINER_TEXT
  missing = _missing(sd, prefixes, need_vae, "SDXL " + ("refiner" if "text_encoder" not in configs else "base"))
  parts = {
      "unet": _network(sd, prefixes["unet"], unet_prefixes(configs["unet"])),
      "vae": None if "vae" in missing else _network(sd, prefixes["vae"], vae_prefixes(configs["vae"]), _vae_transform),
      "text_encoder_2": _open_clip(sd, prefixes["text_encoder_2"], configs["text_encoder_2"], projection=True),
  }
  if "text_encoder" in prefixes:  # the transformers layout; `text_model.` is there already (or added by the loader)
    parts["text_encoder"] = _network(sd, prefixes["text_encoder"], [])
  return parts


def _standalone(sd: Mapping[str, Any], prefix: str, starts: tuple[str, ...], own: tuple[str, ...],
                prefixes: list[tuple[str, str]],
                transform: Callable[[str], Callable | None] = lambda key: None) -> Mapping[str, Any]:
  """One network's file in diffusers names: renamed from the original layout when its keys are under the whole
  checkpoint's `prefix` or start as that layout's do (`starts`), else as it is. In the original layout only the
  network's own keys (under `own`) are read, as diffusers' converters: a training checkpoint's `loss.*` (LPIPS,
  discriminator) and `model_ema.*` entries are no part of it."""
  keys = list(sd.keys())
  if any(k.startswith(prefix) for k in keys):
    return _network(sd, prefix, prefixes, transform)
  if any(k.startswith(starts) for k in keys):
    return _network(sd, "", prefixes, transform, own)
  return sd


def vae_state_dict(sd: Mapping[str, Any], config: dict) -> Mapping[str, Any]:
  """A standalone VAE file's tensors in diffusers names: the original (LDM) layout of A1111's VAE files
  (vae-ft-mse-840000-ema-pruned: `encoder.down.0.block.0...`, or a whole checkpoint's `first_stage_model.`) is
  renamed for an AutoencoderKL of `config`; diffusers-named files pass as they are."""
  return _standalone(sd, PREFIXES["vae"], ("encoder.down.", "decoder.up.", "encoder.mid."),
                     ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."), vae_prefixes(config), _vae_transform)


def unet_state_dict(sd: Mapping[str, Any], config: dict) -> Mapping[str, Any]:
  """A standalone U-Net file's tensors in diffusers names (SDXL-Lightning's, Hyper-SD's `..._unet.safetensors` are
  diffusers-named): the original layout (`input_blocks.`, or a whole checkpoint's `model.diffusion_model.`) is
  renamed for a UNet2DConditionModel of `config`."""
  return _standalone(sd, PREFIXES["unet"], ("input_blocks.", "middle_block.", "output_blocks."),
                     ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out."),
                     unet_prefixes(config))


PICKLED = (".ckpt", ".pt", ".pth", ".bin")


def read(path: str | os.PathLike, allow_pickle: bool = False) -> Mapping[str, Any]:
  """The tensors of a `.safetensors` single file (lazily), or of a pickled `.ckpt` with `allow_pickle` (read with
  `torch.load(weights_only=True)`, as diffusers' `from_single_file` reads it)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; pass a Stable Diffusion .safetensors checkpoint.")
  if path.lower().endswith(PICKLED):
    if not allow_pickle:
      raise ValueError(f"{path} is a pickled checkpoint: unpickling can run arbitrary code, so it is off by default. "
                       "Convert it to .safetensors, or, if you trust its source, pass allow_pickle=True "
                       "(--allow-pickle on the command line): it is read with torch.load(weights_only=True).")
    return read_pickled([path])
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: a single file must be a .safetensors checkpoint (or, with allow_pickle, a pickled "
                     f"{' / '.join(PICKLED)}).")
  return SafetensorsDict([path])


def is_sdxl(sd: Mapping[str, Any]) -> bool:
  """Whether a single file is SDXL's (its text encoders under `conditioner.embedders.`)."""
  return any(k.startswith("conditioner.embedders.") for k in sd.keys())


def is_sdxl_file(path: str | os.PathLike, allow_pickle: bool = False) -> bool:
  """`is_sdxl` of a file, reading only its names where it can: a safetensors header, a pickled checkpoint
  memory-mapped (an old, non-zip pickle is read whole)."""
  path = os.fspath(path)
  if allow_pickle and path.lower().endswith(PICKLED) and os.path.isfile(path):
    try:
      import torch

      loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
      if isinstance(loaded, dict):
        return is_sdxl(loaded)
    except Exception:  # pylint: disable=broad-except  (read below, which names what is wrong)
      pass
  return is_sdxl(read(path, allow_pickle))


def guess_config(sd: Mapping[str, Any]) -> str:
  """The preset a checkpoint's keys point to, as diffusers' `infer_diffusers_model_type`: "v2" when its text encoder
  is OpenCLIP's (SD 2.x), "v1" when it is CLIP's in the transformers layout (SD 1.x), each with "-inpainting" when
  the U-Net takes 9 input channels, "instruct-pix2pix" for an SD 1.x one taking 8; for SDXL files "xl" when a
  second text encoder is under `conditioner.embedders.1` ("xl-inpainting" with 9 channels), "xl-refiner" when
  OpenCLIP's is the only one; a ValueError for files that are none of these (Playground v2.5's, whose configs
  diffusers takes from its repository)."""
  keys = list(sd.keys())
  channels = np.shape(sd[CONV_IN])[1] if CONV_IN in sd and len(np.shape(sd[CONV_IN])) == 4 else 4
  inpainting = channels == 9
  if is_sdxl(sd):
    if "edm_mean" in sd:
      raise ValueError("this is a Playground v2.5 single file (SDXL's networks, an EDM schedule): no preset reads "
                       "it; pass config=<a diffusers folder of Playground v2.5's configs>.")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
      return "xl-inpainting" if inpainting else "xl"
    if any(k.startswith(XL_REFINER_TEXT) for k in keys):
      return "xl-refiner"
    raise ValueError("an SDXL single file with neither SDXL base's text encoders (conditioner.embedders.0 and 1) "
                     f"nor the refiner's ({XL_REFINER_TEXT!r}): pass config=<a diffusers folder that describes it>.")
  if any(k.startswith(PREFIXES["text_encoder"] + "model.") for k in keys):
    version = "v2"
  elif any(k.startswith(PREFIXES["text_encoder"] + "transformer.") for k in keys):
    version = "v1"
  else:
    raise ValueError("not a Stable Diffusion 1.x / 2.x single file: no text encoder under "
                     f"{PREFIXES['text_encoder']!r}.")
  if channels == 8:
    if version != "v1":
      raise ValueError("an SD 2.x single file with an 8-channel (InstructPix2Pix) U-Net: no preset reads it; pass "
                       "config=<a diffusers folder that describes it>.")
    return "instruct-pix2pix"
  return version + "-inpainting" if inpainting else version


def preset(name: str) -> dict:
  """The config dicts ("unet", "vae", "text_encoder", "scheduler") of a preset (a copy)."""
  if name in XL_PRESETS:
    raise ValueError(f"config={name!r} is an SDXL preset: load SDXL single files with "
                     "jaxsd.StableDiffusionXL.from_single_file.")
  if name not in PRESETS:
    raise ValueError(f"config={name!r}: choose one of {', '.join(PRESETS)} or pass a diffusers Stable Diffusion "
                     "folder whose configs describe the checkpoint.")
  return copy.deepcopy(PRESETS[name])


def preset_xl(name: str) -> dict:
  """The config dicts ("unet", "vae", "text_encoder" but for the refiner, "text_encoder_2", "scheduler",
  "model_index") of an SDXL preset (a copy)."""
  if name not in XL_PRESETS:
    raise ValueError(f"config={name!r}: choose one of {', '.join(XL_PRESETS)} or pass a diffusers SDXL folder whose "
                     "configs describe the checkpoint.")
  return copy.deepcopy(XL_PRESETS[name])
