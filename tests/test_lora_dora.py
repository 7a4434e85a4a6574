"""DoRA adapters: parity with diffusers' load_lora_weights (peft's DoRA forward) for PEFT files and kohya-style
`dora_scale` files, at weights, mixed with plain LoRA and with each other; merged kernels against diffusers'
fuse_lora; fuse / unfuse and adapter switches without recompiling; LyCORIS' per-input-channel DoRA.

The adapters are made by peft (`use_dora=True`) on the tiny random model, with random lora_A / lora_B and magnitudes
moved away from the weight norms (so the rescaling matters), and saved by diffusers' save_lora_weights.
"""

from __future__ import annotations

import copy
import types

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

import jaxsd
from jaxsd import lora, lora_export, lora_merge, lora_names, weights
from tests import reference
from tests import test_lora_xl
from tests.test_lora import HW, PROMPTS, TE_TARGETS, UNET_TARGETS, _ours, _theirs

RANKS = {"unet": (4, 8), "text_encoder": (2, 3)}  # (rank, alpha): scales 2 and 1.5
NETS = tuple(RANKS)


def _random_adapter(models: dict, targets: dict, ranks: dict, seed: int, dora: bool) -> tuple[dict, dict]:
  """peft adapters (DoRA or plain) with random factors and magnitudes on copies of `models` (network -> module):
  {network: state dict in PEFT naming}, {network: LoraConfig}."""
  torch.manual_seed(seed)
  g = torch.Generator().manual_seed(seed)
  sds, cfgs = {}, {}
  for net, model in models.items():
    rank, alpha = ranks[net]
    cfgs[net] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets[net], init_lora_weights=False,
                           use_dora=dora)
    model = inject_adapter_in_model(cfgs[net], copy.deepcopy(model))
    reference.randomize_peft_adapter(model, g)
    sds[net] = get_peft_model_state_dict(model)
  return sds, cfgs


def _kohya(sds: dict, ranks: dict, prefixes: dict, unet_name=lambda m: m) -> dict:
  """A kohya-style DoRA file as LyCORIS writes one with wd_on_output=True (peft's DoRA): `prefixes[network]` + the
  module path (`unet_name` of it for the U-Net, with transformers 4's `text_model.` for the text encoders) with '_'
  for '.', lora_down / lora_up, an alpha per layer, dora_scale (out, 1[, 1, 1])."""
  out = {}
  for net, prefix in prefixes.items():
    for key, value in sds[net].items():
      module, role = key.rsplit(".lora_", 1)
      renamed = unet_name(module) if net == "unet" else "text_model." + module.removeprefix("text_model.")
      name = prefix + renamed.replace(".", "_")
      if role == "magnitude_vector":
        ndim = sds[net][f"{module}.lora_B.weight"].ndim
        out[f"{name}.dora_scale"] = value.reshape((-1,) + (1,) * (ndim - 1)).contiguous()
        continue
      out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value.contiguous()
      out[f"{name}.alpha"] = torch.tensor(float(ranks[net][1]))
  return out


def _load_theirs(tpipe, file: str, name: str) -> None:
  """diffusers' load_lora_weights, then the text encoder's magnitudes set from the file: transformers 5's load_adapter
  (which diffusers calls for it) looks for `lora_magnitude_vector.<name>.weight`, finds the key without `.weight`
  unexpected and leaves peft's initial magnitudes (||W + s BA||: no DoRA at weight 1)."""
  tpipe.load_lora_weights(file, adapter_name=name)
  with torch.no_grad():
    for k, v in safetensors.torch.load_file(file).items():
      net, module = k.split(".", 1)
      if net.startswith("text_encoder") and k.endswith(".lora_magnitude_vector"):
        layer = getattr(tpipe, net).get_submodule(module.removesuffix(".lora_magnitude_vector"))
        layer.lora_magnitude_vector[name].weight.copy_(v)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("dora")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  files = {}
  models = {
      "unet": diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
      "text_encoder": transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
  }
  targets = {"unet": UNET_TARGETS, "text_encoder": TE_TARGETS}
  for seed, name, dora in ((1, "dora_a", True), (2, "dora_b", True), (3, "lora_c", False)):
    sds, cfgs = _random_adapter(models, targets, RANKS, seed, dora)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(root / name), unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds["text_encoder"],
        unet_lora_adapter_metadata=cfgs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=cfgs["text_encoder"].to_dict())
    files[name] = str(root / name / lora.WEIGHT_NAME)
    if name == "dora_a":
      files["kohya_a"] = str(root / "kohya_a.safetensors")
      safetensors.torch.save_file(_kohya(sds, RANKS, {
          "unet": "lora_unet_",
          "text_encoder": "lora_te_"
      }), files["kohya_a"])
  tpipe = reference.torch_pipeline(path)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  files["base_reference"] = _theirs(tpipe, latents)
  return path, files, tpipe, pipe, latents


