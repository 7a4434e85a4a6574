"""SDXL LoRA adapters: parity with diffusers' StableDiffusionXLPipeline.load_lora_weights (PEFT) on a tiny random
SDXL with adapters on the U-Net and both text encoders, in diffusers / PEFT naming and in kohya naming as
sd-scripts writes SDXL files (sgm U-Net names, `lora_te1_` / `lora_te2_`); several adapters at weights,
fuse / unfuse, no recompilation; the refiner (no first text encoder) and the errors.
"""

from __future__ import annotations

import re
import types

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

import jaxsd
from jaxsd import lora, lora_export, lora_names
from tests import reference

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW, STEPS, GUIDANCE = 16, 3, 5.0
# Attention, feed-forward, linear proj_in / proj_out, ResNet convolutions (3x3 LoCon), shortcuts, time
# projections, and the down / upsamplers' convolutions ("conv": sgm's `op` and `output_blocks.N.2.conv`).
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj", "conv"
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
TE2_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc2"]
RANKS = {"unet": (4, 8), "text_encoder": (2, 3), "text_encoder_2": (3, 6)}  # (rank, alpha): scales 2, 1.5 and 2
KOHYA_CONV_ALPHA = 2  # per-layer alphas in the kohya file: its convolutions at scale 0.5
# sd-scripts' SDXL U-Net (sgm) names for the tiny U-Net's blocks (layers_per_block 1, two down and two up blocks,
# attentions in the second down and the first up block): input_blocks.0 is conv_in, each down block one entry per
# layer then its downsampler; each up block layers_per_block + 1 entries, its upsampler third in the last.
SGM_BLOCKS = {
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
}
SGM_RESNET = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection"
}


def _random_lora(c: dict, seed: int) -> tuple[dict, dict]:
  """PEFT adapters with random A and B on copies of the U-Net and both text encoders: {network: state dict in PEFT
  naming}, {network: LoraConfig}."""
  import copy

  g = torch.Generator().manual_seed(seed)
  sds, cfgs = {}, {}
  for net, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS), ("text_encoder_2", TE2_TARGETS)):
    rank, alpha = RANKS[net]
    cfgs[net] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(cfgs[net], copy.deepcopy(c[net]))
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
          p.copy_(0.1 * torch.randn(p.shape, generator=g))
    sds[net] = get_peft_model_state_dict(model)
  return sds, cfgs


def _sgm(module: str) -> str:
  for diffusers_name, sgm in SGM_BLOCKS.items():
    if module.startswith(diffusers_name):
      rest = module[len(diffusers_name) + 1:]
      return sgm + ("." + SGM_RESNET.get(rest, rest) if rest else "")
  raise AssertionError(f"no sgm name for {module}")


def _kohya(sds: dict) -> dict:
  """sd-scripts' SDXL names: lora_unet_ + the sgm module path, lora_te1_ / lora_te2_ + the text encoders' (with
  transformers 4's `text_model.`), '_' for '.', lora_down / lora_up and an alpha per layer."""
  out = {}
  for net, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
    for key, value in sds[net].items():
      module, role = key.rsplit(".lora_", 1)
      if net == "unet":
        module = _sgm(module)
      elif not module.startswith("text_model."):
        module = "text_model." + module
      name = prefix + module.replace(".", "_")
      out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value.contiguous()
      conv = value.ndim == 4 and net == "unet"
      out[f"{name}.alpha"] = torch.tensor(float(KOHYA_CONV_ALPHA if conv else RANKS[net][1]))
  return out


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_xl")
  base_path, refiner_path, c = reference.make_tiny_sdxl_folders(root / "sdxl")
  files = {}
  for seed, name in ((1, "a"), (2, "b")):
    sds, cfgs = _random_lora(c, seed)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(root / name), unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds["text_encoder"],
        text_encoder_2_lora_layers=sds["text_encoder_2"], unet_lora_adapter_metadata=cfgs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=cfgs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=cfgs["text_encoder_2"].to_dict())
    files[f"peft_{name}"] = str(root / name / lora.WEIGHT_NAME)
    if name == "a":
      files["kohya"] = str(root / "kohya.safetensors")
      safetensors.torch.save_file(_kohya(sds), files["kohya"])
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_path)
  tpipe.set_progress_bar_config(disable=True)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base_path)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  ns = types.SimpleNamespace(base_path=base_path, refiner_path=refiner_path, files=files, tpipe=tpipe, pipe=pipe,
                             latents=latents)
  ns.base_reference = _theirs(ns)
  return ns


