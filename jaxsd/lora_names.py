"""kohya sd-scripts' names of the layers a LoRA adapts: `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_`
and the PyTorch module name with `_` for `.`.

For SD 1.x / 2.x sd-scripts trains on diffusers' U-Net, so its names are diffusers' (`lora_unet_down_blocks_0_
attentions_0_proj_in`). For SDXL it trains on Stability's own (sgm / LDM) U-Net, so its files name the U-Net's
layers as that model does (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `..._in_layers_2` for a
ResNet's conv1); A1111 and ComfyUI load both spellings, so `kohya_names` gives both for the U-Net.

The sgm U-Net numbers its blocks flat: `input_blocks.0` is conv_in, then per down block one entry per
(ResNet, attention) pair and one for its downsampler; `middle_block` 0 / 1 / 2 is ResNet, attention, ResNet;
`output_blocks` per up block one entry per (ResNet, attention[, upsampler]) with the upsampler in the last;
`out.0` / `out.2` are conv_norm_out / conv_out. Inside a ResNet: `in_layers.0` / `in_layers.2` (norm1 / conv1),
`emb_layers.1` (time_emb_proj), `out_layers.0` / `out_layers.3` (norm2 / conv2), `skip_connection` (conv_shortcut);
attention blocks keep diffusers' names.
"""

from __future__ import annotations

import collections
import re

from jaxsd import lora_lycoris

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_PREFIXES = {**PREFIXES, "text_encoder": "lora_te1_"}  # sd-scripts' names when there are two text encoders
_NETWORK = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
KEY = re.compile(r"(lora_unet|lora_te[12]?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|" +
                 lora_lycoris.KEY_SUFFIX + ")")

_RESNET = {
    "norm1": "in_layers.0",  # GroupNorms: LyCORIS norm layers (`w_norm`), A1111's suffix_conversion
    "norm2": "out_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection"
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def network_of(prefix: str) -> str:
  """"lora_te2" -> "text_encoder_2" (the network a kohya prefix names)."""
  return _NETWORK[prefix]


def _layout(modules) -> dict:
  """(kind, block) -> {"layers": ResNets per block, "sampler": has a down/upsampler, "attentions": has attentions}."""
  layout = collections.defaultdict(lambda: {"layers": 0, "sampler": False, "attentions": False})
  for name in modules:
    m = _BLOCK.fullmatch(name)
    if m:
      block = layout[(m[1], int(m[2]))]
      if m[3] == "resnets":
        block["layers"] = max(block["layers"], int(m[4]) + 1)
      elif m[3] == "attentions":
        block["attentions"] = True
      else:
        block["sampler"] = True
  return layout


def sgm_names(modules) -> dict[str, str]:
  """diffusers U-Net module name -> the sgm U-Net's, for every name in `modules` that has one."""
  layout = _layout(modules)
  starts = {}  # (kind, block) -> index of the block's first entry in input_blocks / output_blocks
  for kind, first in (("down_blocks", 1), ("up_blocks", 0)):
    index = first
    for b in range(len([k for k in layout if k[0] == kind])):
      starts[(kind, b)] = index
      index += layout[(kind, b)]["layers"] + (1 if kind == "down_blocks" and layout[(kind, b)]["sampler"] else 0)
  out = {}
  for name in modules:
    if name in _TOP:
      out[name] = _TOP[name]
      continue
    m = _MID.fullmatch(name)
    if m:
      entry = 1 if m[1] == "attentions" else 2 * int(m[2])
      out[name] = f"middle_block.{entry}.{_RESNET.get(m[3], m[3])}"
      continue
    m = _BLOCK.fullmatch(name)
    if not m or (m[1], int(m[2])) not in starts:
      continue
    kind, block, part, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    info, start = layout[(kind, block)], starts[(kind, block)]
    stem = "input_blocks" if kind == "down_blocks" else "output_blocks"
    if part == "resnets":
      out[name] = f"{stem}.{start + i}.0.{_RESNET.get(rest, rest)}"
    elif part == "attentions":
      out[name] = f"{stem}.{start + i}.1.{rest}"
    elif part == "downsamplers" and rest == "conv":
      out[name] = f"{stem}.{start + info['layers']}.0.op"
    elif part == "upsamplers" and rest == "conv":
      out[name] = f"{stem}.{start + info['layers'] - 1}.{2 if info['attentions'] else 1}.conv"
  return out


def kohya_names(network: str, modules) -> dict[str, str]:
  """kohya name without prefix (module path with `_` for `.`) -> PyTorch module name, for a network's modules;
  the U-Net's also under their sgm names (SDXL files)."""
  out = {name.replace(".", "_"): name for name in modules}
  if network == "unet":
    out.update({sgm.replace(".", "_"): name for name, sgm in sgm_names(modules).items()})
  return out
