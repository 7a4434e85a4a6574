"""Per-block IP-Adapter scales (InstantStyle, Wang et al., 2024), as diffusers' `set_ip_adapter_scale` with a dict.

    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})  # style only (SDXL)
    pipe.set_ip_adapter_scale({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}})  # + layout

A dict names the U-Net's blocks that have cross-attention ("down" / "up": {"block_<i>": one number, or a list with
one number per attention of the block}, or one number for all of them; "mid": a number or a one-entry list); every
attention it leaves out gets 0, as diffusers' `_maybe_expand_lora_scales(..., default_scale=0.0)` expands it. Each
attention's value applies to all its transformer blocks' cross-attentions. Unlike diffusers, a block without
cross-attention ("up": {"block_0": ...} on SD 1.x, whose first up block has none), which diffusers drops silently
(leaving that part at 0), is refused by name, as is any other key.

`expand` turns such a dict into {"down_blocks_2/attentions_1": value, ...}, one entry per attention of the U-Net
(the flax module paths, `layers.BasicTransformerBlock` reads its own); the values are an input of the compiled
program (a new dict of the same U-Net compiles nothing after the first).
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


def expand(scale: Any, unet_config) -> float | dict[str, float]:
  """One number (kept), or a per-block dict expanded to {flax attention path: value} (module docstring)."""
  if not isinstance(scale, Mapping):
    return check_number(scale)
  unknown = [k for k in scale if k not in ("down", "mid", "up")]
  if unknown:
    raise ValueError(f"IP-Adapter scale: unknown part {unknown[0]!r}; a per-block scale names 'down', 'mid' and 'up' "
                     "(e.g. {'up': {'block_0': [0.0, 1.0, 0.0]}}).")
  layers = unet_config.layers_per_block
  if not isinstance(layers, int):
    raise ValueError(f"IP-Adapter per-block scales need one layers_per_block for the U-Net (it has {layers}), as "
                     "diffusers; give one number.")
  blocks, per_block = attention_blocks(unet_config), {"down": layers, "up": layers + 1}
  out = {}
  for part, prefix in (("down", "down_blocks"), ("up", "up_blocks")):
    value = scale.get(part, 0.0)
    if not isinstance(value, Mapping):
      value = {f"block_{i}": value for i in blocks[part]}
    for name in value:
      if name not in [f"block_{i}" for i in blocks[part]]:
        raise ValueError(f"IP-Adapter scale: {part} {name!r} is not a block with cross-attention in this U-Net "
                         f"(those are {', '.join(f'block_{i}' for i in blocks[part]) or 'none'}).")
    for i in blocks[part]:
      values = value.get(f"block_{i}", 0.0)
      values = list(values) if isinstance(values, (list, tuple)) else [values]
      if len(values) == 1:
        values = values * per_block[part]
      if len(values) != per_block[part]:
        raise ValueError(f"IP-Adapter scale: {len(values)} values for {part} block_{i}, which has {per_block[part]} "
                         "attentions: give one number or one per attention.")
      for j, v in enumerate(values):
        out[f"{prefix}_{i}/attentions_{j}"] = check_number(v, f"IP-Adapter scale {part} block_{i}[{j}]")
  mid = scale.get("mid", 0.0)
  if isinstance(mid, (list, tuple)):
    if len(mid) != 1:
      raise ValueError(f"IP-Adapter scale: {len(mid)} values for mid, which has one attention.")
    mid = mid[0]
  if "CrossAttn" in (unet_config.mid_block_type or ""):
    out["mid_block/attentions_0"] = check_number(mid, "IP-Adapter scale mid")
  elif "mid" in scale:
    raise ValueError("IP-Adapter scale: this U-Net's mid block has no cross-attention; drop 'mid'.")
  return out
