"""LoRA adapters: parity with diffusers' load_lora_weights (PEFT) for each format, several adapters at
weights, fuse / unfuse, no recompilation of the sampling program, and the loader's errors.

The adapters are made with diffusers' / PEFT's own machinery on a tiny random model (`add_adapter`
with random lora_A / lora_B, `get_peft_model_state_dict`, `save_lora_weights`); the kohya and old
diffusers files are written from those keys as sd-scripts and diffusers < 0.22 name them.
"""

from __future__ import annotations

import os
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

import jaxsd
from jaxsd import lora, lora_export, lora_merge, weights
from tests import reference

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
HW, STEPS = 16, 4
# Attention, feed-forward, transformer projections (1x1 convolutions in SD 1), ResNet convolutions
# (3x3 LoCon: kxk lora_A, 1x1 lora_B), shortcuts and time projections.
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj"
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
UNET_RANK, UNET_ALPHA, TE_RANK, TE_ALPHA = 4, 8, 2, 3  # alpha != rank: scales 2 and 1.5
KOHYA_CONV_ALPHA = 2  # per-layer alphas in the kohya file: its convolutions at scale 0.5
SD_NETWORKS = ("unet", "text_encoder")  # lora.NETWORKS less SDXL's text_encoder_2


def _random_lora(path: str, seed: int) -> tuple[dict, dict, LoraConfig, LoraConfig]:
  """PEFT adapters with random A and B (PEFT starts B at zero) on fresh copies of the folder's U-Net and
  text encoder; returns their state dicts in PEFT naming and the configs."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet")
  te = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
  ucfg = LoraConfig(r=UNET_RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False)
  tcfg = LoraConfig(r=TE_RANK, lora_alpha=TE_ALPHA, target_modules=TE_TARGETS, init_lora_weights=False)
  unet.add_adapter(ucfg)
  te = inject_adapter_in_model(tcfg, te)  # transformers' add_adapter wants peft >= 0.22; the registry has 0.21
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for model in (unet, te):
      for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
          p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return get_peft_model_state_dict(unet), get_peft_model_state_dict(te), ucfg, tcfg


def _text_model(te_sd: dict) -> dict:
  """The text encoder's keys as transformers 4 named them (`text_model.encoder...`), as LoRA files in
  circulation have them; transformers 5's CLIPTextModel has no `text_model` level."""
  return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in te_sd.items()}


def _kohya(unet_sd: dict, te_sd: dict) -> dict:
  """sd-scripts' names: lora_unet_ / lora_te_ + the module path with '_' for '.', lora_down / lora_up, alpha."""
  out = {}
  for prefix, sd, alpha in (("lora_unet_", unet_sd, UNET_ALPHA), ("lora_te_", _text_model(te_sd), TE_ALPHA)):
    for key, value in sd.items():
      module, role = key.rsplit(".lora_", 1)
      name = prefix + module.replace(".", "_")
      out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value.contiguous()
      is_conv = value.ndim == 4
      out[f"{name}.alpha"] = torch.tensor(float(KOHYA_CONV_ALPHA if is_conv and prefix == "lora_unet_" else alpha))
  return out


