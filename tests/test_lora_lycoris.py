"""LyCORIS LoHa and LoKr adapters: merged kernels against A1111's arithmetic written here in PyTorch (from
`extensions-builtin/Lora/network_hada.py`, `network_lokr.py`, `lyco_helpers.py`, `network.py`), at weights, with
Tucker factors, alphas and none, dora_scale, mixed with a plain kohya LoRA; one sampling run against diffusers with
those merged weights loaded; fuse / unfuse and weight changes without recompiling.

The adapters are random factors in LyCORIS' shapes and kohya names (`lora_unet_…`, `lora_te_text_model_…`) on the
tiny random model's linear layers, 1x1 and 3x3 convolutions and text encoder. diffusers cannot load such files, so
the reference is A1111's formula; that merge is then loaded into diffusers' pipeline for the end-to-end check.
"""

from __future__ import annotations

import collections
import re

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util

import jaxsd
from jaxsd import lora, lora_export, lora_merge, weights
from tests import reference
from tests.test_lora import HW, PROMPTS, _close, _ours, _theirs

UNET = r"(attn1\.to_q|attn2\.to_k|attn2\.to_out\.0|ff\.net\.0\.proj|proj_in|conv1|conv_shortcut|time_emb_proj|conv_in)"
TE = r"(q_proj|out_proj|fc1)"
NETS = ("unet", "text_encoder")


def _kohya_name(net: str, key: str) -> str:
  """A PyTorch state-dict key (`<module>.weight`) -> its layer's kohya name (`lora_unet_…`, `lora_te_text_model_…`)."""
  module = key.removesuffix(".weight")
  module = module if net == "unet" else "text_model." + module.removeprefix("text_model.")
  return ("lora_unet_" if net == "unet" else "lora_te_") + module.replace(".", "_")


def _modules(models: dict, unet: str = UNET, te: str = TE) -> dict:
  """network -> {kohya layer name: PyTorch weight} for the layers whose module names end in the patterns."""
  out = {}
  for net, pattern in {"unet": unet, "text_encoder": te}.items():
    out[net] = {}
    for key, w in models[net].state_dict().items():
      if key.endswith(".weight") and re.search(pattern + "$", key.removesuffix(".weight")):
        out[net][_kohya_name(net, key)] = w.double()
  return out


def _split(d: int) -> tuple[int, int]:
  a = next(f for f in (4, 2, 1) if d % f == 0)
  return a, d // a


def _loha(shape, rank: int, tucker: bool, g) -> dict:
  """LyCORIS' LoHa factors for a weight of `shape` (modules/loha.py): Tucker only on kxk convolutions (k > 1)."""
  out, fan_in, *k = shape
  r = lambda *s: 0.3 * torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
  if tucker and k and k[0] > 1:
    return {
        f"hada_{p}": v for p, v in (("t1", r(rank, rank, *k)), ("w1_a", r(rank, out)), ("w1_b", r(rank, fan_in)),
                                    ("t2", r(rank, rank, *k)), ("w2_a", r(rank, out)), ("w2_b", r(rank, fan_in)))
    }
  flat = fan_in * int(np.prod(k or [1]))
  return {"hada_w1_a": r(out, rank), "hada_w1_b": r(rank, flat), "hada_w2_a": r(out, rank), "hada_w2_b": r(rank, flat)}


def _lokr(shape, mode: str, g) -> dict:
  """LyCORIS' LoKr factors (modules/lokr.py) for a weight of `shape`: w1 whole ("w1_full", "both_full", "tucker") or
  decomposed at rank 2 ("both_lora"); w2 decomposed at rank 3 (Tucker on kxk convolutions for "tucker") or whole."""
  out, fan_in, *k = shape
  (o1, o2), (i1, i2) = _split(out), _split(fan_in)
  r = lambda *s: 0.3 * torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
  w = {"lokr_w1_a": r(o1, 2), "lokr_w1_b": r(2, i1)} if mode == "both_lora" else {"lokr_w1": r(o1, i1)}
  if mode == "both_full":
    w["lokr_w2"] = r(o2, i2, *k)
  elif mode == "tucker" and k and k[0] > 1:
    w.update(lokr_t2=r(3, 3, *k), lokr_w2_a=r(3, o2), lokr_w2_b=r(3, i2))
  else:
    w.update(lokr_w2_a=r(o2, 3), lokr_w2_b=r(3, i2 * int(np.prod(k or [1]))))
  return w