def _ours(xl):
  return xl.pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=STEPS, guidance_scale=GUIDANCE, sampler="euler",
                 latents=xl.latents, output="latent")


def _theirs(xl):
  with torch.no_grad():
    out = xl.tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=reference.nhwc_to_nchw(xl.latents), output_type="latent")
  return reference.nchw_to_nhwc(out.images)


def _close(ours, ref):
  """The SDXL pipeline parity tests' tolerance: 1e-4 of the latents' scale."""
  diff = float(np.abs(ours - ref).max())
  print(f"max |ours - diffusers| = {diff:.2e} (latents up to {np.abs(ref).max():.2f})")
  assert diff < 1e-4 * max(1.0, float(np.abs(ref).max())), f"max |diff| {diff}"
  return diff


@pytest.fixture
def clean(xl):
  """Every test starts and ends with no adapter loaded, here and in diffusers."""
  yield xl
  xl.pipe.unfuse_lora()
  xl.pipe.unload_lora()
  xl.tpipe.unload_lora_weights()


@pytest.mark.parametrize("fmt", ["peft_a", "kohya"])
def test_formats_match_diffusers(clean, fmt):
  xl = clean
  xl.tpipe.load_lora_weights(xl.files[fmt], adapter_name=fmt)
  ref = _theirs(xl)
  assert np.abs(ref - xl.base_reference).max() > 1e-2  # the adapters matter far beyond the tolerance
  name = xl.pipe.load_lora(xl.files[fmt])
  adapter = xl.pipe._loras.adapters[name]
  assert adapter.ignored == ()
  for net in lora.NETWORKS:  # every layer diffusers adapted, in each of the three networks
    theirs = sum(isinstance(m, LoraLayer) for m in getattr(xl.tpipe, net).modules())
    assert len(adapter.layers[net]) == theirs > 0, net
  _close(_ours(xl), ref)


def test_adapters_at_weights_switch_and_fuse_without_recompiling(clean):
  """Two adapters at weights as diffusers' set_adapters; other weights, none, fuse / unfuse: the sampling program
  compiles once, and unfuse_lora gives back the very arrays loaded."""
  xl = clean
  pipe = xl.pipe
  base = _ours(xl)
  fn = pipe._jitted(True, "latent", "text", True)
  size = fn._cache_size()
  xl.tpipe.load_lora_weights(xl.files["peft_a"], adapter_name="a")
  xl.tpipe.load_lora_weights(xl.files["kohya"], adapter_name="k")
  xl.tpipe.set_adapters(["a", "k"], adapter_weights=[0.7, -0.4])
  pipe.load_lora(xl.files["peft_a"], scale=0.7, name="a")
  pipe.load_lora(xl.files["kohya"], scale=-0.4, name="k")
  assert pipe.lora_adapters == {"a": 0.7, "k": -0.4}
  both = _ours(xl)
  _close(both, _theirs(xl))
  pipe.set_adapters("a", 1.3)
  _ours(xl)
  pipe.set_adapters([])
  np.testing.assert_array_equal(_ours(xl), base)
  loaded = pipe.lora_targets
  pipe.set_adapters(["a", "k"], [0.7, -0.4])
  pipe.fuse_lora()
  assert pipe.params["text_encoder_2"] is pipe.text_encoder_2_params  # merged once, into the weights
  np.testing.assert_array_equal(_ours(xl), both)
  pipe.unfuse_lora()
  assert all(pipe.lora_targets[n] is loaded[n] for n in lora.NETWORKS)
  assert fn._cache_size() == size


def test_refiner_has_no_first_text_encoder(xl):
  """A refiner (text_encoder_2 only): `lora_te1_` keys are an error naming them, or ignored with strict=False;
  the second encoder's adapter loads and changes only text_encoder_2."""
  refiner = jaxsd.StableDiffusionXL.from_pretrained(xl.refiner_path)
  sd, _ = lora.read(xl.files["kohya"])
  text = {k: v for k, v in sd.items() if k.startswith(("lora_te1_", "lora_te2_"))}
  with pytest.raises(
      ValueError, match=r"adapts text_encoder, which this model does not have.*refiner.*"
      r"lora_te1_text_model_encoder_layers_0_mlp_fc1\.alpha"):
    refiner.load_lora(text)
  name = refiner.load_lora(text, strict=False)
  adapter = refiner._loras.adapters[name]
  assert set(adapter.layers) == {"text_encoder_2"}
  assert adapter.ignored and all(k.startswith("lora_te1_") for k in adapter.ignored)
  assert set(refiner.params) >= {"unet", "text_encoder_2"} and refiner.params["text_encoder"] is None
  assert refiner.params["unet"] is refiner.unet_params
  assert refiner.params["text_encoder_2"] is not refiner.text_encoder_2_params
  with pytest.raises(ValueError, match="text_encoder.*refiner"):
    refiner.load_lora(xl.files["peft_a"], name="peft")


