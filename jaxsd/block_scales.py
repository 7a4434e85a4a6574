"""diffusers' per-block scale dicts: IP-Adapter scales (InstantStyle, Wang et al., 2024) and LoRA block weights.

    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})  # style only (SDXL)
    pipe.set_ip_adapter_scale({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}})  # + layout
    pipe.set_adapters("pixel", {"unet": {"down": 0.9, "up": {"block_1": [0.0, 1.0, 0.5]}}, "text_encoder": 0.5})

A dict names the U-Net's blocks that have cross-attention ("down" / "up": {"block_<i>": one number, or a list with
one number per attention of the block}, or one number for all of them; "mid": a number or a one-entry list); every
attention it leaves out gets the default (IP-Adapter: 0, LoRA: 1), as diffusers' `_maybe_expand_lora_scales`
expands it. Unlike diffusers, a block without cross-attention ("up": {"block_0": ...} on SD 1.x, whose first up
block has none), which diffusers drops silently (leaving that part at the default), is refused by name, as is any
other key.

`expand` turns such a dict into {"down_blocks_2/attentions_1": value, ...}, one entry per attention of the U-Net
(flax module paths). An IP-Adapter's value covers its attention's transformer blocks (`transformer.BasicTransformerBlock`
reads its own; the values are an input of the compiled program). A LoRA's per-layer weight is `lora_layer_weight`'s,
diffusers' `get_module_weight` rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxsd.config import finite32


def check_number(value, where: str = "IP-Adapter scale") -> float:
  """`value` as a float, or a ValueError: a finite number (booleans and strings are not)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not finite32(value):
    raise ValueError(f"{where} {value!r}: give a finite number (1: as trained, 0: off).")
  return float(value)


def attention_blocks(unet_config) -> dict[str, list[int]]:
  """The indices of the down and up blocks that have cross-attention (diffusers' `blocks_with_transformer`)."""
  return {
      "down": [i for i, t in enumerate(unet_config.down_block_types) if "CrossAttn" in t],
      "up": [i for i, t in enumerate(unet_config.up_block_types) if "CrossAttn" in t],
  }


def expand(scale: Any, unet_config, default: float = 0.0, what: str = "IP-Adapter scale") -> float | dict[str, float]:
  """One number (kept), or a per-block dict expanded to {flax attention path: value}, `default` for the attentions
  it leaves out (module docstring). `what` names the value in errors."""
  if not isinstance(scale, Mapping):
    return check_number(scale, what)
  unknown = [k for k in scale if k not in ("down", "mid", "up")]
  if unknown:
    raise ValueError(f"{what}: unknown part {unknown[0]!r}; a per-block scale names 'down', 'mid' and 'up' "
                     "(e.g. {'up': {'block_0': [0.0, 1.0, 0.0]}}).")
  layers = unet_config.layers_per_block
  if not isinstance(layers, int):
    raise ValueError(f"{what}: per-block values need one layers_per_block for the U-Net (it has {layers}), as "
                     "diffusers; give one number.")
  blocks, per_block = attention_blocks(unet_config), {"down": layers, "up": layers + 1}
  out = {}
  for part, prefix in (("down", "down_blocks"), ("up", "up_blocks")):
    value = scale.get(part, default)
    if not isinstance(value, Mapping):
      value = {f"block_{i}": value for i in blocks[part]}
    for name in value:
      if name not in [f"block_{i}" for i in blocks[part]]:
        raise ValueError(f"{what}: {part} {name!r} is not a block with cross-attention in this U-Net "
                         f"(those are {', '.join(f'block_{i}' for i in blocks[part]) or 'none'}).")
    for i in blocks[part]:
      values = value.get(f"block_{i}", default)
      values = list(values) if isinstance(values, (list, tuple)) else [values]
      if len(values) == 1:
        values = values * per_block[part]
      if len(values) != per_block[part]:
        raise ValueError(f"{what}: {len(values)} values for {part} block_{i}, which has {per_block[part]} "
                         "attentions: give one number or one per attention.")
      for j, v in enumerate(values):
        out[f"{prefix}_{i}/attentions_{j}"] = check_number(v, f"{what} {part} block_{i}[{j}]")
  mid = scale.get("mid", default)
  if isinstance(mid, (list, tuple)):
    if len(mid) != 1:
      raise ValueError(f"{what}: {len(mid)} values for mid, which has one attention.")
    mid = mid[0]
  if "CrossAttn" in (unet_config.mid_block_type or ""):
    out["mid_block/attentions_0"] = check_number(mid, f"{what} mid")
  elif "mid" in scale:
    raise ValueError(f"{what}: this U-Net's mid block has no cross-attention; drop 'mid'.")
  return out


def lora_layer_weight(table: float | Mapping[str, float], path: tuple[str, ...]) -> float:
  """A LoRA layer's weight from `expand`'s output, as diffusers' `get_module_weight` finds it: a layer of down / up
  block i takes the value of that block's attention with its own index ("down_blocks_1/resnets_0/conv1" and the
  block's downsamplers_0 take attentions_0's: diffusers' key f"{parts[0]}.{parts[1]}.attentions.{parts[3]}"), the mid
  block's attention takes "mid", everything else (mid-block ResNets, blocks without attention, conv_in, the time
  embedding) 1 (diffusers raises an IndexError for layers at the top of the U-Net)."""
  if not isinstance(table, Mapping):
    return float(table)
  if path[0].startswith(("down_blocks_", "up_blocks_")) and len(path) > 2:
    return table.get(f"{path[0]}/attentions_{path[1].rsplit('_', 1)[-1]}", 1.0)
  if tuple(path[:2]) == ("mid_block", "attentions_0"):
    return table.get("mid_block/attentions_0", 1.0)
  return 1.0


def lora_weight(name: str, weight: Any, networks: tuple[str, ...], unet_config) -> float | dict:
  """One adapter's weight for `set_adapters`, as diffusers' pipelines take it: a number (every layer), None (1), or
  {network: value} ("unet": a number or a per-block dict, expanded with default 1; "text_encoder",
  "text_encoder_2": numbers; a network left out: 1) -> a float or {network: float or `expand`'s dict}. The
  networks must be among the pipeline's (diffusers warns and drops others: a dict of "down" / "up" without "unet"
  was ignored there)."""
  what = f"adapter {name!r}: weight"
  if weight is None:
    return 1.0
  if not isinstance(weight, Mapping):
    return check_number(weight, what)
  unknown = [k for k in weight if k not in networks]
  if unknown:
    hint = " (per-block weights go under 'unet': {'unet': {'down': ..., 'mid': ..., 'up': ...}})" if any(
        k in ("down", "mid", "up") for k in unknown) else ""
    raise ValueError(f"{what}: {unknown[0]!r} is not one of this pipeline's networks ({', '.join(networks)}){hint}.")
  out = {}
  for network in networks:
    value = weight.get(network)
    if value is None:
      out[network] = 1.0
    elif network == "unet":
      out[network] = expand(value, unet_config, default=1.0, what=f"{what} (unet)")
    elif isinstance(value, Mapping):
      raise ValueError(f"{what}: per-block weights apply to the U-Net; give {network} one number.")
    else:
      out[network] = check_number(value, f"{what} ({network})")
  return out
