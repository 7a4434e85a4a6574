"""Perturbed-Attention Guidance (PAG, Ahn et al., 2024) on the pipelines, as diffusers' PAG pipelines
(StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline and their Img2Img, Inpaint and ControlNet variants, which
`AutoPipelineForText2Image.from_pretrained(..., enable_pag=True, pag_applied_layers=["mid"])` builds).

    pipe.enable_pag(["mid"])                    # diffusers' pag_applied_layers (default "mid")
    images = pipe(prompts, pag_scale=3.0)       # text-to-image, img2img, inpaint, ControlNets, SDXL
    pipe.disable_pag()                          # the plain programs and images again, bit for bit

Every U-Net call gets one more copy of the conditional rows: [uncond, cond, perturbed] under classifier-free guidance,
[cond, perturbed] without. In the perturbed copy the chosen self-attention layers are the identity map (to_out(to_v(x)),
no softmax: diffusers' PAGCFGIdentitySelfAttnProcessor2_0 / PAGIdentitySelfAttnProcessor2_0). The guided output is
uncond + guidance_scale (cond - uncond) + s (cond - perturbed) (without guidance cond + s (cond - perturbed)), then
guidance_rescale where a call takes it; s is pag_scale or, with pag_adaptive_scale a > 0, max(pag_scale - a (1000 - t),
0) at timestep t. The layers are part of the program; pag_scale and pag_adaptive_scale are its inputs (other values
compile nothing). As diffusers, pag_scale <= 0 leaves PAG off: the plain program runs.

Layer names are diffusers': each is a regular expression searched (`re.search`) in the names of the U-Net's
self-attention layers, "down_blocks.1.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.
transformer_blocks.0.attn1", "up_blocks.0.attentions.2.transformer_blocks.1.attn1", ...: "mid", "down_blocks.1",
"up_blocks.0.attentions.1", "down", ... A name that matches no self-attention layer is refused, as diffusers raises
(so are diffusers' older "down.block_1" names, which its current matching does not find either).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxsd.config import finite32

DEFAULT_LAYERS = ("mid",)  # diffusers' PAG pipelines' pag_applied_layers
DEFAULT_SCALE = 3.0  # their pag_scale


def self_attention_layers(cfg) -> list[str]:
  """The names diffusers gives the self-attention layers of a U-Net of config `cfg` (the attn1 of every transformer
  block, except in only_cross_attention blocks, where attn1 is a cross-attention): down blocks, mid block, up blocks."""
  n = len(cfg.block_out_channels)
  per_block = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * n  # noqa: E731
  depth = lambda v, j: v[j] if isinstance(v, (tuple, list)) else v  # noqa: E731
  layers, only_cross = per_block(cfg.layers_per_block), per_block(cfg.only_cross_attention)
  down, up = cfg.transformer_layers()
  names = []

  def block(prefix: str, attentions: int, depths) -> None:
    for j in range(attentions):
      names.extend(f"{prefix}.attentions.{j}.transformer_blocks.{k}.attn1" for k in range(depth(depths, j)))

  for i, kind in enumerate(cfg.down_block_types):
    if kind.startswith("CrossAttn") and not only_cross[i]:
      block(f"down_blocks.{i}", layers[i], down[i])
  if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
    block("mid_block", 1, down[-1])
  for i, kind in enumerate(cfg.up_block_types):
    if kind.startswith("CrossAttn") and not only_cross[n - 1 - i]:
      block(f"up_blocks.{i}", layers[n - 1 - i] + 1, up[i])
  return names


def parameter_path(name: str) -> str:
  """A diffusers module name as the U-Net's parameter path: "mid_block.attentions.0.transformer_blocks.0.attn1" ->
  "mid_block/attentions_0/transformer_blocks_0/attn1"."""
  return re.sub(r"\.(\d+)", r"_\1", name).replace(".", "/")


def check_layer_ids(pag_applied_layers, where: str = "enable_pag") -> tuple[str, ...]:
  """diffusers' `set_pag_applied_layers` checks: a string or a list of strings (each a regular expression)."""
  ids = [pag_applied_layers] if isinstance(pag_applied_layers, str) else pag_applied_layers
  if not isinstance(ids, (list, tuple)) or not ids:
    raise ValueError(f"{where}: pag_applied_layers={pag_applied_layers!r}: give a layer name or a list of them "
                     "(e.g. 'mid', ['down_blocks.1', 'up_blocks.0.attentions.1']).")
  for layer_id in ids:
    if not isinstance(layer_id, str):
      raise ValueError(f"{where}: pag_applied_layers holds {layer_id!r} ({type(layer_id).__name__}); expected "
                       "strings (layer names, matched as regular expressions).")
    try:
      re.compile(layer_id)
    except re.error as e:
      raise ValueError(f"{where}: pag_applied_layers {layer_id!r} is not a valid regular expression ({e}).") from None
  return tuple(ids)


def match_layers(cfg, pag_applied_layers: Sequence[str]) -> tuple[str, ...]:
  """The parameter paths (`parameter_path`) of the self-attention layers the names select, as diffusers'
  `_set_pag_attn_processor` finds them; a ValueError naming the valid layers for a name that matches none."""
  names = self_attention_layers(cfg)

  def fake_integral_match(layer_id: str, name: str) -> bool:  # diffusers': "blocks.1" is not "blocks.10"'s
    layer_id, name = layer_id.split(".")[-1], name.split(".")[-1]
    return layer_id.isnumeric() and name.isnumeric() and layer_id == name

  chosen = set()
  for layer_id in pag_applied_layers:
    found = [n for n in names if re.search(layer_id, n) is not None and not fake_integral_match(layer_id, n)]
    if not found:
      blocks = sorted({n.split(".transformer_blocks.")[0] for n in names}, key=names_order(names))
      raise ValueError(f"Cannot find PAG layer to set attention processor for: {layer_id!r} (as diffusers, each "
                       "name is a regular expression searched in the self-attention layers' names, e.g. "
                       f"{names[0] if names else 'none'}; this U-Net has them in: {', '.join(blocks) or 'none'}).")
    chosen.update(found)
  return tuple(parameter_path(n) for n in names if n in chosen)