def make_file(modules: dict, kind: str, mode: str, alpha: float | None, seed: int, dora: bool = False) -> dict:
  """A LyCORIS state dict (kohya names) over `modules` (from `_modules`), in float32 as files hold it."""
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for layers in modules.values():
    for name, w in layers.items():
      factors = _loha(w.shape, 4, mode == "tucker", g) if kind == "loha" else _lokr(w.shape, mode, g)
      sd.update({f"{name}.{role}": v.float() for role, v in factors.items()})
      if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
      if dora:  # LyCORIS' default (wd_on_output=False): per input channel, (1, in[, 1, 1])
        sd[f"{name}.dora_scale"] = 0.5 + torch.rand((1, w.shape[1]) + (1,) * (w.ndim - 2), generator=g)
  return sd


# --- A1111's arithmetic (extensions-builtin/Lora), in float64 --------------------------------------


def _make_weight_cp(t, wa, wb):  # lyco_helpers.make_weight_cp
  temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
  return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _rebuild_conventional(up, down, shape):  # lyco_helpers.rebuild_conventional
  up = up.reshape(up.size(0), -1)
  down = down.reshape(down.size(0), -1)
  return (up @ down).reshape(shape)


def a1111_updown(w: dict, orig_weight: torch.Tensor) -> torch.Tensor:
  """`calc_updown` of network_hada.NetworkModuleHada / network_lokr.NetworkModuleLokr, then `finalize_updown` (at
  multiplier 1) with `apply_weight_decompose` for a dora_scale: the layer's update, PyTorch layout."""
  w = {k: v.double() for k, v in w.items()}
  dim = None
  if "hada_w1_a" in w:
    w1a, w1b, w2a, w2b, t1, t2 = (w.get("hada_" + p) for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"))
    dim = w1b.shape[0]
    output_shape = [w1a.size(0), w1b.size(1)]
    if t1 is not None:
      output_shape = [w1a.size(1), w1b.size(1)] + list(t1.shape[2:])
      updown1 = _make_weight_cp(t1, w1a, w1b)
    else:
      if len(w1b.shape) == 4:
        output_shape += w1b.shape[2:]
      updown1 = _rebuild_conventional(w1a, w1b, output_shape)
    updown2 = _make_weight_cp(t2, w2a, w2b) if t2 is not None else _rebuild_conventional(w2a, w2b, output_shape)
    updown = updown1 * updown2
  else:
    if "lokr_w1_b" in w:
      dim = w["lokr_w1_b"].shape[0]
    if "lokr_w2_b" in w:
      dim = w["lokr_w2_b"].shape[0]
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
      w2 = w["lokr_w2"]
    elif "lokr_t2" not in w:
      w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    else:
      w2 = _make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
    if len(orig_weight.shape) == 4:
      output_shape = orig_weight.shape
    if len(w2.shape) == 4:  # network_lokr.make_kron
      w1 = w1.unsqueeze(2).unsqueeze(2)
    updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
  # network.NetworkModule.finalize_updown, calc_scale, apply_weight_decompose
  if len(output_shape) == 4:
    updown = updown.reshape(output_shape)
  if orig_weight.numel() == updown.numel():
    updown = updown.reshape(orig_weight.shape)
  alpha = float(w["alpha"]) if "alpha" in w else None
  updown = updown * (alpha / dim if dim is not None and alpha is not None else 1.0)
  if "dora_scale" in w:
    merged = updown + orig_weight
    norm = (merged.transpose(0,
                             1).reshape(merged.shape[1],
                                        -1).norm(dim=1,
                                                 keepdim=True).reshape(merged.shape[1],
                                                                       *[1] * (orig_weight.ndim - 1)).transpose(0, 1))
    updown = merged * (w["dora_scale"] / norm) - orig_weight
  return updown


def kohya_lora_updown(w: dict, orig_weight: torch.Tensor) -> torch.Tensor:
  """network_lora.NetworkModuleLora: up @ down, or with lora_mid `lyco_helpers.rebuild_cp_decomposition`, times
  alpha / rank (rank lora_down.shape[0]; 1 without alpha)."""
  down, up = w["lora_down.weight"].double(), w["lora_up.weight"].double()
  r = down.shape[0]
  if "lora_mid.weight" in w:
    updown = torch.einsum("n m k l, i n, m j -> i j k l", w["lora_mid.weight"].double(), up.reshape(up.size(0), -1),
                          down.reshape(r, -1))
  else:
    updown = up.reshape(-1, r) @ down.reshape(r, -1)
  return updown.reshape(orig_weight.shape) * (float(w["alpha"]) / r if "alpha" in w else 1.0)


def a1111_merge(modules: dict, files: list[tuple[dict, float]]) -> dict:
  """network -> {kohya layer name: W + sum of multiplier * updown}, each adapter's update computed on the weight the
  adapters before it left (A1111's network_apply_weights; only DoRA's updown depends on it)."""
  out = {}
  for net, layers in modules.items():
    out[net] = {}
    for name, base in layers.items():
      merged = base.clone()
      for sd, mult in files:
        w = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
        if w:
          merged = merged + mult * (kohya_lora_updown(w, merged) if "lora_down.weight" in w else a1111_updown(
              w, merged))
      out[net][name] = merged
  return out


# --- fixtures and checks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lycoris")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  models = {
      "unet": diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
      "text_encoder": transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
  }
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  return path, models, _modules(models), pipe