def _old_diffusers(unet_sd: dict, te_sd: dict) -> dict:
  """diffusers' pre-PEFT spellings: attention processors' `attn1.processor.to_q_lora.down`, `lora.down` elsewhere
  in the U-Net, `lora_linear_layer.down` in the text encoder (no alphas: scale 1)."""
  out = {}
  for key, value in unet_sd.items():
    module, role = key.rsplit(".lora_", 1)
    updown = "down" if role.startswith("A") else "up"
    m = re.fullmatch(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out)(?:\.0)?", module)
    out[f"unet.{m[1]}.processor.{m[2]}_lora.{updown}.weight" if m else f"unet.{module}.lora.{updown}.weight"] = value
  for key, value in _text_model(te_sd).items():
    module, role = key.rsplit(".lora_", 1)
    out[f"text_encoder.{module}.lora_linear_layer.{'down' if role.startswith('A') else 'up'}.weight"] = value
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  files = {}
  for seed, name in ((1, "a"), (2, "b")):
    unet_sd, te_sd, ucfg, tcfg = _random_lora(path, seed)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(root / name), unet_lora_layers=unet_sd,
                                                        text_encoder_lora_layers=te_sd,
                                                        unet_lora_adapter_metadata=ucfg.to_dict(),
                                                        text_encoder_lora_adapter_metadata=tcfg.to_dict())
    files[f"peft_{name}"] = str(root / name / lora.WEIGHT_NAME)
    if name == "a":
      files["kohya"] = str(root / "kohya.safetensors")
      safetensors.torch.save_file(_kohya(unet_sd, te_sd), files["kohya"])
      files["old"] = str(root / "old.safetensors")
      safetensors.torch.save_file({k: v.contiguous() for k, v in _old_diffusers(unet_sd, te_sd).items()}, files["old"])
  tpipe = reference.torch_pipeline(path)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  files["base_reference"] = _theirs(tpipe, latents)  # diffusers' latents without adapters
  return path, files, tpipe, pipe, latents


def _ours(pipe, latents):
  return pipe(PROMPTS, NEGATIVE, height=HW, width=HW, steps=STEPS, guidance_scale=7.5, sampler="euler", latents=latents,
              output="latent")


def _theirs(tpipe, latents):
  with torch.no_grad():
    out = tpipe(PROMPTS, negative_prompt=NEGATIVE, height=HW, width=HW, num_inference_steps=STEPS, guidance_scale=7.5,
                latents=reference.nhwc_to_nchw(latents), output_type="latent")
  return reference.nchw_to_nhwc(out.images)


def _close(ours, ref):
  """The pipeline parity tests' tolerance: 1e-4 of the latents' scale."""
  diff = np.abs(ours - ref).max()
  print(f"max |ours - diffusers| = {diff:.2e} (latents up to {np.abs(ref).max():.2f})")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max()), f"max |diff| {diff}"
  return diff


@pytest.fixture
def clean(setup):
  """Every test starts and ends with no adapter loaded, here and in diffusers."""
  _, _, tpipe, pipe, _ = setup
  yield setup
  pipe.unfuse_lora()
  pipe.unload_lora()
  tpipe.unload_lora_weights()


@pytest.mark.parametrize("fmt", ["peft_a", "kohya", "old"])
def test_formats_match_diffusers(clean, fmt):
  path, files, tpipe, pipe, latents = clean
  tpipe.load_lora_weights(files[fmt], adapter_name=fmt)
  ref = _theirs(tpipe, latents)
  # The adapter matters (so a loader that drops layers fails): it moves the latents far beyond the tolerance.
  assert np.abs(ref - files["base_reference"]).max() > 1e-2
  name = pipe.load_lora(files[fmt])
  adapter = pipe._loras.adapters[name]
  assert adapter.ignored == ()
  n_theirs = sum(isinstance(m, LoraLayer) for net in (tpipe.unet, tpipe.text_encoder) for m in net.modules())
  assert adapter.num_layers == n_theirs
  _close(_ours(pipe, latents), ref)


def _fused_reference(path: str, file: str) -> dict:
  """diffusers' U-Net and text-encoder weights after load_lora_weights + fuse_lora (PEFT's merge), as state dicts."""
  tpipe = reference.torch_pipeline(path)
  tpipe.load_lora_weights(file)
  tpipe.fuse_lora()
  tpipe.unload_lora_weights()  # keeps the fused weights
  return {net: {k: v.numpy() for k, v in getattr(tpipe, net).state_dict().items()} for net in SD_NETWORKS}