@pytest.fixture
def clean(setup):
  """Every test starts and ends with no adapter loaded, here and in diffusers."""
  _, _, tpipe, pipe, _ = setup
  yield setup
  pipe.unfuse_lora()
  pipe.unload_lora()
  tpipe.unload_lora_weights()


def _close(ours, ref, base):
  """fp32 parity: within 1e-5 of the latents' scale, and the adapters move diffusers' latents 1000 x farther."""
  scale = max(1.0, float(np.abs(ref).max()))
  diff, moved = float(np.abs(ours - ref).max()), float(np.abs(ref - base).max())
  print(f"max |ours - diffusers| = {diff:.2e} (latents up to {scale:.2f}); the adapters move them by {moved:.2e}")
  assert diff < 1e-5 * scale, f"max |diff| {diff}"
  assert moved > 1e-2 * scale


@pytest.mark.parametrize("fmt,weight", [("dora_a", 1.0), ("dora_a", 0.7), ("dora_a", 0.0), ("kohya_a", 1.0)])
def test_one_dora_adapter_matches_diffusers(clean, fmt, weight):
  """U-Net (linear, 1x1 and 3x3 convolutions) and text encoder; the weight scales the LoRA part only, as peft's
  set_scale (at 0 the magnitudes still rescale). diffusers drops a kohya file's dora_scale (loading it as plain
  LoRA), so the kohya file is compared with diffusers running the same adapter from the PEFT file, at weight 1 (where
  A1111's blend, which kohya files follow, is peft's DoRA; other weights: `test_kohya_dora_scale_as_a1111`)."""
  path, files, tpipe, pipe, latents = clean
  _load_theirs(tpipe, files["dora_a"], "a")
  tpipe.set_adapters(["a"], adapter_weights=[weight])
  ref = _theirs(tpipe, latents)
  name = pipe.load_lora(files[fmt], scale=weight)
  adapter = pipe._loras.adapters[name]
  assert adapter.ignored == ()
  assert all(f.magnitude is not None for layers in adapter.layers.values() for f in layers.values())
  _close(_ours(pipe, latents), ref, files["base_reference"])
  if fmt.startswith("kohya"):
    tpipe.unload_lora_weights()
    tpipe.load_lora_weights(files[fmt], adapter_name="k")  # warns and filters the dora_scale keys out
    tpipe.set_adapters(["k"], adapter_weights=[weight])
    assert np.abs(_theirs(tpipe, latents) - ref).max() > 1e-3


@pytest.mark.parametrize("names,weights", [(["dora_a", "lora_c"], [0.7, -0.4]), (["lora_c", "dora_a"], [0.7, 1.0]),
                                           (["dora_a", "dora_b"], [1.0, 0.6]), (["dora_b", "dora_a"], [1.0, 0.6])])
def test_mixed_adapters_match_diffusers(clean, names, weights):
  """Several active adapters, in order: each DoRA layer rescales what the adapters before it made (peft's forward)."""
  path, files, tpipe, pipe, latents = clean
  for n, w in zip(names, weights):
    _load_theirs(tpipe, files[n], n)
    pipe.load_lora(files[n], scale=w, name=n)
  tpipe.set_adapters(names, adapter_weights=weights)
  pipe.set_adapters(names, weights)
  _close(_ours(pipe, latents), _theirs(tpipe, latents), files["base_reference"])


def test_merged_kernels_match_diffusers_fuse(setup):
  """Layer by layer: our merged kernels are the weights diffusers' fuse_lora (peft's merge) writes, for two DoRA
  adapters and a plain one at weights, merged in the order they are active."""
  path, files, _, pipe, _ = setup
  names, ws = ["dora_a", "lora_c", "dora_b"], [0.7, -0.4, 1.3]
  tpipe = reference.torch_pipeline(path)
  for n in names:
    _load_theirs(tpipe, files[n], n)
  tpipe.set_adapters(names, adapter_weights=ws)
  tpipe.fuse_lora(adapter_names=names)
  tpipe.unload_lora_weights()  # keeps the fused weights
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  got = lora_merge.merge(params, [(lora.load(files[n], params), w) for n, w in zip(names, ws)])
  worst = 0.0
  for net in NETS:
    theirs = {k: v.numpy() for k, v in getattr(tpipe, net).state_dict().items()}
    rename = None if net == "unet" else lambda k: k if k.startswith("text_model.") else "text_model." + k
    want = traverse_util.flatten_dict(weights.state_dict_to_params(theirs, params[net], rename=rename))
    for p, v in traverse_util.flatten_dict(got[net]).items():
      np.testing.assert_allclose(np.asarray(v), want[p], rtol=1e-5, atol=1e-6, err_msg=f"{net} {p}")
      worst = max(worst, float(np.abs(np.asarray(v) - want[p]).max()))
  print(f"merged kernels: max |ours - diffusers' fuse_lora| = {worst:.1e}")