def _params(pipe) -> dict:
  return {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}


def _assert_merged_as_a1111(models: dict, modules: dict, params: dict, got: dict, want: dict) -> None:
  """Every kernel of `got` (jaxsd's merge) equals the models' weights with `want`'s layers replaced (PyTorch layout,
  converted by `jaxsd.weights`), and the adapters moved those layers well beyond the tolerance."""
  keys = {net: {_kohya_name(net, k): k for k in models[net].state_dict() if k.endswith(".weight")} for net in NETS}
  _assert_state_as_a1111(models, params, got, {net: {keys[net][n]: w for n, w in want[net].items()} for net in NETS})


def _assert_state_as_a1111(models: dict, params: dict, got: dict, want: dict) -> float:
  """Every leaf of `got` equals the models' state dicts with `want`'s entries (network -> {state-dict key: tensor}:
  weights, norms' weights, biases) replaced, converted by `jaxsd.weights`; the adapters moved those well beyond the
  tolerance. Returns the largest difference."""
  worst = moved = 0.0
  for net in NETS:
    state = {k: v.clone() for k, v in models[net].state_dict().items()}
    for key, w in want[net].items():
      moved = max(moved, float((w - state[key].double()).abs().max()))
      state[key] = w.float()
    rename = None if net == "unet" else lambda k: k if k.startswith("text_model.") else "text_model." + k
    ref = traverse_util.flatten_dict(
        weights.state_dict_to_params({
            k: v.numpy() for k, v in state.items()
        }, params[net], rename=rename))
    for p, v in traverse_util.flatten_dict(got[net]).items():
      np.testing.assert_allclose(np.asarray(v), ref[p], rtol=1e-5, atol=1e-6, err_msg=f"{net} {p}")
      worst = max(worst, float(np.abs(np.asarray(v) - ref[p]).max()))
  print(f"merged parameters: max |jaxsd - A1111| = {worst:.1e}; the adapters move them by up to {moved:.2f}")
  assert moved > 1e-2
  return worst


@pytest.mark.parametrize("mode,alpha,mults", [("plain", 3.0, [1.0]), ("plain", 3.0, [0.6]), ("tucker", 6.0, [1.0]),
                                              ("tucker", 6.0, [0.6]), ("plain", None, [1.0])])
def test_loha_merged_kernels_as_a1111(setup, mode, alpha, mults):
  """LoHa on linear layers, 1x1 and 3x3 convolutions (Tucker `hada_t1` / `hada_t2` there for "tucker") and the text
  encoder; scale alpha / rank with rank = hada_w1_b.shape[0], 1 without alpha; W + weight * scale * ΔW."""
  path, models, modules, pipe = setup
  sd = make_file(modules, "loha", mode, alpha, seed=1)
  params = _params(pipe)
  adapter = lora.from_state_dict(sd, params)
  assert adapter.num_layers == sum(len(v) for v in modules.values())
  assert all(f.up is None for layers in adapter.layers.values() for f in layers.values())
  got = lora_merge.merge(params, [(adapter, m) for m in mults])
  _assert_merged_as_a1111(models, modules, params, got, a1111_merge(modules, [(sd, m) for m in mults]))


@pytest.mark.parametrize("mode,alpha,mults", [("w1_full", 6.0, [1.0]), ("w1_full", 6.0, [0.6]),
                                              ("both_lora", 6.0, [1.0]), ("both_lora", None, [1.0]),
                                              ("both_full", 6.0, [1.0]), ("both_full", None, [0.6]),
                                              ("tucker", 6.0, [1.0])])