def test_second_encoder_mismatches_are_named(xl):
  params = xl.pipe.lora_targets
  sd, _ = lora.read(xl.files["kohya"])
  key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
  with pytest.raises(ValueError, match=rf"{key}: lora_down has shape \(3, 48\).*weight is \(32, 32\)"):
    lora.from_state_dict(dict(sd, **{f"{key}.lora_down.weight": np.zeros((3, 48), np.float32)}), params)
  bad = dict(sd, **{"lora_te2_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": np.zeros((3, 32), np.float32)})
  with pytest.raises(ValueError, match=r"map to no layer.*lora_te2_text_model_encoder_layers_9_mlp_fc1"):
    lora.from_state_dict(bad, params)
  sd15 = {k: v for k, v in params.items() if k != "text_encoder_2"}  # as an SD 1.x model: no second encoder
  with pytest.raises(ValueError, match="adapts text_encoder_2, which this model does not have"):
    lora.from_state_dict(sd, sd15)
  assert re.fullmatch(r"lora_te2_.*", lora.from_state_dict(sd, sd15, strict=False).ignored[0])


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_saved_adapters_load_in_diffusers(clean, tmp_path, fmt):
  """An SDXL adapter written by jaxsd (from the kohya file: per-layer alphas) loads with diffusers'
  load_lora_weights, kohya with sd-scripts' names (sgm U-Net, lora_te1_ / lora_te2_), and gives diffusers
  jaxsd's latents; read back, it is the same adapter."""
  xl = clean
  params = xl.pipe.lora_targets
  adapter = lora.load(xl.files["kohya"], params)
  sgm = lora_names.sgm_names(lora.kernel_modules(params["unet"]))
  saved = lora_export.save(adapter, tmp_path / "out", fmt, unet_names=sgm)
  keys = set(lora.read(saved)[0])
  if fmt == "kohya":
    assert "lora_unet_output_blocks_1_2_conv.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
  else:
    assert any(k.startswith("text_encoder_2.") for k in keys)
  xl.tpipe.load_lora_weights(saved)
  xl.pipe.load_lora(xl.files["kohya"])
  _close(_ours(xl), _theirs(xl))
  reference.assert_same_adapter(lora.load(saved, params), adapter)


def _sdxl_unet_modules() -> list[str]:
  """Module names of the released SDXL U-Net's blocks (layers_per_block 2; no attention in the first down and the
  last up block; down blocks 0 and 1 downsample, up blocks 0 and 1 upsample)."""
  names = ["conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"]
  for kind, n, attn, sampler in (("down_blocks", 2, (False, True, True), "downsamplers"),
                                 ("up_blocks", 3, (True, True, False), "upsamplers")):
    for b in range(3):
      for i in range(n):
        names += [f"{kind}.{b}.resnets.{i}.conv1", f"{kind}.{b}.resnets.{i}.conv_shortcut"]
        if attn[b]:
          names.append(f"{kind}.{b}.attentions.{i}.transformer_blocks.0.attn1.to_q")
      if b < 2:
        names.append(f"{kind}.{b}.{sampler}.0.conv")
  return names + ["mid_block.resnets.1.time_emb_proj", "mid_block.attentions.0.proj_in"]


def test_sgm_names_of_the_sdxl_unet():
  """Names as they appear in sd-scripts' SDXL LoRA files (and in the sgm U-Net's state dict)."""
  sgm = lora_names.sgm_names(_sdxl_unet_modules())
  want = {
      "conv_in": "input_blocks.0.0",
      "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
      "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
      "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
      "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
      "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
      "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q": "input_blocks.8.1.transformer_blocks.0.attn1.to_q",
      "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
      "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
      "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "output_blocks.0.1.transformer_blocks.0.attn1.to_q",
      "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
      "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
      "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
      "conv_out": "out.2",
      "add_embedding.linear_2": "label_emb.0.2",
  }
  assert {k: sgm[k] for k in want} == want
  assert len(set(sgm.values())) == len(sgm)  # one name per layer