def test_fuse_unfuse_and_switches_never_recompile(clean):
  """DoRA and plain adapters at new weights reuse the merge program; the sampling program compiles once; fuse_lora
  gives the unfused latents, unfuse_lora the very arrays loaded (bit for bit)."""
  path, files, tpipe, pipe, latents = clean
  base = _ours(pipe, latents)
  fn = pipe._jitted(True, "latent", "text", True)
  size = fn._cache_size()
  loaded = pipe.lora_targets
  before = {n: [np.array(x) for x in jax_leaves(t)] for n, t in loaded.items()}
  pipe.load_lora(files["dora_a"], name="a")
  pipe.load_lora(files["lora_c"], name="c")
  pipe.set_adapters(["a", "c"], [0.7, 0.5])
  both = _ours(pipe, latents)
  merges = lora_merge.merged_kernels._cache_size()
  for w in ([0.2, 1.5], [-1.0, 0.0]):
    pipe.set_adapters(["a", "c"], w)
    _ours(pipe, latents)
  assert lora_merge.merged_kernels._cache_size() == merges
  pipe.set_adapters(["a", "c"], [0.7, 0.5])
  pipe.fuse_lora()
  np.testing.assert_array_equal(_ours(pipe, latents), both)
  pipe.unfuse_lora()
  assert all(pipe.lora_targets[n] is loaded[n] for n in loaded)
  for n, t in pipe.lora_targets.items():
    for x, y in zip(jax_leaves(t), before[n]):
      np.testing.assert_array_equal(np.asarray(x), y)
  pipe.set_adapters([])
  np.testing.assert_array_equal(_ours(pipe, latents), base)
  assert fn._cache_size() == size


def jax_leaves(tree):
  return list(traverse_util.flatten_dict(tree).values())


@pytest.mark.parametrize("axis,weights", [("input", [1.0]), ("input", [0.7]), ("output", [0.7]), ("input", [0.0]),
                                          ("input", [0.6, -0.5])])