def _assert_merged_like_diffusers(pipe, file, reference_weights):
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  adapter = lora.load(file, params)
  got = lora_merge.merge(params, [(adapter, 1.0)])
  worst = 0.0
  for net in SD_NETWORKS:
    rename = None if net == "unet" else lambda k: k if k.startswith("text_model.") else "text_model." + k
    want = traverse_util.flatten_dict(weights.state_dict_to_params(reference_weights[net], params[net], rename=rename))
    flat = traverse_util.flatten_dict(got[net])
    assert set(adapter.layers[net]) < set(flat)
    for p in flat:
      np.testing.assert_allclose(np.asarray(flat[p]), want[p], rtol=1e-6, atol=1e-6, err_msg=f"{net} {p}")
      worst = max(worst, float(np.abs(np.asarray(flat[p]) - want[p]).max()))
  print(f"merged kernels: max |ours - diffusers' fuse_lora| = {worst:.1e}")


def test_merged_kernels_match_diffusers_fuse(setup):
  """Layer by layer, U-Net and text encoder: our merged kernels are the weights diffusers' fuse_lora (PEFT's
  merge) writes, for the PEFT file (alpha 8, rank 4; text encoder alpha 3, rank 2)."""
  path, files, _, pipe, _ = setup
  _assert_merged_like_diffusers(pipe, files["peft_a"], _fused_reference(path, files["peft_a"]))


def test_sd2_merged_kernels_match_diffusers_fuse(tmp_path):
  """SD 2.x: linear proj_in / proj_out (use_linear_projection) and the gelu text encoder, merged as diffusers does."""
  path = reference.make_tiny_sd_folder(str(tmp_path / "sd2"), sd2=True)
  unet_sd, te_sd, ucfg, tcfg = _random_lora(path, 3)
  diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=unet_sd,
                                                      text_encoder_lora_layers=te_sd,
                                                      unet_lora_adapter_metadata=ucfg.to_dict(),
                                                      text_encoder_lora_adapter_metadata=tcfg.to_dict())
  file = str(tmp_path / "lora" / lora.WEIGHT_NAME)
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  assert len(pipe.unet_params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape) == 2  # a Dense
  _assert_merged_like_diffusers(pipe, file, _fused_reference(path, file))


def test_two_adapters_at_weights_match_diffusers(clean):
  path, files, tpipe, pipe, latents = clean
  tpipe.load_lora_weights(files["peft_a"], adapter_name="a")
  tpipe.load_lora_weights(files["peft_b"], adapter_name="b")
  tpipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
  ref = _theirs(tpipe, latents)
  pipe.load_lora(files["peft_a"], scale=0.7, name="a")
  pipe.load_lora(files["peft_b"], scale=-0.4, name="b")
  assert pipe.lora_adapters == {"a": 0.7, "b": -0.4}
  _close(_ours(pipe, latents), ref)
  tpipe.set_adapters(["b"], adapter_weights=[1.3])
  pipe.set_adapters("b", 1.3)
  assert pipe.lora_adapters == {"a": None, "b": 1.3}
  _close(_ours(pipe, latents), _theirs(tpipe, latents))


@pytest.mark.parametrize(
    "weights",
    [
        {
            "unet": {
                "down": 0.3,
                "mid": 1.7,
                "up": {
                    "block_1": [0.0, 2.0]
                }
            },
            "text_encoder": 0.5
        },
        {
            "unet": {
                "up": {
                    "block_1": [1.5]
                }
            }
        },  # everything else at 1; one value for both attentions of the block
        {
            "text_encoder": -0.8,
            "unet": 0.6
        },
    ])
def test_per_block_weights_match_diffusers(clean, weights):
  """diffusers' set_adapters with per-network and per-block weights: the down block's ResNets take its attention's
  weight, the up block's ResNets 0 and 1 their attentions', mid-block ResNets and blocks without attention 1 (its
  get_module_weight rule, on a LoRA of attentions, ResNet convolutions, shortcuts and time projections)."""
  path, files, tpipe, pipe, latents = clean
  tpipe.load_lora_weights(files["peft_a"], adapter_name="a")
  tpipe.load_lora_weights(files["peft_b"], adapter_name="b")
  tpipe.set_adapters(["a", "b"], adapter_weights=[weights, 0.4])
  pipe.load_lora(files["peft_a"], name="a")
  pipe.load_lora(files["peft_b"], name="b")
  pipe.set_adapters(["a", "b"], [weights, 0.4])
  _close(_ours(pipe, latents), _theirs(tpipe, latents))
  assert pipe.lora_adapters["b"] == 0.4