def test_lokr_merged_kernels_as_a1111(setup, mode, alpha, mults):
  """LoKr: w1 whole with w2 decomposed (scale alpha / w2's rank 3), both decomposed at ranks 2 and 3 (w2's rank wins,
  as in A1111), both whole (scale 1 whatever the alpha), Tucker lokr_t2 on the 3x3 convolutions (w2 4-D, w1 given
  two trailing axes before the Kronecker product); without alpha the scale is 1."""
  path, models, modules, pipe = setup
  sd = make_file(modules, "lokr", mode, alpha, seed=2)
  params = _params(pipe)
  adapter = lora.from_state_dict(sd, params)
  assert adapter.num_layers == sum(len(v) for v in modules.values())
  got = lora_merge.merge(params, [(adapter, m) for m in mults])
  _assert_merged_as_a1111(models, modules, params, got, a1111_merge(modules, [(sd, m) for m in mults]))


def _plain_lora(modules: dict, seed: int, tucker: bool = False, alpha: float | None = 2.0) -> dict:
  """A kohya LoRA (rank 4) on the same layers, kxk lora_down and 1x1 lora_up on convolutions; with `tucker`, LyCORIS'
  Tucker LoCon on the kxk ones (k > 1): lora_down (4, in, 1, 1), lora_mid (4, 4, k, k), lora_up (out, 4, 1, 1)."""
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for layers in modules.values():
    for name, w in layers.items():
      out, fan_in, *k = w.shape
      mid = tucker and k and k[0] > 1
      sd[f"{name}.lora_down.weight"] = 0.3 * torch.randn((4, fan_in) + ((1, 1) if mid else tuple(k)), generator=g)
      if mid:
        sd[f"{name}.lora_mid.weight"] = 0.3 * torch.randn((4, 4, *k), generator=g)
      sd[f"{name}.lora_up.weight"] = 0.3 * torch.randn((out, 4) + (1,) * len(k), generator=g)
      if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
  return sd


@pytest.mark.parametrize("alpha,mults", [(2.0, [1.0]), (2.0, [0.6]), (None, [1.0])])
def test_tucker_locon_merged_kernels_as_a1111(setup, alpha, mults):
  """LyCORIS' LoCon with Tucker (`lora_mid`) on the 3x3 convolutions, plain LoRA elsewhere in the same file: A1111's
  rebuild_cp_decomposition at alpha / rank (1 without alpha)."""
  path, models, modules, pipe = setup
  sd = _plain_lora(modules, 12, tucker=True, alpha=alpha)
  assert any(k.endswith("lora_mid.weight") for k in sd)
  params = _params(pipe)
  adapter = lora.from_state_dict(sd, params)
  assert adapter.num_layers == sum(len(v) for v in modules.values())
  got = lora_merge.merge(params, [(adapter, m) for m in mults])
  _assert_merged_as_a1111(models, modules, params, got, a1111_merge(modules, [(sd, m) for m in mults]))


@pytest.mark.parametrize("dora", [False, True])
def test_loha_lokr_and_lora_mixed_as_a1111(setup, dora):
  """A LoHa (Tucker) at 0.6, a LoKr (both decomposed) at -0.5 and a plain kohya LoRA at 0.8 on the same layers, in
  order (A1111); with dora_scale on the LoHa and LoKr (per input channel, as LyCORIS' default), A1111's blend for
  each of them, the LoKr's on the weight the LoHa left."""
  path, models, modules, pipe = setup
  files = [(make_file(modules, "loha", "tucker", 6.0, seed=3, dora=dora), 0.6),
           (make_file(modules, "lokr", "both_lora", 4.0, seed=4, dora=dora), -0.5), (_plain_lora(modules, 5), 0.8)]
  params = _params(pipe)
  adapters = [(lora.from_state_dict(sd, params), m) for sd, m in files]
  assert all((f.magnitude is not None) == dora for a, _ in adapters[:2] for f in a.layers["unet"].values())
  _assert_merged_as_a1111(models, modules, params, lora_merge.merge(params, adapters), a1111_merge(modules, files))


