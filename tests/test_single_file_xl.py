"""StableDiffusionXL.from_single_file on the original (Stability / A1111 / ComfyUI) SDXL layout.

The tests write SDXL base and refiner single files from tiny diffusers folders (a U-Net whose transformer depth
differs per block), renaming the folders' state dicts back to the LDM names, and check each file with diffusers'
own single-file converters (they must give the folder's state dicts back), so the layout is diffusers'
understanding of it, not only the inverse of jaxsd's tables. The presets are checked at SDXL's real sizes against
diffusers' and transformers' networks built from them on PyTorch's meta device (no weights allocated).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as su
from flax import traverse_util

import jaxsd
from jaxsd import model_folder, pipeline_xl, pretrained, single_file, weights
from jaxsd.models import clip, unet as unet_model, vae as vae_model
from tests import reference

UNET, VAE, CLIP_L, BIG_G = "model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.", \
    "conditioner.embedders.1.model."
REFINER_BIG_G = "conditioner.embedders.0.model."


def _read(folder: str, name: str) -> dict:
  return dict(model_folder.read_state_dict(os.path.join(folder, name)))


def _with_text_model(sd: dict) -> dict:
  # transformers 5 saves a standalone CLIPTextModel without `text_model.`; the files and diffusers' converters have it
  return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}


def _assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]).reshape(want[k].shape), want[k], err_msg=k)


def ldm_file(folder: str, refiner: bool) -> dict:
  """The folder's weights as an SDXL single file (checked with diffusers' converters)."""
  configs = {name: model_folder.read_json(os.path.join(folder, name, "config.json")) for name in ("unet", "vae")}
  unet, vae, big_g = _read(folder, "unet"), _read(folder, "vae"), _with_text_model(_read(folder, "text_encoder_2"))
  ldm = {
      **reference.to_ldm(unet, single_file.unet_prefixes(configs["unet"]), UNET),
      **reference.to_ldm(vae, single_file.vae_prefixes(configs["vae"]), VAE, unsqueeze_attention=True),
      **reference.to_open_clip(big_g, REFINER_BIG_G if refiner else BIG_G),
      "model_ema.decay": np.float32(0.9999),  # keys of no network are ignored
  }
  assert any(k.startswith(UNET + "label_emb.0.") for k in ldm)
  if not refiner:
    clip_l = _with_text_model(_read(folder, "text_encoder"))
    ldm.update({CLIP_L + k: v for k, v in clip_l.items()})
  # diffusers' converters read this file back into the folder's state dicts: it is the SDXL single-file layout.
  torch_ldm = {k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()}
  _assert_same(su.convert_ldm_unet_checkpoint(torch_ldm, configs["unet"]), unet)
  _assert_same(su.convert_ldm_vae_checkpoint(torch_ldm, configs["vae"]), vae)
  text_model = transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder_2")))
  _assert_same(su.convert_open_clip_checkpoint(text_model, torch_ldm, REFINER_BIG_G if refiner else BIG_G), big_g)
  if not refiner:
    _assert_same(su.convert_ldm_clip_checkpoint(torch_ldm), clip_l)
  return ldm


def tiny_sdxl_folders(root: str) -> dict[str, str]:
  """`reference.make_tiny_sdxl_folders`' base and refiner (a U-Net of transformer depth 1 and 2 per block) with a
  second text encoder wider than the first (48 against 32) and a projection of another width (40), as SDXL's
  (768, 1280, 1280): diffusers' from_single_file tells the two encoders apart by width, and a (width, dim) projection
  read the wrong way round fails on its shape."""
  import diffusers

  c = reference.tiny_sdxl_components()
  torch.manual_seed(1)
  c["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=37, num_hidden_layers=3,
                                  num_attention_heads=4, max_position_embeddings=77, projection_dim=40,
                                  bos_token_id=49406, pad_token_id=1, hidden_act="gelu", eos_token_id=49407))
  # 32 + 48 text features; 40 pooled + 6 (base) or 5 (refiner) time ids of 8 Fourier features each
  c["unet"] = diffusers.UNet2DConditionModel.from_config(c["unet"].config, cross_attention_dim=80,
                                                         projection_class_embeddings_input_dim=40 + 6 * 8)
  c["refiner_unet"] = diffusers.UNet2DConditionModel.from_config(c["refiner_unet"].config, cross_attention_dim=48,
                                                                 projection_class_embeddings_input_dim=40 + 5 * 8)
  with torch.no_grad():  # default inits zero some layers: perturb everything so that every weight matters
    for m in (c["text_encoder_2"], c["unet"], c["refiner_unet"]):
      for p in m.parameters():
        p.add_(0.05 * torch.randn_like(p))
  shared = dict(vae=c["vae"], text_encoder_2=c["text_encoder_2"].eval(), tokenizer_2=c["tokenizer_2"],
                scheduler=c["scheduler"], add_watermarker=False)
  pipes = {
      "base":
          diffusers.StableDiffusionXLPipeline(text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                              unet=c["unet"].eval(), force_zeros_for_empty_prompt=True, **shared),
      "refiner":
          diffusers.StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, unet=c["refiner_unet"].eval(),
                                                     requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                     **shared),
  }
  folders = {}
  for name, pipe in pipes.items():
    folders[name] = os.path.join(root, name)
    pipe.save_pretrained(folders[name])
    with open(os.path.join(folders[name], "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(reference.SDXL_SCHEDULER, f)  # the released folders' (keys Euler ignores too)
  return folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  folders = tiny_sdxl_folders(str(tmp_path_factory.mktemp("single_xl")))
  unet = model_folder.read_json(os.path.join(folders["base"], "unet", "config.json"))
  assert unet["transformer_layers_per_block"] == [1, 2] and unet["cross_attention_dim"] == 80
  return folders


@pytest.fixture(scope="module", params=["base", "refiner"])
def folder_and_file(request, folders):
  folder = folders[request.param]
  path = os.path.join(os.path.dirname(folder), f"{request.param}.safetensors")
  model_folder.write_safetensors({
      k: np.asarray(v) for k, v in ldm_file(folder, request.param == "refiner").items()
  }, path)
  return folder, path, request.param == "refiner"


def test_single_file_loads_the_folders_weights(folder_and_file):
  folder, path, refiner = folder_and_file
  want = jaxsd.StableDiffusionXL.from_pretrained(folder)
  got = jaxsd.StableDiffusionXL.from_single_file(path, config=folder)
  names = ("unet_params", "vae_params", "text_encoder_2_params") + (() if refiner else ("text_encoder_params",))
  for name in names:
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  assert (got.text_encoder is None) == refiner and got.unet.config == want.unet.config
  assert got.scheduler_config == want.scheduler_config and got.scheduler_class == "EulerDiscreteScheduler"
  assert (got.requires_aesthetics_score, got.force_zeros_for_empty_prompt) == (refiner, not refiner)
  assert got.tokenizer_2.pad_token == want.tokenizer_2.pad_token == "!"
  assert single_file.guess_config(single_file.read(path)) == ("xl-refiner" if refiner else "xl")
  # "auto" reads it with the SDXL 1.0 preset, whose sizes the tiny file does not have: every mismatch is named.
  with pytest.raises(weights.WeightLoadError, match=r"(?s)safetensors \(U-Net\): checkpoint does not match.*shape"):
    jaxsd.StableDiffusionXL.from_single_file(path)


def test_diffusers_from_single_file_reads_the_same_weights(folder_and_file):
  """diffusers' own StableDiffusionXLPipeline.from_single_file (the Img2Img pipeline for the refiner), given the
  folder as its config, reads the file into the same weights and pipeline settings as jaxsd."""
  import diffusers

  folder, path, refiner = folder_and_file
  cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
  theirs = cls.from_single_file(path, config=folder, local_files_only=True)
  ours = jaxsd.StableDiffusionXL.from_single_file(path, config=folder)
  for name in ("unet", "vae", "text_encoder_2") + (() if refiner else ("text_encoder",)):
    want = {k: v.numpy() for k, v in getattr(theirs, name).state_dict().items() if not k.endswith("position_ids")}
    got = weights.params_to_state_dict(getattr(ours, name + "_params"))
    if name.startswith("text_encoder"):
      want, got = _with_text_model(want), _with_text_model(got)
    _assert_same(got, want)
  assert (theirs.text_encoder is None) == (ours.text_encoder is None) == refiner
  for flag in ("requires_aesthetics_score", "force_zeros_for_empty_prompt"):
    assert bool(theirs.config.get(flag)) == getattr(ours, flag), flag
  assert theirs.tokenizer_2.pad_token == ours.tokenizer_2.pad_token == "!"


def test_auto_reads_with_the_preset(folder_and_file, monkeypatch):
  """With the preset's networks made the tiny folder's, "auto" gives the folder's model: what a preset brings
  besides the network sizes (the shipped vocabulary, "!" padding for the second tokenizer, Euler, the base's zero
  unconditional embeddings, the refiner's aesthetic score) is the released folders'."""
  folder, path, refiner = folder_and_file
  name = "xl-refiner" if refiner else "xl"
  tiny = single_file.preset_xl(name)
  for net in tiny:
    if net not in ("scheduler", "model_index"):
      tiny[net] = model_folder.read_json(os.path.join(folder, net, "config.json"))
  monkeypatch.setitem(single_file.XL_PRESETS, name, tiny)
  got = jaxsd.StableDiffusionXL.from_single_file(path)
  want = jaxsd.StableDiffusionXL.from_pretrained(folder)
  for attr in ("unet_params", "vae_params", "text_encoder_2_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, attr), getattr(want, attr))
  assert got.scheduler_config == want.scheduler_config and got.scheduler_class == want.scheduler_class
  for flag in ("requires_aesthetics_score", "force_zeros_for_empty_prompt", "default_sampler"):
    assert getattr(got, flag) == getattr(want, flag), flag
  assert got.model_index["_class_name"] == want.model_index["_class_name"]
  for t in ("tokenizer", "tokenizer_2"):
    if not (refiner and t == "tokenizer"):
      assert getattr(got, t).pad_token == getattr(want, t).pad_token, t
      assert getattr(got, t)(["a cat"]).input_ids == getattr(want, t)(["a cat"]).input_ids
  prompts = ["a red circle"]
  kw = dict(steps=2, seed=1, output="latent")
  if refiner:
    image = np.full((1, 16, 16, 3), 128, np.uint8)
    np.testing.assert_array_equal(got.img2img(prompts, image, strength=0.6, **kw),
                                  want.img2img(prompts, image, strength=0.6, **kw))
  else:
    np.testing.assert_array_equal(got(prompts, height=16, width=16, **kw), want(prompts, height=16, width=16, **kw))


def test_guess_config_and_refusals(folders, folder_and_file, tmp_path):
  """As diffusers' infer_diffusers_model_type: a second text encoder under conditioner.embedders.1 is SDXL base
  (xl_inpaint with a 9-channel U-Net), OpenCLIP alone under conditioner.embedders.0 the refiner; SD files keep
  their presets. Each loader refuses the other's files, and a file that is not the configs' kind is named."""
  one = np.ones(4, np.float32)
  base = {CLIP_L + "text_model.final_layer_norm.weight": one, BIG_G + "ln_final.weight": one}
  for channels, name in ((4, "xl"), (9, "xl-inpainting")):
    conv_in = {single_file.CONV_IN: np.zeros((320, channels, 3, 3), np.float32)}
    assert single_file.guess_config({**base, **conv_in}) == name
    assert single_file.preset_xl(name)["unet"]["in_channels"] == channels
  assert single_file.guess_config({REFINER_BIG_G + "text_projection": one}) == "xl-refiner"
  assert single_file.guess_config({"cond_stage_model.model.ln_final.weight": one}) == "v2"
  with pytest.raises(ValueError, match="Playground v2.5"):
    single_file.guess_config({**base, "edm_mean": one})
  with pytest.raises(ValueError, match="config='xl' is an SDXL preset: .*StableDiffusionXL.from_single_file"):
    single_file.preset("xl")
  with pytest.raises(ValueError, match="config='v1': choose one of xl, xl-refiner, xl-inpainting"):
    single_file.preset_xl("v1")

  folder, path, refiner = folder_and_file
  with pytest.raises(ValueError, match="is an SDXL preset"):
    jaxsd.StableDiffusion.from_single_file(path, config="auto")
  sd_file = str(tmp_path / "sd1.safetensors")
  model_folder.write_safetensors({"cond_stage_model.transformer.text_model.final_layer_norm.weight": one}, sd_file)
  with pytest.raises(ValueError, match="is a Stable Diffusion 1.x / 2.x single file \\(v1\\), not SDXL's"):
    jaxsd.StableDiffusionXL.from_single_file(sd_file)
  other = folders["base" if refiner else "refiner"]
  missing = "text_encoder, text_encoder_2 weights" if refiner else "text_encoder_2 weights"
  with pytest.raises(ValueError, match=f"has no {missing} .* full SDXL {'base' if refiner else 'refiner'} checkpoint"):
    jaxsd.StableDiffusionXL.from_single_file(path, config=other)


def _torch_layout_shapes(params) -> dict[str, tuple[int, ...]]:
  """{torch key: shape in PyTorch's layout} of a (possibly abstract) jaxsd parameter tree."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    out[weights.path_to_torch_key(path)] = shape
  return out


JAXSD = {
    "unet": (unet_model.UNet2DConditionModel, unet_model.UNet2DConditionConfig),
    "vae": (vae_model.AutoencoderKL, vae_model.AutoencoderKLConfig),
    "text_encoder": (clip.CLIPTextModel, clip.CLIPTextConfig),
    "text_encoder_2": (clip.CLIPTextModelWithProjection, clip.CLIPTextConfig),
}


def _meta(build):
  with torch.device("meta"):
    return build()


@pytest.mark.parametrize("name", ["xl", "xl-refiner"])
def test_presets_are_sdxl_1_0_at_full_size(name):
  """Each preset's networks as diffusers and transformers build them from the same configs (on the meta device: no
  2.6B parameters allocated), against jaxsd's abstract parameters (`jax.eval_shape`): equal names and shapes. Then
  a file of SDXL's full key set, made from diffusers' state dicts and checked with diffusers' converters, is split
  by the preset into exactly those state dicts (every key, every shape)."""
  import diffusers

  p = single_file.preset_xl(name)
  reference_nets = {
      "unet":
          _meta(lambda: diffusers.UNet2DConditionModel(**p["unet"])),
      "vae":
          _meta(lambda: diffusers.AutoencoderKL(**p["vae"])),
      "text_encoder_2":
          _meta(lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**p["text_encoder_2"]))),
  }
  if "text_encoder" in p:
    reference_nets["text_encoder"] = _meta(
        lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**p["text_encoder"])))
  assert ("text_encoder" in p) == (name == "xl")
  state = {}
  for net, model in reference_nets.items():
    for k, v in p[net].items():  # the preset's settings are what diffusers / transformers read from them
      if not k.startswith("_") and k not in ("architectures", "model_type"):
        got = model.config[k] if net in ("unet", "vae") else getattr(model.config, k)
        assert (list(got) if isinstance(got, tuple) else got) == v, (net, k)
    state[net] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if net.startswith("text_encoder"):
      state[net] = _with_text_model(state[net])
    module_cls, config_cls = JAXSD[net]
    module = module_cls(config_cls.from_dict(p[net]))
    ours = _torch_layout_shapes(pretrained.abstract_params(module))
    assert ours == state[net], net
  if name == "xl":  # the published size of SDXL 1.0's U-Net
    assert sum(int(np.prod(s)) for s in state["unet"].values()) == 2_567_463_684

  # The full key set as a file (values of no memory: zero-stride arrays), and diffusers' reading of it.
  zeros = lambda shapes: {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  ldm = {
      **reference.to_ldm(zeros(state["unet"]), single_file.unet_prefixes(p["unet"]), UNET),
      **reference.to_ldm(zeros(state["vae"]), single_file.vae_prefixes(p["vae"]), VAE, unsqueeze_attention=True),
      **reference.to_open_clip(zeros(state["text_encoder_2"]), BIG_G if name == "xl" else REFINER_BIG_G),
  }
  if name == "xl":
    ldm.update({CLIP_L + k: v for k, v in zeros(state["text_encoder"]).items()})
  assert single_file.guess_config(ldm) == name
  torch_ldm = {k: torch.empty(np.shape(v), device="meta") for k, v in ldm.items()}
  assert {k: tuple(v.shape) for k, v in su.convert_ldm_unet_checkpoint(torch_ldm, p["unet"]).items()} == state["unet"]
  got = su.convert_open_clip_checkpoint(reference_nets["text_encoder_2"], torch_ldm,
                                        BIG_G if name == "xl" else REFINER_BIG_G)
  assert {k: tuple(v.shape) for k, v in got.items()} == state["text_encoder_2"]
  parts = single_file.split_xl(ldm, p)
  assert sorted(parts) == sorted(state)
  for net, part in parts.items():
    assert {k: np.shape(part[k]) for k in part} == state[net], net


def test_the_sample_command_reads_an_sdxl_single_file(folders, tmp_path, capsys):
  """`python -m sample --model FILE.safetensors`: an SDXL file goes to StableDiffusionXL.from_single_file ("auto" picks
  the SDXL 1.0 preset, which the tiny file fails on its sizes; a pickled copy with --allow-pickle too), read as a
  folder it writes its images."""
  folder = folders["base"]
  path = str(tmp_path / "tiny_xl.safetensors")
  ldm = {k: np.asarray(v) for k, v in ldm_file(folder, refiner=False).items()}
  model_folder.write_safetensors(ldm, path)
  got = pipeline_xl.load(path, single_file_config=folder)
  assert isinstance(got, jaxsd.StableDiffusionXL)
  jax.tree.map(np.testing.assert_array_equal, got.unet_params,
               jaxsd.StableDiffusionXL.from_pretrained(folder).unet_params)
  with pytest.raises(weights.WeightLoadError, match=r"tiny_xl.safetensors \(U-Net\)"):
    pipeline_xl.load(path)
  ckpt = str(tmp_path / "tiny_xl.ckpt")
  torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in ldm.items()}}, ckpt)
  with pytest.raises(weights.WeightLoadError, match=r"tiny_xl.ckpt \(U-Net\)"):
    pipeline_xl.load(ckpt, allow_pickle=True)
  reference.assert_sample_command_reads(path, folder, tmp_path / "out", capsys)


def test_a_file_without_its_vae_takes_one_given_apart(folders, tmp_path):
  """Some SDXL checkpoints ship without the VAE (no first_stage_model. keys): refused with what to do, and read with
  vae= (a VAE folder; `pipeline_xl.load(..., vae=)` and --vae on the command line) as diffusers'
  from_single_file(..., vae=...) reads it: the same parameters as the whole folder's."""
  folder = folders["base"]
  sd = {k: np.asarray(v) for k, v in ldm_file(folder, False).items() if not k.startswith("first_stage_model.")}
  path = str(tmp_path / "no_vae.safetensors")
  model_folder.write_safetensors(sd, path)
  with pytest.raises(ValueError, match=r"no VAE weights .*vae=<a VAE folder.*--vae on the command line"):
    jaxsd.StableDiffusionXL.from_single_file(path, config=folder)
  want = jaxsd.StableDiffusionXL.from_pretrained(folder)
  for got in (jaxsd.StableDiffusionXL.from_single_file(path, config=folder, vae=os.path.join(folder, "vae")),
              jaxsd.pipeline_xl.load(path, single_file_config=folder, vae=os.path.join(folder, "vae"))):
    for name in ("unet_params", "vae_params", "text_encoder_params", "text_encoder_2_params"):
      jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
