"""Writing LoRA adapters (`jaxsd.lora.Adapter`, e.g. trained by `jaxsd.training.lora_training`) in the formats the
PyTorch world loads: diffusers / PEFT (`unet.<module>.lora_A.weight`, alphas in diffusers' safetensors metadata) and
kohya's (`lora_unet_<module>.lora_down.weight` with an `.alpha` per layer), both loaded by diffusers'
`load_lora_weights` and back by `jaxsd.lora.load`.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxsd import lora_dora, lora_names, model_folder, weights
from jaxsd.files import written_whole
from jaxsd.lora import METADATA_KEY, WEIGHT_NAME, Adapter, Factors

FORMATS = ("peft", "kohya")


def _torch_factors(f: Factors) -> tuple[np.ndarray, np.ndarray]:
  """Flax-layout factors -> PyTorch-layout lora_down (r, in[, kh, kw]) and lora_up (out, r[, 1, 1])."""
  down, up = np.asarray(jax.device_get(f.down), np.float32), np.asarray(jax.device_get(f.up), np.float32)
  r = down.shape[1]
  if len(f.kernel_shape) == 4:
    kh, kw, fan_in, features = f.kernel_shape
    return (np.ascontiguousarray(down.reshape(kh, kw, fan_in,
                                              r).transpose(3, 2, 0,
                                                           1)), np.ascontiguousarray(up.T.reshape(features, r, 1, 1)))
  return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)


def to_state_dict(adapter: Adapter, fmt: str = "peft", dtype=np.float32,
                  unet_names: Mapping[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict, adapter metadata) in diffusers / PEFT naming (`unet.<module>.lora_A.weight`, alphas in
  the metadata as diffusers' save_lora_weights writes them) or kohya's (`lora_unet_<module>.lora_down.weight`
  with an `.alpha` per layer; `lora_te1_` / `lora_te2_` when the adapter has a second text encoder, as
  sd-scripts' SDXL files). Both load with diffusers' load_lora_weights and back with `load`.

  A DoRA adapter (PEFT's, magnitudes per output channel) is written in PEFT naming only, as diffusers'
  save_lora_weights writes peft's: `<network>.<module>.lora_magnitude_vector` (`...lora_magnitude_vector.weight` for a
  text encoder, which transformers 5 needs), (out,) for a linear layer and (1, out, 1, 1) for a convolution, and
  `<network>.use_dora` in the metadata (every layer of a network DoRA, as one LoraConfig says). Kohya files are
  refused for it: A1111 applies a `dora_scale` per input channel and ComfyUI divides an output-channel one by the
  base weight's norm, so no kohya-world loader would apply peft's DoRA (`jaxsd.lora_dora`).

  `unet_names` (kohya only): U-Net module name -> the name to write instead, e.g. `lora_names.sgm_names(...)`
  of the whole U-Net for sd-scripts' SDXL names (which A1111 expects of an SDXL adapter)."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}.")
  dora = {n for n, layers in adapter.layers.items() if any(f.magnitude is not None for f in layers.values())}
  if dora and fmt == "kohya":
    raise ValueError("a DoRA adapter in kohya format: A1111 and ComfyUI apply kohya files' dora_scale otherwise than "
                     "peft's DoRA (lora_dora); write it with format 'peft'.")
  for network in dora:
    layers = adapter.layers[network]
    if any(f.magnitude is None or f.blend or np.shape(f.magnitude) != lora_dora.output_shape(f.kernel_shape)
           for f in layers.values()):
      raise ValueError(f"a {network} adapter mixing DoRA and plain layers, or with kohya-style DoRA (A1111's blend, "
                       "per-input-channel magnitudes): only PEFT's DoRA, on every layer of a network, is written.")
  if any(f.up is None for layers in adapter.layers.values() for f in layers.values()):  # no lora_down / lora_up
    raise ValueError("a LyCORIS LoHa / LoKr / full / norm adapter (whole updates, no low-rank factors): only plain "
                     "LoRA adapters are written.")
  out, metadata = {}, {}
  prefixes = lora_names.SDXL_PREFIXES if "text_encoder_2" in adapter.layers else lora_names.PREFIXES
  for network, layers in adapter.layers.items():
    ranks, alphas = {}, {}
    for path, f in layers.items():
      module = weights.path_to_torch_key(path).removesuffix(".weight")
      down, up = _torch_factors(f)
      ranks[module], alphas[module] = down.shape[0], f.scale * down.shape[0]
      if fmt == "kohya":
        kohya = (unet_names or {}).get(module, module) if network == "unet" else module
        name = prefixes[network] + kohya.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down.astype(dtype), up.astype(dtype)
        out[f"{name}.alpha"] = np.asarray(alphas[module], np.float32)
      else:
        out[f"{network}.{module}.lora_A.weight"], out[f"{network}.{module}.lora_B.weight"] = (down.astype(dtype),
                                                                                              up.astype(dtype))
        if f.magnitude is not None:  # peft's parameter: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
          m = np.asarray(jax.device_get(f.magnitude), np.float32).reshape(-1)
          # Text encoders' keys end in `.weight`: transformers 5's load_adapter (diffusers' way into them) loads only
          # that spelling and silently keeps peft's initial magnitudes for the other; peft reads both.
          key = f"{network}.{module}.lora_magnitude_vector" + ("" if network == "unet" else ".weight")
          out[key] = m.reshape((1, -1, 1, 1) if up.ndim == 4 else -1).astype(dtype)
    if fmt == "peft":
      # Module names in the config without transformers 4's `text_model.` level: PEFT matches them as suffixes,
      # so they fit transformers 4's CLIPTextModel (which has it, as the state-dict keys do) and 5's (which has not).
      ranks = {m.removeprefix("text_model."): v for m, v in ranks.items()}
      alphas = {m.removeprefix("text_model."): v for m, v in alphas.items()}
      r = collections.Counter(ranks.values()).most_common(1)[0][0]
      alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
      metadata.update({
          f"{network}.r": r,
          f"{network}.lora_alpha": alpha,
          f"{network}.target_modules": sorted(ranks),
          f"{network}.rank_pattern": {
              m: v for m, v in ranks.items() if v != r
          },
          f"{network}.alpha_pattern": {
              m: v for m, v in alphas.items() if v != alpha
          },
      })
      if network in dora:
        metadata[f"{network}.use_dora"] = True
  return out, metadata


def save(adapter: Adapter, path: str, fmt: str = "peft", dtype=np.float32,
         unet_names: Mapping[str, str] | None = None) -> str:
  """Writes `to_state_dict` as safetensors: to `path` if it ends in .safetensors, else to
  `path/pytorch_lora_weights.safetensors` (diffusers' name). Returns the file written."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  state_dict, metadata = to_state_dict(adapter, fmt, dtype, unet_names)
  header = {METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)} if metadata else None
  with written_whole(path) as tmp:
    model_folder.write_safetensors(state_dict, tmp, header)
  return path