def test_kohya_dora_scale_as_a1111(setup, axis, weights):
  """A kohya-style dora_scale rescales per input channel when (1, in[, 1, 1]) (LyCORIS' default, wd_on_output=False:
  the norm over (out, kh, kw), as LyCORIS' `apply_dora_scale`) and per output channel when (out, 1[, 1, 1]); and such
  files apply as A1111's Lora extension applies them (`apply_weight_decompose`, `finalize_updown`): the weight w
  blends, W' = W + w (dora_scale / ||W + s BA|| * (W + s BA) - W), each adapter on the weight the ones before it
  left (`network_apply_weights`; two adapters from one file here). Checked kernel by kernel against that written in
  PyTorch layout."""
  path, files, _, pipe, _ = setup
  sd = safetensors.torch.load_file(files["kohya_a"])
  g = torch.Generator().manual_seed(5)
  for k in [k for k in sd if k.endswith(".dora_scale")]:
    fan_in = sd[k.replace("dora_scale", "lora_down.weight")].shape[1]
    ndim = sd[k].ndim
    if axis == "input":
      sd[k] = (0.5 + torch.rand((1, fan_in) + (1,) * (ndim - 2), generator=g))
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  adapter = lora.from_state_dict(sd, params)
  assert all(f.blend for layers in adapter.layers.values() for f in layers.values())
  got = lora_merge.merge(params, [(adapter, w) for w in weights])
  kernels = {n: lora.kernel_modules(params[n]) for n in NETS}
  checked = 0
  for k in [k for k in sd if k.endswith(".dora_scale")]:
    name = k.removesuffix(".dora_scale")
    net = "unet" if name.startswith("lora_unet_") else "text_encoder"
    module = next(m for m in kernels[net] if lora_names.PREFIXES[net] + m.replace(".", "_") == name)
    kpath, shape = kernels[net][module]
    w = torch.from_numpy(np.asarray(traverse_util.flatten_dict(params[net])[kpath])).double()
    w = w.permute(3, 2, 0, 1) if w.ndim == 4 else w.T  # flax -> PyTorch layout
    down, up = sd[name + ".lora_down.weight"].double(), sd[name + ".lora_up.weight"].double()
    r = down.shape[0]
    updown = float(sd[name + ".alpha"]) / r * (up.reshape(-1, r) @ down.reshape(r, -1)).reshape(w.shape)
    want = w
    for mult in weights:  # A1111's network_apply_weights: each adapter's updown from the weight so far
      merged = want + updown
      if axis == "input":  # A1111's apply_weight_decompose
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape((1, -1) + (1,) * (w.ndim - 2))
      else:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (w.ndim - 1))
      want = want + mult * (merged * sd[k].double() / norm - want)
    want = want.permute(2, 3, 1, 0) if w.ndim == 4 else want.T
    ours = np.asarray(traverse_util.flatten_dict(got[net])[kpath])
    np.testing.assert_allclose(ours, want.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    checked += 1
  assert checked == adapter.num_layers


def test_magnitudes_that_do_not_fit_are_named(setup):
  path, files, _, pipe, _ = setup
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  sd, meta = lora.read(files["dora_a"])
  key = next(k for k in sd if k.endswith("to_q.lora_magnitude_vector"))
  with pytest.raises(ValueError, match=r"magnitude has shape \(31,\).*should be \(32,\)"):
    lora.from_state_dict(dict(sd, **{key: np.ones((31,), np.float32)}), params, meta)
  with pytest.raises(ValueError, match=r"DoRA \(use_dora in its metadata\) but this layer has no"):
    lora.from_state_dict({k: v for k, v in sd.items() if k != key}, params, meta)
  kohya = safetensors.torch.load_file(files["kohya_a"])
  key = next(k for k in kohya if k.endswith("to_q.dora_scale"))
  with pytest.raises(ValueError, match=r"should be \(32, 1\) or \(1, 32\)"):
    lora.from_state_dict(dict(kohya, **{key: torch.ones(2, 16)}), params)
  with pytest.raises(ValueError, match="DoRA adapter in kohya format"):
    lora_export.to_state_dict(lora.load(files["dora_a"], params), "kohya")
  with pytest.raises(ValueError, match="kohya-style DoRA"):  # A1111's blend: not peft's DoRA
    lora_export.to_state_dict(lora.load(files["kohya_a"], params))


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_sdxl_dora_matches_diffusers(tmp_path, fmt):
  """A tiny SDXL with a DoRA adapter on the U-Net (linear and conv layers, sd-scripts' sgm names in the kohya file)
  and both text encoders, at weight 0.8 (the kohya file at 1, where A1111's blend is peft's DoRA): jaxsd's latents
  against diffusers' (peft's forward, the PEFT file)."""
  base_path, _, c = reference.make_tiny_sdxl_folders(tmp_path / "sdxl")
  nets = ("unet", "text_encoder", "text_encoder_2")
  targets = dict(zip(nets, (test_lora_xl.UNET_TARGETS, test_lora_xl.TE_TARGETS, test_lora_xl.TE2_TARGETS)))
  sds, cfgs = _random_adapter({n: c[n] for n in nets}, targets, test_lora_xl.RANKS, 4, True)
  diffusers.StableDiffusionXLPipeline.save_lora_weights(
      str(tmp_path / "a"), unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds["text_encoder"],
      text_encoder_2_lora_layers=sds["text_encoder_2"], unet_lora_adapter_metadata=cfgs["unet"].to_dict(),
      text_encoder_lora_adapter_metadata=cfgs["text_encoder"].to_dict(),
      text_encoder_2_lora_adapter_metadata=cfgs["text_encoder_2"].to_dict())
  peft_file = str(tmp_path / "a" / lora.WEIGHT_NAME)
  file = peft_file
  if fmt == "kohya":
    file = str(tmp_path / "kohya.safetensors")
    prefixes = dict(zip(nets, ("lora_unet_", "lora_te1_", "lora_te2_")))
    safetensors.torch.save_file(_kohya(sds, test_lora_xl.RANKS, prefixes, test_lora_xl._sgm), file)
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_path)
  tpipe.set_progress_bar_config(disable=True)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base_path)
  hw = test_lora_xl.HW
  xl = types.SimpleNamespace(tpipe=tpipe, pipe=pipe, latents=np.asarray(pipe.noise(0, 2, hw, hw)))
  base = test_lora_xl._theirs(xl)
  _load_theirs(tpipe, peft_file, "a")
  weight = 0.8 if fmt == "peft" else 1.0
  tpipe.set_adapters(["a"], adapter_weights=[weight])
  name = pipe.load_lora(file, scale=weight)
  adapter = pipe._loras.adapters[name]
  assert all(f.magnitude is not None for n in nets for f in adapter.layers[n].values())
  _close(test_lora_xl._ours(xl), test_lora_xl._theirs(xl), base)