def test_per_block_weights_act_per_layer_and_compile_nothing(clean):
  """Each part of a per-block weight reaches its layers (the merged kernels differ exactly where it says), new
  values reuse the merge program, and a dict of 1 everywhere is the plain adapter."""
  path, files, tpipe, pipe, latents = clean
  pipe.load_lora(files["peft_a"], name="a")
  plain = pipe.params
  merges = lora_merge.merged_kernels._cache_size()
  pipe.set_adapters("a", {"unet": {"down": 1.0, "mid": 1.0, "up": 1.0}, "text_encoder": 1.0})
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(pipe.params)):
    np.testing.assert_array_equal(a, b)
  pipe.set_adapters("a", {"unet": {"up": {"block_1": [1.0, 0.0]}}})
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(pipe.params["unet"], sep="/").items()}
  base = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(plain["unet"], sep="/").items()}
  changed = sorted(k for k in flat if not np.array_equal(flat[k], base[k]))
  assert changed and all(
      k.startswith(("up_blocks_1/attentions_1/", "up_blocks_1/resnets_1/")) for k in changed), changed
  assert any(k.startswith("up_blocks_1/resnets_1/") for k in changed)
  assert lora_merge.merged_kernels._cache_size() == merges


def test_per_block_weights_that_do_not_fit_are_refused(clean):
  path, files, tpipe, pipe, latents = clean
  pipe.load_lora(files["peft_a"], name="a")
  for weights, message in (
      ({
          "down": 0.5
      }, "'down' is not one of this pipeline's networks (unet, text_encoder) (per-block weights go "
       "under 'unet'"),
      ({
          "text_encoder_2": 0.5
      }, "'text_encoder_2' is not one of this pipeline's networks"),
      ({
          "unet": {
              "down": {
                  "block_1": 0.5
              }
          }
      }, "down 'block_1' is not a block with cross-attention in this U-Net"),
      ({
          "text_encoder": {
              "down": 1.0
          }
      }, "per-block weights apply to the U-Net"),
      ({
          "unet": {
              "up": {
                  "block_1": [1.0, 2.0, 3.0]
              }
          }
      }, "3 values for up block_1, which has 2 attentions"),
      ({
          "unet": float("nan")
      }, "finite number"),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      pipe.set_adapters("a", weights)
  assert pipe.lora_adapters == {"a": 1.0}


def test_switching_adapters_and_weights_never_recompiles(clean):
  """Adapters, weights and none at all: the sampling program compiles once; new weights reuse the merge.

  (It fails if the adapters reach the program as anything but the same-shaped, same-dtype parameters, e.g.
  as extra arguments or as constants closed over.)"""
  path, files, tpipe, pipe, latents = clean
  base = _ours(pipe, latents)
  fn = pipe._jitted(True, "latent", "text", True)
  size = fn._cache_size()
  pipe.load_lora(files["peft_a"], name="a")
  with_a = _ours(pipe, latents)
  merges = lora_merge.merged_kernels._cache_size()
  for weight in (0.3, -1.0, 2.5):
    pipe.set_adapters("a", weight)
    _ours(pipe, latents)
  assert lora_merge.merged_kernels._cache_size() == merges
  pipe.load_lora(files["kohya"], name="k")
  pipe.set_adapters(["a", "k"], [0.5, 0.5])
  _ours(pipe, latents)
  pipe.set_adapters([])
  np.testing.assert_array_equal(_ours(pipe, latents), base)
  pipe.set_adapters("a")
  np.testing.assert_array_equal(_ours(pipe, latents), with_a)
  pipe.delete_adapters(["a", "k"])
  np.testing.assert_array_equal(_ours(pipe, latents), base)
  assert fn._cache_size() == size


def test_weight_zero_is_the_base_model(clean):
  path, files, tpipe, pipe, latents = clean
  base_params = pipe.params
  base = _ours(pipe, latents)
  pipe.load_lora(files["peft_a"], scale=0.0)
  for net in ("unet", "text_encoder"):
    jax.tree.map(np.testing.assert_array_equal, pipe.params[net], base_params[net])
  np.testing.assert_array_equal(_ours(pipe, latents), base)
  _close(base, files["base_reference"])


def test_merge_keeps_the_parameters_dtype(setup):
  """bf16 parameters stay bf16 (the program sees the same dtypes), merged in fp32 and rounded once."""
  path, files, _, pipe, _ = setup
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  adapter = lora.load(files["peft_a"], params)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  got = lora_merge.merge(half, [(adapter, 0.6)])
  want = lora_merge.merge(jax.tree.map(lambda x: x.astype(jnp.float32), half), [(adapter, 0.6)])
  assert jax.tree.structure(got) == jax.tree.structure(half)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w.astype(jnp.bfloat16)))