def test_loha_sampling_matches_diffusers_with_a1111_merged_weights(setup, tmp_path):
  """End to end: jaxsd's latents with a LoHa file (Tucker, weight 0.8) equal diffusers' StableDiffusionPipeline's
  whose U-Net and text encoder hold the weights A1111 merges from that file (diffusers cannot load LoHa itself)."""
  path, models, modules, pipe = setup
  sd = make_file(modules, "loha", "tucker", 6.0, seed=6)
  file = str(tmp_path / "loha.safetensors")
  safetensors.torch.save_file(sd, file)
  tpipe = reference.torch_pipeline(path)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  base = _theirs(tpipe, latents)
  merged = a1111_merge(modules, [(sd, 0.8)])
  for net in NETS:
    model = getattr(tpipe, net)
    state = model.state_dict()
    for key in state:
      module = key.removesuffix(".weight")
      module = module if net == "unet" else "text_model." + module.removeprefix("text_model.")
      name = ("lora_unet_" if net == "unet" else "lora_te_") + module.replace(".", "_")
      if key.endswith(".weight") and name in merged[net]:
        state[key] = merged[net][name].float()
    model.load_state_dict(state)
  ref = _theirs(tpipe, latents)
  moved = float(np.abs(ref - base).max())
  print(f"the LoHa moves diffusers' latents by {moved:.2e}")
  assert moved > 100 * 1e-4 * max(1.0, float(np.abs(ref).max()))  # 100 x the tolerance of `_close`
  pipe.load_lora(file, scale=0.8, name="loha")
  try:
    _close(_ours(pipe, latents), ref)
  finally:
    pipe.unload_lora()


def test_fuse_unfuse_and_weights_never_recompile(setup, tmp_path):
  """A LoHa and a LoKr file with a plain LoRA: new weights reuse the merge program, the sampling program compiles
  once, fuse_lora gives the unfused latents and unfuse_lora the very arrays loaded (bit for bit)."""
  path, models, modules, pipe = setup
  files = {}
  for name, sd in (("loha", make_file(modules, "loha", "plain", 3.0,
                                      seed=7)), ("lokr", make_file(modules, "lokr", "tucker", 6.0, seed=8,
                                                                   dora=True)), ("lora", _plain_lora(modules, 9))):
    files[name] = str(tmp_path / f"{name}.safetensors")
    safetensors.torch.save_file(sd, files[name])
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  base = _ours(pipe, latents)
  fn = pipe._jitted(True, "latent", "text", True)
  size = fn._cache_size()
  loaded = pipe.lora_targets
  before = {n: [np.array(x) for x in traverse_util.flatten_dict(t).values()] for n, t in loaded.items()}
  try:
    for name in files:
      pipe.load_lora(files[name], name=name)
    pipe.set_adapters(list(files), [0.7, 0.5, 0.3])
    mixed = _ours(pipe, latents)
    merges = lora_merge.merged_kernels._cache_size()
    for w in ([0.2, 1.5, 0.0], [-1.0, 0.0, 1.0]):
      pipe.set_adapters(list(files), w)
      _ours(pipe, latents)
    assert lora_merge.merged_kernels._cache_size() == merges
    pipe.set_adapters(list(files), [0.7, 0.5, 0.3])
    pipe.fuse_lora()
    np.testing.assert_array_equal(_ours(pipe, latents), mixed)
    pipe.unfuse_lora()
    assert all(pipe.lora_targets[n] is loaded[n] for n in loaded)
    for n, t in pipe.lora_targets.items():
      for x, y in zip(traverse_util.flatten_dict(t).values(), before[n]):
        np.testing.assert_array_equal(np.asarray(x), y)
    pipe.set_adapters([])
    np.testing.assert_array_equal(_ours(pipe, latents), base)
    assert fn._cache_size() == size
    with pytest.raises(ValueError, match="LoHa / LoKr / full / norm adapter .*: only plain LoRA"):
      lora_export.to_state_dict(pipe._loras.adapters["loha"])
  finally:
    pipe.unfuse_lora()
    pipe.unload_lora()


