"""SDXL LyCORIS (LoHa, LoKr, Tucker LoCon) and kohya `dora_scale` files: merged kernels against A1111's arithmetic
(`tests.test_lora_lycoris`' PyTorch transcription of `extensions-builtin/Lora`, with A1111's weight decomposition
for a plain kohya LoRA's dora_scale added here), two adapters in order at weights, one sampling run against diffusers'
StableDiffusionXLPipeline holding those merged weights.

The files are random factors in LyCORIS' shapes, named as sd-scripts / LyCORIS name SDXL layers (the form of the
SDXL LyCORIS files in circulation): `lora_unet_` + the sgm U-Net's module path (`input_blocks_3_1_transformer_blocks_0_
attn1_to_q`, `..._in_layers_2` for a ResNet's conv1, `..._op` / `..._2_conv` for the down / upsamplers), `lora_te1_` /
`lora_te2_` + transformers' CLIP module path (`text_model_encoder_layers_0_self_attn_q_proj`) for the two text
encoders. The sgm names come from `tests.test_lora_xl`'s table written by hand, not from `jaxsd.lora_names`.
"""

from __future__ import annotations

import re
import types

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util

import jaxsd
from jaxsd import lora, lora_merge, weights
from tests import reference
from tests.test_lora_lycoris import _plain_lora, a1111_updown, kohya_lora_updown, make_file
from tests.test_lora_xl import HW, PROMPTS, _close, _ours, _sgm, _theirs

# Attention and feed-forward linears, proj_in, ResNet conv1 (3x3) and conv_shortcut (1x1), time projections, the
# downsampler's and upsampler's 3x3 convolutions; per text encoder some attention and MLP linears.
TARGETS = {
    "unet": r"(attn1\.to_q|attn2\.to_k|attn2\.to_out\.0|ff\.net\.0\.proj|proj_in|conv1|conv_shortcut|time_emb_proj|"
            r"downsamplers\.0\.conv|upsamplers\.0\.conv)",
    "text_encoder": r"(q_proj|out_proj|fc1)",
    "text_encoder_2": r"(k_proj|out_proj|fc2)",
}
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
NETS = tuple(PREFIXES)
TOLERANCE = 1e-6  # of a kernel's largest entry


def _module(net: str, key: str) -> str:
  """A state-dict key's module name as jaxsd's kernel paths spell it (transformers 5's bare CLIPTextModel drops
  `text_model.` from its keys, CLIPTextModelWithProjection keeps it)."""
  module = key.removesuffix(".weight")
  return module if net == "unet" else "text_model." + module.removeprefix("text_model.")


def _layers(models: dict) -> tuple[dict, dict]:
  """({network: {kohya layer name: PyTorch weight, float64}}, {network: {kohya layer name: module name}}) for the
  targeted layers, named as sd-scripts names SDXL layers."""
  layers, modules = {}, {}
  for net, model in models.items():
    layers[net], modules[net] = {}, {}
    for key, w in model.state_dict().items():
      module = _module(net, key)
      if key.endswith(".weight") and w.ndim in (2, 4) and re.search(TARGETS[net] + "$", module):
        name = PREFIXES[net] + (_sgm(module) if net == "unet" else module).replace(".", "_")
        layers[net][name], modules[net][name] = w.detach().double(), module
  return layers, modules


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
  root = tmp_path_factory.mktemp("lycoris_xl")
  base_path, _, _ = reference.make_tiny_sdxl_folders(root / "sdxl")
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_path)
  tpipe.set_progress_bar_config(disable=True)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base_path)
  layers, modules = _layers({n: getattr(tpipe, n) for n in NETS})
  assert all(len(v) > 2 for v in layers.values())
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  return types.SimpleNamespace(tpipe=tpipe, pipe=pipe, layers=layers, modules=modules, latents=latents,
                               params=pipe.lora_targets)


# --- A1111's arithmetic ----------------------------------------------------------------------------