def test_fuse_then_unfuse_restores_the_base_bit_exactly(clean):
  path, files, tpipe, pipe, latents = clean
  base_unet, base_te = pipe.unet_params, pipe.text_encoder_params
  pipe.load_lora(files["peft_a"], scale=0.8)
  unfused = _ours(pipe, latents)
  pipe.fuse_lora()
  assert pipe.params["unet"] is pipe.unet_params  # no merge before calls any more
  np.testing.assert_array_equal(_ours(pipe, latents), unfused)  # the same merged kernels, the same numbers
  with pytest.raises(ValueError, match="unfuse_lora"):
    pipe.set_adapters("default_0", 0.5)
  pipe.unfuse_lora()
  assert pipe.unet_params is base_unet and pipe.text_encoder_params is base_te
  pipe.fuse_lora()
  pipe.unload_lora()  # as diffusers: unloading after fusing keeps the fused weights
  np.testing.assert_array_equal(_ours(pipe, latents), unfused)
  pipe.unet_params, pipe.text_encoder_params = base_unet, base_te


def test_swap_unet_while_fused_is_refused(clean):
  """swap_unet after fuse_lora was taken, and a later unfuse_lora put the old U-Net's parameters back into the
  new U-Net (0.6 away from the swapped-in weights, silently): refused now, the pipeline as it was."""
  path, files, tpipe, pipe, latents = clean
  pipe.load_lora(files["peft_a"])
  pipe.fuse_lora()
  fused = pipe.unet_params
  with pytest.raises(ValueError, match="swap_unet: the LoRA adapters are fused.*unfuse_lora"):
    pipe.swap_unet(os.path.join(path, "unet"))
  assert pipe.unet_params is fused


@pytest.mark.parametrize("fmt", lora_export.FORMATS)
def test_saved_adapters_load_in_diffusers(clean, tmp_path, fmt):
  """An adapter written by jaxsd (from the kohya file: per-layer alphas) loads with diffusers' load_lora_weights
  and gives diffusers the latents jaxsd gives with it; read back, it is the same adapter."""
  path, files, tpipe, pipe, latents = clean
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  adapter = lora.load(files["kohya"], params)
  saved = lora_export.save(adapter, tmp_path / "out", fmt)
  assert saved.endswith(lora.WEIGHT_NAME)
  tpipe.load_lora_weights(saved)
  pipe.load_lora(files["kohya"])
  _close(_ours(pipe, latents), _theirs(tpipe, latents))
  reference.assert_same_adapter(lora.load(saved, params), adapter)