def test_lycoris_mistakes_are_named(setup):
  """Factors that do not fit the layer or each other, a layer lacking a factor, LoRA and LoHa factors on one layer."""
  path, models, modules, pipe = setup
  params = _params(pipe)
  sd = make_file(modules, "loha", "plain", 3.0, seed=10)
  name = next(n for n in modules["unet"] if n.endswith("attn1_to_q"))
  with pytest.raises(
      ValueError, match=rf"{name}: its LoHa factors make an update of shape \(32, 31\) and \(32, 32\) "
      r"but the layer's weight is \(32, 32\)"):
    lora.from_state_dict(dict(sd, **{f"{name}.hada_w1_b": torch.ones(4, 31)}), params)
  with pytest.raises(ValueError, match=rf"{name}: the LoHa factors do not fit each other"):
    lora.from_state_dict(dict(sd, **{f"{name}.hada_w1_b": torch.ones(3, 32)}), params)
  with pytest.raises(ValueError, match=rf"lacking LyCORIS factors.*{name}"):
    lora.from_state_dict({k: v for k, v in sd.items() if k != f"{name}.hada_w2_b"}, params)
  with pytest.raises(ValueError, match=rf"{name}: both LoRA \(lora_down / lora_up\) and LoHa"):
    lora.from_state_dict(dict(sd, **{f"{name}.lora_down.weight": torch.ones(4, 32)}), params)
  lokr = make_file(modules, "lokr", "w1_full", 3.0, seed=11)
  with pytest.raises(ValueError, match=rf"{name}: its LoKr factors make an update of shape \(32, 64\)"):
    lora.from_state_dict(dict(lokr, **{f"{name}.lokr_w1": torch.ones(4, 8)}), params)
  missing = {k: v for k, v in lokr.items() if not k.startswith(name + ".lokr_w2")}
  adapter = lora.from_state_dict(missing, params, strict=False)  # as an incomplete LoRA layer: left out, listed
  assert f"{name}.lokr_w1" in adapter.ignored and adapter.num_layers == sum(len(v) for v in modules.values()) - 1


# --- LyCORIS full (diff, diff_b) and norm (w_norm, b_norm) layers ----------------------------------

# Full layers on linear layers with and without a bias (to_q, to_k have none), 1x1 and 3x3 convolutions and the text
# encoder; norm layers on the U-Net's GroupNorms (ResNets' norm1 / norm2, the transformers' norm, conv_norm_out), the
# transformer blocks' LayerNorms (norm1/2/3) and the text encoder's (layer_norm1, final_layer_norm).
FULL = (r"(attn1\.to_q|attn2\.to_k|ff\.net\.0\.proj|proj_in|conv1|conv_in)", r"(q_proj|fc1)")
NORM = (r"(resnets\.\d+\.norm[12]|attentions\.\d+\.norm|norm[123]|conv_norm_out)", r"(layer_norm1|final_layer_norm)")


def _whole_file(models: dict, patterns: tuple[str, str], kind: str, seed: int, bias: bool = True,
                alpha: float | None = None) -> dict:
  """A LyCORIS full (`diff`, `diff_b`) or norm (`w_norm`, `b_norm`) state dict over the layers `patterns` name, float32
  as LyCORIS saves it: ΔW in the weight's shape, ΔB (with `bias`) for layers that have a bias."""
  g = torch.Generator().manual_seed(seed)
  w_role, b_role = ("diff", "diff_b") if kind == "full" else ("w_norm", "b_norm")
  sd = {}
  for net, layers in _modules(models, *patterns).items():
    state = models[net].state_dict()
    for key in state:
      name = _kohya_name(net, key)
      if key.endswith(".weight") and name in layers:
        sd[f"{name}.{w_role}"] = 0.3 * torch.randn(state[key].shape, generator=g)
        if bias and key.removesuffix("weight") + "bias" in state:
          sd[f"{name}.{b_role}"] = 0.3 * torch.randn(state[key].shape[:1], generator=g)
        if alpha is not None:  # ignored: full and norm layers have no rank (calc_scale 1)
          sd[f"{name}.alpha"] = torch.tensor(alpha)
  return sd


def a1111_whole_merge(models: dict, files: list[tuple[dict, float | dict]]) -> dict:
  """network -> {state-dict key: merged weight or bias} as A1111 applies full and norm layers: `calc_updown` of
  network_full.NetworkModuleFull / network_norm.NetworkModuleNorm, `finalize_updown` (updown * calc_scale() (1: no
  dim) * multiplier, ex_bias * multiplier), then networks.network_apply_weights (weight += updown, bias += ex_bias), the
  multiplier te_multiplier for the text encoder and unet_multiplier for the U-Net (a number: both)."""
  out = {net: {} for net in NETS}
  for net in NETS:
    state = {k: v.double() for k, v in models[net].state_dict().items()}
    for key in [k for k in state if k.endswith(".weight")]:
      name, bias_key = _kohya_name(net, key), key.removesuffix("weight") + "bias"
      for sd, mult in files:
        w = {k.removeprefix(name + "."): v.double() for k, v in sd.items() if k.startswith(name + ".")}
        if not w:
          continue
        mult = mult[net] if isinstance(mult, dict) else mult
        updown, ex_bias = (w["diff"], w.get("diff_b")) if "diff" in w else (w["w_norm"], w["b_norm"])
        if state[key].numel() == updown.numel():
          updown = updown.reshape(state[key].shape)
        out[net][key] = state[key] = state[key] + updown * 1.0 * mult
        if ex_bias is not None:
          out[net][bias_key] = state[bias_key] = state[bias_key] + ex_bias * mult
  return out