def _weight_decompose(updown: torch.Tensor, orig_weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
  """network.NetworkModule.apply_weight_decompose: the norm per input channel (over out, kh, kw)."""
  merged = updown + orig_weight
  norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
  norm = norm.reshape(merged.shape[1], *[1] * (orig_weight.ndim - 1)).transpose(0, 1)
  return merged * (dora_scale.double() / norm) - orig_weight


def _updown(w: dict, orig_weight: torch.Tensor) -> torch.Tensor:
  """A layer's update at multiplier 1 (`calc_updown` and `finalize_updown`): LoHa / LoKr (with their dora_scale) as
  `tests.test_lora_lycoris.a1111_updown`; a kohya LoRA (lora_mid: Tucker LoCon) scaled, then decomposed if it has a
  dora_scale (network_lora.NetworkModuleLora.calc_updown goes through the same finalize_updown)."""
  if "lora_down.weight" not in w:
    return a1111_updown(w, orig_weight)
  updown = kohya_lora_updown(w, orig_weight)
  return updown if "dora_scale" not in w else _weight_decompose(updown, orig_weight, w["dora_scale"])


def a1111_merge(layers: dict, files: list[tuple[dict, float]]) -> dict:
  """{network: {kohya layer name: W + multiplier * updown, adapter after adapter}}, each update computed on the weight
  the adapters before it left (A1111's network_apply_weights)."""
  out = {}
  for net, named in layers.items():
    out[net] = {}
    for name, merged in named.items():
      for sd, mult in files:
        w = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
        if w:
          merged = merged + mult * _updown(w, merged)
      out[net][name] = merged
  return out


def _flax(w: torch.Tensor) -> np.ndarray:
  """PyTorch layout -> the flax kernel's: (out, in) -> (in, out), (out, in, kh, kw) -> (kh, kw, in, out)."""
  return (w.T if w.ndim == 2 else w.permute(2, 3, 1, 0)).numpy()


def _file_layers(files: list[tuple[dict, float]]) -> set[str]:
  return {k.split(".", 1)[0] for sd, _ in files for k in sd}


def _assert_merged_as_a1111(xl, files: list[tuple[dict, float]]) -> float:
  """jaxsd's merge of the files (loaded, at their weights, in order) equals A1111's within TOLERANCE of each kernel's
  largest entry; every layer the files name moved by far more, every other kernel is the loaded one bit for bit, and
  the kernels that changed are exactly as many as the layers the files name. Returns the worst relative difference."""
  adapters = [(lora.from_state_dict(sd, xl.params), m) for sd, m in files]
  for (sd, _), (adapter, _) in zip(files, adapters):
    assert adapter.num_layers == len(_file_layers([(sd, 1.0)])) and adapter.ignored == ()
  got = lora_merge.merge(xl.params, adapters)
  want = a1111_merge(xl.layers, files)
  named = _file_layers(files)
  by_module = {(net, xl.modules[net][name]): (name, w) for net in NETS for name, w in want[net].items()}
  worst, least_moved, changed = 0.0, np.inf, 0
  for net in NETS:
    base = traverse_util.flatten_dict(xl.params[net])
    for path, v in traverse_util.flatten_dict(got[net]).items():
      v, b = np.asarray(v), np.asarray(base[path])
      changed += not np.array_equal(v, b)
      module = weights.path_to_torch_key(path).removesuffix(".weight")
      name, w = by_module.get((net, module), (None, None))
      if name not in named:
        np.testing.assert_array_equal(v, b, err_msg=f"{net} {module}: no adapter names it, yet it changed")
        continue
      ref = _flax(w)
      scale = float(np.abs(ref).max())
      diff = float(np.abs(v - ref).max()) / scale
      assert diff < TOLERANCE, f"{net} {module} ({name}): max |jaxsd - A1111| / max |W| = {diff:.1e}"
      worst, least_moved = max(worst, diff), min(least_moved, float(np.abs(ref - b).max()) / scale)
  print(f"{len(named)} layers: max |jaxsd - A1111| / max |W| = {worst:.1e}; each moved by >= {least_moved:.1e} of it")
  assert least_moved > 1000 * TOLERANCE  # every targeted layer is changed far beyond the tolerance
  assert changed == len(named)  # and no other: a key silently skipped would leave its kernel as loaded
  return worst


def _dora_lora(layers: dict, seed: int, alpha: float = 2.0) -> dict:
  """A kohya LoRA (rank 4, kxk lora_down and 1x1 lora_up on convolutions) with `dora_scale` per input channel, (1, in)
  or (1, in, 1, 1): LyCORIS' LoCon with dora_wd=True (its default wd_on_output=False), the DoRA A1111 applies."""
  sd = _plain_lora(layers, seed, alpha=alpha)
  g = torch.Generator().manual_seed(seed + 1000)
  for named in layers.values():
    for name, w in named.items():
      sd[f"{name}.dora_scale"] = 0.5 + torch.rand((1, w.shape[1]) + (1,) * (w.ndim - 2), generator=g)
  return sd


def _some(layers: dict, pattern: str) -> dict:
  """The layers whose kohya names match `pattern`, by network."""
  return {net: {n: w for n, w in named.items() if re.search(pattern, n)} for net, named in layers.items()}


# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,alpha,mult", [("plain", 3.0, 1.0), ("tucker", 6.0, 0.6), ("plain", None, 0.8)])
def test_loha_merged_kernels_as_a1111(xl, mode, alpha, mult):
  """LoHa on the U-Net's attention and feed-forward linears, its 3x3 and 1x1 convolutions (Tucker hada_t1 / hada_t2
  on the 3x3 ones for "tucker") and on both text encoders (lora_te1_ / lora_te2_); scale alpha / rank, 1 without."""
  sd = make_file(xl.layers, "loha", mode, alpha, seed=1)
  assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.") for k in sd)
  assert any(k.startswith("lora_unet_output_blocks_1_0_in_layers_2.") for k in sd)
  assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_k_proj.") for k in sd)
  if mode == "tucker":
    assert sd["lora_unet_middle_block_0_in_layers_2.hada_t1"].shape[2:] == (3, 3)
  _assert_merged_as_a1111(xl, [(sd, mult)])


def test_unet_names_diffusers_style_load_the_same(xl):
  """The same LoHa with the U-Net's layers in diffusers' names (`lora_unet_down_blocks_1_attentions_0_…`, as some
  converted SDXL files have them) maps onto the very same kernels with the same updates."""
  sd = make_file(xl.layers, "loha", "tucker", 6.0, seed=1)
  diffusers_names = {name: "lora_unet_" + module.replace(".", "_") for name, module in xl.modules["unet"].items()}
  renamed = {}
  for k, v in sd.items():
    name, role = k.split(".", 1)
    renamed[f"{diffusers_names.get(name, name)}.{role}"] = v
  assert renamed.keys() != sd.keys()
  a, b = lora.from_state_dict(sd, xl.params), lora.from_state_dict(renamed, xl.params)
  reference.assert_same_adapter(a, b)


@pytest.mark.parametrize("mode,alpha,mult", [("w1_full", 6.0, 1.0), ("both_lora", 4.0, 0.7), ("both_lora", None, 1.0)])
def test_lokr_merged_kernels_as_a1111(xl, mode, alpha, mult):
  """LoKr with w1 whole and w2 factored (scale alpha / w2's rank 3), and with both factored (ranks 2 and 3: w2's wins),
  on linears, the 3x3 / 1x1 convolutions (w2 a matrix over in * kh * kw) and both text encoders."""
  sd = make_file(xl.layers, "lokr", mode, alpha, seed=2)
  conv = "lora_unet_input_blocks_1_0_in_layers_2"
  assert (f"{conv}.lokr_w1" in sd) == (mode == "w1_full") and f"{conv}.lokr_w2_b" in sd
  _assert_merged_as_a1111(xl, [(sd, mult)])


@pytest.mark.parametrize("mult", [1.0, 0.6])
def test_tucker_locon_merged_kernels_as_a1111(xl, mult):
  """LyCORIS' LoCon with Tucker (`lora_mid`) on the 3x3 convolutions (ResNet conv1, down / upsampler), plain kohya
  LoRA on the other layers of the same file."""
  sd = _plain_lora(xl.layers, 12, tucker=True, alpha=2.0)
  mid = {k.split(".")[0] for k in sd if k.endswith(".lora_mid.weight")}
  assert {"lora_unet_input_blocks_2_0_op", "lora_unet_output_blocks_1_2_conv",
          "lora_unet_middle_block_2_in_layers_2"} <= mid
  _assert_merged_as_a1111(xl, [(sd, mult)])


@pytest.mark.parametrize("mult", [1.0, 0.7])
def test_kohya_dora_merged_kernels_as_a1111(xl, mult):
  """A kohya LoRA with `dora_scale` (per input channel) on linears, convolutions and both text encoders: A1111's
  weight decomposition, blended by the multiplier."""
  sd = _dora_lora(xl.layers, 13)
  assert sd["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (1, 32, 1, 1)
  _assert_merged_as_a1111(xl, [(sd, mult)])


@pytest.mark.parametrize("order", ["loha_then_dora", "dora_then_lokr"])
def test_two_adapters_in_order_as_a1111(xl, order):
  """Two files at weights, applied in order as A1111 does: a DoRA layer's update depends on the weight the adapters
  before it left. They overlap on some layers only (the DoRA LoRA on attention and text-encoder layers)."""
  dora = (_dora_lora(_some(xl.layers, r"attn|self_attn|mlp"), 14), 0.8)
  if order == "loha_then_dora":
    files = [(make_file(xl.layers, "loha", "tucker", 6.0, seed=15, dora=True), 0.6), dora]
  else:
    files = [dora, (make_file(xl.layers, "lokr", "both_lora", 4.0, seed=16), -0.5)]
  _assert_merged_as_a1111(xl, files)


def test_sampling_matches_diffusers_with_a1111_merged_weights(xl, tmp_path):
  """End to end: jaxsd's SDXL latents with a LoHa file (Tucker on the 3x3 convolutions) at 0.8 and then a kohya DoRA
  LoRA file at 0.5 loaded (`load_lora`) equal diffusers' StableDiffusionXLPipeline's whose U-Net and two text
  encoders hold the weights A1111 merges from those files (diffusers cannot load LoHa itself)."""
  files = [(make_file(xl.layers, "loha", "tucker", 6.0, seed=20), 0.8), (_dora_lora(xl.layers, 21), 0.5)]
  paths = []
  for i, (sd, _) in enumerate(files):
    paths.append(str(tmp_path / f"adapter_{i}.safetensors"))
    safetensors.torch.save_file(sd, paths[-1])
  merged = a1111_merge(xl.layers, files)
  models = {net: getattr(xl.tpipe, net) for net in NETS}
  originals = {net: {k: v.clone() for k, v in m.state_dict().items()} for net, m in models.items()}
  base = _theirs(xl)
  try:
    for net, model in models.items():
      names = {module: name for name, module in xl.modules[net].items()}
      state = model.state_dict()
      replaced = 0
      for key in state:
        name = names.get(_module(net, key)) if key.endswith(".weight") else None
        if name is not None:
          state[key], replaced = merged[net][name].float(), replaced + 1
      assert replaced == len(xl.layers[net])
      model.load_state_dict(state)
    ref = _theirs(xl)
    moved = float(np.abs(ref - base).max())
    print(f"the adapters move diffusers' latents by {moved:.2e}")
    assert moved > 100 * 1e-4 * max(1.0, float(np.abs(ref).max()))  # 100 x the tolerance of `_close`
    for path, (_, mult) in zip(paths, files):
      xl.pipe.load_lora(path, scale=mult)
    _close(_ours(xl), ref)
  finally:
    xl.pipe.unload_lora()
    for net, model in models.items():
      model.load_state_dict(originals[net])