def test_unknown_keys_and_mismatches_are_named(clean):
  path, files, tpipe, pipe, latents = clean
  sd, meta = lora.read(files["kohya"])
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  extra = dict(sd, **{"lora_unet_down_blocks_9_attn_to_q.lora_down.weight": np.zeros((4, 32), np.float32)})
  with pytest.raises(ValueError, match=r"map to no layer.*lora_unet_down_blocks_9_attn_to_q\.lora_down\.weight"):
    lora.from_state_dict(extra, params)
  adapter = lora.from_state_dict(extra, params, strict=False)
  assert adapter.ignored == ("lora_unet_down_blocks_9_attn_to_q.lora_down.weight",)
  name = pipe.load_lora(extra, strict=False)
  assert pipe._loras.adapters[name].ignored == adapter.ignored
  key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
  bad_rank = dict(sd, **{f"{key}.lora_up.weight": np.zeros((32, 3), np.float32)})
  with pytest.raises(ValueError, match=r"lora_down has shape \(4, 32\).*lora_up has shape \(32, 3\)"):
    lora.from_state_dict(bad_rank, params)
  bad_shape = dict(sd, **{f"{key}.lora_down.weight": np.zeros((4, 48), np.float32)})
  with pytest.raises(ValueError, match=r"lora_down has shape \(4, 48\).*weight is \(32, 32\)"):
    lora.from_state_dict(bad_shape, params)
  with pytest.raises(ValueError, match="one of lora_down/lora_up"):
    lora.from_state_dict({k: v for k, v in sd.items() if k != f"{key}.lora_up.weight"}, params)
  with pytest.raises(ValueError, match=r"DoRA magnitude has shape \(31, 1\)"):
    lora.from_state_dict(dict(sd, **{f"{key}.dora_scale": np.ones((31, 1), np.float32)}), params)
  with pytest.raises(ValueError, match="weight nan"):
    pipe.load_lora(files["peft_a"], scale=float("nan"))
  with pytest.raises(FileNotFoundError, match="no such LoRA file"):
    pipe.load_lora(os.path.join(path, "missing.safetensors"))


def test_other_adapter_kinds_are_refused_even_when_unmatched_keys_are_ignored(setup):
  """A lora_B bias or LyCORIS' extra tensors change how their layers' factors apply: strict=False must not drop them
  and load those layers as plain LoRA (silently wrong). (DoRA's magnitudes load: tests/test_lora_dora.py.)"""
  path, files, _, pipe, _ = setup
  sd, _ = lora.read(files["peft_a"])
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  kohya = f"lora_unet_{module.replace('.', '_')}"
  others = {  # (LyCORIS' full and norm layers load: tests/test_lora_lycoris.py)
      f"unet.{module}.lora_B.bias": "bias",
      f"{kohya}.bias": "weight-shaped",
      f"{kohya}.on_input": r"\(IA\)\^3",
  }
  for extra, kind in others.items():
    with pytest.raises(ValueError, match=rf"{kind}.*not supported.*{re.escape(extra)}"):
      lora.from_state_dict(dict(sd, **{extra: np.ones((32,), np.float32)}), params, strict=False)


def test_a_folder_with_one_other_lora_file_loads_it(setup, tmp_path):
  """As diffusers' load_lora_weights(folder): without pytorch_lora_weights.safetensors its one .safetensors file
  (learned token embeddings aside); two candidates are refused, naming them, rather than one picked at random."""
  path, files, _, pipe, _ = setup
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  folder = tmp_path / "civitai_download"
  folder.mkdir()
  (folder / "my_style_v2.safetensors").write_bytes(open(files["kohya"], "rb").read())
  (folder / "learned_embeds.safetensors").write_bytes(b"")  # a textual-inversion run's other file
  reference.assert_same_adapter(lora.load(folder, params), lora.load(files["kohya"], params))
  (folder / "other.safetensors").write_bytes(b"")
  message = r"holds 2 .safetensors files and no pytorch_lora_weights.safetensors: pass the LoRA file itself \(my_st"
  with pytest.raises(ValueError, match=message):
    lora.load(folder, params)