SPLIT = {"unet": 0.6, "text_encoder": -0.5}  # A1111's unet / te multipliers


@pytest.mark.parametrize("kind,bias,alpha,mults", [("full", False, None, [1.0]), ("full", True, None, [1.0]),
                                                   ("full", True, 4.0, [0.6]), ("full", True, None, [SPLIT]),
                                                   ("norm", True, None, [1.0]), ("norm", True, 4.0, [0.6])])
def test_full_and_norm_layers_merged_as_a1111(setup, kind, bias, alpha, mults):
  """Full layers (diff; diff + diff_b) on linear layers, convolutions and the text encoder, norm layers (w_norm +
  b_norm) on GroupNorms and LayerNorms of the U-Net and the text encoder: W + w * ΔW, b + w * ΔB, whatever the alpha;
  the weight per network as A1111's te / unet multipliers."""
  path, models, modules, pipe = setup
  sd = _whole_file(models, FULL if kind == "full" else NORM, kind, seed=20, bias=bias, alpha=alpha)
  params = _params(pipe)
  adapter = lora.from_state_dict(sd, params)
  leaves = [p[-1] for layers in adapter.layers.values() for p in layers]
  roles = collections.Counter(k.rsplit(".", 1)[1] for k in sd)
  assert len(leaves) == len(sd) - roles["alpha"] and leaves.count("bias") == roles["diff_b"] + roles["b_norm"]
  assert leaves.count("scale") == roles["w_norm"] and all(
      f.up is None and f.scale == 1.0 for layers in adapter.layers.values() for f in layers.values())
  got = lora_merge.merge(params, [(adapter, m) for m in mults])
  _assert_state_as_a1111(models, params, got, a1111_whole_merge(models, [(sd, m) for m in mults]))


def test_full_norm_and_loha_mixed_as_a1111(setup):
  """A full file (diff + diff_b) at 0.7, a norm file at -0.4 and a LoHa on some of the same kernels at 0.5, in order;
  a norm layer spelled with sgm names (`lora_unet_input_blocks_1_0_in_layers_0`, SDXL files' spelling) maps to the same
  GroupNorm."""
  path, models, modules, pipe = setup
  full, norm = _whole_file(models, FULL, "full", seed=21), _whole_file(models, NORM, "norm", seed=22)
  loha = make_file(modules, "loha", "plain", 3.0, seed=23)
  params = _params(pipe)
  sgm = {k.replace("down_blocks_0_resnets_0_norm1", "input_blocks_1_0_in_layers_0"): v for k, v in norm.items()}
  assert sgm != norm
  a, b = lora.from_state_dict(norm, params), lora.from_state_dict(sgm, params)
  assert a.layers.keys() == b.layers.keys() and all(a.layers[n].keys() == b.layers[n].keys() for n in a.layers)
  files = [(full, 0.7), (norm, -0.4), (loha, 0.5)]
  got = lora_merge.merge(params, [(lora.from_state_dict(sd, params), m) for sd, m in files])
  want = a1111_whole_merge(models, files[:2])
  for net, layers in a1111_merge(modules, [(loha, 0.5)]).items():  # the LoHa on the weights the full layers left
    for name, w in layers.items():
      key = next(k for k in models[net].state_dict() if _kohya_name(net, k) == name)
      want[net][key] = want[net].get(key, modules[net][name]) + (w - modules[net][name])
  _assert_state_as_a1111(models, params, got, want)