def names_order(names: list[str]):
  """Sort key: where a prefix first occurs in `names`."""
  return lambda prefix: next(i for i, n in enumerate(names) if n.startswith(prefix))


def check_scales(pag_scale, pag_adaptive_scale, where: str = "pag_scale") -> tuple[float, float]:
  """(pag_scale, pag_adaptive_scale) as floats, or a ValueError for a value that is not a finite number (fp32)."""
  for name, v in (("pag_scale", pag_scale), ("pag_adaptive_scale", pag_adaptive_scale)):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite32(v):
      raise ValueError(f"{where}: {name}={v!r} must be a finite number (diffusers' defaults: pag_scale 3.0, "
                       "pag_adaptive_scale 0.0).")
  return float(pag_scale), float(pag_adaptive_scale)


def call_options(pag_scale=None, pag_adaptive_scale=0.0) -> dict:
  """A pipeline call's PAG arguments, only those given (passed on to `StableDiffusion._run`)."""
  out = {} if pag_scale is None else {"pag_scale": pag_scale}
  if not (isinstance(pag_adaptive_scale, (int, float)) and pag_adaptive_scale == 0):
    out["pag_adaptive_scale"] = pag_adaptive_scale
  return out


def with_perturbed_rows(tree, guided: bool):
  """The U-Net inputs of the guided batch (every leaf's axis 0: [uncond, cond] under guidance, [cond] without) with
  the conditional rows once more at the end, as diffusers' `_prepare_perturbed_attention_guidance`."""

  def extend(x):
    return jnp.concatenate([x, x[x.shape[0] // 2:] if guided else x])

  return jax.tree.map(extend, tree)


def scale_at(pag_scales: dict, t: jax.Array) -> jax.Array:
  """The PAG scale at timestep `t` from the program's `pag_scales` input, as diffusers' `_get_pag_scale`: pag_scale,
  or with pag_adaptive_scale > 0 max(pag_scale - pag_adaptive_scale (1000 - t), 0); fp32."""
  scale, adaptive = pag_scales["scale"], pag_scales["adaptive_scale"]
  adapted = jnp.maximum(scale - adaptive * (1000 - jnp.asarray(t, jnp.float32)), 0.0)
  return jnp.where(adaptive > 0, adapted, scale)


class PAGMixin:
  """`enable_pag` / `set_pag_applied_layers` / `disable_pag` for a `jaxsd.pipeline.StableDiffusion` (SDXL and the
  ControlNet pipelines too); with PAG on, the calls take diffusers' `pag_scale` (default 3.0) and
  `pag_adaptive_scale` (default 0.0)."""

  @property
  def pag_applied_layers(self) -> tuple[str, ...] | None:
    """The layer names `enable_pag` set (diffusers' pag_applied_layers), or None when PAG is off."""
    return self.__dict__.get("_pag")

  def enable_pag(self, pag_applied_layers=DEFAULT_LAYERS) -> None:
    """Turns PAG on for every later call (all tasks) on the self-attention layers that `pag_applied_layers` names
    (diffusers' names: a string or a list, each a regular expression searched in names such as
    "mid_block.attentions.0.transformer_blocks.0.attn1"; default "mid", as diffusers' PAG pipelines). A name that
    matches no self-attention layer of this U-Net raises a ValueError listing where they are. The calls then take
    `pag_scale` (default 3.0) and `pag_adaptive_scale` (default 0.0)."""
    ids = check_layer_ids(pag_applied_layers)
    match_layers(self.unet.config, ids)  # raises for a name that selects nothing
    self.__dict__["_pag"] = ids

  def set_pag_applied_layers(self, pag_applied_layers) -> None:
    """diffusers' name for `enable_pag`'s layer choice (on a PAG pipeline): the same."""
    self.enable_pag(pag_applied_layers)

  def disable_pag(self) -> None:
    """Turns PAG off: the plain programs and images again (pag_scale is then refused)."""
    self.__dict__.pop("_pag", None)

  def pag_cond(self, cond: dict) -> tuple[dict, dict]:
    """(`cond` with its PAG arguments (`call_options`) turned into the program's `pag_scales` input ({"scale",
    "adaptive_scale"}: fp32 scalars), the program options:
    {"pag_layers": the perturbed layers' parameter paths}); both unchanged / empty with PAG off or pag_scale <= 0
    (as diffusers' `do_perturbed_attention_guidance`)."""
    scale, adaptive = cond.get("pag_scale"), cond.get("pag_adaptive_scale", 0.0)
    cond = {k: v for k, v in cond.items() if k not in ("pag_scale", "pag_adaptive_scale")}
    ids = self.pag_applied_layers
    if ids is None:
      if scale is not None or adaptive != 0.0:
        raise ValueError(
            "pag_scale / pag_adaptive_scale need Perturbed-Attention Guidance on: pipe.enable_pag(['mid']) "
            "first (diffusers' PAG pipelines, enable_pag=True).")
      return cond, {}
    scale, adaptive = check_scales(DEFAULT_SCALE if scale is None else scale, adaptive)
    if scale <= 0:  # as diffusers: PAG off
      return cond, {}
    scales = {"scale": jnp.float32(scale), "adaptive_scale": jnp.float32(adaptive)}
    return dict(cond, pag_scales=scales), {"pag_layers": match_layers(self.unet.config, ids)}