def test_full_and_norm_sampling_as_diffusers_with_a1111_weights(setup, tmp_path):
  """End to end: one LyCORIS file with full (diff + diff_b) and norm layers at weight 0.8 gives diffusers' latents with
  A1111's merged weights and biases; new weights change the latents and reuse the merge and sampling programs;
  export refuses the adapter."""
  path, models, modules, pipe = setup
  sd = {**_whole_file(models, FULL, "full", seed=24), **_whole_file(models, NORM, "norm", seed=25)}
  file = str(tmp_path / "full_norm.safetensors")
  safetensors.torch.save_file(sd, file)
  tpipe = reference.torch_pipeline(path)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  for net, state in a1111_whole_merge(models, [(sd, 0.8)]).items():
    model = getattr(tpipe, net)
    model.load_state_dict({**model.state_dict(), **{k: v.float() for k, v in state.items()}})
  ref = _theirs(tpipe, latents)
  base = _ours(pipe, latents)
  fn = pipe._jitted(True, "latent", "text", True)
  size = fn._cache_size()
  pipe.load_lora(file, scale=0.8, name="full_norm")
  try:
    _close(_ours(pipe, latents), ref)
    assert np.abs(ref - base).max() > 100 * 1e-4 * max(1.0, float(np.abs(ref).max()))
    merges = lora_merge.merged_kernels._cache_size()
    pipe.set_adapters(["full_norm"], [{"unet": 0.3, "text_encoder": -0.2}])
    other = _ours(pipe, latents)
    assert np.abs(other - ref).max() > 1e-2 and lora_merge.merged_kernels._cache_size() == merges
    assert fn._cache_size() == size
    with pytest.raises(ValueError, match="LoHa / LoKr / full / norm adapter .*: only plain LoRA"):
      lora_export.to_state_dict(pipe._loras.adapters["full_norm"])
  finally:
    pipe.unload_lora()


def test_full_and_norm_mistakes_are_named(setup):
  """A diff or b_norm that does not fit its layer, a diff_b on a layer without bias, a norm layer lacking b_norm (A1111
  requires both; left out with strict=False), diff and LoHa factors on one layer, dora_scale on a full layer, LoRA
  factors on a norm, A1111's weight-shaped `.bias`; a diff_b beside LoRA factors is refused even with strict=False."""
  path, models, modules, pipe = setup
  params = _params(pipe)
  full, norm = _whole_file(models, FULL, "full", seed=26), _whole_file(models, NORM, "norm", seed=27)
  q = next(n for n in modules["unet"] if n.endswith("attn1_to_q"))
  fc1 = next(n for n in full if n.endswith("fc1.diff")).removesuffix(".diff")
  gn = next(n for n in norm if n.endswith("resnets_0_norm1.w_norm")).removesuffix(".w_norm")
  with pytest.raises(ValueError, match=rf"{q}: its diff has shape \(32, 31\) but the layer's weight is \(32, 32\)"):
    lora.from_state_dict(dict(full, **{f"{q}.diff": torch.ones(32, 31)}), params)
  with pytest.raises(ValueError, match=rf"{q}: its diff_b updates the layer's bias, but the layer has none"):
    lora.from_state_dict(dict(full, **{f"{q}.diff_b": torch.ones(32)}), params)
  with pytest.raises(ValueError, match=rf"{gn}: its b_norm has shape \(3,\) but the layer's bias is \(32,\)"):
    lora.from_state_dict(dict(norm, **{f"{gn}.b_norm": torch.ones(3)}), params)
  with pytest.raises(ValueError, match=rf"lacking LyCORIS factors.*{gn}"):
    lora.from_state_dict({k: v for k, v in norm.items() if k != f"{gn}.b_norm"}, params)
  adapter = lora.from_state_dict({k: v for k, v in norm.items() if k != f"{gn}.b_norm"}, params, strict=False)
  assert adapter.ignored == (f"{gn}.w_norm",)
  with pytest.raises(ValueError, match=rf"{fc1}: both LyCORIS full \(diff, diff_b\) and other factors \(hada_w1_a\)"):
    lora.from_state_dict(dict(full, **{f"{fc1}.hada_w1_a": torch.ones(37, 4)}), params)
  with pytest.raises(ValueError, match=rf"{q}: both LyCORIS full \(diff_b\) and other factors \(down, up\)"):
    lora.from_state_dict(dict(_plain_lora(modules, 5), **{f"{q}.diff_b": torch.ones(32)}), params, strict=False)
  with pytest.raises(ValueError, match=rf"{fc1}: a dora_scale on a LyCORIS full \(diff, diff_b\) layer"):
    lora.from_state_dict(dict(full, **{f"{fc1}.dora_scale": torch.ones(1, 32)}), params)
  with pytest.raises(ValueError, match=rf"map to no layer of this model: {gn}.lora_down.weight"):
    lora.from_state_dict({
        f"{gn}.lora_down.weight": torch.ones(4, 32),
        f"{gn}.lora_up.weight": torch.ones(32, 4)
    }, params)
  with pytest.raises(ValueError, match=r"A1111's weight-shaped \.bias .* not supported"):
    lora.from_state_dict(dict(full, **{f"{fc1}.bias": torch.ones(37, 32)}), params)
